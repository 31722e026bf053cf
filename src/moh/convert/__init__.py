"""Continue-tuning pretrained Hugging Face models into MoH: ``moh convert SRC OUT``.

``convert(src, heads="75%", router="calibrated", calibrate=TEXT)`` reads a LLaMA / Mistral / Qwen2
causal LM (a directory, a GGUF file or a hub id), keeps its weights, reorders each layer's heads
so the shared ones come first, and returns a ``Conversion`` (the ``MoHForCausalLM``, its tokenizer
and a report) whose ``save(out)`` writes a directory that ``AutoModelForCausalLM.from_pretrained``
loads once ``moh`` is imported. Modules: ``sources`` (reading), ``families`` (config and tensor
names), ``heads`` (splits, shared-head rule, reordering), ``calibrate`` (contribution statistics and
the router fit), ``convert`` (the steps), ``cli`` (the command).
"""
from moh.convert.convert import Conversion, convert
from moh.convert.families import FAMILIES, family_of, supported
from moh.convert.sources import Source, load_source

__all__ = ["Conversion", "convert", "Source", "load_source", "FAMILIES", "family_of", "supported"]
