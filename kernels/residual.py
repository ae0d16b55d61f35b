"""Gated scatter-add into the residual stream, in place: h[order[p]] += g * o[p] for p < count.

``o`` holds the branch output of the active rows in route order (as the gathered projections
write it), ``gate`` the gate value per row of h: (N,) for scalar gates (the route's importance) or
(N, d) for full gates; None adds o unscaled. ``standin``, if given, is added to every skipped row
instead: a stand-in for the branch output, (d,) the same for every row (h[~active] += standin) or
(N, d) one per row (h[~active] += standin[~active]). Rows of ``order`` are distinct, so the tiles
never write the same row and no atomics are needed.
"""

from __future__ import annotations

import torch

from . import cdiv, jit, next_pow2

try:
    import triton.language as tl
except ImportError:  # the reference below still works
    tl = None


def residual_add_reference(
    h: torch.Tensor, o: torch.Tensor, order: torch.Tensor, count: torch.Tensor,
    gate: torch.Tensor | None = None, standin: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """The same update on a copy of h (N, d), computed in float32."""
    out = h.reshape(-1, h.shape[-1]).float().clone()
    n = int(count.reshape(()))
    rows = order[:n].long()
    update = o[:n].float()
    if gate is not None:
        g = gate.reshape(out.shape[0], -1)[rows].float()
        update = update * g
    out[rows] += update
    if standin is not None:
        skipped = order[n:].long()
        out[skipped] += standin.float().expand_as(out)[skipped]
    return out.to(h.dtype).view_as(h)


@jit
def _residual_kernel(
    h_ptr, o_ptr, g_ptr, s_ptr, order_ptr, count_ptr, N, D, stride_h, stride_o, stride_g, stride_s,
    HAS_GATE: tl.constexpr, GATE_PER_CHANNEL: tl.constexpr, HAS_STANDIN: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One (positions, channels) tile of the update; without a stand-in, tiles past count exit."""
    count = tl.load(count_ptr)
    first = tl.program_id(0) * BLOCK_R
    if not HAS_STANDIN:
        if first >= count:
            return
    pos = first + tl.arange(0, BLOCK_R)
    in_range = pos < N
    active = pos < count
    rows = tl.load(order_ptr + pos, mask=in_range, other=0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    act2 = active[:, None] & col_ok[None, :]
    update = tl.load(o_ptr + pos[:, None].to(tl.int64) * stride_o + cols[None, :], mask=act2, other=0.0)
    update = update.to(tl.float32)
    if HAS_GATE:
        if GATE_PER_CHANNEL:
            g = tl.load(g_ptr + rows[:, None] * stride_g + cols[None, :], mask=act2, other=0.0)
        else:
            g = tl.load(g_ptr + rows * stride_g, mask=active, other=0.0)[:, None]
        update = update * g.to(tl.float32)
    if HAS_STANDIN:
        fill = (in_range & ~active)[:, None] & col_ok[None, :]
        s = tl.load(s_ptr + rows[:, None] * stride_s + cols[None, :], mask=fill, other=0.0).to(tl.float32)
        update = tl.where(active[:, None], update, s)
        write = in_range[:, None] & col_ok[None, :]
    else:
        write = act2
    dst = h_ptr + rows[:, None] * stride_h + cols[None, :]
    h = tl.load(dst, mask=write, other=0.0).to(tl.float32)
    tl.store(dst, (h + update).to(h_ptr.dtype.element_ty), mask=write)


def residual_add_(
    h: torch.Tensor, o: torch.Tensor, order: torch.Tensor, count: torch.Tensor,
    gate: torch.Tensor | None = None, standin: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Update h (..., d), contiguous, in place (see the module docstring); returns h."""
    if not h.is_contiguous():
        raise ValueError("h is updated in place and must be contiguous")
    hf = h.view(-1, h.shape[-1])
    N, D = hf.shape
    o = o.reshape(-1, D)
    per_channel = gate is not None and gate.numel() == N * D and D > 1
    g = gate.reshape(N, -1) if gate is not None else hf
    s = standin.reshape(-1, D) if standin is not None else hf
    if s.stride(-1) != 1:
        s = s.contiguous()
    stride_s = s.stride(0) if s.shape[0] > 1 else 0  # (d,): the same row for every skipped row
    BLOCK_R, BLOCK_D = 16, min(256, next_pow2(D))
    _residual_kernel[(cdiv(N, BLOCK_R), cdiv(D, BLOCK_D))](
        hf, o, g, s, order, count, N, D, hf.stride(0), o.stride(0), g.stride(0), stride_s,
        HAS_GATE=gate is not None, GATE_PER_CHANNEL=per_channel, HAS_STANDIN=standin is not None,
        BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D,
    )  # fmt: skip
    return h
