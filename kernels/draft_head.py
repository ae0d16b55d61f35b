"""Draft head: the LM head over a vocabulary subset, fused with the choice of the draft token.

A draft only needs its token (and, for speculative sampling, its distribution over a few
candidates), so the head runs over a subset of the vocabulary (``w_sub``: a contiguous, reordered
copy of the subset's rows of the LM head; ``vocab_map``: subset position -> full-vocabulary id)
and never writes logits. Two passes:

1. ``_head_partial_kernel``, one program per (16 rows, 128 vocabulary entries) block: the block's
   logits (optionally soft-capped, divided by the temperature), reduced in registers to its top
   ``k`` entries (k = 1 for greedy) and, for greedy, its sum of exp(logit - block max);
2. a finishing kernel per row merges the blocks' candidates: the argmax (ties to the lowest subset
   position, as ``torch.argmax``) and its probability within the subset; or the top k, their
   softmax, and a sample drawn by inverse CDF from a given uniform number, so that results can be
   compared exactly with the reference.
"""

from __future__ import annotations

import torch

from . import cdiv, jit, next_pow2

try:
    import triton.language as tl
except ImportError:  # the references below still work
    tl = None

BLOCK_B, BLOCK_V, BLOCK_D = 16, 128, 64
MERGE_CHUNK = 1024  # candidates a finishing program holds at once
MAX_TOP_K = BLOCK_V


# -- PyTorch references ---------------------------------------------------------------------------


def subset_logits_reference(
    h: torch.Tensor, w_sub: torch.Tensor, softcap: float | None = None, temperature: float = 1.0
) -> torch.Tensor:
    """(B, Vs) float32 logits over the subset (what the kernels never write)."""
    logits = h.float() @ w_sub.float().T
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits / temperature


def draft_argmax_reference(
    h: torch.Tensor, w_sub: torch.Tensor, vocab_map: torch.Tensor, softcap: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy draft token (B,) as full-vocabulary ids, and its probability within the subset."""
    logits = subset_logits_reference(h, w_sub, softcap)
    best = logits.argmax(-1)
    return vocab_map[best].long(), logits.softmax(-1).gather(1, best[:, None]).squeeze(1)


def draft_sample_topk_reference(
    h: torch.Tensor, w_sub: torch.Tensor, vocab_map: torch.Tensor, u: torch.Tensor, top_k: int,
    temperature: float = 1.0, softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Top-k sampling with given uniforms u (B,): the sampled token (B,), the top-k ids (B, k)
    and their probabilities (B, k), largest first."""
    logits = subset_logits_reference(h, w_sub, softcap, temperature)
    vals, pos = logits.sort(dim=-1, descending=True, stable=True)
    vals, pos = vals[:, :top_k], pos[:, :top_k]
    e = (vals - vals[:, :1]).exp()
    cdf = e.cumsum(-1)
    pick = (cdf <= u[:, None].float() * cdf[:, -1:]).sum(-1).clamp(max=top_k - 1)
    ids = vocab_map[pos].long()
    return ids.gather(1, pick[:, None]).squeeze(1), ids, e / cdf[:, -1:]


# -- kernels --------------------------------------------------------------------------------------


@jit
def _head_partial_kernel(
    h_ptr, w_ptr, val_ptr, idx_ptr, sum_ptr, B, V, D, stride_h, stride_w, n_blocks, inv_temp, softcap,
    HAS_SOFTCAP: tl.constexpr, TOPK: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Logits of one (rows, vocabulary block) tile, reduced to the block's top TOPK per row."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    blk = tl.program_id(1)
    cols = blk * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    acc = tl.zeros((BLOCK_B, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        a = tl.load(h_ptr + rows[:, None] * stride_h + ds[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(
            w_ptr + cols[None, :].to(tl.int64) * stride_w + ds[:, None], mask=col_ok[None, :] & d_ok[:, None], other=0.0
        )
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
    if HAS_SOFTCAP:  # tanh(z) = 2 sigmoid(2z) - 1
        acc = (2.0 * tl.sigmoid(2.0 * acc / softcap) - 1.0) * softcap
    logits = tl.where(col_ok[None, :], acc * inv_temp, float("-inf"))
    block_max = tl.max(logits, axis=1)
    out = (rows * n_blocks + blk) * TOPK
    tl.store(sum_ptr + rows * n_blocks + blk, tl.sum(tl.exp(logits - block_max[:, None]), axis=1), mask=row_ok)
    for i in range(TOPK):
        m = tl.max(logits, axis=1)
        first = tl.min(tl.where((logits == m[:, None]) & col_ok[None, :], cols[None, :], V + BLOCK_V), axis=1)
        tl.store(val_ptr + out + i, m, mask=row_ok)
        tl.store(idx_ptr + out + i, first, mask=row_ok)
        logits = tl.where(cols[None, :] == first[:, None], float("-inf"), logits)


@jit
def _argmax_finish_kernel(val_ptr, idx_ptr, sum_ptr, map_ptr, tok_ptr, prob_ptr, n_blocks, CHUNK: tl.constexpr):
    """One row: the best block (the first among equals) and an online log-sum-exp over blocks."""
    row = tl.program_id(0)
    best = tl.full((), float("-inf"), tl.float32)
    best_blk = tl.zeros((), dtype=tl.int32)
    total = tl.zeros((), dtype=tl.float32)  # sum of exp(logit - best)
    for c0 in range(0, n_blocks, CHUNK):
        blks = c0 + tl.arange(0, CHUNK)
        ok = blks < n_blocks
        v = tl.load(val_ptr + row * n_blocks + blks, mask=ok, other=float("-inf"))
        s = tl.load(sum_ptr + row * n_blocks + blks, mask=ok, other=0.0)
        m = tl.max(v, axis=0)
        first = tl.min(tl.where((v == m) & ok, blks, n_blocks), axis=0)
        new_best = tl.maximum(best, m)
        total = total * tl.exp(best - new_best) + tl.sum(tl.where(ok, s * tl.exp(v - new_best), 0.0), axis=0)
        best_blk = tl.where(m > best, first, best_blk)
        best = new_best
    sub = tl.load(idx_ptr + row * n_blocks + best_blk)
    tl.store(tok_ptr + row, tl.load(map_ptr + sub).to(tl.int64))
    tl.store(prob_ptr + row, 1.0 / total)


@jit
def _topk_finish_kernel(
    val_ptr, idx_ptr, map_ptr, u_ptr, tok_ptr, ids_ptr, probs_ptr, n_cand,
    TOPK: tl.constexpr, K_P: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    """One row: merge the blocks' candidates chunk by chunk into a running sorted top k (earlier
    candidates win ties: they have lower subset positions), then sample from its softmax."""
    row = tl.program_id(0)
    kk = tl.arange(0, K_P)
    cc = tl.arange(0, CHUNK)
    run_v = tl.full((K_P,), float("-inf"), tl.float32)
    run_i = tl.zeros((K_P,), dtype=tl.int32)
    for c0 in range(0, n_cand, CHUNK):
        ok = c0 + cc < n_cand
        cv = tl.load(val_ptr + row * n_cand + c0 + cc, mask=ok, other=float("-inf"))
        ci = tl.load(idx_ptr + row * n_cand + c0 + cc, mask=ok, other=0)
        new_v = tl.full((K_P,), float("-inf"), tl.float32)
        new_i = tl.zeros((K_P,), dtype=tl.int32)
        for i in range(TOPK):
            m_r = tl.max(run_v, axis=0)
            m_c = tl.max(cv, axis=0)
            take_r = m_r >= m_c
            p_r = tl.min(tl.where(run_v == m_r, kk, K_P), axis=0)
            p_c = tl.min(tl.where(cv == m_c, cc, CHUNK), axis=0)
            idx_r = tl.sum(tl.where(kk == p_r, run_i, 0), axis=0)
            idx_c = tl.sum(tl.where(cc == p_c, ci, 0), axis=0)
            new_v = tl.where(kk == i, tl.where(take_r, m_r, m_c), new_v)
            new_i = tl.where(kk == i, tl.where(take_r, idx_r, idx_c), new_i)
            run_v = tl.where(kk == tl.where(take_r, p_r, K_P), float("-inf"), run_v)  # K_P, CHUNK: no entry
            cv = tl.where(cc == tl.where(take_r, CHUNK, p_c), float("-inf"), cv)
        run_v = new_v
        run_i = new_i
    in_k = kk < TOPK
    e = tl.where(in_k, tl.exp(run_v - tl.max(run_v, axis=0)), 0.0)
    total = tl.sum(e, axis=0)
    cdf = tl.cumsum(e, axis=0)
    u = tl.load(u_ptr + row).to(tl.float32)
    pick = tl.minimum(tl.sum(((cdf <= u * total) & in_k).to(tl.int32), axis=0), TOPK - 1)
    ids = tl.load(map_ptr + run_i, mask=in_k, other=0).to(tl.int64)
    tl.store(ids_ptr + row * TOPK + kk, ids, mask=in_k)
    tl.store(probs_ptr + row * TOPK + kk, e / total, mask=in_k)
    tl.store(tok_ptr + row, tl.sum(tl.where(kk == pick, ids, 0), axis=0))


# -- launchers ------------------------------------------------------------------------------------


def _partials(h, w_sub, top_k: int, temperature: float, softcap: float | None):
    if h.dtype != w_sub.dtype:
        raise TypeError(f"h is {h.dtype} but w_sub is {w_sub.dtype}")
    if h.stride(-1) != 1 or w_sub.stride(-1) != 1:
        raise ValueError("h and w_sub need contiguous rows")
    B, D = h.shape
    V = w_sub.shape[0]
    n_blocks = cdiv(V, BLOCK_V)
    vals = torch.empty(B, n_blocks * top_k, dtype=torch.float32, device=h.device)
    idx = torch.empty(B, n_blocks * top_k, dtype=torch.int32, device=h.device)
    sums = torch.empty(B, n_blocks, dtype=torch.float32, device=h.device)
    _head_partial_kernel[(cdiv(B, BLOCK_B), n_blocks)](
        h, w_sub, vals, idx, sums, B, V, D, h.stride(0), w_sub.stride(0), n_blocks, 1.0 / temperature,
        float(softcap or 1.0), HAS_SOFTCAP=bool(softcap), TOPK=top_k, IEEE=h.dtype == torch.float32,
        BLOCK_B=BLOCK_B, BLOCK_V=BLOCK_V, BLOCK_D=BLOCK_D,
    )  # fmt: skip
    return vals, idx, sums, n_blocks


def draft_argmax(
    h: torch.Tensor, w_sub: torch.Tensor, vocab_map: torch.Tensor, softcap: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """h (B, d), already final-normed; w_sub (Vs, d); vocab_map (Vs,) -> greedy tokens (B,) int64
    (full-vocabulary ids) and each one's probability within the subset (B,) float32."""
    vals, idx, sums, n_blocks = _partials(h, w_sub, 1, 1.0, softcap)
    B = h.shape[0]
    tokens = torch.empty(B, dtype=torch.int64, device=h.device)
    prob = torch.empty(B, dtype=torch.float32, device=h.device)
    _argmax_finish_kernel[(B,)](vals, idx, sums, vocab_map, tokens, prob, n_blocks, CHUNK=min(MERGE_CHUNK, next_pow2(n_blocks)))
    return tokens, prob


def draft_sample_topk(
    h: torch.Tensor, w_sub: torch.Tensor, vocab_map: torch.Tensor, u: torch.Tensor, top_k: int,
    temperature: float = 1.0, softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Sample one draft token per row from the softmax of the top_k subset logits / temperature,
    by inverse CDF at the uniforms u (B,). Returns the tokens (B,) int64, the top_k ids (B, k)
    int64 and their probabilities (B, k) float32, largest first (the draft's sparse q)."""
    if not 1 <= top_k <= min(MAX_TOP_K, w_sub.shape[0]):
        raise ValueError(f"top_k must be in [1, {min(MAX_TOP_K, w_sub.shape[0])}], got {top_k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    vals, idx, _, n_blocks = _partials(h, w_sub, top_k, temperature, softcap)
    B = h.shape[0]
    tokens = torch.empty(B, dtype=torch.int64, device=h.device)
    ids = torch.empty(B, top_k, dtype=torch.int64, device=h.device)
    probs = torch.empty(B, top_k, dtype=torch.float32, device=h.device)
    n_cand = n_blocks * top_k
    _topk_finish_kernel[(B,)](
        vals, idx, vocab_map, u, tokens, ids, probs, n_cand,
        TOPK=top_k, K_P=next_pow2(top_k), CHUNK=min(MERGE_CHUNK, max(16, next_pow2(n_cand))),
    )  # fmt: skip
    return tokens, ids, probs
