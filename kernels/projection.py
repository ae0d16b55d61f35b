"""Gathered, row-masked projections: y = x[rows] @ W.T (+ bias) over the rows a route selected.

The rows are ``order[0:count]`` (the active rows) or, with ``skipped=True``, ``order[count:N]``
(see :mod:`.route`); ``count`` is read on the device. Output row ``p`` belongs to the p-th selected
row; the output has N rows, and rows at or past the number selected are left unwritten (never read
by the other kernels, which take the same ``count``). A program whose rows are all unselected exits
before it loads a weight, so a pass pays for the weights of its active rows' blocks only.

Batches are flattened: x is (B * T, d) and every sequence has its own rows in ``order``.

:func:`sparse_linear` is the product of a sparse-inputs draft (:mod:`specgate.sparse_inputs`): it
zeroes the selected rows' inputs at or below a threshold and reads only the weights that some
selected row's kept inputs multiply. That pays where the weight is input-major (``W_t``: (K, M), the
transpose of ``F.linear``'s (M, K)): input k's weights are then one contiguous row, and the load of
the rows no selected row keeps is masked off (on a GPU a masked load issues no memory transaction;
with output-major weights input k's weights lie at stride K, and a zeroed input saves nothing until
a whole 32-byte sector of inputs is zeroed). The engine's Triton path keeps an input-major copy of
the decoder matrices for these passes (:class:`specgate.dispatch.TritonKernels`). It also counts,
where asked, the inputs it zeroed times a share per input (the weights not read, in the caller's
unit), summed on the device.

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
    return _act(gate, act) * up


def sparse_linear_reference(
    x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None, threshold: float,
    order: torch.Tensor, count: torch.Tensor, act: str | None = None,
) -> tuple[torch.Tensor, int]:  # fmt: skip
    """(n, M): the selected rows' products with their inputs ``|x| <= threshold`` zeroed (act(gate) *
    up, (n, M / 2), with ``act``), and the number of inputs zeroed."""
    rows = x.reshape(-1, x.shape[-1])[selected_rows(order, count)]
    keep = rows.abs() > threshold
    y = F.linear(rows * keep, weight_t.t(), bias)
    if act is not None:
        gate, up = y.chunk(2, dim=-1)
        y = _act(gate, act) * up
    return y, int((~keep).sum())


def _act(t: torch.Tensor, act: str) -> torch.Tensor:
    return F.silu(t) if act == "silu" else F.gelu(t, approximate="tanh")


# -- kernel ---------------------------------------------------------------------------------------


@jit
def _gathered_linear_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, order_ptr, count_ptr, dropped_ptr, N, M, K, stride_x, stride_wm, stride_wk,
    stride_y, up_offset, threshold, col_share,
    SKIPPED: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, CUT: tl.constexpr, COUNT: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One (rows, outputs) tile. W[m, k] is at ``m * stride_wm + k * stride_wk`` (output-major:
    (M, K) rows; input-major: (K, M) rows). ACT 0: plain projection; 1/2: act(gate) * up, the up
    weights ``up_offset`` outputs after the gate's. CUT: inputs ``|x| <= threshold`` are zeroed and
    the weights of inputs no row keeps are not loaded; COUNT: adds their number x ``col_share``."""
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
    dropped = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a_ok = pos_ok[:, None] & k_ok[None, :]
        a = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=a_ok, other=0.0)
        w_off = cols[None, :].to(tl.int64) * stride_wm + ks[:, None].to(tl.int64) * stride_wk
        w_ok = col_ok[None, :] & k_ok[:, None]
        if CUT:
            keep = tl.abs(a.to(tl.float32)) > threshold
            a = tl.where(keep, a, 0.0).to(a.dtype)
            w_ok = w_ok & (tl.max(keep.to(tl.int32), axis=0) > 0)[:, None]  # some selected row reads input k
            if COUNT:
                dropped += (a_ok & (keep == 0)).to(tl.int32)
        w = tl.load(w_ptr + w_off, mask=w_ok, other=0.0)  # (BLOCK_K, BLOCK_N): W.T
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
        if ACT != 0:
            w_up = tl.load(w_ptr + up_offset * stride_wm + w_off, mask=w_ok, other=0.0)
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
    if COUNT:
        if tl.program_id(1) == 0:  # one column block counts its rows' zeroed inputs
            tl.atomic_add(dropped_ptr, tl.sum(tl.sum(dropped, axis=1), axis=0).to(tl.float32) * col_share)


# -- launchers ------------------------------------------------------------------------------------


def gathered_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, order: torch.Tensor, count: torch.Tensor,
    skipped: bool = False,
) -> torch.Tensor:  # fmt: skip
    """x (..., K), weight (M, K) -> (N, M): row p is the p-th selected row's projection."""
    return _launch(x, weight, bias, order, count, "output", None, skipped)


def gathered_gate_up(
    x: torch.Tensor, gate_up_weight: torch.Tensor, order: torch.Tensor, count: torch.Tensor, act: str = "silu"
) -> torch.Tensor:
    """x (..., K), gate_up_weight (2ff, K) -> (N, ff) act(gate) * up of the active rows."""
    return _launch(x, gate_up_weight, None, order, count, "output", act)


def sparse_linear(
    x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None, threshold: float,
    order: torch.Tensor, count: torch.Tensor, act: str | None = None,
    dropped: torch.Tensor | None = None, col_share: float = 0.0,
) -> torch.Tensor:  # fmt: skip
    """x (..., K), input-major weight_t (K, M) (a column slice of a wider one is fine) -> (N, M)
    (act(gate) * up, (N, M / 2), with ``act``): row p is the p-th selected row's product with its
    inputs at or below ``threshold`` zeroed. ``dropped`` (float32, one element): adds the number of
    inputs zeroed times ``col_share``."""
    return _launch(x, weight_t, bias, order, count, "input", act, cut=(float(threshold), dropped, float(col_share)))


def _launch(x, weight, bias, order, count, major: str, act: str | None, skipped: bool = False, cut=None) -> torch.Tensor:
    """Rows of ``weight`` are outputs (``major="output"``, (M, K)) or inputs (``"input"``, (K, M))."""
    if act is not None and act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
    x = x.reshape(-1, x.shape[-1])
    if x.stride(-1) != 1:
        x = x.contiguous()
    if weight.stride(-1) != 1:
        hint = ": pass weight.t().contiguous() (input-major)" if major == "input" else ""
        raise ValueError(f"the weight's rows must be contiguous{hint}")
    if x.dtype != weight.dtype:
        raise TypeError(f"x is {x.dtype} but the weight is {weight.dtype}")
    N, K = x.shape
    M_all, stride_wm, stride_wk = (weight.shape[0], weight.stride(0), 1) if major == "output" else (weight.shape[1], 1, weight.stride(0))
    M = M_all // 2 if act is not None else M_all
    threshold, dropped, col_share = cut if cut is not None else (0.0, None, 0.0)
    y = torch.empty(N, M, dtype=x.dtype, device=x.device)
    BLOCK_M, BLOCK_N, BLOCK_K = 16, 64, 64
    _gathered_linear_kernel[(cdiv(N, BLOCK_M), cdiv(M, BLOCK_N))](
        x, weight, bias if bias is not None else weight, y, order, count, dropped if dropped is not None else y,
        N, M, K, x.stride(0), stride_wm, stride_wk, y.stride(0), M, threshold, col_share,
        SKIPPED=skipped, HAS_BIAS=bias is not None, ACT=ACTIVATIONS[act] if act else 0, CUT=cut is not None,
        COUNT=dropped is not None, IEEE=x.dtype == torch.float32, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )  # fmt: skip
    return y
