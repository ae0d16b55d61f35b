"""The fused CPU pass: the whole decoder stack of a pass of 1-16 token rows in one C++ call.

A decode step run op by op from Python pays ~1 us per operation, ~60 per layer: 4-6 ms of a 15-25 ms
step of SmolLM2-135M, and a larger share of a draft step that skips half the weights.
``cpu_step.cpp`` runs the same layer math (:mod:`specgate.layers` is its reference, and the tests
compare the two) as loops over the hidden vectors and the small-M linear kernel of ``cpu_linear.h``.

It covers what decoding runs most: plain decode steps and verify passes of up to 16 token rows in
all (batch x new tokens, left padding allowed; no gates, or gates that only pick skips with no
policy), and a single sequence's draft steps with scalar gates and calibrated thresholds
(:class:`specgate.policy.BudgetPolicy`), stand-ins of any rank and both K/V fills; fp32
activations, no autograd. :meth:`CpuStep.applies` says whether a pass is covered;
everything else runs the engine's PyTorch code.

``precision="bfloat16"``, ``"int8"`` or ``"int4"`` builds the pass over a low-precision copy of the
weight matrices and the LM head (int8: symmetric, one scale per output row; int4: the layers' matrices
in 4 bits with a scale and an offset per group of 32 inputs, GGUF's Q4_1 numbers in a layout of our
own for streaming, :func:`int4`, and the head in int8):
a draft that reads a half, a quarter or about a sixth of the layers' bytes (the engine's
``draft_precision``). It costs that copy's memory; the verifier keeps the float32 weights, so
speculation stays lossless. Weights that were dequantized from Q4_1 (the SmolLM2 GGUF we test with)
come back almost exactly in int4 (4-bit codes, with the scale and offset recomputed and stored in float16, as Q4_1 stores them).
On CPUs with AVX-512 VNNI the int8 and int4 products round the token rows to int8 too (a scale per 4
inputs for int8 weights, per 8 for int4 ones) and multiply 64 weights per instruction (:func:`int8_activations`; int8 rows of a multiple of
64 inputs, int4 ones always): the int8 and int4 drafts' products were compute-bound without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from . import cpu_linear

if TYPE_CHECKING:
    from specgate.adapters import ModelWeights
    from specgate.cache import StaticKVCache
    from specgate.gates import GateSet
    from specgate.policy import SkipPolicy
    from specgate.standin import StandIns

PRECISIONS = ("float32", "bfloat16", "int8", "int4")
GROUP = 32  # inputs per (scale, offset) pair of an int4 matrix (cpu_linear.h: kGroup)
Q4_ROWS = 4  # rows per block of an int4 matrix (cpu_linear.h: kQ4Rows)
# the input of a 64-input chunk at each position of an int4 matrix's layout (cpu_linear.h: q4_input)
Q4_INPUT = torch.tensor([32 * (p // 4 % 2) + 16 * (p // 32) + 4 * (p // 8 % 4) + p % 4 for p in range(64)])
ROWS_PER_PASS = 8  # token rows per pass over the weights (cpu_linear.h: kMaxRows)
MAX_TOKENS = 2 * ROWS_PER_PASS  # token rows (batch x tokens) of a fused pass: 9-16 read the weights twice


class CpuStep:
    """The fused pass over one model's weights (shared, not copied, in float32; ``precision``: see
    the module docstring). ``act``: the MLP activation's name (one of :attr:`ACTIVATIONS`). ``head``:
    the LM head already in ``head_precision(precision)`` (:func:`low_precision`'s pair), to share."""

    ACTIVATIONS = ("silu", "gelu_tanh")  # codes 0 and 1 of cpu_step.cpp

    def __init__(self, weights: "ModelWeights", act: str, precision: str = "float32", head: tuple | None = None):
        if cpu_linear.load() is None:
            raise RuntimeError("the CPU kernels could not be built (see the warning above): use kernels='torch'")
        if weights.embed.dtype != torch.float32:
            raise ValueError(f"the fused CPU pass runs float32 weights, not {weights.embed.dtype}: use kernels='torch'")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        vec = lambda t: torch.empty(0) if t is None else t.detach().float().contiguous()  # noqa: E731
        tensors, self.products = [], []  # products: the decoder's (matrix, scale) pairs, layer by layer
        for lw in weights.layers:
            mats = [low_precision(w, precision) for w in (lw.qkv_w, lw.o_w, lw.gate_up_w, lw.down_w)]
            self.products += mats
            (qkv, o, gate_up, down), scales = zip(*mats)
            tensors += [vec(lw.attn_norm), qkv, vec(lw.qkv_b), o, vec(lw.o_b), vec(lw.mlp_norm), gate_up, down]
            tensors += [vec(t) for t in (lw.q_norm, lw.k_norm, lw.post_attn_norm, lw.post_mlp_norm)] + list(scales)
        self.precision, self.act = precision, act
        if head is None and precision != "float32":  # else: the engine's copy of the head in head_precision(precision)
            head = low_precision(weights.lm_head, head_precision(precision))
        self.head = head  # logits()
        self.rope_kinds = list(weights.rope)
        ints = [weights.n_heads, weights.n_kv_heads, weights.head_dim, self.ACTIVATIONS.index(act)]
        ints += [lw.window or 0 for lw in weights.layers] + [self.rope_kinds.index(lw.rope) for lw in weights.layers]
        self._step = torch.classes.specgate.CpuStep(tensors, ints, [weights.eps, weights.scaling])
        self.weights = weights
        self._tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # RoPE cos, sin per position
        self._plans: dict[tuple, tuple] = {}  # (gates, thresholds, never_skip) -> (gates, thresholds, plan, stand-ins)

    @staticmethod
    def applies(input_ids: torch.Tensor, cache: "StaticKVCache", gates: "GateSet | None", policy: "SkipPolicy | None") -> bool:
        """Whether the fused pass computes this forward (else the engine's PyTorch code does)."""
        if torch.is_grad_enabled() or input_ids.device.type != "cpu":
            return False
        return CpuStep.covers(*input_ids.shape, gates, policy)

    @staticmethod
    def covers(B: int, T: int, gates: "GateSet | None", policy: "SkipPolicy | None") -> bool:
        """Whether the fused pass runs passes of B sequences x T tokens with these gates and policy
        (on the CPU, without autograd: :meth:`applies`)."""
        from specgate.engine import draft_adapters
        from specgate.policy import BudgetPolicy

        if B * T > MAX_TOKENS:
            return False
        if gates is None or policy is None:  # gates without a policy skip nothing
            return gates is None or not gates.config.scale_output
        if gates.config.scale_output or not isinstance(policy, BudgetPolicy) or T != 1:
            return False
        if policy.thresholds is None:  # single tokens without thresholds skip nothing (no adapters either)
            return draft_adapters(gates, policy) is None
        return B == 1 and gates.config.kind == "scalar"  # a draft step: one sequence's skips

    def hidden(self, h: torch.Tensor, cache: "StaticKVCache", gates, policy, copy_below: bool) -> list[int] | None:
        """Run the embedded tokens h (B, T, d) through every layer, in place, writing their K/V at the
        cache's next slots (the caller advances it). Returns, for a draft step, which branches were
        skipped (2 L flags, row 2 i + b), else None."""
        B, T, d = h.shape
        cos, sin = self._rope(max(cache.host_lengths) + T)
        drafting = gates is not None and policy is not None and policy.thresholds is not None
        plan, standins, adapters = self._plan(gates, policy) if drafting else (torch.empty(0), [], [])
        skipped = self._step.run(
            h.view(B * T, d), cache.k, cache.v, cache.host_lengths, cache.host_pad, cos, sin, plan, standins, adapters,
            copy_below,
        )  # fmt: skip
        return skipped.tolist() if plan.numel() else None

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm, the LM head in this pass's low precision, soft-capping -> (..., V) logits (the
        float32 pass leaves the head to the engine)."""
        from specgate.layers import head

        return head(self.weights, h, lambda x: low_precision_linear(x, *self.head))

    def _rope(self, n: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """cos and sin tables per RoPE kind, (positions, hd), for at least n positions."""
        first = self._tables.get(self.rope_kinds[0])
        if first is None or len(first[0]) < n:
            size = max(n, 2 * len(first[0]) if first is not None else 256)
            positions = torch.arange(size)[None]
            x = torch.empty(0, dtype=torch.float32)
            for kind in self.rope_kinds:
                cos, sin = self.weights.rope[kind](x, positions)
                self._tables[kind] = (cos[0].float().contiguous(), sin[0].float().contiguous())
        return [self._tables[k][0] for k in self.rope_kinds], [self._tables[k][1] for k in self.rope_kinds]

    def _plan(self, gates: "GateSet", policy) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """The draft's plan (2 L, d + 2): per branch its gate's weights and bias and its threshold
        (-1 where the step never skips), and the stand-ins' and adapters' tensors; built once per gates
        and thresholds."""
        from specgate.engine import draft_adapters

        adapters = draft_adapters(gates, policy)  # as the PyTorch path decides: none at budget 0
        # a budget's policies share its thresholds; stand-ins and adapters may be swapped on the same gates
        key = (id(gates), id(policy.thresholds), policy.never_skip, id(gates.standins), id(adapters))
        if key in self._plans and self._plans[key][0] is gates and self._plans[key][1] is policy.thresholds:
            return self._plans[key][2:]
        L, d = gates.config.num_layers, gates.config.hidden_size
        plan = torch.full((2 * L, d + 2), -1.0)
        with torch.no_grad():
            for i in range(L):
                for b in (0, 1):
                    proj = gates.gate(i, b).proj
                    plan[2 * i + b, :d] = proj.weight.reshape(-1).float()
                    plan[2 * i + b, d] = proj.bias.float()
                    if policy.may_skip(i, b, 1):
                        plan[2 * i + b, d + 1] = policy.threshold(i, b)
        maps = [_map_tensors(gates.standins), _map_tensors(adapters)]
        if len(self._plans) >= 16:  # a few live at once (one per calibrated budget)
            self._plans.clear()
        self._plans[key] = (gates, policy.thresholds, plan, *maps)
        return plan, *maps


def _map_tensors(s: "StandIns | None") -> list[torch.Tensor]:
    """The C++ pass's form of stand-ins or adapters: [], [c] or [c, A, B], float32."""
    if s is None:
        return []
    return [t.detach().float().contiguous() for t in ([s.bias] if s.rank == 0 else [s.bias, s.down, s.up])]


def low_precision(w: torch.Tensor, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight matrix (n, d) in ``precision`` and what the kernel needs beside it: float32 is w
    itself, bfloat16 a rounded copy (both with an empty tensor), int8 round(w / s) with s = max |w| / 127
    per row (and s), int4 see :func:`int4`."""
    w, empty = w.detach(), torch.empty(0)
    if precision == "float32":
        return w.float().contiguous(), empty
    if precision == "bfloat16":
        return w.to(torch.bfloat16).contiguous(), empty
    if precision == "int4":
        return int4(w)
    scale = w.float().abs().amax(1).clamp_min(1e-30) / 127
    return torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous(), scale


def low_precision_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (..., d) times a :func:`low_precision` pair's matrix (n, d) -> (..., n)."""
    return torch.ops.specgate.small_linear(x, weight, None, scale if scale.numel() else None)


def int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (n, d) as 4-bit codes per group of GROUP inputs with a float16 scale and offset per group (GGUF's
    Q4_1 numbers: code = round((w - offset) / scale) in 0..15 with offset the group's minimum and scale its
    range / 15, both rounded to float16, so w ~ scale * code + offset), in the kernels' streaming layout
    (cpu_linear.h, "4-bit weights"): blocks of Q4_ROWS rows, chunks of 64 inputs in the positions of
    :data:`Q4_INPUT` (a last half chunk padded), one uint8 matrix (n, 40 * ceil(d / 64)), and an empty
    tensor (no scale beside it). :func:`dequantized` reads it back."""
    n, d = w.shape
    if d % GROUP or n % Q4_ROWS:
        raise ValueError(
            f"an int4 copy needs a multiple of {GROUP} inputs and of {Q4_ROWS} rows per matrix, not ({n}, {d}): use draft_precision='int8'"
        )
    g = w.detach().float().reshape(n, d // GROUP, GROUP)
    offset = g.amin(-1).half()
    scale = ((g.amax(-1) - offset.float()) / 15).half()
    codes = torch.round((g - offset[..., None].float()) / scale[..., None].float().clamp_min(1e-30)).clamp(0, 15).to(torch.uint8)
    chunks = -(-d // 64)
    pad = 2 * chunks - d // GROUP  # a padding group adds scale 0 * code 0 + offset 0
    codes, scale, offset = F.pad(codes, (0, 0, 0, pad)), F.pad(scale, (0, pad)), F.pad(offset, (0, pad))
    positions = codes.reshape(n, chunks, 64)[..., Q4_INPUT]
    packed = positions[..., :32] | (positions[..., 32:] << 4)  # (n, chunks, 32)
    pairs = lambda t: t.reshape(n, chunks, 2).view(torch.uint8)  # noqa: E731  (n, chunks, 4): (A, B) float16
    block = lambda t: t.reshape(n // Q4_ROWS, Q4_ROWS, chunks, -1).transpose(1, 2).reshape(n // Q4_ROWS, chunks, -1)  # noqa: E731
    blocks = torch.cat([block(packed), block(pairs(scale)), block(pairs(offset))], -1)  # (n / 4, chunks, 160)
    return blocks.reshape(n, chunks * 40).contiguous(), torch.empty(0)


def _int4_float(q: torch.Tensor, d: int) -> torch.Tensor:
    """The (n, d) float32 matrix an :func:`int4` copy stands for."""
    n, chunks = q.shape[0], q.shape[1] // 40
    blocks = q.reshape(n // Q4_ROWS, chunks, 160)
    rows = lambda t: t.reshape(n // Q4_ROWS, chunks, Q4_ROWS, -1).transpose(1, 2).reshape(n, chunks, -1)  # noqa: E731
    packed = rows(blocks[..., :128])
    scale, offset = (rows(blocks[..., a : a + 16]).contiguous().view(torch.float16).float() for a in (128, 144))  # (n, chunks, 2)
    positions = torch.cat([packed & 15, packed >> 4], -1)
    codes = torch.empty_like(positions)
    codes[..., Q4_INPUT] = positions
    w = codes.reshape(n, 2 * chunks, GROUP).float() * scale.reshape(n, -1, 1) + offset.reshape(n, -1, 1)
    return w.reshape(n, 64 * chunks)[:, :d]


def dequantized(w: torch.Tensor, precision: str) -> torch.Tensor:
    """The float32 matrix that w's ``precision`` copy stands for: what the kernels compute with."""
    q, extra = low_precision(w, precision)
    if precision == "int4":
        return _int4_float(q, w.shape[1])
    return q.float() * extra[:, None] if extra.numel() else q.float()


def head_precision(precision: str) -> str:
    """The LM head's precision in a pass over a ``precision`` copy: int8 under int4 (the head decides
    the argmax, and is a quarter of SmolLM2's weights), else the same."""
    return "int8" if precision == "int4" else precision


def int8_activations() -> bool:
    """Whether the kernels' int8 and int4 products round the token rows to int8 too (CPUs with AVX-512 VNNI;
    rows of a multiple of 64 inputs): see :func:`rounded_activations`. Elsewhere they take the float32 rows."""
    return cpu_linear.load() is not None and torch.ops.specgate.int8_activations()


def rounded_activations(x: torch.Tensor, precision: str = "int8") -> torch.Tensor:
    """x (..., d) as an int8 or int4 product sees it where :func:`int8_activations` (the tests'
    reference): rounded to int8 with step max |x| / 127 over each group of inputs: 4 consecutive ones
    for int8 weights; for int4 ones, per chunk of 64 inputs in the layout's positions (:data:`Q4_INPUT`),
    the 8 at positions 4 l + j and 32 + 4 l + j (j < 4) for each l < 8 (one 32-bit lane of the kernel's
    two code vectors)."""
    if precision == "int8":
        return _rounded(x.reshape(*x.shape[:-1], -1, 4)).reshape(x.shape)
    d = x.shape[-1]
    chunks = -(-d // 64)
    xp = F.pad(x, (0, 64 * chunks - d)).reshape(*x.shape[:-1], chunks, 64)[..., Q4_INPUT]  # positions
    lanes = xp.reshape(*xp.shape[:-1], 2, 8, 4).transpose(-3, -2).reshape(*xp.shape[:-1], 8, 8)  # (..., chunks, l, 8)
    rounded = _rounded(lanes).reshape(*xp.shape[:-1], 8, 2, 4).transpose(-3, -2).reshape(xp.shape)
    out = torch.empty_like(rounded)
    out[..., Q4_INPUT] = rounded
    return out.reshape(*x.shape[:-1], 64 * chunks)[..., :d]


def _rounded(g: torch.Tensor) -> torch.Tensor:
    """g (..., n) rounded to int8 with step max |g| / 127 over its last dim."""
    top = g.abs().amax(-1, keepdim=True)
    return torch.round(g * torch.where(top > 0, 127 / top, 0)) * (top / 127)
