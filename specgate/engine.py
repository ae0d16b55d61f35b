"""The engine: our own layer loop over the Hugging Face weights, with per-token, per-branch skipping.

One forward serves every pass of decoding: prefill, single-token decode, and multi-token verify
passes (several new tokens against the cache). Gates and the skip policy are arguments of the
forward, never hidden state: ``forward(ids, cache)`` is the original model, ``forward(ids, cache,
gates)`` the gated model at full compute, ``forward(ids, cache, gates, policy)`` the skipping draft.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Literal

import torch

from . import dispatch, layers
from .adapters import LayerWeights, ModelWeights, read_weights
from .cache import StaticKVCache
from .gates import GateSet
from .kernels.cpu_step import CpuStep, head_precision
from .ops import gather_tokens, scatter_add_tokens
from .policy import BudgetPolicy, SkipPolicy
from .sparse_inputs import InputCuts
from .standin import StandIns
from .vocab import DraftHead

# The K/V of a token that skips attention: ``project`` runs the k/v projections on its passed-through
# hidden state; ``copy_below`` copies the layer below's cache entry (the paper's fill).
KVFill = Literal["project", "copy_below"]
KV_FILLS = ("project", "copy_below")


@dataclass
class _Pass:
    """What every layer of one forward shares: positions and masks, and how it skips."""

    cache: StaticKVCache
    slots: torch.Tensor  # (B, T) cache slots of the new tokens
    valid: torch.Tensor  # (B, T) False for left padding
    n_valid: int
    uniform: int | None  # first slot when every row writes the same slots
    S: int  # cache slots attended to: 0 .. S-1
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]]  # key -> cos, sin (B, T, hd)
    padded: bool  # some row of the cache starts with left padding
    causal: bool  # a fresh, unpadded multi-token pass: plain causal attention needs no mask
    gates: GateSet | None = None
    policy: SkipPolicy | None = None
    kv_fill: KVFill = "project"
    counter: "SkipCounter | None" = None
    adapters: StandIns | None = None  # the draft's adapters, in a pass that may skip
    cuts: InputCuts | None = None  # a sparse-inputs draft's thresholds
    masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict)  # built on first use
    kernels: "dispatch.TritonKernels | None" = None  # the Triton path of this pass (None: PyTorch)
    skips: list = field(default_factory=list)  # the Triton routes' skip counts, on the device
    unread: torch.Tensor | None = None  # the Triton path's weights its sparse inputs left unread

    def mask(self, window: int | None) -> torch.Tensor | None:
        """(B, 1, T, S) bool, True where a query may look, for a sliding window (None: global);
        None when every query may look at every slot (one token, no padding, inside the window)."""
        if window not in self.masks:
            self.masks[window] = self._build_mask(window)
        return self.masks[window]

    def _build_mask(self, window: int | None) -> torch.Tensor | None:
        T, pad = self.slots.shape[1], self.cache.pad
        if T == 1 and self.uniform is not None and not self.padded and (window is None or self.S <= window):
            return None
        j = torch.arange(self.S, device=self.slots.device)
        q = self.slots[:, :, None]  # (B, T, 1)
        m = (j >= pad[:, None, None]) & (j <= q)
        if window is not None:
            m &= q - j < window
        return (m | (j == q))[:, None]  # a padding query sees itself: no empty rows


def draft_adapters(gates: GateSet | None, policy: SkipPolicy | None) -> StandIns | None:
    """The gates' draft-only adapters if a pass with this policy may skip (one that skips nothing
    is the original model, adapters or not)."""
    if gates is None or gates.adapters is None or policy is None:
        return None
    return None if isinstance(policy, BudgetPolicy) and policy.budget == 0 else gates.adapters


@dataclass
class _Selection:
    """The tokens that run a branch: ``order`` (B, n) token indices, ``keep`` (B, n) False where a
    row has fewer than n active tokens and the entry only pads the batch."""

    order: torch.Tensor
    keep: torch.Tensor
    active: torch.Tensor  # (B, T) bool

    @staticmethod
    def of(active: torch.Tensor, n_run: int) -> "_Selection":
        """The selection of ``active`` (B, T), of which ``n_run`` tokens are True."""
        if n_run == 0:  # every token skips (the usual skip of a single-token draft step): nothing to order
            empty = torch.empty(active.shape[0], 0, dtype=torch.long, device=active.device)
            return _Selection(empty, empty.bool(), active)
        counts = active.sum(1)
        n = n_run if active.shape[0] == 1 else int(counts.max())
        order = (~active).to(torch.int8).argsort(dim=1, stable=True)[:, :n]  # active tokens first
        keep = torch.arange(n, device=active.device)[None] < counts[:, None]
        return _Selection(order, keep, active)


class SkipCounter:
    """Counts (token, branch) evaluations and the layer compute they stand for, run and skipped,
    over one or more forwards. Compute is counted in weights read (decoding is memory-bound)."""

    def __init__(self):
        self.total = self._skipped = 0
        self.compute_total = self._compute_skipped = 0.0
        self._on_device: torch.Tensor | None = None  # (skipped, compute skipped) not read yet

    def add(self, valid: int, skipped: int, cost: float, saved: float) -> None:
        """One branch of one pass: ``valid`` tokens, ``skipped`` of them skipped; a branch costs
        ``cost`` per token, and skipping it saves ``saved`` per token."""
        self.total += valid
        self._skipped += skipped
        self.compute_total += valid * cost
        self._compute_skipped += skipped * saved

    def add_on_device(self, skipped: torch.Tensor, compute_skipped: torch.Tensor) -> None:
        """Skips counted on the device (0-d tensors; their evaluations go through :meth:`add`),
        summed there and read on the host only when the counts are: a Triton draft step counts
        its skips without waiting on the device."""
        both = torch.stack([skipped, compute_skipped]).double()
        self._on_device = both if self._on_device is None else self._on_device + both

    def _read(self) -> None:
        if self._on_device is not None:
            skipped, compute = self._on_device.tolist()
            self._skipped += round(skipped)
            self._compute_skipped += compute
            self._on_device = None

    @property
    def skipped(self) -> int:
        """(token, branch) evaluations skipped."""
        self._read()
        return self._skipped

    @property
    def compute_skipped(self) -> float:
        """Layer compute skipped (see :meth:`Engine.branch_costs`)."""
        self._read()
        return self._compute_skipped

    @property
    def fraction(self) -> float:
        """Share of the (token, branch) evaluations skipped."""
        return self.skipped / self.total if self.total else 0.0

    @property
    def compute_fraction(self) -> float:
        """Share of the layer compute skipped (the LM head not counted)."""
        return self.compute_skipped / self.compute_total if self.compute_total else 0.0


class Engine:
    """Runs a Hugging Face decoder (see :mod:`specgate.adapters`) with a :class:`StaticKVCache`.

    ``kernels``: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cpu"``, what runs the passes (see
    :mod:`specgate.dispatch`); ``self.kernels`` is the Triton dispatch and ``self.cpu_step`` the fused
    CPU pass, each None where that path is not taken; ``self.screened`` the screened LM head (None where
    it is not measured faster, or not on the CPU path)."""

    def __init__(self, model: torch.nn.Module, kernels: str = "auto"):
        self.weights: ModelWeights = read_weights(model)
        self.config = model.config
        self.dtype = self.weights.embed.dtype
        self.device = self.weights.embed.device
        self._costs: dict[tuple, tuple] = {}  # (kv_fill, stand-in, adapter weights) -> branch_costs(...)
        self._skip_ones: dict[torch.device, _Selection] = {}
        self.kernels = dispatch.make(kernels, self.weights)
        self.cpu_step = dispatch.make_cpu_step(kernels, self.weights)
        if self.cpu_step is not None:
            dispatch.block_rows(self.weights)
            dispatch.prefetch(self.weights)
        if kernels == "auto" and not dispatch.fused_pays(self):
            self.cpu_step = None
        self.screened = dispatch.screened_head(self.weights, kernels)  # for forward(exact_logits=False)
        self._kernels = kernels
        self._low_steps: dict[str, object] = {}  # precision -> the fused pass over a low-precision copy

    @property
    def num_layers(self) -> int:
        return len(self.weights.layers)

    def branch_costs(self, kv_fill: KVFill = "project", standin: int = 0, adapter: int = 0) -> tuple[list[list[float]], list[list[float]]]:
        """(cost, saved): per branch (row 0 attention, 1 MLP) and layer, the weights a token reads
        when it runs the branch (and its draft adapter's ``adapter`` weights), and those it does
        not read when it skips it (a token that skips attention still projects its K/V with
        ``kv_fill="project"``, and reads its stand-in's ``standin`` weights), as shares of all
        layers' weights. Skipping an MLP saves about three times what skipping attention saves in
        SmolLM2."""
        w = self.weights
        q_dim = w.n_heads * w.head_dim
        attn = [lw.qkv_w.shape[0] * lw.qkv_w.shape[1] + lw.o_w.numel() for lw in w.layers]
        mlp = [lw.gate_up_w.numel() + lw.down_w.numel() for lw in w.layers]
        attn_saved = attn if kv_fill == "copy_below" else [q_dim * lw.qkv_w.shape[1] + lw.o_w.numel() for lw in w.layers]
        total = self.total_weights
        share = lambda xs: [x / total for x in xs]  # noqa: E731
        cost = [share([a + adapter for a in attn]), share([m + adapter for m in mlp])]
        return cost, [share([a + adapter - standin for a in attn_saved]), share([m + adapter - standin for m in mlp])]

    def new_cache(self, batch: int, max_len: int) -> StaticKVCache:
        w = self.weights
        return StaticKVCache(self.num_layers, batch, w.n_kv_heads, max_len, w.head_dim, self.dtype, self.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: StaticKVCache,
        gates: GateSet | None = None,
        policy: SkipPolicy | None = None,
        *,
        kv_fill: KVFill = "project",
        logits_to_keep: int = 0,
        counter: SkipCounter | None = None,
        head: DraftHead | None = None,
        precision: str = "float32",
        exact_logits: bool = True,
        exact_top: int = 1,
        cuts: InputCuts | None = None,
    ) -> torch.Tensor:
        """Run T new tokens (B, T) against the cache; returns logits (B, T, V), or of the last
        ``logits_to_keep`` positions. Writes their K/V and advances the cache by T. ``kv_fill``:
        the K/V of tokens that skip attention (see :data:`KVFill`). ``head``: a draft vocabulary's
        head (logits -inf outside it) instead of the full LM head. ``precision``: the weight matrices' precision
        (``"bfloat16"``, ``"int8"``: a copy, for drafts; see :mod:`specgate.kernels.cpu_step`).
        ``exact_logits=False``: only each row's argmax must be the full head's (greedy decisions), so
        the screened head may compute them where the engine has one (:attr:`screened`): exact where
        they could be the maximum, within a bound elsewhere (:mod:`specgate.kernels.screened_head`);
        so a greedy draft over a low-precision copy, or with a draft vocabulary, takes the float32
        head's token too. ``exact_top``: with ``exact_logits=False``, the full head's ``exact_top``
        largest logits of each row are exact (top-k sampling), not only its argmax. ``cuts``: a
        sparse-inputs draft's thresholds (:mod:`specgate.sparse_inputs`; the PyTorch path)."""
        h = self.hidden(input_ids, cache, gates, policy, kv_fill=kv_fill, counter=counter, precision=precision, cuts=cuts)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        screened = None if exact_logits else self.screened  # greedy: the float32 head's argmax, at about int8's cost
        if head is not None:
            return head.logits(h, head_precision(precision), screened=screened is not None)
        if precision != "float32" and screened is None:
            return self.low_precision_step(precision).logits(h)
        if screened is not None and exact_top > 1:  # top-k: the float32 head past the screened head's max_rank
            screened = functools.partial(screened, rank=exact_top) if exact_top <= screened.max_rank else None
        return layers.head(self.weights, h, screened)

    __call__ = forward

    def hidden(
        self,
        input_ids: torch.Tensor,
        cache: StaticKVCache,
        gates: GateSet | None = None,
        policy: SkipPolicy | None = None,
        *,
        kv_fill: KVFill = "project",
        counter: SkipCounter | None = None,
        precision: str = "float32",
        cuts: InputCuts | None = None,
    ) -> torch.Tensor:
        """:meth:`forward` without the LM head: the last layer's hidden states (B, T, d), for a
        head the engine does not run (the Triton path's fused draft head). Reads nothing from the
        device on the host when the pass takes the Triton path or runs no gates (the cache keeps
        its positions on the host too; a policy reads its thresholds once, on first use)."""
        B, T = input_ids.shape
        if max(cache.host_lengths) + T > cache.max_len:
            raise ValueError(f"cache of {cache.max_len} slots cannot take {T} more tokens")
        if kv_fill not in KV_FILLS:
            raise ValueError(f"kv_fill must be one of {KV_FILLS}, got {kv_fill!r}")
        fusable = cuts is None and CpuStep.applies(input_ids, cache, gates, policy)
        if fusable and (self.cpu_step is not None or precision != "float32"):
            return self._fused(input_ids, cache, gates, policy, kv_fill, counter, precision)
        if precision != "float32":
            raise ValueError(
                f"precision={precision!r} runs on the fused CPU pass (kernels='auto' or 'cpu', float32 weights on the "
                "CPU), which covers passes of up to 16 token rows (batch x tokens) that skip nothing and one "
                "sequence's single-token drafts with scalar gates that only pick skips"
                + (", without sparse inputs (they run on the PyTorch path)" if cuts is not None else "")
                + ": use precision='float32' here"
            )
        p = self._prepare(input_ids, cache)
        p.gates, p.policy, p.kv_fill, p.counter = gates, policy, kv_fill, counter
        p.adapters, p.cuts = draft_adapters(gates, policy), cuts
        if self.kernels is not None and self.kernels.applies(gates, policy, cuts, kv_fill):
            p.kernels = self.kernels
        h = layers.embed(self.weights, input_ids)
        for i, lw in enumerate(self.weights.layers):
            h = self._attention(h, i, lw, p)
            h = self._mlp(h, i, lw, p)
        if p.kernels is not None:
            p.kernels.finish(p)
        cache.advance(T)
        return h

    # -- one pass --------------------------------------------------------------------------------

    def _fused(self, input_ids, cache, gates, policy, kv_fill, counter, precision) -> torch.Tensor:
        """:meth:`hidden` by the fused CPU pass (:mod:`specgate.dispatch`), in ``precision``."""
        h = layers.embed(self.weights, input_ids)
        step = self.cpu_step if precision == "float32" else self.low_precision_step(precision)
        skipped = step.hidden(h, cache, gates, policy, copy_below=kv_fill == "copy_below")
        T = input_ids.shape[1]
        n_valid = cache.n_valid(T)
        cache.advance(T)
        if counter is not None and gates is not None:  # every gated branch counts, as in _select
            cost, saved = self.pass_costs(kv_fill, gates)
            for i in range(self.num_layers):
                for b in (0, 1):
                    counter.add(n_valid, skipped[2 * i + b] if skipped else 0, cost[b][i], saved[b][i])
        return h

    def low_precision_step(self, precision: str):
        """The fused CPU pass over a ``precision`` copy of the weight matrices, made on first use
        and the LM head (int8: about a quarter of the float32 weights' memory, bfloat16 half)."""
        if precision not in self._low_steps:
            if dispatch.resolve(self._kernels, self.device) != "cpu":
                raise ValueError(f"precision={precision!r} needs the fused CPU pass: kernels='auto' or 'cpu', on the CPU")
            shared = self.screened.int8 if self.screened is not None and head_precision(precision) == "int8" else None
            self._low_steps[precision] = dispatch.make_cpu_step("cpu", self.weights, precision, shared)  # raises what is wrong
            if precision != "float32":
                dispatch.low_precision_streaming(self.weights, precision, self._low_steps[precision].products)
        return self._low_steps[precision]

    def _prepare(self, input_ids: torch.Tensor, cache: StaticKVCache) -> _Pass:
        B, T = input_ids.shape
        slots = cache.slots(T)  # (B, T)
        lo, hi = min(cache.host_lengths), max(cache.host_lengths)  # the host's copies: no device read
        S = hi + T
        padded = any(cache.host_pad)
        valid = slots >= cache.pad[:, None]
        positions = (slots - cache.pad[:, None]).clamp(min=0)
        x = torch.empty(0, dtype=self.dtype, device=self.device)
        rope = {k: fn(x, positions) for k, fn in self.weights.rope.items()}
        causal = hi == 0 and T > 1 and not padded  # the fused causal kernel: no (T, S) mask to read
        return _Pass(cache, slots, valid, cache.n_valid(T), lo if lo == hi else None, S, rope, padded, causal)

    def _select(self, x: torch.Tensor, i: int, branch: int, p: _Pass):
        """The factor on the branch output (None: 1) and the tokens that run it (None: all)."""
        if p.gates is None:
            return None, None
        scale = p.gates.config.scale_output
        if p.policy is not None and not scale and not p.policy.may_skip(i, branch, x.shape[1]):
            self._count(p, i, branch, 0)
            return None, None  # the gate would neither skip nor scale anything: do not run it
        g = p.gates.gate(i, branch)(x)
        if not scale and x.shape[:2] == (1, 1) and isinstance(p.policy, BudgetPolicy) and p.policy.thresholds is not None:
            # one token, calibrated thresholds (a batch-1 draft step): one host read decides, and a
            # skip reuses one empty selection (the general path below takes ~6 more operations)
            skip = (g if g.numel() == 1 else g.mean()).item() <= p.policy.threshold(i, branch)
            self._count(p, i, branch, int(skip))
            return None, self._skip_one(x.device) if skip else None
        active = p.policy.active(g.mean(-1), p.valid, i, branch) if p.policy is not None else None
        n_run = p.n_valid
        if active is not None:
            if p.padded:  # padding tokens need no branch: their K/V are never read
                active = active & p.valid
            n_run = int(active.sum())  # the host reads each skip decision once
        self._count(p, i, branch, p.n_valid - n_run)
        if n_run == x.shape[0] * x.shape[1]:
            active = None
        factor = layers.branch_factor(g, active, scale)  # computed on all tokens, used on the active ones
        return factor, None if active is None else _Selection.of(active, n_run)

    def _skip_one(self, device: torch.device) -> _Selection:
        """The selection of a single token that skips (cached: it never changes)."""
        if device not in self._skip_ones:
            self._skip_ones[device] = _Selection.of(torch.zeros(1, 1, dtype=torch.bool, device=device), 0)
        return self._skip_ones[device]

    def _count(self, p: _Pass, i: int, branch: int, skipped: int) -> None:
        if p.counter is None:
            return
        cost, saved = self.pass_costs(p.kv_fill, p.gates)
        p.counter.add(p.n_valid, skipped, cost[branch][i], saved[branch][i])

    def pass_costs(self, kv_fill: KVFill, gates: GateSet | None) -> tuple[list[list[float]], list[list[float]]]:
        """:meth:`branch_costs` of a pass's K/V fill and its gates' stand-ins and adapters."""
        maps = (None, None) if gates is None else (gates.standins, gates.adapters)
        key = (kv_fill, *(0 if m is None else m.weights_read() for m in maps))
        if key not in self._costs:
            self._costs[key] = self.branch_costs(*key)
        return self._costs[key]

    def _attention(self, h: torch.Tensor, i: int, lw: LayerWeights, p: _Pass) -> torch.Tensor:
        w = self.weights
        x = layers.norm(w, h, lw.attn_norm)  # (B, T, d)
        if p.kernels is not None:
            return p.kernels.attention(self, h, x, i, lw, p)
        g, sel = self._select(x, i, 0, p)
        cos, sin = p.rope[lw.rope]
        cut = self._cut(i, 0, p)
        xp = x if cut is None else cut(x, 0, lw.qkv_w.shape[0] if sel is None else lw.qkv_w.shape[0] - lw.o_w.shape[1])

        # 1. K/V of the new tokens into the cache (run on all tokens, or fill the skipped ones).
        if sel is None:
            q, k, v = layers.qkv(w, lw, xp, cos, sin)
            p.cache.write(i, p.slots, k, v, p.uniform)
        elif p.kv_fill == "copy_below" and i > 0:
            gcos, gsin = gather_tokens(cos, sel.order), gather_tokens(sin, sel.order)
            k, v = layers.keys_values(w, lw, gather_tokens(xp, sel.order), gcos, gsin)
            p.cache.write(i, gather_tokens(p.slots, sel.order), k, v, None)
            rows, cols = (~sel.active).nonzero(as_tuple=True)
            p.cache.copy_from_below(i, p.slots[rows, cols], rows)
        else:
            p.cache.write(i, p.slots, *layers.keys_values(w, lw, xp, cos, sin), p.uniform)
        if sel is not None and sel.order.shape[1] == 0:
            return self._draft_terms(h, x, i, 0, sel, p)  # every token skips attention

        # 2. Queries of the active tokens attend to the cache.
        causal = p.causal and sel is None and (lw.window is None or p.S <= lw.window)
        mask = None if causal else p.mask(lw.window)
        if sel is not None:
            cut = self._cut(i, 0, p, sel)  # the queries and outputs of the tokens the selection gathered
            xq = gather_tokens(x, sel.order)
            xq = xq if cut is None else cut(xq, 0, lw.o_w.shape[1])
            q = layers.queries(w, lw, xq, gather_tokens(cos, sel.order), gather_tokens(sin, sel.order))
            if mask is not None:
                mask = mask.gather(2, sel.order[:, None, :, None].expand(-1, 1, -1, p.S))
        k, v = p.cache.k[i][:, :, : p.S], p.cache.v[i][:, :, : p.S]  # (B, n_kv, S, hd)
        o = layers.attention_output(w, lw, layers.attend(w, q, k, v, mask, causal), cut)  # (B, n, d)
        return self._residual(self._draft_terms(h, x, i, 0, sel, p), o, g, sel)

    def _mlp(self, h: torch.Tensor, i: int, lw: LayerWeights, p: _Pass) -> torch.Tensor:
        x = layers.norm(self.weights, h, lw.mlp_norm)
        if p.kernels is not None:
            return p.kernels.mlp(self, h, x, i, lw, p)
        g, sel = self._select(x, i, 1, p)
        h = self._draft_terms(h, x, i, 1, sel, p)
        if sel is not None:
            if sel.order.shape[1] == 0:
                return h
            x = gather_tokens(x, sel.order)
        return self._residual(h, layers.mlp(self.weights, lw, x, self._cut(i, 1, p, sel)), g, sel)

    def _cut(self, i: int, branch: int, p: _Pass, sel: _Selection | None = None) -> layers.Cut | None:
        """Layer i's cut of a sparse-inputs pass (None: none), which counts the weights it does not
        read (and the branch's evaluations, where no gates count them). ``sel``: it cuts the tokens
        that selection gathered, of which the entries that only pad the batch do not count."""
        if p.cuts is None:
            return None
        if p.counter is not None and p.gates is None:
            cost, _ = self.pass_costs(p.kv_fill, None)
            p.counter.add(p.n_valid, 0, cost[branch][i], 0.0)
        total = self.total_weights

        def cut(x: torch.Tensor, proj: int, n_out: int) -> torch.Tensor:
            keep = p.cuts.keep(x, i, proj)
            if p.counter is not None:  # the n_out-wide weight columns of the zeroed entries
                zeroed = ~keep if sel is None else ~keep & sel.keep[..., None]
                p.counter.add_on_device(torch.zeros((), device=x.device), zeroed.sum() * (n_out / total))
            return x * keep

        return cut

    @functools.cached_property
    def total_weights(self) -> int:
        """All layers' weights (the unit of :meth:`branch_costs`' shares)."""
        return sum(lw.qkv_w.shape[0] * lw.qkv_w.shape[1] + lw.o_w.numel() + lw.gate_up_w.numel() + lw.down_w.numel()
                   for lw in self.weights.layers)  # fmt: skip

    @staticmethod
    def _draft_terms(h: torch.Tensor, x: torch.Tensor, i: int, branch: int, sel: _Selection | None, p: _Pass) -> torch.Tensor:
        """h plus what a draft adds beside the branch outputs (:mod:`specgate.standin`): the
        branch's stand-in at the tokens that skip it, its adapter at those that run it."""
        standins = None if sel is None else p.gates.standins
        if standins is None and p.adapters is None:
            return h
        skip = None if sel is None else (~sel.active)[..., None].to(h.dtype)
        if standins is not None:
            h = h + standins(x, i, branch) * skip
        if p.adapters is not None:
            a = p.adapters(x, i, branch)
            h = h + (a if skip is None else a * (1 - skip))
        return h

    @staticmethod
    def _residual(h: torch.Tensor, o: torch.Tensor, g: torch.Tensor | None, sel: _Selection | None) -> torch.Tensor:
        """h + g * o, with o computed for the selected tokens only."""
        if sel is None:
            return h + (o if g is None else g * o)
        o = o * sel.keep[..., None] if g is None else o * gather_tokens(g, sel.order) * sel.keep[..., None]
        return scatter_add_tokens(h, sel.order, o)
