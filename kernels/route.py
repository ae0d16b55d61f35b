"""Route: gate importance -> which rows of a pass run a branch, decided on the device.

The result of a route is a :class:`Route`: ``order``, a permutation of the pass's N rows (batch
and tokens flattened, row ``b * T + t``) listing the active rows first, each group in ascending
row order (the engine's ``(~active).argsort(stable=True)``); ``count``, the number of active rows,
a one-element int32 tensor that never leaves the device; the ``active`` mask and the
``importance`` of every row. The other kernels take ``order`` and ``count``: positions
``[0, count)`` of ``order`` are the rows that run the branch, ``[count, N)`` the rows that skip it.

Two ways to decide (see :class:`specgate.gates.SkipPolicy`):

- single-token steps compare each row's importance with the branch's calibrated threshold (skip
  where importance <= threshold); :func:`route_threshold` computes the importance too, with the
  scalar gate's dot product fused in;
- multi-token passes skip the ``floor(budget * n_valid)`` lowest-importance valid rows of the whole
  batch (``skip_lowest`` of the skip policy); :func:`route_budget` ranks them on the device.

Both deciding kernels run as one program: the passes they serve have few rows (a decode step has
B, a verify pass B * (k + 1)), and one program keeps the order deterministic without atomics.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import cdiv, jit, next_pow2

try:
    import triton.language as tl
except ImportError:  # the references below still work
    tl = None


class Route(NamedTuple):
    order: torch.Tensor  # (N,) int32: active rows first, then skipped rows, each ascending
    count: torch.Tensor  # (1,) int32: number of active rows
    active: torch.Tensor  # (N,) bool
    importance: torch.Tensor  # (N,) float32


# -- PyTorch references ---------------------------------------------------------------------------


def importance_reference(x: torch.Tensor, w: torch.Tensor | None = None, b: torch.Tensor | None = None) -> torch.Tensor:
    """(N, d) -> (N,) float32: sigmoid(x . w + b) for a scalar gate, else mean_j sigmoid(x_j) of
    the gate's pre-activations x (the engine's ``g.mean(-1)``)."""
    x = x.reshape(-1, x.shape[-1]).float()
    if w is None:
        return torch.sigmoid(x).mean(-1)
    return torch.sigmoid(x @ w.reshape(-1).float() + b.reshape(-1).float())


def route_from_mask(active: torch.Tensor, importance: torch.Tensor) -> Route:
    """The Route of an active mask, as the kernels lay it out."""
    active = active.reshape(-1)
    order = (~active).to(torch.int8).argsort(stable=True).to(torch.int32)
    count = active.sum().to(torch.int32).reshape(1)
    return Route(order, count, active, importance.reshape(-1).float())


def route_threshold_reference(
    x: torch.Tensor, threshold: torch.Tensor, w: torch.Tensor | None = None, b: torch.Tensor | None = None
) -> Route:
    imp = importance_reference(x, w, b)
    return route_from_mask(imp > threshold.reshape(()).float(), imp)


def route_budget_reference(importance: torch.Tensor, valid: torch.Tensor, budget: float) -> Route:
    """The policy's ``skip_lowest`` over the flattened batch (the tests check the two agree):
    the floor(budget * n_valid) valid rows first in a stable ascending sort are skipped; padding
    sorts last and stays active."""
    importance, valid = importance.reshape(-1), valid.reshape(-1).bool()
    n_skip = int(budget * int(valid.sum()))
    ranked = importance.masked_fill(~valid, float("inf")).argsort(stable=True)
    active = torch.ones_like(valid)
    active[ranked[:n_skip]] = False
    return route_from_mask(active, importance)


# -- kernels --------------------------------------------------------------------------------------


@jit
def _importance_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, N, D, stride_x,
    SCALAR: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Importance of BLOCK_N rows: fused sigmoid(x . w + b), or the mean sigmoid of pre-activations."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        ok = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        if SCALAR:
            w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            acc += tl.sum(x * w[None, :], axis=1)
        else:
            acc += tl.sum(tl.where(ok, tl.sigmoid(x), 0.0), axis=1)
    if SCALAR:
        imp = tl.sigmoid(acc + tl.load(b_ptr).to(tl.float32))
    else:
        imp = acc / D
    tl.store(out_ptr + rows, imp, mask=row_ok)


@jit
def _threshold_order_kernel(imp_ptr, thr_ptr, order_ptr, count_ptr, active_ptr, N, BLOCK: tl.constexpr):
    """One program: active = importance > threshold, compacted into order (active rows first)."""
    thr = tl.load(thr_ptr).to(tl.float32)
    n_active = tl.zeros((), dtype=tl.int32)
    for r0 in range(0, N, BLOCK):
        rows = r0 + tl.arange(0, BLOCK)
        ok = rows < N
        act = (tl.load(imp_ptr + rows, mask=ok, other=0.0) > thr) & ok
        tl.store(active_ptr + rows, act.to(tl.int8), mask=ok)
        flag = act.to(tl.int32)
        tl.store(order_ptr + n_active + tl.cumsum(flag, 0) - 1, rows, mask=act)
        n_active += tl.sum(flag, 0)
    tl.store(count_ptr, n_active)
    n_skipped = tl.zeros((), dtype=tl.int32)
    for r0 in range(0, N, BLOCK):
        rows = r0 + tl.arange(0, BLOCK)
        ok = rows < N
        skip = (tl.load(imp_ptr + rows, mask=ok, other=0.0) <= thr) & ok
        flag = skip.to(tl.int32)
        tl.store(order_ptr + n_active + n_skipped + tl.cumsum(flag, 0) - 1, rows, mask=skip)
        n_skipped += tl.sum(flag, 0)


@jit
def _budget_order_kernel(
    imp_ptr, valid_ptr, budget_ptr, order_ptr, count_ptr, active_ptr, N, BLOCK: tl.constexpr,
):  # fmt: skip
    """One program: skip the floor(budget * n_valid) valid rows of lowest (importance, row).

    A row's rank is the number of valid rows before it in that order (ties by row index, as a
    stable sort). floor(budget * n_valid) is taken in float64, as Python does."""
    n_valid = tl.zeros((), dtype=tl.int32)
    for r0 in range(0, N, BLOCK):
        rows = r0 + tl.arange(0, BLOCK)
        n_valid += tl.sum(tl.load(valid_ptr + rows, mask=rows < N, other=0).to(tl.int32), 0)
    n_skip = tl.floor(tl.load(budget_ptr).to(tl.float64) * n_valid.to(tl.float64)).to(tl.int32)
    n_active = tl.zeros((), dtype=tl.int32)
    for i0 in range(0, N, BLOCK):
        rows_i = i0 + tl.arange(0, BLOCK)
        ok_i = rows_i < N
        imp_i = tl.load(imp_ptr + rows_i, mask=ok_i, other=0.0).to(tl.float32)
        valid_i = tl.load(valid_ptr + rows_i, mask=ok_i, other=0) != 0
        rank = tl.zeros((BLOCK,), dtype=tl.int32)
        for j0 in range(0, N, BLOCK):
            rows_j = j0 + tl.arange(0, BLOCK)
            ok_j = rows_j < N
            imp_j = tl.load(imp_ptr + rows_j, mask=ok_j, other=0.0).to(tl.float32)
            valid_j = (tl.load(valid_ptr + rows_j, mask=ok_j, other=0) != 0) & ok_j
            before = (imp_j[None, :] < imp_i[:, None]) | (
                (imp_j[None, :] == imp_i[:, None]) & (rows_j[None, :] < rows_i[:, None])
            )
            rank += tl.sum((before & valid_j[None, :]).to(tl.int32), axis=1)
        act = ~(valid_i & (rank < n_skip)) & ok_i
        tl.store(active_ptr + rows_i, act.to(tl.int8), mask=ok_i)
        flag = act.to(tl.int32)
        tl.store(order_ptr + n_active + tl.cumsum(flag, 0) - 1, rows_i, mask=act)
        n_active += tl.sum(flag, 0)
    tl.store(count_ptr, n_active)
    tl.debug_barrier()  # the active flags written above are read back by other threads
    n_skipped = tl.zeros((), dtype=tl.int32)
    for r0 in range(0, N, BLOCK):
        rows = r0 + tl.arange(0, BLOCK)
        ok = rows < N
        skip = (tl.load(active_ptr + rows, mask=ok, other=1) == 0) & ok
        flag = skip.to(tl.int32)
        tl.store(order_ptr + n_active + n_skipped + tl.cumsum(flag, 0) - 1, rows, mask=skip)
        n_skipped += tl.sum(flag, 0)


# -- launchers ------------------------------------------------------------------------------------


def importance(x: torch.Tensor, w: torch.Tensor | None = None, b: torch.Tensor | None = None) -> torch.Tensor:
    """(..., d) -> (N,) float32 importance. With a scalar gate's weight w (d,) or (1, d) and bias b,
    x is the gate input and the dot product is fused; without, x holds the gate's pre-activations."""
    x = x.reshape(-1, x.shape[-1])
    if x.stride(-1) != 1:
        x = x.contiguous()
    N, D = x.shape
    out = torch.empty(N, dtype=torch.float32, device=x.device)
    scalar = w is not None
    w_arg = w.reshape(-1).contiguous() if scalar else x
    b_arg = b.reshape(-1) if scalar else x
    BLOCK_N = 16
    _importance_kernel[(cdiv(N, BLOCK_N),)](
        x, w_arg, b_arg, out, N, D, x.stride(0), SCALAR=scalar, BLOCK_N=BLOCK_N, BLOCK_D=min(256, next_pow2(D))
    )
    return out


def route_threshold(
    x: torch.Tensor, threshold: torch.Tensor, w: torch.Tensor | None = None, b: torch.Tensor | None = None
) -> Route:
    """Single-token steps: rows whose importance (see :func:`importance`) is above ``threshold``
    (a one-element device tensor, e.g. ``thresholds[branch, layer]``) run the branch."""
    imp = importance(x, w, b)
    return _order(_threshold_order_kernel, imp, threshold.reshape(1))


def route_budget(importance: torch.Tensor, valid: torch.Tensor, budget: float | torch.Tensor) -> Route:
    """Multi-token passes: skip the floor(budget * n_valid) lowest-importance valid rows over the
    whole batch; importance and valid are (B, T) or flat. Padding rows stay active, as in
    ``skip_lowest``. A float budget is copied to the device (no synchronisation)."""
    imp = importance.reshape(-1)
    valid_i8 = valid.reshape(-1).to(torch.int8)
    budget_t = torch.as_tensor(budget, dtype=torch.float64).to(imp.device, non_blocking=True).reshape(1)
    return _order(_budget_order_kernel, imp, valid_i8, budget_t)


def _order(kernel, imp: torch.Tensor, *inputs: torch.Tensor) -> Route:
    N = imp.shape[0]
    order = torch.empty(N, dtype=torch.int32, device=imp.device)
    count = torch.empty(1, dtype=torch.int32, device=imp.device)
    active = torch.empty(N, dtype=torch.int8, device=imp.device)
    kernel[(1,)](imp, *inputs, order, count, active, N, BLOCK=min(128, max(16, next_pow2(N))))
    return Route(order, count, active.bool(), imp.float())

