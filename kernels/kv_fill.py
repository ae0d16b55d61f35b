"""K/V of the tokens that skip attention, written into the static cache (both engine modes).

A token that skips a layer's attention still needs K/V there for later queries. The skipped rows
are ``order[count:N]`` of the layer's attention route (see :mod:`.route`); rows are flattened
(B * T), row r belongs to sequence r // T and is stored at cache slot ``slots[r]``. The cache is
one (B, kv_heads, max_len, head_dim) tensor each for k and v per layer (:class:`StaticKVCache`).

- ``"project"`` (:func:`kv_fill_project`): k/v projections of the row's passed-through normed
  state, the k norm (Qwen3, Gemma 3) and rotary embedding applied to k, stored at the row's slot:
  one gathered projection + norm + rope + scatter per (rows, kv head) tile.
- ``"copy_below"`` (:func:`kv_fill_copy_below`): layer i-1's entries at the row's slot copied into
  layer i.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cdiv, jit, next_pow2

try:
    import triton.language as tl
except ImportError:  # the references below still work
    tl = None


# -- PyTorch references ---------------------------------------------------------------------------


def _skipped(order: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return order[int(count.reshape(())) :].long()


def kv_fill_project_reference(
    x: torch.Tensor, kv_weight: torch.Tensor, kv_bias: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
    slots: torch.Tensor, order: torch.Tensor, count: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    k_norm: torch.Tensor | None = None, eps: float = 1e-6,
) -> None:  # fmt: skip
    """The engine's ``_write_kv`` for the skipped rows only, in float32; writes the caches."""
    B, n_kv, _, hd = k_cache.shape
    rows = _skipped(order, count)
    T = x.reshape(B, -1, x.shape[-1]).shape[1]
    kv = F.linear(x.reshape(-1, x.shape[-1])[rows].float(), kv_weight.float(), _float(kv_bias))
    k, v = kv.view(-1, 2, n_kv, hd).unbind(1)  # (n, n_kv, hd)
    if k_norm is not None:
        k = F.rms_norm(k, (hd,), k_norm.float(), eps)
    c, s = cos.reshape(-1, hd)[rows].float()[:, None], sin.reshape(-1, hd)[rows].float()[:, None]
    k = k * c + torch.cat((-k[..., hd // 2 :], k[..., : hd // 2]), -1) * s
    b, slot = rows // T, slots.reshape(-1)[rows].long()
    k_cache[b, :, slot] = k.to(k_cache.dtype)
    v_cache[b, :, slot] = v.to(v_cache.dtype)


def kv_fill_copy_below_reference(
    slots: torch.Tensor, order: torch.Tensor, count: torch.Tensor, T: int,
    k_below: torch.Tensor, v_below: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
) -> None:  # fmt: skip
    """``StaticKVCache.copy_from_below`` for the skipped rows."""
    rows = _skipped(order, count)
    b, slot = rows // T, slots.reshape(-1)[rows].long()
    k_cache[b, :, slot] = k_below[b, :, slot]
    v_cache[b, :, slot] = v_below[b, :, slot]


def _float(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


# -- kernels --------------------------------------------------------------------------------------


@jit
def _kv_project_kernel(
    x_ptr, w_ptr, b_ptr, cos_ptr, sin_ptr, norm_ptr, slots_ptr, order_ptr, count_ptr, k_ptr, v_ptr,
    N, T, K, eps, stride_x, stride_w, stride_rope, stride_cb, stride_ch, stride_cs,
    N_KV: tl.constexpr, HEAD_DIM: tl.constexpr, HALF_P: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_NORM: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """K and V of one kv head for BLOCK_M skipped rows. Each is computed as two halves (dims
    [0, hd/2) and [hd/2, hd)), which is what rotate_half pairs up."""
    count = tl.load(count_ptr)
    n_sel = N - count
    first = tl.program_id(0) * BLOCK_M
    if first >= n_sel:
        return
    head = tl.program_id(1)
    HALF = HEAD_DIM // 2
    pos = first + tl.arange(0, BLOCK_M)
    pos_ok = pos < n_sel
    rows = tl.load(order_ptr + count + pos, mask=pos_ok, other=0).to(tl.int64)
    j = tl.arange(0, HALF_P)
    j_ok = j < HALF
    k_row = head * HEAD_DIM + j  # weight rows of k's first half; + HALF: second half
    v_row = (N_KV + head) * HEAD_DIM + j
    k1 = tl.zeros((BLOCK_M, HALF_P), dtype=tl.float32)
    k2 = tl.zeros((BLOCK_M, HALF_P), dtype=tl.float32)
    v1 = tl.zeros((BLOCK_M, HALF_P), dtype=tl.float32)
    v2 = tl.zeros((BLOCK_M, HALF_P), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=pos_ok[:, None] & k_ok[None, :], other=0.0)
        w_ok = j_ok[None, :] & k_ok[:, None]
        wk1 = tl.load(w_ptr + k_row[None, :] * stride_w + ks[:, None], mask=w_ok, other=0.0)
        wk2 = tl.load(w_ptr + (k_row + HALF)[None, :] * stride_w + ks[:, None], mask=w_ok, other=0.0)
        wv1 = tl.load(w_ptr + v_row[None, :] * stride_w + ks[:, None], mask=w_ok, other=0.0)
        wv2 = tl.load(w_ptr + (v_row + HALF)[None, :] * stride_w + ks[:, None], mask=w_ok, other=0.0)
        if IEEE:
            k1 = tl.dot(a, wk1, k1, input_precision="ieee")
            k2 = tl.dot(a, wk2, k2, input_precision="ieee")
            v1 = tl.dot(a, wv1, v1, input_precision="ieee")
            v2 = tl.dot(a, wv2, v2, input_precision="ieee")
        else:
            k1 = tl.dot(a, wk1, k1)
            k2 = tl.dot(a, wk2, k2)
            v1 = tl.dot(a, wv1, v1)
            v2 = tl.dot(a, wv2, v2)
    if HAS_BIAS:
        k1 += tl.load(b_ptr + k_row, mask=j_ok, other=0.0).to(tl.float32)[None, :]
        k2 += tl.load(b_ptr + k_row + HALF, mask=j_ok, other=0.0).to(tl.float32)[None, :]
        v1 += tl.load(b_ptr + v_row, mask=j_ok, other=0.0).to(tl.float32)[None, :]
        v2 += tl.load(b_ptr + v_row + HALF, mask=j_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_NORM:
        rstd = 1.0 / tl.sqrt((tl.sum(k1 * k1, axis=1) + tl.sum(k2 * k2, axis=1)) / HEAD_DIM + eps)
        k1 = k1 * rstd[:, None] * tl.load(norm_ptr + j, mask=j_ok, other=0.0).to(tl.float32)[None, :]
        k2 = k2 * rstd[:, None] * tl.load(norm_ptr + HALF + j, mask=j_ok, other=0.0).to(tl.float32)[None, :]
    m2 = pos_ok[:, None] & j_ok[None, :]
    rope = rows[:, None] * stride_rope + j[None, :]
    cos1 = tl.load(cos_ptr + rope, mask=m2, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + rope + HALF, mask=m2, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + rope, mask=m2, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + rope + HALF, mask=m2, other=0.0).to(tl.float32)
    r1 = k1 * cos1 - k2 * sin1
    r2 = k2 * cos2 + k1 * sin2
    slot = tl.load(slots_ptr + rows, mask=pos_ok, other=0).to(tl.int64)
    dst = ((rows // T) * stride_cb + head * stride_ch + slot * stride_cs)[:, None] + j[None, :]
    ty = k_ptr.dtype.element_ty
    tl.store(k_ptr + dst, r1.to(ty), mask=m2)
    tl.store(k_ptr + dst + HALF, r2.to(ty), mask=m2)
    tl.store(v_ptr + dst, v1.to(ty), mask=m2)
    tl.store(v_ptr + dst + HALF, v2.to(ty), mask=m2)


@jit
def _kv_copy_kernel(
    slots_ptr, order_ptr, count_ptr, k_src, v_src, k_dst, v_dst, N, T, stride_cb, stride_ch, stride_cs,
    N_KV: tl.constexpr, HEAD_DIM: tl.constexpr, KV_P: tl.constexpr, HD_P: tl.constexpr,
):  # fmt: skip
    """Copy all kv heads of one skipped row's slot from the layer below."""
    pos = tl.load(count_ptr) + tl.program_id(0)
    if pos >= N:
        return
    row = tl.load(order_ptr + pos).to(tl.int64)
    slot = tl.load(slots_ptr + row).to(tl.int64)
    h = tl.arange(0, KV_P)
    d = tl.arange(0, HD_P)
    off = (row // T) * stride_cb + slot * stride_cs + h[:, None] * stride_ch + d[None, :]
    ok = (h < N_KV)[:, None] & (d < HEAD_DIM)[None, :]
    tl.store(k_dst + off, tl.load(k_src + off, mask=ok), mask=ok)
    tl.store(v_dst + off, tl.load(v_src + off, mask=ok), mask=ok)


# -- launchers ------------------------------------------------------------------------------------


def kv_fill_project(
    x: torch.Tensor, kv_weight: torch.Tensor, kv_bias: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
    slots: torch.Tensor, order: torch.Tensor, count: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    k_norm: torch.Tensor | None = None, eps: float = 1e-6,
) -> None:  # fmt: skip
    """Write k, v of the skipped rows into one layer's caches.

    x (B, T, d) normed attention input; kv_weight (2 * kv_heads * hd, d), k rows then v rows (the
    engine's ``qkv_w[q_dim:]``), kv_bias likewise or None; cos, sin (B, T, hd); slots (B, T);
    k_norm (hd,) RMSNorm weight applied to k before rope, or None."""
    B, n_kv, _, hd = k_cache.shape
    if hd % 2:
        raise ValueError(f"rotary embedding needs an even head_dim, got {hd}")
    if k_cache.stride(-1) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError("k and v caches must share one layout with contiguous head_dim")
    x2 = x.reshape(-1, x.shape[-1])
    N, K = x2.shape
    cos2, sin2 = cos.reshape(N, hd).contiguous(), sin.reshape(N, hd).contiguous()
    BLOCK_M = 16
    _kv_project_kernel[(cdiv(N, BLOCK_M), n_kv)](
        x2, kv_weight, kv_bias if kv_bias is not None else kv_weight, cos2, sin2,
        k_norm if k_norm is not None else kv_weight, slots.reshape(-1), order, count, k_cache, v_cache,
        N, N // B, K, eps, x2.stride(0), kv_weight.stride(0), cos2.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        N_KV=n_kv, HEAD_DIM=hd, HALF_P=max(16, next_pow2(hd // 2)),
        HAS_BIAS=kv_bias is not None, HAS_NORM=k_norm is not None, IEEE=x2.dtype == torch.float32,
        BLOCK_M=BLOCK_M, BLOCK_K=64,
    )  # fmt: skip


def kv_fill_copy_below(
    slots: torch.Tensor, order: torch.Tensor, count: torch.Tensor,
    k_below: torch.Tensor, v_below: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
) -> None:  # fmt: skip
    """Copy the layer below's k, v at the skipped rows' slots (slots (B, T)) into k/v_cache."""
    B, n_kv, _, hd = k_cache.shape
    if not all(t.stride() == k_cache.stride() for t in (v_cache, k_below, v_below)) or k_cache.stride(-1) != 1:
        raise ValueError("all four caches must share one layout with contiguous head_dim")
    N = slots.numel()
    _kv_copy_kernel[(N,)](
        slots.reshape(-1), order, count, k_below, v_below, k_cache, v_cache, N, N // B,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        N_KV=n_kv, HEAD_DIM=hd, KV_P=next_pow2(n_kv), HD_P=next_pow2(hd),
    )  # fmt: skip
