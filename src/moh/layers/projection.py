"""The per-head query and output projections of an MoH layer, as backends see them.

A backend never touches the attention module or its weights. ``MoHAttention`` hands it a
``QueryProjection`` (queries of chosen heads, for all tokens or for chosen rows, after qk-norm and
RoPE) and an ``OutputProjection`` (sum over heads of gated head outputs times W_O^h, plus the bias
once). Both are built per call from the module's *current* submodules, so a projection replaced
after construction (a PEFT LoRA layer, a quantised or tensor-parallel linear) is what runs.

Two ways to compute, chosen by ``sliceable``:

* a plain ``nn.Linear`` (no forward override, no hooks, a dense weight): per-head slices of the
  weight, so only the selected (row, head) pairs are projected — the work MoH saves;
* any other module: the module itself on every row (queries) or on the dense, zero-filled head
  outputs (output projection). Exact for any module that is a function of its input rows, at the
  cost of the projection savings (attention is still skipped where unused).

Shape legend: B batch, T tokens, D model width, H heads, P heads of a group, M rows per head,
hd head width, n = B*T flattened rows.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moh.layers.rope import apply_rope


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` runs forward (pre-)hooks of its own, i.e. more than its forward."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def sliceable(module: nn.Module) -> bool:
    """True when ``module`` computes exactly ``F.linear(x, weight, bias)`` with a dense weight, so
    per-head slices of its weight give per-head slices of its output. (The weight is looked up in
    the module's parameters, not through ``nn.Module.__getattr__``: this runs a few times per
    layer call, decode steps included. A weight that is no registered parameter, e.g. a
    parametrization's, takes the path for any module.)"""
    return (
        isinstance(module, nn.Linear)
        and type(module).forward is nn.Linear.forward
        and not has_forward_hooks(module)
        and type(module._parameters.get("weight")) is nn.Parameter
    )


class QueryProjection:
    """Queries of one layer call: x (B, T, D) -> per-head queries (.., hd) after qk-norm and RoPE.

    ``raw()`` is the full projection (B, T, H, hd) before qk-norm/RoPE, made at most once (the
    ``query_norm`` router asks for it; once made, every query a backend asks for is a slice of
    it instead of a new projection). ``has_raw`` tells whether it was made."""

    def __init__(self, q_proj: nn.Module, x_BTD: Tensor, positions_BT: Tensor, num_heads: int, head_dim: int,
                 q_norm: Optional[nn.Module] = None, rotary: Optional[nn.Module] = None):
        self.proj, self.x, self.positions = q_proj, x_BTD, positions_BT
        self.num_heads, self.head_dim = num_heads, head_dim
        self.q_norm, self.rotary = q_norm, rotary
        self.sliceable = sliceable(q_proj)
        self._raw: Optional[Tensor] = None

    @property
    def has_raw(self) -> bool:
        return self._raw is not None

    def raw(self) -> Tensor:
        if self._raw is None:
            B, T, _ = self.x.shape
            self._raw = self.proj(self.x).view(B, T, self.num_heads, self.head_dim)
        return self._raw

    def heads(self, h0: int, h1: int, *, reuse: bool = True) -> Tensor:
        """Queries of heads h0..h1-1 for every token -> (B, T, P, hd). ``reuse=False`` projects
        anew even when ``raw()`` exists (the reference backend: the reuse is tested against it)."""
        if self.has_raw and reuse or not self.sliceable:
            q = self.raw()[:, :, h0:h1]
        else:
            H, hd, D = self.num_heads, self.head_dim, self.x.shape[-1]
            w = self.proj.weight.view(H, hd, D)[h0:h1].reshape(-1, D)
            b = None if self.proj.bias is None else self.proj.bias.view(H, hd)[h0:h1].reshape(-1)
            q = F.linear(self.x, w, b).unflatten(-1, (h1 - h0, hd))
        return self.finish(q)

    def finish(self, q_BTPd: Tensor) -> Tensor:
        """qk-norm and RoPE of raw queries (B, T, P, hd) of some heads for every token (a backend
        that projects queries itself, e.g. only the heads one decoded token uses)."""
        q = q_BTPd
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.rotary is None:
            return q
        # the tokens' own positions tensor, as the keys': RotaryEmbedding.cos_sin reuses its factors
        cos, sin = self.rotary.cos_sin(self.positions, q.dtype)
        return apply_rope(q, cos.unsqueeze(-2), sin.unsqueeze(-2))

    def rows(self, heads: list[int], tokens_BPM: Tensor, positions_BPM: Tensor) -> Tensor:
        """Queries of head ``heads[p]`` for tokens ``tokens_BPM[b, p]`` (indices within item b)
        -> (B, P, M, hd), after qk-norm and RoPE at ``positions_BPM``."""
        return self.rows_many([(heads, tokens_BPM, positions_BPM)])[0]

    def rows_many(self, groups: list[tuple[list[int], Tensor, Tensor]], cpu_kernels: bool = False) -> list[Tensor]:
        """``rows`` of several groups (heads, tokens_BPM, positions_BPM) at once: for a plain linear
        one autograd node for all of them, so the backward accumulates one input gradient, not one
        full-size gradient per group. ``cpu_kernels``: the products may run as moh's CPU kernels
        where the tensors allow (``OutputProjection.start``)."""
        B, T, D = self.x.shape
        H, hd = self.num_heads, self.head_dim
        offset = (torch.arange(B, device=self.x.device) * T)[:, None, None]
        if self.has_raw or not self.sliceable:
            raw = self.raw().reshape(B * T * H, hd)
            qs = []
            for heads, tokens_BPM, _ in groups:
                head = torch.tensor(heads, device=tokens_BPM.device)[None, :, None]
                flat = ((offset + tokens_BPM) * H + head).view(-1)
                qs.append(raw.index_select(0, flat).view(*tokens_BPM.shape, hd))
        else:
            qs = gather_matmuls(self.x.reshape(B * T, D), self.proj.weight.view(H, hd, D),
                                [(heads, offset + tokens_BPM) for heads, tokens_BPM, _ in groups], cpu_kernels)
            if self.proj.bias is not None:
                bias = self.proj.bias.view(H, hd)
                qs = [q + bias[heads][:, None] for q, (heads, _, _) in zip(qs, groups)]
        return [self._norm_rope(q, positions_BPM) for q, (_, _, positions_BPM) in zip(qs, groups)]

    def _norm_rope(self, q: Tensor, positions: Tensor) -> Tensor:
        """qk-norm and RoPE of queries q (..., hd); ``positions`` broadcast to q's leading shape."""
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.rotary is not None:
            cos, sin = self.rotary.cos_sin(positions, q.dtype)
            q = apply_rope(q, cos, sin)
        return q


class OutputProjection:
    """sum_h g_h * (head output h) W_O^h + bias, for head outputs given whole or by rows.

    ``dense(heads_BTHd)``: all heads at once, already gated (zeros for unused ones). For pieces,
    ``start(B, T)`` returns an accumulator: ``add_heads`` (heads h0..h1-1 for every token),
    ``add_rows`` (chosen rows of chosen heads), each with its gates, then ``finish()`` -> (B, T, D)
    with the bias added once."""

    def __init__(self, o_proj: nn.Module, num_heads: int, head_dim: int):
        self.proj, self.num_heads, self.head_dim = o_proj, num_heads, head_dim
        self.sliceable = sliceable(o_proj)

    def dense(self, heads_BTHd: Tensor) -> Tensor:
        return self.proj(heads_BTHd.flatten(-2))

    def start(self, B: int, T: int, cpu_kernels: bool = False) -> "_Accumulator":
        """``cpu_kernels``: the products of pieces given by rows may run as moh's CPU kernels
        (``moh.kernels.cpu.scatter_mm`` / ``gather_mm``) where the tensors allow (fp32 CPU, no
        autocast): the sparse backend's choice (its tuning)."""
        if not self.sliceable:
            return _DenseHeads(self, B, T)
        return _SlicedSum(self, B, T, cpu_kernels)


class _SlicedSum:
    """Plain linear W_O: every piece is gated and projected with its heads' weight columns into
    the (n, D) output, all pieces in one autograd node (``_GatedOutput``): no work for unused
    (row, head) pairs, no gated or projected copy of a piece kept for backward."""

    def __init__(self, op: OutputProjection, B: int, T: int, cpu_kernels: bool = False):
        self.op, self.B, self.T, self.cpu_kernels = op, B, T, cpu_kernels
        self.pieces: list[tuple] = []  # ("heads", h0, h1) or ("rows", heads) with their tensors
        self.tensors: list[Tensor] = []

    def add_heads(self, h0: int, h1: int, y_BTPd: Tensor, gates_BTP: Tensor) -> None:
        self.pieces.append(("heads", h0, h1))
        self.tensors += [y_BTPd, gates_BTP]

    def add_rows(self, heads: list[int], rows_BPM: Tensor, y_BPMd: Tensor, gates_BPM: Tensor,
                 counts: Optional[list[list[int]]] = None) -> None:
        """rows_BPM: indices into the n = B*T flattened rows; y (B, P, M, hd), gates (B, P, M).
        ``counts[b][p]``: item b's real rows of head p, the rest padding (gate 0) that need not be
        projected; None: all M."""
        self.pieces.append(("rows", heads, counts))
        self.tensors += [y_BPMd, gates_BPM, rows_BPM]

    def finish(self) -> Tensor:
        w, b = self.op.proj.weight, self.op.proj.bias
        if not self.pieces:
            out = w.new_zeros(self.B, self.T, w.shape[0])
        else:
            device = w.device.type
            autocast = torch.is_autocast_enabled(device)
            dtype = torch.get_autocast_dtype(device) if autocast else w.dtype
            tensors = [t if t.dtype in (torch.int64, torch.int32) else t.to(dtype) for t in self.tensors]
            fast = self.cpu_kernels and dtype == torch.float32 and _cpu_kernels_fit(w, *self.tensors) and \
                _unit_last_stride(w, *self.tensors)
            meta = (self.B, self.T, self.op.head_dim, self.pieces, fast)
            if autocast:  # one dtype in forward and backward, as autocast gives a matmul
                with torch.autocast(device, enabled=False):
                    out = _GatedOutput.apply(w.to(dtype), meta, *tensors)
            else:
                out = _GatedOutput.apply(w, meta, *tensors)
        return out if b is None else out + b


class _GatedOutput(torch.autograd.Function):
    """out (n, D) = sum over pieces of (y * gate) @ W_O[:, heads].T, rows pieces scattered back with
    ``index_add_``. Saves the pieces as given (head outputs, gates, row indices) and the weight; the
    backward gathers the output gradient of each piece's rows again."""

    @staticmethod
    def forward(ctx, w_DE: Tensor, meta: tuple, *tensors: Tensor) -> Tensor:  # type: ignore[override]
        B, T, hd, pieces, fast = meta
        ctx.meta = meta
        ctx.save_for_backward(w_DE, *tensors)
        if fast:
            return _gated_output_cpu(w_DE, B, T, hd, pieces, tensors)
        D = w_DE.shape[0]
        out: Optional[Tensor] = None
        buf: Optional[Tensor] = None
        it = iter(tensors)
        for piece in pieces:
            if piece[0] == "heads":
                _, h0, h1 = piece
                y, g = next(it), next(it)
                yg = (y * g.unsqueeze(-1)).reshape(B * T, -1)
                w = w_DE[:, h0 * hd : h1 * hd].t()
                out = yg @ w if out is None else out.addmm_(yg, w)
            else:
                heads = piece[1]
                y, g, rows = next(it), next(it), next(it)
                if out is None:
                    out = y.new_zeros(B * T, D)
                if buf is None or buf.shape[0] < rows.shape[0] * rows.shape[2]:
                    buf = y.new_empty(rows.shape[0] * rows.shape[2], D)  # reused: see _head_rows
                for p, h in enumerate(heads):
                    yg = (y[:, p] * g[:, p].unsqueeze(-1)).reshape(-1, hd)  # (B*M, hd)
                    part = torch.mm(yg, w_DE[:, h * hd : (h + 1) * hd].t(), out=buf[: yg.shape[0]])
                    out.index_add_(0, rows[:, p].reshape(-1), part)
        return out.view(B, T, D)

    @staticmethod
    def backward(ctx, dout_BTD: Tensor):  # type: ignore[override]
        B, T, hd, pieces, fast = ctx.meta
        w_DE, *tensors = ctx.saved_tensors
        dout = dout_BTD.reshape(B * T, -1).to(w_DE.dtype)
        dw = torch.zeros_like(w_DE) if ctx.needs_input_grad[0] else None
        if fast:
            dout = dout.contiguous()
            row_grads = _gated_output_cpu_backward(dout, w_DE, dw, B, hd, pieces, tensors)
        grads: list[Optional[Tensor]] = []
        buf: Optional[Tensor] = None
        it = iter(tensors)
        for piece in pieces:
            if piece[0] == "heads":
                _, h0, h1 = piece
                y, g = next(it), next(it)
                w = w_DE[:, h0 * hd : h1 * hd]  # (D, P*hd)
                dyg = (dout @ w).view(y.shape)  # (B, T, P, hd)
                if dw is not None:
                    dw[:, h0 * hd : h1 * hd] += dout.t() @ (y * g.unsqueeze(-1)).reshape(B * T, -1)
                grads += [dyg * g.unsqueeze(-1), (dyg * y).sum(-1)]
            elif fast:
                next(it), next(it), next(it)
                grads += [*row_grads.pop(0), None]
            else:
                heads = piece[1]
                y, g, rows = next(it), next(it), next(it)
                dy, dg = torch.empty_like(y), torch.empty_like(g)
                if buf is None or buf.shape[0] < rows.shape[0] * rows.shape[2]:
                    buf = dout.new_empty(rows.shape[0] * rows.shape[2], dout.shape[1])
                for p, h in enumerate(heads):
                    w = w_DE[:, h * hd : (h + 1) * hd]  # (D, hd)
                    idx = rows[:, p].reshape(-1)
                    d_rows = torch.index_select(dout, 0, idx, out=buf[: idx.numel()])  # (B*M, D)
                    dyg = (d_rows @ w).view(y[:, p].shape)  # (B, M, hd)
                    if dw is not None:
                        dw[:, h * hd : (h + 1) * hd] += d_rows.t() @ (y[:, p] * g[:, p].unsqueeze(-1)).reshape(-1, hd)
                    dy[:, p] = dyg * g[:, p].unsqueeze(-1)
                    dg[:, p] = (dyg * y[:, p]).sum(-1)
                grads += [dy, dg, None]
        return (dw, None, *grads)


def _cpu_kernels_fit(*tensors: Tensor) -> bool:
    """Whether moh's CPU projection kernels can take these tensors: fp32 (or integer indices) on
    CPU, no autocast, and the kernels built."""
    from moh.kernels import cpu as cpu_kernels

    if torch.is_autocast_enabled("cpu"):
        return False
    if any(t.device.type != "cpu" or t.dtype not in (torch.float32, torch.int64) for t in tensors):
        return False
    return cpu_kernels.available()


def _unit_last_stride(*tensors: Tensor) -> bool:
    return all(t.stride(-1) == 1 for t in tensors)


def _address(t: Tensor, *index: int) -> int:
    """The address of ``t[index]`` (leading indices), without making the view."""
    return t.data_ptr() + sum(i * st for i, st in zip(index, t.stride())) * t.element_size()


def _along(t: Tensor, dim: int) -> tuple[int, int]:
    """(address of t's first element, bytes from one index to the next along ``dim``): the
    address of ``t[0, .., i, ..]`` is their first plus i times their second (a loop over heads
    asks the tensor once, not per head)."""
    return t.data_ptr(), t.stride(dim) * t.element_size()


def _per_head(t_BPM: Tensor) -> Tensor:
    """(B, P, M, ...) -> (P, B*M, ...) contiguous: each head's rows of all items in one block."""
    t = t_BPM.transpose(0, 1) if t_BPM.shape[0] > 1 else t_BPM[0]
    return t.reshape(t_BPM.shape[1], -1, *t_BPM.shape[3:]).contiguous()


def _gated_output_cpu(w_DE: Tensor, B: int, T: int, hd: int, pieces: list, tensors: tuple) -> Tensor:
    """``_GatedOutput``'s forward with moh's CPU kernel: every piece in one ``scatter_mm`` (the
    output's rows a block at a time for all heads: no per-head product written out and added
    back). One piece per head (its rows over all items), addresses by arithmetic, the gates as
    row factors applied in the kernel (no gated copy); with one item a head's padding rows are
    not projected."""
    from moh.kernels import cpu as cpu_kernels

    ldw = w_DE.stride(0)  # W_O[:, cols].t(): stored transposed, rows ldw apart
    raw, keep = [], []
    it = iter(tensors)
    for piece in pieces:
        if piece[0] == "heads":
            _, h0, h1 = piece
            y, g = next(it), next(it)  # (B, T, P, hd), (B, T, P)
            if (B == 1 or y.stride(0) == T * y.stride(1)) and (B == 1 or g.stride(0) == T * g.stride(1)):
                # the B*T rows of each head evenly spaced: one piece per head, its gate per row
                (y0, ys), (g0, gs), (w0, ws) = _along(y, 2), _along(g, 2), _along(w_DE, 1)
                raw += [(0, B * T, y0 + p * ys, y.stride(1), hd, w0 + (h0 + p) * hd * ws, ldw, 1, g0 + p * gs,
                         g.stride(1)) for p in range(h1 - h0)]
            else:
                yg = (y * g.unsqueeze(-1)).reshape(B * T, -1)
                keep.append(yg)
                raw.append((0, B * T, yg.data_ptr(), yg.stride(0), yg.shape[1], _address(w_DE, 0, h0 * hd), ldw, 1,
                            0, 0))
        else:
            y, g, rows = next(it), next(it), next(it)  # (B, P, M, hd), (B, P, M), (B, P, M)
            counts = piece[2]
            if B > 1:  # one piece per head over all items: its rows (B*M, ascending) made contiguous
                y, g, rows = _per_head(y), _per_head(g), _per_head(rows)  # (P, B*M, ...)
                keep += [y, g, rows]
                y, g, rows = y[None], g[None], rows[None]
            (r0, rs), (y0, ys), (g0, gs), (w0, ws) = _along(rows, 1), _along(y, 1), _along(g, 1), _along(w_DE, 1)
            for p, h in enumerate(piece[1]):
                # with one item, rows past its count are padding: not projected (with several the
                # padding lies between items' rows, and its gate is 0)
                n = y.shape[2] if B > 1 or counts is None else counts[0][p]
                raw.append((r0 + p * rs, n, y0 + p * ys, y.stride(2), hd, w0 + h * hd * ws, ldw, 1, g0 + p * gs,
                            g.stride(2)))
    out = w_DE.new_empty(B * T, w_DE.shape[0])
    return cpu_kernels.scatter_mm_raw(out, raw, zero=True).view(B, T, -1)


def _gated_output_cpu_backward(dout: Tensor, w_DE: Tensor, dw: Optional[Tensor], B: int, hd: int, pieces: list,
                               tensors: tuple) -> list[tuple[Tensor, Tensor]]:
    """(dy, dgate) of every rows piece of ``_GatedOutput``, and their weight gradients added to
    ``dw``, in one ``gather_mm`` over the output gradient's rows."""
    from moh.kernels import cpu as cpu_kernels

    work, outs, chunks = [], [], []
    it = iter(tensors)
    for piece in pieces:
        if piece[0] == "heads":
            next(it), next(it)
            continue
        y, g, rows = next(it), next(it), next(it)
        P, M = y.shape[1], y.shape[2]
        yg, rr = _per_head(y * g.unsqueeze(-1)), _per_head(rows)
        dyg = y.new_empty(P, B * M, hd)
        for p, h in enumerate(piece[1]):
            cols = slice(h * hd, (h + 1) * hd)
            work.append((rr[p], w_DE[:, cols], yg[p], None if dw is None else dw[:, cols].t()))
            outs.append(dyg[p])
        chunks.append((y, g, dyg))
    cpu_kernels.gather_mm(dout, work, check=False, out=outs)
    grads = []
    for y, g, dyg in chunks:
        P, M = y.shape[1], y.shape[2]
        d = dyg.view(P, B, M, hd).transpose(0, 1)  # (B, P, M, hd)
        grads.append((d * g.unsqueeze(-1), (d * y).sum(-1)))
    return grads


class _DenseHeads:
    """Any other W_O module: gated pieces are written into dense (B, T, H, hd) head outputs, zeros
    for unused pairs, and the module runs once on them."""

    def __init__(self, op: OutputProjection, B: int, T: int):
        self.op, self.B, self.T = op, B, T
        self.heads: Optional[Tensor] = None  # (n, H, hd)

    def _buffer(self, like: Tensor) -> Tensor:
        if self.heads is None:
            self.heads = like.new_zeros(self.B * self.T, self.op.num_heads, self.op.head_dim)
        return self.heads

    def add_heads(self, h0: int, h1: int, y_BTPd: Tensor, gates_BTP: Tensor) -> None:
        y = y_BTPd * gates_BTP.unsqueeze(-1).to(y_BTPd.dtype)
        buf = self._buffer(y)
        piece = torch.zeros_like(buf)
        piece[:, h0:h1] = y.reshape(-1, h1 - h0, self.op.head_dim).to(buf.dtype)
        self.heads = buf + piece

    def add_rows(self, heads: list[int], rows_BPM: Tensor, y_BPMd: Tensor, gates_BPM: Tensor,
                 counts: Optional[list[list[int]]] = None) -> None:
        y = y_BPMd * gates_BPM.unsqueeze(-1).to(y_BPMd.dtype)
        buf = self._buffer(y)
        H, hd = self.op.num_heads, self.op.head_dim
        head = torch.tensor(heads, device=rows_BPM.device)[None, :, None]
        flat = (rows_BPM * H + head).reshape(-1)  # into (n * H) (row, head) pairs
        self.heads = buf.view(-1, hd).index_add(0, flat, y.reshape(-1, hd).to(buf.dtype)).view_as(buf)

    def finish(self) -> Tensor:
        if self.heads is None:
            p = next(self.op.proj.parameters(), None)
            self.heads = torch.zeros(self.B * self.T, self.op.num_heads, self.op.head_dim,
                                     dtype=None if p is None else p.dtype, device=None if p is None else p.device)
        return self.op.dense(self.heads.view(self.B, self.T, self.op.num_heads, self.op.head_dim))


_Accumulator = _SlicedSum | _DenseHeads


# ---------------------------------------------------------------------------------------------
# gathered rows times a weight per head, without keeping the gathered rows for backward


class _GatherMatmuls(torch.autograd.Function):
    """Autograd through ``index_select`` + matmul would save the gathered rows (a copy of the input
    row for every head that uses it: at 50% heads, N=2048, D=768 about 25 MB per layer) for the
    weight gradient, and give every group its own full-size input gradient. Here the backward
    gathers the rows again from the input, which autograd keeps anyway, and accumulates one input
    gradient for all groups."""

    @staticmethod
    def forward(ctx, x_nD: Tensor, w_HoD: Tensor, heads: list[list[int]], fast: bool,  # type: ignore[override]
                *rows: Tensor):
        ctx.heads, ctx.fast = heads, fast
        if fast:  # moh's CPU kernel: x read a block of rows at a time for every head
            from moh.kernels import cpu as cpu_kernels

            x_nD = x_nD.contiguous()
            ctx.save_for_backward(x_nD, w_HoD, *rows)
            # one piece per head, its rows over all items (B*M, ascending; contiguous: a copy for
            # B > 1), addresses by arithmetic (a view per piece costs more than its few rows'
            # product), products straight into (P, B*M, o), returned as (B, P, M, o) views
            o_dim, w1 = w_HoD.shape[1], w_HoD.stride(1)
            outs, raw, keep = [], [], []
            for hs, r in zip(heads, rows):
                B, P, M = r.shape
                rr = _per_head(r)  # (P, B*M)
                o = x_nD.new_empty(P, B * M, o_dim)
                keep.append(rr)
                outs.append(o.view(P, B, M, o_dim).transpose(0, 1))
                (r0, rs), (o0, os_), (w0, ws) = _along(rr, 0), _along(o, 0), _along(w_HoD, 0)
                raw += [(r0 + p * rs, B * M, o0 + p * os_, o_dim, o_dim, w0 + h * ws, w1, 1, 0, 0, 0, 0, 0)
                        for p, h in enumerate(hs)]
            cpu_kernels.gather_mm_raw(x_nD, raw)
            return tuple(outs)
        ctx.save_for_backward(x_nD, w_HoD, *rows)
        buf = _row_buffer(x_nD, rows, x_nD.shape[1])
        return tuple(_head_rows(x_nD, w_HoD, hs, r, buf) for hs, r in zip(heads, rows))

    @staticmethod
    def backward(ctx, *dq: Tensor):  # type: ignore[override]
        x_nD, w_HoD, *rows = ctx.saved_tensors
        dw = torch.zeros_like(w_HoD) if ctx.needs_input_grad[1] else None
        if ctx.fast:  # dx: zeroed by the kernel as it writes it
            dx = torch.empty_like(x_nD) if ctx.needs_input_grad[0] else None
            return (*_gather_matmuls_cpu_backward(x_nD, w_HoD, ctx.heads, rows, dq, dx, dw), None, None,
                    *(None for _ in rows))
        dx = torch.zeros_like(x_nD) if ctx.needs_input_grad[0] else None
        buf = _row_buffer(x_nD, rows, x_nD.shape[1])
        for hs, r, dq_BPMo in zip(ctx.heads, rows, dq):
            if dq_BPMo is None:
                continue
            dq_BPMo = dq_BPMo.to(w_HoD.dtype)
            for p, h in enumerate(hs):
                idx = r[:, p].reshape(-1)
                d = dq_BPMo[:, p].reshape(-1, w_HoD.shape[1])  # (B*M, o)
                if dx is not None:
                    dx.index_add_(0, idx, torch.mm(d, w_HoD[h], out=buf[: idx.numel()]).to(dx.dtype))
                if dw is not None:  # the rows gathered again
                    dw[h] += d.t() @ torch.index_select(x_nD, 0, idx, out=buf[: idx.numel()]).to(dw.dtype)
        return (dx, dw, None, None, *(None for _ in rows))


def _gather_matmuls_cpu_backward(x_nD: Tensor, w_HoD: Tensor, heads: list[list[int]], rows: list[Tensor],
                                 dq: tuple, dx: Optional[Tensor], dw: Optional[Tensor]) -> tuple:
    """``_GatherMatmuls``' input and weight gradients with moh's CPU kernels: dx as one
    ``scatter_mm`` of every head's dq @ W_h, dw as one ``gather_mm`` (the rows of x again)."""
    from moh.kernels import cpu as cpu_kernels

    scatter, gather = [], []
    for hs, r, d in zip(heads, rows, dq):
        if d is None:
            continue
        rr, dd = _per_head(r), _per_head(d.to(w_HoD.dtype))
        for p, h in enumerate(hs):
            scatter.append((rr[p], dd[p], w_HoD[h]))
            if dw is not None:
                gather.append((rr[p], None, dd[p], dw[h]))
    if dx is not None:
        cpu_kernels.scatter_mm(dx, scatter, zero=True, check=False)
    if gather:
        cpu_kernels.gather_mm(x_nD, gather, check=False)
    return dx, dw


def _head_rows(x_nD: Tensor, w_HoD: Tensor, heads: list[int], rows_BPM: Tensor, buf: Tensor) -> Tensor:
    """(B, P, M, o): x_nD[rows_BPM[b, p, m]] @ w_HoD[heads[p]].T, one matmul per head with the
    weight's own rows (a transposed view, no copy); the gathered rows go to ``buf`` (reused: a
    fresh multi-MB tensor per head costs its page faults, 0.17 of 0.42 ms for 850 x 768 floats)."""
    B, P, M = rows_BPM.shape
    out = x_nD.new_empty(B, P, M, w_HoD.shape[1])
    for p, h in enumerate(heads):
        rows = torch.index_select(x_nD, 0, rows_BPM[:, p].reshape(-1), out=buf[: B * M])
        out[:, p] = (rows @ w_HoD[h].t()).view(B, M, -1)
    return out


def _row_buffer(like: Tensor, rows: list[Tensor], width: int) -> Tensor:
    """Scratch for the largest (B*M, width) block of rows any one head of ``rows`` gathers."""
    return like.new_empty(max(r.shape[0] * r.shape[2] for r in rows), width)


def gather_matmuls(x_nD: Tensor, w_HoD: Tensor, groups: list[tuple[list[int], Tensor]],
                   cpu_kernels: bool = False) -> list[Tensor]:
    """For each group (heads, rows_BPM): ``x_nD[rows_BPM[b, p, m]] @ w_HoD[heads[p]].T`` ->
    (B, P, M, o); x (n, D), rows indices into n, w (H, o, D) (a linear layer's weight per head).
    Same values and gradients as ``index_select`` then ``@``, one autograd node for all groups.
    Under autocast both operands are cast to the autocast dtype first (as autocast does for a
    matmul), so forward and backward agree on one dtype. ``cpu_kernels``: moh's CPU kernels where
    the tensors allow (fp32 CPU, no autocast)."""
    if not groups:
        return []
    heads = [list(hs) for hs, _ in groups]
    rows = [r for _, r in groups]
    device = x_nD.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            return list(_GatherMatmuls.apply(x_nD.to(dtype), w_HoD.to(dtype), heads, False, *rows))
    fast = cpu_kernels and _cpu_kernels_fit(x_nD, w_HoD, *rows) and _unit_last_stride(w_HoD, *rows)
    return list(_GatherMatmuls.apply(x_nD, w_HoD, heads, fast, *rows))
