"""Small tensor operations the engine is built from, each with one dispatch point.

The sparse draft steps (gather the active tokens, run a branch on them, scatter the gated result
back) live here as plain PyTorch functions: they are the CPU path and the test oracle of the
Triton kernels in ``specgate.kernels``, which slot in at these functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _probe_onednn_linear() -> bool:
    """oneDNN's linear streams fp32 weights about 2x faster than the BLAS GEMV behind F.linear on
    x86 CPUs for the few-row products of decoding, on the same (unpacked) weight tensors."""
    try:
        x, w = torch.ones(1, 4), torch.ones(3, 4)
        return bool(torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "").sum() == 12)
    except (AttributeError, RuntimeError):
        return False


_ONEDNN_LINEAR: bool | None = None  # probed on first use, not at import


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, routed to oneDNN for CPU inference (no autograd) where that is available."""
    global _ONEDNN_LINEAR
    if x.device.type == "cpu" and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        if _ONEDNN_LINEAR is None:
            _ONEDNN_LINEAR = _probe_onednn_linear()
        if _ONEDNN_LINEAR and x.dtype in (torch.float32, torch.bfloat16):
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


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
