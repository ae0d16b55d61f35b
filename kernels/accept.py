"""Acceptance of a batch of drafts on the device: greedy prefix match and speculative sampling.

Both return, per sequence, the number of drafts accepted and the next token (a correction after a
rejection, a bonus token after a full accept), as int64 tensors, like the references in
:mod:`specgate.speculative`. Speculative sampling takes its uniform numbers as inputs (``u`` for
the k accept tests, ``u_next`` for the next token, drawn by inverse CDF), so its results can be
compared exactly with :func:`rejection_sample_reference`; given ``u = torch.rand(B, k,
generator=g)`` the accepted counts equal those of ``specgate.speculative.rejection_sample`` with
the same generator.
"""

from __future__ import annotations

import torch

from . import jit, next_pow2

try:
    import triton.language as tl
except ImportError:  # the references below still work
    tl = None

BLOCK_V = 1024


# -- PyTorch references ---------------------------------------------------------------------------


def greedy_accept_reference(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``specgate.speculative.greedy_accept``: draft (B, k), target logits (B, k+1, V)."""
    target = target_logits.argmax(-1)
    n = (target[:, :-1] == draft_tokens).to(torch.long).cumprod(1).sum(1)
    return n, target.gather(1, n[:, None]).squeeze(1)


def rejection_sample_reference(
    draft_tokens: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor,
    u: torch.Tensor, u_next: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``specgate.speculative.rejection_sample`` with its random numbers given: draft i is
    accepted while u_i * q_i(x) <= p_i(x); the next token is the first index whose cumulative
    residual max(p_n - q_n, 0) (p_n where that is all zero) exceeds u_next * its total."""
    B, k = draft_tokens.shape
    p_x = target_probs[:, :k].gather(2, draft_tokens[..., None]).squeeze(2)
    q_x = draft_probs.gather(2, draft_tokens[..., None]).squeeze(2)
    n = (u * q_x <= p_x).to(torch.long).cumprod(1).sum(1)
    rows = torch.arange(B, device=n.device)
    p_n = target_probs[rows, n].float()
    q_n = torch.cat([draft_probs, torch.zeros_like(draft_probs[:, :1])], 1)[rows, n].float()
    residual = (p_n - q_n).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) <= 0, p_n, residual)
    cdf = residual.cumsum(-1)
    last = residual.shape[1] - 1 - (residual > 0).flip(-1).to(torch.int8).argmax(-1)  # last index with mass
    pick = (cdf <= u_next[:, None].float() * cdf[:, -1:]).sum(-1)
    return n, torch.minimum(pick, last)


# -- kernels --------------------------------------------------------------------------------------


@jit
def _argmax_rows_kernel(x_ptr, out_ptr, V, stride_row, BLOCK: tl.constexpr):
    """Argmax of one row of logits (first index among equal maxima, as torch.argmax)."""
    row = tl.program_id(0).to(tl.int64)
    best = tl.full((), float("-inf"), tl.float32)
    best_i = tl.zeros((), dtype=tl.int64)
    for v0 in range(0, V, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        ok = cols < V
        x = tl.load(x_ptr + row * stride_row + cols, mask=ok, other=float("-inf")).to(tl.float32)
        m = tl.max(x, axis=0)
        first = tl.min(tl.where((x == m) & ok, cols, V), axis=0).to(tl.int64)
        best_i = tl.where(m > best, first, best_i)
        best = tl.maximum(best, m)
    tl.store(out_ptr + row, best_i)


@jit
def _greedy_prefix_kernel(draft_ptr, target_ptr, n_ptr, next_ptr, K, K_P: tl.constexpr):
    """One sequence: length of the agreed prefix and the verifier's token right after it."""
    b = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, K_P)
    ok = j < K
    d = tl.load(draft_ptr + b * K + j, mask=ok, other=0)
    t = tl.load(target_ptr + b * (K + 1) + j, mask=ok, other=0)
    n = tl.min(tl.where((t != d) & ok, j, K), axis=0)
    tl.store(n_ptr + b, n.to(tl.int64))
    tl.store(next_ptr + b, tl.load(target_ptr + b * (K + 1) + n))


@jit
def _rejection_kernel(
    draft_ptr, q_ptr, p_ptr, u_ptr, u_next_ptr, n_ptr, next_ptr, K, V,
    sq_b, sq_k, sp_b, sp_k, K_P: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One sequence: accept tests in order, then the next token from the residual distribution
    (two passes over the vocabulary: its total, then the inverse-CDF search)."""
    b = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, K_P)
    ok = j < K
    d = tl.load(draft_ptr + b * K + j, mask=ok, other=0)
    p_x = tl.load(p_ptr + b * sp_b + j * sp_k + d, mask=ok, other=0.0).to(tl.float32)
    q_x = tl.load(q_ptr + b * sq_b + j * sq_k + d, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + b * K + j, mask=ok, other=0.0).to(tl.float32)
    n = tl.min(tl.where(~(u * q_x <= p_x) & ok, j, K), axis=0)
    p_row = p_ptr + b * sp_b + n * sp_k
    q_row = q_ptr + b * sq_b + n * sq_k
    q_end = tl.where(n < K, V, 0)  # after a full accept q is zero: the bonus token comes from p
    res_total = tl.zeros((), dtype=tl.float32)
    p_total = tl.zeros((), dtype=tl.float32)
    for v0 in range(0, V, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        okv = cols < V
        p = tl.load(p_row + cols, mask=okv, other=0.0).to(tl.float32)
        q = tl.load(q_row + cols, mask=cols < q_end, other=0.0).to(tl.float32)
        res_total += tl.sum(tl.maximum(p - q, 0.0), axis=0)
        p_total += tl.sum(p, axis=0)
    use_p = res_total <= 0.0  # p == q: sampling from p is the same law
    q_end = tl.where(use_p, 0, q_end)
    target = tl.load(u_next_ptr + b).to(tl.float32) * tl.where(use_p, p_total, res_total)
    seen = tl.zeros((), dtype=tl.float32)
    below = tl.zeros((), dtype=tl.int64)  # entries whose cumulative mass is <= target
    last = tl.zeros((), dtype=tl.int64)  # last entry with mass: the answer if rounding runs past the end
    for v0 in range(0, V, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        okv = cols < V
        p = tl.load(p_row + cols, mask=okv, other=0.0).to(tl.float32)
        q = tl.load(q_row + cols, mask=cols < q_end, other=0.0).to(tl.float32)
        r = tl.where(okv, tl.maximum(p - q, 0.0), 0.0)
        cdf = seen + tl.cumsum(r, axis=0)
        below += tl.sum(((cdf <= target) & okv).to(tl.int64), axis=0)
        last = tl.maximum(last, tl.max(tl.where(r > 0, cols, 0), axis=0).to(tl.int64))
        seen += tl.sum(r, axis=0)
    tl.store(n_ptr + b, n.to(tl.int64))
    tl.store(next_ptr + b, tl.minimum(below, last))


# -- launchers ------------------------------------------------------------------------------------


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """(..., V) -> (...) int64 argmax, one program per row."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape[0], dtype=torch.int64, device=x.device)
    _argmax_rows_kernel[(x2.shape[0],)](x2, out, x2.shape[1], x2.stride(0), BLOCK=min(BLOCK_V, next_pow2(x2.shape[1])))
    return out.view(x.shape[:-1])


def greedy_accept(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """draft_tokens (B, k), target_logits (B, k+1, V) -> accepted count (B,), next token (B,)."""
    B, k = draft_tokens.shape
    target = argmax_rows(target_logits).contiguous()
    drafts = draft_tokens.to(torch.int64).contiguous()
    n = torch.empty(B, dtype=torch.int64, device=drafts.device)
    nxt = torch.empty(B, dtype=torch.int64, device=drafts.device)
    _greedy_prefix_kernel[(B,)](drafts, target, n, nxt, k, K_P=max(2, next_pow2(k)))
    return n, nxt


def rejection_sample(
    draft_tokens: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor,
    u: torch.Tensor, u_next: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """draft_tokens (B, k) drawn from q = draft_probs (B, k, V); p = target_probs (B, k+1, V);
    u (B, k) and u_next (B,) uniforms in [0, 1) -> accepted count (B,), next token (B,)."""
    B, k = draft_tokens.shape
    V = target_probs.shape[-1]
    if draft_probs.stride(-1) != 1 or target_probs.stride(-1) != 1:
        raise ValueError("probabilities need a contiguous vocabulary dimension")
    drafts = draft_tokens.to(torch.int64).contiguous()
    n = torch.empty(B, dtype=torch.int64, device=drafts.device)
    nxt = torch.empty(B, dtype=torch.int64, device=drafts.device)
    _rejection_kernel[(B,)](
        drafts, draft_probs, target_probs, u.contiguous(), u_next.contiguous(), n, nxt, k, V,
        draft_probs.stride(0), draft_probs.stride(1), target_probs.stride(0), target_probs.stride(1),
        K_P=max(2, next_pow2(k)), BLOCK=min(BLOCK_V, next_pow2(V)),
    )  # fmt: skip
    return n, nxt
