"""``moh generate RUN_OR_MODEL_DIR --prompt "..." [--max-new-tokens N] [--temperature T] [--top-p P]
[--top-k K] [--num-beams B] [--seed S] [--backend sparse]``: text from a moh language model, printed
as it is produced (transformers' ``TextStreamer``; beam search prints the best beam at the end).

The directory is a training run of a language model (``moh train configs/llm-*.yaml``) or any
directory ``save_pretrained`` wrote, with its tokenizer. ``--temperature 0`` (the default) is
greedy decoding; above 0 it samples, with ``--top-p`` / ``--top-k`` when given. The prompt is
encoded as the tokenizer does; when that adds no special token and the tokenizer has an eos token,
the eos token is put in front: moh's token files separate documents with it, so the model reads
the prompt as the start of a document. Every argument and file is checked before the model runs
(one error naming the value); nothing is written.
"""
from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from moh.backends import BACKENDS

    p.add_argument("model_dir", metavar="RUN_OR_MODEL_DIR", help="a language-model run directory or a saved model")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=50, help="tokens to generate (default 50)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sampling temperature")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep the most likely tokens up to P")
    p.add_argument("--top-k", type=int, default=None, help="sampling: keep the K most likely tokens")
    p.add_argument("--num-beams", type=int, default=1, help="beam search with B beams (default 1: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")
    p.add_argument("--backend", default="sparse", choices=BACKENDS.names(), help="attention backend (default: sparse)")


def check_args(args: argparse.Namespace) -> None:
    """ValueError naming the first argument that cannot work."""
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    if not args.temperature >= 0 or args.temperature == float("inf"):
        raise ValueError(f"--temperature={args.temperature} must be a finite number >= 0 (0: greedy)")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p={args.top_p} must be in (0, 1]")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k={args.top_k} must be >= 1")
    if args.num_beams < 1:
        raise ValueError(f"--num-beams={args.num_beams} must be >= 1")
    if args.temperature == 0 and (args.top_p is not None or args.top_k is not None):
        raise ValueError(f"--top-p / --top-k shape sampling: give --temperature > 0 with them "
                         f"(got --temperature={args.temperature})")
    if not args.prompt.strip():
        raise ValueError(f"--prompt={args.prompt!r} is empty")


def encode_prompt(tokenizer, prompt: str):
    """(1, T) ids of ``prompt`` (see the module doc for the leading eos)."""
    import torch

    ids = tokenizer(prompt, return_tensors="pt").input_ids
    plain = tokenizer(prompt, add_special_tokens=False).input_ids
    if ids.shape[1] == len(plain) and tokenizer.eos_token_id is not None:
        ids = torch.cat([torch.tensor([[tokenizer.eos_token_id]]), ids], dim=1)
    return ids


def generation_kwargs(args: argparse.Namespace, tokenizer, max_new_tokens: int) -> dict:
    kw = dict(max_new_tokens=max_new_tokens, num_beams=args.num_beams,
              pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    if args.temperature > 0:
        kw.update(do_sample=True, temperature=args.temperature, top_p=args.top_p or 1.0, top_k=args.top_k or 0)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kw


def fit_context(prompt_len: int, max_new_tokens: int, context: int) -> int:
    """``max_new_tokens``, shortened to what fits the model's context after the prompt; a prompt
    that does not leave room for one new token is a ValueError naming both lengths."""
    if prompt_len >= context:
        raise ValueError(f"the prompt is {prompt_len} tokens; the model's context is {context} "
                         f"(max_position_embeddings), with room for at least one new token")
    if prompt_len + max_new_tokens > context:
        log.warning("--max-new-tokens=%d shortened to %d: the prompt (%d tokens) and the new tokens must fit the "
                    "model's context of %d", max_new_tokens, context - prompt_len, prompt_len, context)
        return context - prompt_len
    return max_new_tokens


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer
    from transformers.utils import logging as hf_logging

    from moh.core.attention import set_backend
    from moh.hf.run import load_model_dir

    check_args(args)
    hf_logging.disable_progress_bar()
    model, tokenizer = load_model_dir(args.model_dir)
    set_backend(model, args.backend)
    ids = encode_prompt(tokenizer, args.prompt)
    new = fit_context(ids.shape[1], args.max_new_tokens, model.config.max_position_embeddings)
    torch.manual_seed(args.seed)
    stream = args.num_beams == 1
    streamer = TextStreamer(tokenizer, skip_special_tokens=True) if stream else None
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                             **generation_kwargs(args, tokenizer, new))
    if not stream:
        print(tokenizer.decode(out[0], skip_special_tokens=True))
    return 0
