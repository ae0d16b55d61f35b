"""Which code runs the engine's passes: the PyTorch path, the Triton kernels or the fused CPU pass (``kernels=``).

``load(..., kernels=)`` / ``Engine(model, kernels=)`` take ``"auto"`` (Triton on CUDA tensors when
Triton imports; on the CPU the fused pass where it applies, else PyTorch), ``"torch"`` (always the
PyTorch path), ``"triton"`` (the kernels of :mod:`specgate.kernels`; on the CPU only under
``TRITON_INTERPRET=1``, set before Python imports torch) or ``"cpu"`` (the fused pass, an error
where it cannot be built). ``"auto"`` takes the fused pass where it is measured faster than the PyTorch path
(:func:`fused_pays`). This module is the one place that chooses: :func:`resolve` names the
path; the engine holds a :class:`TritonKernels` (``engine.kernels``, :func:`make`) or a
:class:`~specgate.kernels.cpu_step.CpuStep` (``engine.cpu_step``, :func:`make_cpu_step`), or neither:
the PyTorch path, the engine's own code, unchanged.

The fused CPU pass (:mod:`specgate.kernels.cpu_step`) runs a whole pass of up to 16 token rows
(batch x new tokens) in one C++ call: plain decode steps, verify passes and one sequence's
single-token draft steps with scalar gates. Other passes (prefill, more rows, a batch's skipping
drafts, multi-token skipping passes) run the PyTorch code.

What the Triton path covers: passes with gates and the engine's own :class:`BudgetPolicy`, and
sparse-inputs passes (:mod:`specgate.sparse_inputs`, alone or inside the gates' skips, with
``kv_fill="project"``), run without autograd (the draft steps, and multi-token skipping passes):

1. routing, gate importance -> active rows (thresholds for single tokens, budget ranking otherwise);
2. the gathered projections of the active rows (attention q/k/v and o, MLP gate_up + act + down);
   with sparse inputs, products that read only the weights of the inputs they keep
   (:func:`specgate.kernels.projection.sparse_linear`), over an input-major copy of the decoder matrices that
   the first such pass makes (as much memory again as those matrices);
3. the gated scatter-add into the residual stream (in place), with the gates' stand-ins
   (:mod:`specgate.standin`) added at the rows that skip a branch;
4. the K/V of the tokens that skip attention (``kv_fill="project"`` and ``"copy_below"``);
5. a greedy draft's token under a draft vocabulary's head (:class:`specgate.vocab.DraftHead`): the
   head fused with the argmax, no logits written (the speculative loop's drafter calls it);
6. greedy acceptance and speculative sampling in the speculative loop.

Everything else (prefill, plain decode, verify passes, attention itself, norms, the full LM head, a
draft vocabulary's head when sampling, passes with a custom :class:`SkipPolicy`) runs the PyTorch
code on the same device.

No host synchronisation in a draft step: the routes keep the number of active rows on the device,
the skip counts are summed there (:meth:`TritonKernels.finish`), and the engine takes the cache's
positions from its host copies (:class:`specgate.cache.StaticKVCache`), so a single-token Triton
draft step reads nothing from the device on the host (``tests/test_triton_path.py`` checks it in
the interpreter). That is what CUDA-graph capture needs first, not all it needs: a step's shapes
and arguments still change with the position (it attends to the first S cache slots and writes at
a slot the host knows), so a captured step would replay one position only. A speculative round
waits on the device once, to read its acceptance. Nothing here has run on a GPU (none was
available to this work) and no CUDA graph has been captured.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from . import layers
from .ops import rms_norm
from .policy import BudgetPolicy

if TYPE_CHECKING:
    from .adapters import LayerWeights, ModelWeights
    from .kernels.cpu_step import CpuStep
    from .kernels.screened_head import ScreenedHead
    from .engine import Engine, _Pass
    from .vocab import DraftHead

KERNELS = ("auto", "torch", "triton", "cpu")


def resolve(kernels: str, device: torch.device | str) -> str:
    """``"torch"``, ``"triton"`` or ``"cpu"``: the path ``kernels`` means on ``device``. A path that
    cannot run there raises an error that says what to do."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    if kernels == "torch":
        return "torch"
    on_cpu = torch.device(device).type == "cpu"
    if kernels == "cpu":
        if not on_cpu:
            raise ValueError(f"kernels='cpu' runs CPU tensors, the model is on {device}: use kernels='auto'")
        return "cpu"
    from .kernels import require_triton, triton_available

    if kernels == "auto":
        if on_cpu:
            return "cpu"
        return "triton" if torch.device(device).type == "cuda" and triton_available(device) else "torch"
    require_triton(device)
    return "triton"


def make(kernels: str, weights: "ModelWeights") -> "TritonKernels | None":
    """The engine's Triton dispatch, or None (another path)."""
    return TritonKernels(weights) if resolve(kernels, weights.embed.device) == "triton" else None


def make_cpu_step(
    kernels: str, weights: "ModelWeights", precision: str = "float32", head: tuple | None = None
) -> "CpuStep | None":
    """The engine's fused CPU pass (over a ``precision`` copy of the weights), or None (another
    path). ``"auto"`` falls back to the PyTorch path where the fused pass cannot run (no compiler,
    not float32, another activation); ``"cpu"`` then raises an error that says so. Whether "auto"
    keeps it is :func:`fused_pays`. ``head``: the LM head's copy in the pass's head precision, if one is
    made already (shared, not copied again)."""
    if resolve(kernels, weights.embed.device) != "cpu":
        return None
    from .kernels.cpu_step import CpuStep

    try:
        return CpuStep(weights, activation_name(weights.act, CpuStep.ACTIVATIONS), precision, head)
    except (RuntimeError, ValueError):
        if kernels == "cpu":
            raise
        return None


def _decoder(weights: "ModelWeights") -> list[torch.Tensor]:
    """The decoder's matrices in the order a step reads them: q/k/v, output, gate/up, down per layer."""
    return [m for lw in weights.layers for m in (lw.qkv_w, lw.o_w, lw.gate_up_w, lw.down_w)]


def _shapes(weights: "ModelWeights") -> str:
    """The model's shape as the names of the timed choices give it (kept on disk per shape)."""
    lw = weights.layers[0]
    return f"{len(weights.layers)} layers {tuple(lw.qkv_w.shape)} {tuple(lw.gate_up_w.shape)}"


def _forced_block_rows() -> int | None:
    """``SPECGATE_BLOCK_ROWS`` (8 or 4), if set."""
    forced = os.environ.get("SPECGATE_BLOCK_ROWS")
    if forced not in (None, "8", "4"):
        raise ValueError(f"SPECGATE_BLOCK_ROWS must be 8 or 4, got {forced!r}")
    return int(forced) if forced else None


def _forced_prefetch() -> tuple[int, int] | None:
    """``SPECGATE_PREFETCH`` as (far, near) bytes, if set."""
    forced = os.environ.get("SPECGATE_PREFETCH")
    if forced is None:
        return None
    try:
        far, near = (int(b) for b in forced.split(":"))
    except ValueError:
        raise ValueError(f"SPECGATE_PREFETCH must be FAR:NEAR in bytes, e.g. 24576:1024, got {forced!r}") from None
    return far, near


def block_rows(weights: "ModelWeights") -> int | None:
    """Sets how many weight rows the CPU kernels' products stream at once (8 or 4; see ``block_cap``
    in kernels/cpu_linear.h) to the faster for this model's decoder products at 1 and 2 token rows,
    timed interleaved once per machine, thread count and shape and kept on disk with the products'
    choices; ``SPECGATE_BLOCK_ROWS=8|4`` sets it without timing. Returns it (None without the
    kernels). The setting holds for the process: it is the machine's, not the model's."""
    from . import linear
    from .kernels import cpu_linear

    if cpu_linear.load() is None:
        return None
    forced = _forced_block_rows()
    name = f"block rows: {_shapes(weights)}, 1 + 2 rows"
    labels = {"block 8": 8, "block 4": 4}  # as bench output lists the choices
    choice = f"block {forced}" if forced else linear.remembered(name, tuple(labels))
    if choice is None:
        mats = _decoder(weights)
        xs = {m.shape[1]: torch.randn(2, m.shape[1]) for m in mats}

        def products(cap: int) -> None:
            torch.ops.specgate.set_block_rows(cap)
            for T in (1, 2):
                for m in mats:
                    torch.ops.specgate.small_linear(xs[m.shape[1]][:T], m)

        with torch.inference_mode():
            choice = linear.fastest(name, {label: lambda n=n: products(n) for label, n in labels.items()}, reps=5)
    torch.ops.specgate.set_block_rows(labels[choice])
    return labels[choice]


# Prefetch distances the CPU kernels choose between per token-row count (bytes ahead into L2, into
# L1; see Prefetch in kernels/cpu_linear.h), labelled as bench output lists the choices. A 2-core AMD
# EPYC (Zen 4) streamed 1-2 row products 7-10% faster without the L1 prefetch and 5-8 row ones 2-10%
# slower (eval/kernel_rates.py --prefetch); on an Intel Xeon the L1 prefetch paid at 5 rows and cost
# nothing at 1.
PREFETCH = {"prefetch L2+L1": (24576, 1024), "prefetch L2": (24576, 0)}


def prefetch(weights: "ModelWeights") -> dict[int, str] | None:
    """Sets how far ahead the CPU kernels prefetch their weights, per token-row count 1..8: the
    faster of :data:`PREFETCH` for this model's decoder products at that row count, timed
    interleaved once per machine, thread count and shape and kept on disk with the products'
    choices; ``SPECGATE_PREFETCH=FAR:NEAR`` (bytes) sets every row count without timing. Returns the
    labels per row count (None without the kernels). Like the block rows it holds for the process."""
    from . import linear
    from .kernels import cpu_linear

    if cpu_linear.load() is None:
        return None
    forced = _forced_prefetch()
    if forced is not None:
        for T in range(1, 9):
            torch.ops.specgate.set_prefetch(T, *forced)
        return dict.fromkeys(range(1, 9), "prefetch {}:{}".format(*forced))
    mats = _decoder(weights)
    xs = {d: torch.randn(8, d) for d in {m.shape[1] for m in mats}}
    chosen = {}
    for T in range(1, 9):
        name = f"prefetch: {_shapes(weights)}, {T} rows"
        choice = linear.remembered(name, tuple(PREFETCH))
        if choice is None:

            def products(plan: tuple[int, int], T: int = T) -> None:
                torch.ops.specgate.set_prefetch(T, *plan)
                for m in mats:
                    torch.ops.specgate.small_linear(xs[m.shape[1]][:T], m)

            with torch.inference_mode():
                choice = linear.fastest(name, {label: lambda p=p: products(p) for label, p in PREFETCH.items()}, reps=9)
        torch.ops.specgate.set_prefetch(T, *PREFETCH[choice])
        chosen[T] = choice
    return chosen


def low_precision_streaming(weights: "ModelWeights", precision: str, products: list[tuple[torch.Tensor, torch.Tensor]]) -> str:
    """Sets how the CPU kernels stream a low-precision copy of the weights in 1-row products (draft
    steps): the fastest of 8 or 4 weight rows per block (int4: its layout's 4) and :data:`PREFETCH`,
    timed over the copy's decoder ``products`` (:func:`~specgate.kernels.cpu_step.low_precision` pairs)
    interleaved once per machine, thread count and shape and kept on disk with the other choices. On a
    2-core AMD EPYC (Zen 4), int4 products in Q4_1's own layout took 0.85x the time with 4 rows and the
    L1 prefetch that they took with float32's 1-row setting there (8 rows, L2 only).
    ``SPECGATE_BLOCK_ROWS`` and ``SPECGATE_PREFETCH`` set them without timing. Returns the label."""
    from . import linear

    forced_rows, forced_prefetch = _forced_block_rows(), _forced_prefetch()
    if forced_rows or forced_prefetch:
        if forced_rows:
            torch.ops.specgate.set_block_rows(forced_rows, precision)
        if forced_prefetch:
            torch.ops.specgate.set_prefetch(1, *forced_prefetch, precision)
        return f"{precision}: forced"
    caps = (4,) if precision == "int4" else (8, 4)  # int4 matrices come in blocks of 4 rows (cpu_linear.h)
    options = {f"{precision} block {cap}, {label}": (cap, plan) for cap in caps for label, plan in PREFETCH.items()}
    name = f"streaming: {precision} copy of {_shapes(weights)}, 1 row"
    choice = linear.remembered(name, tuple(options))
    if choice is None:
        inputs = [torch.randn(1, m.shape[1]) for m in _decoder(weights)]

        def products_with(cap: int, plan: tuple[int, int]) -> None:
            torch.ops.specgate.set_block_rows(cap, precision)
            torch.ops.specgate.set_prefetch(1, *plan, precision)
            for x, (q, extra) in zip(inputs, products):
                torch.ops.specgate.small_linear(x, q, None, extra if extra.numel() else None)

        with torch.inference_mode():
            choice = linear.fastest(name, {label: lambda o=o: products_with(*o) for label, o in options.items()}, reps=9)
    cap, plan = options[choice]
    torch.ops.specgate.set_block_rows(cap, precision)
    torch.ops.specgate.set_prefetch(1, *plan, precision)
    return choice


def fused_pays(engine: "Engine") -> bool:
    """Whether ``kernels="auto"`` takes the engine's fused pass: the faster of it and the PyTorch path
    (products by the measured choice of :mod:`specgate.linear`) for a decode step plus a 5-token verify
    pass, timed interleaved on a scratch cache once per machine, thread count and model shape, and kept
    on disk with the products' choices. Which wins depends on the CPU: the fused pass saves ~60
    operations' overhead per layer, but its products are our small-M kernel, and on some CPUs BLAS
    beats it for one row. ``SPECGATE_LINEAR`` forcing a backend decides without timing (the fused
    pass runs the small-M kernel only)."""
    from . import linear

    forced = linear.forced_backend()
    if forced != "auto" or engine.cpu_step is None:
        return forced == "smallm" and engine.cpu_step is not None
    w, step = engine.weights, engine.cpu_step
    name = f"fused pass: {_shapes(w)}, 1 + 5 rows"
    known = linear.remembered(name, ("fused", "torch"))
    if known is not None:
        return known == "fused"
    ids = torch.arange(40).remainder(w.embed.shape[0]).unsqueeze(0)
    cache = engine.new_cache(1, ids.shape[1] + 8)
    engine.cpu_step = None
    with torch.inference_mode():
        engine.hidden(ids[:, :32], cache)  # a prompt (the PyTorch path: prefill is not fused)
        start = cache.host_lengths

        def passes(fused: bool) -> None:
            engine.cpu_step = step if fused else None
            for T in (1, 5):
                cache.rewind(start)
                engine.hidden(ids[:, 32 : 32 + T], cache)

        try:
            passes(False)  # the PyTorch path's products pick their backends now (timed at first use), not in the timing
            choice = linear.fastest(name, {"fused": lambda: passes(True), "torch": lambda: passes(False)}, reps=5)
        finally:
            engine.cpu_step = step
    return choice == "fused"


def screened_head(weights: "ModelWeights", kernels: str) -> "ScreenedHead | None":
    """The engine's screened LM head (:mod:`specgate.kernels.screened_head`: exact greedy decisions from
    an int8 copy of the head) where it is measured faster than the float32 head: the two products for a
    decode step's row and a 5-token verify pass's rows, timed interleaved once per machine, thread count
    and head shape, and kept on disk with the products' choices. None on the PyTorch and Triton paths,
    without the CPU kernels, with ``SPECGATE_LINEAR`` forcing a backend other than ours, or with
    ``SPECGATE_SCREENED_HEAD=0`` (to save the copy's memory, or to compare)."""
    from . import linear
    from .kernels import cpu_linear
    from .kernels.screened_head import ScreenedHead

    forced = linear.forced_backend()
    if os.environ.get("SPECGATE_SCREENED_HEAD", "1") == "0" or forced not in ("auto", "smallm"):
        return None
    head = weights.lm_head
    if resolve(kernels, head.device) != "cpu" or head.dtype != torch.float32 or cpu_linear.load() is None:
        return None
    name = f"screened head: {tuple(head.shape)}, 1 + 5 rows"
    known = "screened" if forced == "smallm" else linear.remembered(name, ("screened", "float32"))
    if known is not None:
        return ScreenedHead(head) if known == "screened" else None
    screened = ScreenedHead(head)
    # Token rows along head rows: confident predictions, as most decoding steps are, where the float32
    # work left is a few rows (on MT-Bench answers a median of 7 of SmolLM2's 49,152 rows, 13 of Gemma
    # 3's 262,144: eval/screened_head.py). States of a made-up prompt are no stand-in: a base model's
    # distributions after arbitrary tokens can be flat, with 10^4-10^5 candidate rows.
    rows = head[torch.linspace(0, head.shape[0] - 1, 5).long()].float()
    x = rows * (4 * rows.shape[1] ** 0.5 / rows.norm(dim=1, keepdim=True).clamp_min(1e-6))  # rms 4 per input
    with torch.inference_mode():
        options = {
            "screened": lambda: [screened(x[:T]) for T in (1, 5)],
            "float32": lambda: [linear.linear(x[:T], head) for T in (1, 5)],
        }
        options["float32"]()  # the float32 products pick their backends now (timed at first use), not in the timing
        choice = linear.fastest(name, options, reps=5)
    return screened if choice == "screened" else None


def activation_name(act, names: tuple[str, ...] = ("silu", "gelu_tanh")) -> str:
    """The kernels' name of the model's MLP activation (one of ``names``), told by its values."""
    t = torch.linspace(-4, 4, 33)
    with torch.no_grad():
        y = act(t)
    refs = {"silu": F.silu(t), "gelu_tanh": F.gelu(t, approximate="tanh")}
    for name in names:
        if torch.allclose(y, refs[name], atol=1e-5):
            return name
    raise ValueError(f"the kernels have no MLP activation like {act}: use kernels='torch'")


class TritonKernels:
    """The Triton implementations the engine calls at its sparse points (see the module docstring)."""

    name = "triton"

    def __init__(self, weights: "ModelWeights"):
        from .kernels import accept, draft_head, kv_fill, projection, residual, route

        self._accept, self._head, self._kv, self._proj = accept, draft_head, kv_fill, projection
        self._res, self._route = residual, route
        self.weights = weights
        self.device = weights.embed.device
        self.act = activation_name(weights.act)
        self._thresholds: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (host, device float32)
        self._budgets: dict[float, torch.Tensor] = {}
        self._identity: dict[int, torch.Tensor] = {}
        self._saved: dict[tuple[float, ...], torch.Tensor] = {}  # the routes' saved compute, on the device
        self._input_major: dict[int, torch.Tensor] = {}  # id(weight) -> weight.t().contiguous()
        self._cut_values: dict[tuple[int, torch.dtype], tuple] = {}  # (id(cuts), dtype) -> (cuts, thresholds)
        self._counts: dict[int, torch.Tensor] = {}  # n -> [n] (int32) on the device

    def applies(self, gates, policy, cuts=None, kv_fill: str = "project") -> bool:
        """Whether a forward with these gates, policy and sparse inputs takes the Triton path."""
        if torch.is_grad_enabled() or (cuts is not None and kv_fill != "project"):
            return False
        return isinstance(policy, BudgetPolicy) if gates is not None else cuts is not None

    # -- 1. routing --------------------------------------------------------------------------------

    def route(self, engine, x: torch.Tensor, i: int, branch: int, p: "_Pass"):
        """(factor, route): the gate values that scale the branch output (None: 1) and the Route of
        the rows that run it (None: all rows), as the engine's ``_select`` decides with a
        :class:`BudgetPolicy`. Skip counts stay on the device until :meth:`finish`."""
        if p.gates is None:  # sparse inputs alone: every row runs the branch
            self._count(engine, p, i, branch, None, 0)
            return None, None
        policy: BudgetPolicy = p.policy
        scale = p.gates.config.scale_output
        T = x.shape[1]
        may = policy.may_skip(i, branch, T)
        if not may and not scale:
            self._count(engine, p, i, branch, None, 0)
            return None, None
        pre = p.gates.gate(i, branch).proj(x)  # Gate.forward before its sigmoid
        g = torch.sigmoid(pre)
        factor = g if scale else None
        r = None
        if (i, branch) in policy.never_skip:
            pass
        elif T == 1 and policy.thresholds is not None:
            if may:  # else the threshold is below 0: every token runs
                r = self._route.route_threshold(pre, self._threshold(policy.thresholds)[branch, i])
        elif int(policy.budget * p.n_valid):  # the same floor(budget * n_valid) the kernel takes
            r = self._route.route_budget(g.mean(-1), p.valid, self._budget(policy.budget))
        self._count(engine, p, i, branch, r, x.shape[0] * T)
        return factor, r

    def _threshold(self, thresholds: torch.Tensor) -> torch.Tensor:
        key = id(thresholds)
        if key not in self._thresholds or self._thresholds[key][0] is not thresholds:
            self._thresholds[key] = (thresholds, thresholds.to(self.device, torch.float32))
        return self._thresholds[key][1]

    def _budget(self, budget: float) -> torch.Tensor:
        if budget not in self._budgets:  # one copy to the device per budget, not one per pass
            self._budgets[budget] = torch.tensor([budget], dtype=torch.float64, device=self.device)
        return self._budgets[budget]

    def _count(self, engine, p: "_Pass", i: int, branch: int, r, n_rows: int) -> None:
        if p.counter is None:
            return
        engine._count(p, i, branch, 0)  # the evaluations; the skipped ones are added by finish()
        if r is not None:
            p.skips.append((r.count, n_rows, engine.pass_costs(p.kv_fill, p.gates)[1][branch][i]))

    def finish(self, p: "_Pass") -> None:
        """End of a forward: the skip counts of its routes and the weights its sparse inputs left
        unread into the counter, summed on the device (the counter reads them when asked, e.g. once
        per ``generate``)."""
        if p.counter is None:
            return
        if p.unread is not None:
            p.counter.add_on_device(torch.zeros((), device=self.device), p.unread[0])
            p.unread = None
        if not p.skips:
            return
        # skipped rows are valid ones (padding is never skipped); their evaluations were counted
        skipped = torch.cat([n_rows - c for c, n_rows, _ in p.skips]).double()
        key = tuple(saved for _, _, saved in p.skips)
        if key not in self._saved:  # one copy to the device per set of routes, not one per pass
            self._saved[key] = torch.tensor(key, dtype=torch.float64, device=self.device)
        p.counter.add_on_device(skipped.sum(), (skipped * self._saved[key]).sum())
        p.skips.clear()

    # -- 2.-4. the branches ------------------------------------------------------------------------

    def attention(self, engine, h: torch.Tensor, x: torch.Tensor, i: int, lw: "LayerWeights", p: "_Pass") -> torch.Tensor:
        """The engine's ``_attention`` after the norm: x (B, T, d) is the branch's normed input."""
        w = self.weights
        g, r = self.route(engine, x, i, 0, p)
        cos, sin = p.rope[lw.rope]
        B, T, _ = x.shape
        if p.cuts is not None:
            q, k, v = self._cut_qkv(engine, x, i, lw, p, r, cos, sin)
        elif r is None:  # every token runs the branch: the engine's dense code
            q, k, v = layers.qkv(w, lw, x, cos, sin)
        else:
            # q, k, v of the active rows in one gathered product, put back in row order; the
            # skipped rows are zeros here and get their K/V from the fill below.
            fused = self._unpermute(self._proj.gathered_linear(x, lw.qkv_w, lw.qkv_b, r.order, r.count), r).view(B, T, -1)
            q_dim = w.n_heads * w.head_dim
            q = layers.finish_queries(w, lw, fused[..., :q_dim], cos, sin)
            k, v = layers.finish_keys_values(w, lw, fused[..., q_dim:], cos, sin)
        p.cache.write(i, p.slots, k, v, p.uniform)
        if r is not None and p.cuts is None:  # (with sparse inputs every row's K/V were projected)
            ck, cv = p.cache.k[i], p.cache.v[i]
            if p.kv_fill == "copy_below" and i > 0:
                self._kv.kv_fill_copy_below(p.slots, r.order, r.count, p.cache.k[i - 1], p.cache.v[i - 1], ck, cv)
            else:
                b = None if lw.qkv_b is None else lw.qkv_b[w.n_heads * w.head_dim :]
                self._kv.kv_fill_project(
                    x, lw.qkv_w[w.n_heads * w.head_dim :], b, cos, sin, p.slots, r.order, r.count, ck, cv, lw.k_norm, w.eps
                )
        # Attention for every row (a skipped row's output is never read): no gather of masks.
        causal = p.causal and (lw.window is None or p.S <= lw.window)
        mask = None if causal else p.mask(lw.window)
        k, v = p.cache.k[i][:, :, : p.S], p.cache.v[i][:, :, : p.S]
        o = layers.attend(w, q, k, v, mask, causal)  # (B, heads, T, hd)
        h = self._adapt(h, x, i, 0, r, p)
        if r is None and p.cuts is None:
            o = layers.attention_output(w, lw, o)
            return h + (o if g is None else g * o)
        o = o.transpose(1, 2).reshape(B * T, -1)
        y = self._project(engine, o, lw.o_w, lw.o_b, p, i, 1, self._rows(r, B * T))  # route order
        return self._residual(h, layers.post_norm(w, y, lw.post_attn_norm), r, g, x, i, 0, p)

    def mlp(self, engine, h: torch.Tensor, x: torch.Tensor, i: int, lw: "LayerWeights", p: "_Pass") -> torch.Tensor:
        """The engine's ``_mlp`` after the norm."""
        w = self.weights
        g, r = self.route(engine, x, i, 1, p)
        h = self._adapt(h, x, i, 1, r, p)
        if r is None and p.cuts is None:
            o = layers.mlp(w, lw, x)
            return h + (o if g is None else g * o)
        rows = self._rows(r, x.shape[0] * x.shape[1])
        a = self._project(engine, x, lw.gate_up_w, None, p, i, 2, rows, act=self.act)  # (N, ff) route order
        y = self._project(engine, a, lw.down_w, None, p, i, 3, (self._arange(a.shape[0]), rows[1]))
        return self._residual(h, layers.post_norm(w, y, lw.post_mlp_norm), r, g, x, i, 1, p)

    def _project(self, engine, x, weight, bias, p: "_Pass", i: int, proj: int, rows, cols=(0, None), act=None):
        """(N, M): the selected rows' (``rows``: order, count) products with ``weight``'s rows
        ``cols`` (M of them; ``act``: act(gate) * up, M / 2), in route order: the gathered product,
        or with sparse inputs the one that reads only the kept inputs' weights (and counts those it
        does not read)."""
        if p.cuts is None:
            if act is not None:
                return self._proj.gathered_gate_up(x, weight, *rows, act)
            return self._proj.gathered_linear(x, weight, bias, *rows)
        w_t = self._transposed(weight)[:, cols[0] : cols[1]]
        bias = None if bias is None else bias[cols[0] : cols[1]]
        if p.counter is not None and p.unread is None:
            p.unread = torch.zeros(1, dtype=torch.float32, device=self.device)
        share = w_t.shape[1] / engine.total_weights  # per input not read
        threshold = self._thresholds_of(p.cuts, x.dtype)[i][proj]
        return self._proj.sparse_linear(x, w_t, bias, threshold, *rows, act, p.unread, share)

    def _cut_qkv(self, engine, x, i: int, lw: "LayerWeights", p: "_Pass", r, cos, sin):
        """q, k, v of a sparse-inputs pass: every row's K/V, as the engine's PyTorch path fills
        them (``kv_fill="project"``), and the queries of the rows that run the branch."""
        w, (B, T, _) = self.weights, x.shape
        q_dim, every = w.n_heads * w.head_dim, self._rows(None, B * T)
        if r is None:
            fused = self._project(engine, x, lw.qkv_w, lw.qkv_b, p, i, 0, every).view(B, T, -1)
            q, kv = fused[..., :q_dim], fused[..., q_dim:]
        else:
            kv = self._project(engine, x, lw.qkv_w, lw.qkv_b, p, i, 0, every, cols=(q_dim, None)).view(B, T, -1)
            q = self._project(engine, x, lw.qkv_w, lw.qkv_b, p, i, 0, (r.order, r.count), cols=(0, q_dim))
            q = self._unpermute(q, r).view(B, T, -1)
        return (layers.finish_queries(w, lw, q, cos, sin), *layers.finish_keys_values(w, lw, kv, cos, sin))

    def _transposed(self, weight: torch.Tensor) -> torch.Tensor:
        """weight's input-major copy (K, M), made once: the sparse-inputs products read it."""
        if id(weight) not in self._input_major:
            self._input_major[id(weight)] = weight.t().contiguous()
        return self._input_major[id(weight)]

    def _thresholds_of(self, cuts, dtype: torch.dtype) -> list[list[float]]:
        """The cuts' thresholds rounded to ``dtype``, as the PyTorch path compares them."""
        key = (id(cuts), dtype)
        if key not in self._cut_values or self._cut_values[key][0] is not cuts:
            rounded = torch.tensor(cuts.values, dtype=dtype).float().tolist()
            self._cut_values[key] = (cuts, rounded)
        return self._cut_values[key][1]

    def _rows(self, r, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(order, count) of a route's selected rows, or of all n rows (r None)."""
        if r is not None:
            return r.order, r.count
        if n not in self._counts:
            self._counts[n] = torch.tensor([n], dtype=torch.int32, device=self.device)
        return self._arange(n), self._counts[n]

    @staticmethod
    def _stand_in(x: torch.Tensor, i: int, branch: int, p: "_Pass") -> torch.Tensor | None:
        """The branch's stand-in (:mod:`specgate.standin`) of every row, (N, d); the residual
        kernel adds it at the rows that skip the branch (the engine's ``_draft_terms``)."""
        s = p.gates.standins
        return None if s is None else s(x, i, branch).reshape(-1, x.shape[-1])

    @staticmethod
    def _adapt(h: torch.Tensor, x: torch.Tensor, i: int, branch: int, r, p: "_Pass") -> torch.Tensor:
        """h plus the draft's adapter at the rows that run the branch (all rows when r is None)."""
        if p.adapters is None:
            return h
        a = p.adapters(x, i, branch)
        return h + (a if r is None else a * r.active.view(*x.shape[:2], 1).to(a.dtype))

    def _residual(self, h: torch.Tensor, y: torch.Tensor, r, g: torch.Tensor | None, x, i: int, branch: int, p: "_Pass"):
        """h plus the branch output y (N, d) of the rows of route r (in its order; every row when
        r is None), times g, and the branch's stand-in at the rows that skip it."""
        if r is None:
            y = y.view_as(h)
            return h + (y if g is None else g * y)
        fill = self._stand_in(x, i, branch, p)
        return self._res.residual_add_(h.contiguous(), y, r.order, r.count, gate=g, standin=fill)

    def _unpermute(self, y: torch.Tensor, r) -> torch.Tensor:
        """(N, M) rows in route order (the first ``count`` valid) -> row order, zeros where skipped."""
        rows = torch.empty_like(y).index_copy_(0, r.order.long(), y)
        return rows.masked_fill_(~r.active[:, None], 0)

    def _arange(self, n: int) -> torch.Tensor:
        if n not in self._identity:
            self._identity[n] = torch.arange(n, dtype=torch.int32, device=self.device)
        return self._identity[n]

    # -- 5. the draft's token ---------------------------------------------------------------------

    def draft_argmax(self, head: "DraftHead", h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy draft tokens (B,) of the last hidden states h (B, d) under a draft vocabulary's
        head, and each token's probability within the vocabulary: the final norm, then one fused
        pass over the head's rows that never writes logits. Where logits tie exactly it picks the
        token ranked first, ``head.logits(h).argmax(-1)`` the lowest id."""
        w = self.weights
        x = rms_norm(h, w.final_norm, w.eps).contiguous()
        return self._head.draft_argmax(x, head.weight, head.ids, w.final_softcap or None)

    # -- 6. acceptance -----------------------------------------------------------------------------

    def greedy_accept(self, draft_tokens: torch.Tensor, target_logits: torch.Tensor):
        """:func:`specgate.speculative.greedy_accept` on the device."""
        return self._accept.greedy_accept(draft_tokens, target_logits.contiguous())

    def rejection_sample(self, draft_tokens, draft_probs, target_probs, generator: torch.Generator | None = None):
        """:func:`specgate.speculative.rejection_sample` on the device, its uniforms drawn with
        ``generator`` (reproducible; not the same draws as the PyTorch function's)."""
        B, k = draft_tokens.shape
        u = torch.rand(B, k, generator=generator, device=draft_tokens.device)
        u_next = torch.rand(B, generator=generator, device=draft_tokens.device)
        return self._accept.rejection_sample(draft_tokens, draft_probs.contiguous(), target_probs.contiguous(), u, u_next)
