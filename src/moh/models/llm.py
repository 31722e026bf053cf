"""MoH decoder language model (LLaMA-style: RMSNorm, RoPE, SwiGLU, grouped-query attention),
the seed of the MoH-LLM family. Attention is MoHAttention with causal masking and a KV cache.

Shape legend: B batch, T tokens, V vocabulary, D width.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moh.config import MoHConfig
from moh.core.attention import MoHAttention
from moh.core.cache import LayerCaches
from moh.layers.block import Block
from moh.layers.mlp import SwiGLU
from moh.layers.norm import RMSNorm
from moh.models.base import HeadSpec, ModelOutput, finish_output
from moh.models.factory import MODELS


@dataclass
class DecoderConfig(HeadSpec):
    vocab_size: int = 256
    max_seq_len: int = 512
    dim: int = 128
    depth: int = 4
    mlp_hidden: Optional[int] = None  # None: about 8/3 * dim, rounded up to a multiple of 32
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True

    def attention_configs(self) -> list[MoHConfig]:
        return self.layer_configs(self.dim, self.depth, causal=True, rope=True, rope_theta=self.rope_theta)

    @property
    def hidden(self) -> int:
        return self.mlp_hidden or 32 * -(-int(8 * self.dim / 3) // 32)

    def build(self) -> "Decoder":
        return Decoder(self)


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.dim
        self.embed = nn.Embedding(cfg.vocab_size, D)
        self.blocks = nn.ModuleList(
            Block(MoHAttention(a), SwiGLU(D, cfg.hidden), RMSNorm(D, cfg.norm_eps), RMSNorm(D, cfg.norm_eps))
            for a in cfg.attention_configs()
        )
        self.norm = RMSNorm(D, cfg.norm_eps)
        self.lm_head = nn.Linear(D, cfg.vocab_size, bias=False)
        self.apply(_init_weights)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        cache: Optional[LayerCaches] = None,
        positions: Optional[Tensor] = None,
    ) -> ModelOutput:
        """input_ids (B, T). ``labels`` (B, T) are the input ids themselves (or -100 where no loss):
        position t's logits predict labels[t + 1]. ``attention_mask`` (B, S) 1/True for real tokens
        (S = cached + new). ``cache``: a ``LayerCaches`` for incremental decoding."""
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if past + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {past + T} exceeds max_seq_len={self.cfg.max_seq_len}")
        if positions is None and attention_mask is not None:
            # left padding: positions count real tokens only, so padded prompts match unpadded ones
            positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, past:]
        x = self.embed(input_ids)
        routings = []
        for i, blk in enumerate(self.blocks):
            x, r = blk(x, attention_mask, cache[i] if cache is not None else None, positions)
            routings.append(r)
        logits = self.lm_head(self.norm(x))  # (B, T, V)
        task_loss = None
        if labels is not None:
            task_loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        token_mask = None if attention_mask is None else attention_mask[:, past:].bool()
        out = ModelOutput(logits=logits, task_loss=task_loss, routings=routings, token_mask=token_mask, cache=cache)
        return finish_output(out, self.cfg.aux_loss_coef, labels, B)

    def new_cache(self, capacity: int = 256) -> LayerCaches:
        return LayerCaches(len(self.blocks), capacity)

    @torch.no_grad()
    def generate(
        self, input_ids: Tensor, max_new_tokens: int, temperature: float = 0.0, generator: Optional[torch.Generator] = None
    ) -> Tensor:
        """Greedy (temperature 0) or sampled continuation with the KV cache; returns (B, T + new)."""
        cache = self.new_cache(input_ids.shape[1] + max_new_tokens)
        out = self(input_ids, cache=cache)
        ids = input_ids
        for _ in range(max_new_tokens):
            logits = out.logits[:, -1]
            if temperature > 0:
                nxt = torch.multinomial(F.softmax(logits / temperature, -1), 1, generator=generator)
            else:
                nxt = logits.argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            out = self(nxt, cache=cache)
        return ids


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, std=0.02)


def _register(name: str, **kw) -> None:
    MODELS.register(name)(lambda: DecoderConfig(**kw))


# tiny decoders (the demo's and the tests'): 8 heads of width 16
_TINY = dict(vocab_size=256, max_seq_len=512, dim=128, depth=4, num_heads=8)
_register("llm-tiny-mha", router="all", **_TINY)
_register("moh-llm-tiny-75", num_shared=2, top_k=4, **_TINY)
_register("moh-llm-tiny-50", num_shared=2, top_k=2, **_TINY)

# the demo's decoders (moh demo, in-context recall): 2 layers are the fewest that can learn MQAR
# (an induction circuit); 8 heads of width 16 so 75% = 2 shared + top-4 of 6, 50% = 2 + top-2
_DEMO = dict(vocab_size=64, max_seq_len=1024, dim=64, depth=2, num_heads=8, head_dim=16)
_register("llm-demo-mha", router="all", **_DEMO)
_register("moh-llm-demo-75", num_shared=2, top_k=4, **_DEMO)
_register("moh-llm-demo-50", num_shared=2, top_k=2, **_DEMO)
