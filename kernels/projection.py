"""Gathered, row-masked projections: y = x[rows] @ W.T (+ bias) over the rows a route selected.

The rows are ``order[0:count]`` (the active rows) or, with ``skipped=True``, ``order[count:N]``
(see :mod:`.route`); ``count`` is read on the device. Output row ``p`` belongs to the p-th selected
row; the output has N rows, and rows at or past the number selected are left unwritten (never read
by the other kernels, which take the same ``count``). A program whose rows are all unselected exits
before it loads a weight, so a pass pays for the weights of its active rows' blocks only.

Batches are flattened: x is (B * T, d) and every sequence has its own rows in ``order``.

:func:`gathered_gate_up` fuses the MLP's first half: with the fused gate/up weight (rows [0, ff)
gate, [ff, 2ff) up) it returns act(x W_gate.T) * (x W_up.T) without writing the 2ff-wide
intermediate; ``act`` is SiLU (Llama, Qwen) or tanh-approximated GELU (Gemma 3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cdiv, jit

try:
    import triton.language as tl
except ImportError:  # the references below still work
    tl = None

ACTIVATIONS = {"silu": 1, "gelu_tanh": 2}


# -- PyTorch references ---------------------------------------------------------------------------


def selected_rows(order: torch.Tensor, count: torch.Tensor, skipped: bool = False) -> torch.Tensor:
    """The rows a kernel works on, as a long tensor (reads count on the host: references only)."""
    n = int(count.reshape(()))
    return (order[n:] if skipped else order[:n]).long()


def gathered_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, order: torch.Tensor, count: torch.Tensor,
    skipped: bool = False,
) -> torch.Tensor:  # fmt: skip
    """(n, M): the selected rows' projections only."""
    return F.linear(x.reshape(-1, x.shape[-1])[selected_rows(order, count, skipped)], weight, bias)


def gathered_gate_up_reference(
    x: torch.Tensor, gate_up_weight: torch.Tensor, order: torch.Tensor, count: torch.Tensor, act: str = "silu"
) -> torch.Tensor:
    """(n, ff): act(gate) * up of the selected rows, as the engine's MLP computes it."""
    gate, up = gathered_linear_reference(x, gate_up_weight, None, order, count).chunk(2, dim=-1)
    fn = F.silu if act == "silu" else lambda t: F.gelu(t, approximate="tanh")
    return fn(gate) * up


# -- kernel ---------------------------------------------------------------------------------------


@jit
def _gathered_linear_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, order_ptr, count_ptr, N, M, K, stride_x, stride_w, stride_y, up_offset,
    SKIPPED: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One (rows, outputs) tile. ACT 0: plain projection; 1/2: act(gate) * up, the up weight rows
    ``up_offset`` below the gate rows."""
    count = tl.load(count_ptr)
    if SKIPPED:
        start = count
        n_sel = N - count
    else:
        start = 0
        n_sel = count
    first = tl.program_id(0) * BLOCK_M
    if first >= n_sel:
        return  # no selected row in this tile: the weights are not read
    pos = first + tl.arange(0, BLOCK_M)
    pos_ok = pos < n_sel
    rows = tl.load(order_ptr + start + pos, mask=pos_ok, other=0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=pos_ok[:, None] & k_ok[None, :], other=0.0)
        w_off = cols[None, :].to(tl.int64) * stride_w + ks[:, None]
        w_ok = col_ok[None, :] & k_ok[:, None]
        w = tl.load(w_ptr + w_off, mask=w_ok, other=0.0)  # (BLOCK_K, BLOCK_N): W.T
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
        if ACT != 0:
            w_up = tl.load(w_ptr + up_offset * stride_w + w_off, mask=w_ok, other=0.0)
            if IEEE:
                acc_up = tl.dot(a, w_up, acc_up, input_precision="ieee")
            else:
                acc_up = tl.dot(a, w_up, acc_up)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if ACT == 1:
        acc = acc * tl.sigmoid(acc) * acc_up
    elif ACT == 2:  # gelu(z) = z * sigmoid(2u), u = sqrt(2/pi) (z + 0.044715 z^3): the tanh form
        inner = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
        acc = acc * tl.sigmoid(2.0 * inner) * acc_up
    out = y_ptr + pos[:, None].to(tl.int64) * stride_y + cols[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=pos_ok[:, None] & col_ok[None, :])


# -- launchers ------------------------------------------------------------------------------------


def gathered_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, order: torch.Tensor, count: torch.Tensor,
    skipped: bool = False,
) -> torch.Tensor:  # fmt: skip
    """x (..., K), weight (M, K) -> (N, M): row p is the p-th selected row's projection."""
    return _launch(x, weight, bias, order, count, weight.shape[0], 0, skipped)


def gathered_gate_up(
    x: torch.Tensor, gate_up_weight: torch.Tensor, order: torch.Tensor, count: torch.Tensor, act: str = "silu"
) -> torch.Tensor:
    """x (..., K), gate_up_weight (2ff, K) -> (N, ff) act(gate) * up of the active rows."""
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
    ff = gate_up_weight.shape[0] // 2
    return _launch(x, gate_up_weight, None, order, count, ff, ACTIVATIONS[act], False)


def _launch(x, weight, bias, order, count, M: int, act: int, skipped: bool) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1])
    if x.stride(-1) != 1:
        x = x.contiguous()
    if weight.stride(-1) != 1:
        raise ValueError("the weight's rows must be contiguous")
    if x.dtype != weight.dtype:
        raise TypeError(f"x is {x.dtype} but the weight is {weight.dtype}")
    N, K = x.shape
    y = torch.empty(N, M, dtype=x.dtype, device=x.device)
    BLOCK_M, BLOCK_N, BLOCK_K = 16, 64, 64
    _gathered_linear_kernel[(cdiv(N, BLOCK_M), cdiv(M, BLOCK_N))](
        x, weight, bias if bias is not None else weight, y, order, count, N, M, K,
        x.stride(0), weight.stride(0), y.stride(0), M,
        SKIPPED=skipped, HAS_BIAS=bias is not None, ACT=act, IEEE=x.dtype == torch.float32,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )  # fmt: skip
    return y
