"""Small tensor operations the engine is built from, each with one dispatch point.

The sparse draft steps (gather the active tokens, run a branch on them, scatter the gated result
back) live here as plain PyTorch functions: they are the CPU path and the test oracle of the
Triton kernels in ``specgate.kernels``, which slot in at these functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .linear import linear  # noqa: F401 - the linear products: the backend measured fastest on this CPU


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, then cast back (as the Hugging Face modules do)."""
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, T, hd); cos, sin: (B, T, hd)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def gather_tokens(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Pick tokens along dim 1. x: (B, T, ...); order: (B, n) token indices -> (B, n, ...)."""
    index = order.view(*order.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, index)


def scatter_add_tokens(h: torch.Tensor, order: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """Add update (B, n, d) into h (B, T, d) at the token indices order (B, n)."""
    return h.scatter_add(1, order.unsqueeze(-1).expand(-1, -1, h.shape[-1]), update)
