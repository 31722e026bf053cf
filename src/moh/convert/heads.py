"""Head splits of a converted model and the rule that chooses its shared heads.

A split is, per layer, (num_shared, top_k): the first ``num_shared`` heads of a moh layer are used
by every token, the top ``top_k`` of the others are routed. ``--heads 75%`` keeps
``round(0.75 * H)`` heads per token (SmolLM2: 7 of 9), split by ``default_split``; ``--heads 100%``
keeps every head; ``--layer-heads`` gives each layer's ``S:K``.

Which heads are shared (``shared_order``): moh's shared heads are positions ``0..S-1``, and a
query head reads key/value head ``h // (H / G)``, so the pretrained heads are *reordered* so the
chosen ones come first. Reordering moves whole key/value groups and query heads within a group,
so the model computes the same function (exactly: a permutation of the heads' sum). The rule:
with calibration statistics (mean contribution size ``m_h = E ||head_h(x) W_O^h||`` per head),
the ``S // P`` key/value groups with the largest summed ``m`` (P query heads per group) become
the first groups, each ordered by ``m``; when ``S % P`` heads remain, the next group is the
remaining one whose top ``S % P`` heads have the largest ``m``, those heads first. Without
statistics the original order is kept (the first S heads are shared, as in the paper).
"""
from __future__ import annotations

import json
import math
import re
from typing import Optional, Sequence

import torch
from torch import Tensor

_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


def default_split(active: int, num_heads: int, heads_per_group: int) -> tuple[int, int]:
    """(S, K) for ``active`` heads per token: S = half of them, rounded down to whole key/value
    groups when at least one group fits (SmolLM2 at 7 of 9: 3 shared + top-4 of 6)."""
    if not 1 <= active <= num_heads:
        raise ValueError(f"active heads={active} must be in [1, num_heads={num_heads}]")
    shared = active // 2
    if shared >= heads_per_group:
        shared -= shared % heads_per_group
    return shared, active - shared


def parse_heads(spec: str, num_heads: int) -> int:
    """Active heads per token from ``"75%"`` (rounded to the nearest head, at least 1) or ``"7"``."""
    m = _PERCENT.match(str(spec))
    if m:
        frac = float(m.group(1)) / 100
        if not 0 < frac <= 1:
            raise ValueError(f"--heads {spec!r} must be a percentage in (0, 100]")
        return max(1, min(num_heads, math.floor(frac * num_heads + 0.5)))
    if str(spec).strip().isdigit():
        n = int(spec)
        if not 1 <= n <= num_heads:
            raise ValueError(f"--heads {spec!r} must be between 1 and num_heads={num_heads}")
        return n
    raise ValueError(f"--heads {spec!r}: give a percentage like 75% or a head count like 7")


def parse_layer_heads(spec: str | Sequence, depth: int, num_heads: int) -> list[tuple[int, int]]:
    """Per-layer (S, K) from ``"3:4"`` (every layer), ``"3:4,3:4,..."`` (``depth`` entries) or a
    JSON / Python list ``[[3, 4], ...]``."""
    if isinstance(spec, str):
        text = spec.strip()
        if text.startswith("["):
            try:
                entries = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"--layer-heads {spec!r} is not a JSON list: {e}") from None
        else:
            entries = []
            for part in text.split(","):
                s, sep, k = part.partition(":")
                if not sep or not s.strip().isdigit() or not k.strip().isdigit():
                    raise ValueError(f"--layer-heads {spec!r}: entry {part!r} must look like S:K (e.g. 3:4)")
                entries.append([int(s), int(k)])
    else:
        entries = list(spec)
    if not isinstance(entries, list) or not all(isinstance(e, (list, tuple)) for e in entries):
        raise ValueError(f"--layer-heads {spec!r}: give S:K pairs, e.g. 3:4 or [[3, 4], [2, 5]]")
    entries = [list(e) for e in entries]
    if len(entries) == 1:
        entries = entries * depth
    if len(entries) != depth:
        raise ValueError(f"--layer-heads has {len(entries)} entries; the model has {depth} layers (or give one S:K)")
    out = []
    for i, e in enumerate(entries):
        if len(e) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in e) or e[0] + e[1] < 1 or e[0] + e[1] > num_heads:
            raise ValueError(f"--layer-heads entry {i}={e!r}: need S:K with 1 <= S + K <= num_heads={num_heads}")
        out.append((int(e[0]), int(e[1])))
    return out


def shared_order(mean_H: Optional[Tensor], num_shared: int, num_heads: int, num_kv_heads: int) -> list[int]:
    """New head position j -> original head index (see the module doc); identity without stats."""
    P = num_heads // num_kv_heads
    if mean_H is None or num_shared == 0:
        return list(range(num_heads))
    m = [float(v) for v in mean_H]
    groups = [list(range(g * P, (g + 1) * P)) for g in range(num_kv_heads)]
    by_m = lambda heads: sorted(heads, key=lambda h: (-m[h], h))  # noqa: E731
    full, rest = divmod(num_shared, P)
    ranked = sorted(range(num_kv_heads), key=lambda g: (-sum(m[h] for h in groups[g]), g))
    first = ranked[:full]
    order = [h for g in first for h in by_m(groups[g])]
    left = [g for g in range(num_kv_heads) if g not in first]
    if rest:
        part = min(left, key=lambda g: (-sum(m[h] for h in by_m(groups[g])[:rest]), g))
        order += by_m(groups[part])
        left.remove(part)
    order += [h for g in left for h in groups[g]]
    return order


def check_order(order: Sequence[int], num_heads: int, num_kv_heads: int) -> list[int]:
    """The key/value group order implied by a head order; ValueError when the order splits a group."""
    P = num_heads // num_kv_heads
    if sorted(order) != list(range(num_heads)):
        raise ValueError(f"head order {list(order)} is not a permutation of 0..{num_heads - 1}")
    groups = []
    for c in range(num_kv_heads):
        g = {h // P for h in order[c * P:(c + 1) * P]}
        if len(g) != 1:
            raise ValueError(f"head order {list(order)} mixes key/value groups {sorted(g)} at positions "
                             f"{c * P}..{(c + 1) * P - 1}")
        groups.append(g.pop())
    return groups


def permute_layer(sd: dict[str, Tensor], prefix: str, order: Sequence[int], num_heads: int, num_kv_heads: int,
                  head_dim: int) -> None:
    """Reorder one attention layer's heads in place in state dict ``sd`` (keys ``prefix`` +
    ``q_proj.weight`` ...): query rows and output columns by ``order``, key/value rows by group."""
    if list(order) == list(range(num_heads)):
        return
    groups = check_order(order, num_heads, num_kv_heads)
    q_idx = torch.tensor(list(order))
    kv_idx = torch.tensor(groups)

    def rows(key: str, idx: Tensor, n: int) -> None:
        if key in sd:
            t = sd[key]
            sd[key] = t.reshape(n, head_dim, *t.shape[1:])[idx].reshape(t.shape).contiguous()

    for name in ("weight", "bias"):
        rows(f"{prefix}q_proj.{name}", q_idx, num_heads)
        rows(f"{prefix}k_proj.{name}", kv_idx, num_kv_heads)
        rows(f"{prefix}v_proj.{name}", kv_idx, num_kv_heads)
    w = sd[f"{prefix}o_proj.weight"]  # (D, H * hd)
    sd[f"{prefix}o_proj.weight"] = w.reshape(w.shape[0], num_heads, head_dim)[:, q_idx].reshape(w.shape).contiguous()


__all__ = ["default_split", "parse_heads", "parse_layer_heads", "shared_order", "check_order", "permute_layer"]
