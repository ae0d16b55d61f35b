"""``specgate tune``: the speculation settings that pay on this machine, for this model and these gates.

Whether drafting with the gated model beats plain decoding depends on what a draft step and a verify
pass cost here (CPU, threads, torch build) relative to a plain step, and on how often drafts are
accepted (the gates, the budget, the draft vocabulary). :func:`tune` measures both and picks the
``(draft_budget, max_draft, draft_vocab, kv_fill, draft_precision)`` with the highest predicted speed-up

    E / (k c + v),   E = (1 - a^(k+1)) / (1 - a) tokens per round,

for k drafts, per-position acceptance a, draft-step cost c and verify cost v of k + 1 tokens, both
relative to a plain step; plain decoding (1.0x) is one of the options. ``kv_fill`` is there because
projecting the K/V of a token that skips attention costs a share of the branch, and copying the
layer below's instead costs the draft some acceptance: which pays is measured, per machine.
``draft_precision`` (bfloat16, int8 or int4 copies of the weights: they cost memory) trades acceptance
for bytes read the same way; by default the int8 and int4 copies the engine can run here are tried
as drafts that skip nothing (what won on every CPU measured), ``precisions`` tries the ones it
names at every setting. Each setting is also tried
with rounds of up to ``max_draft`` drafts that stop where the draft is unsure (``min_draft_prob``,
``draft_probs``): their tokens and draft steps per round are measured, not modelled. The choice is stored in
``<cache>/tune-<key>.json``; the key hashes the model, the gates' tensors, the CPU, torch and the
thread count, so anything that changes the costs or the acceptance makes the stored choice unused.
``SpecGateModel.generate(speculative=True)`` without explicit settings uses it (:func:`resolve`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .kernels.cpu_linear import cache_dir
from .linear import machine_key, probe_threads
from .engine import KV_FILLS
from .kernels.cpu_step import PRECISIONS, ROWS_PER_PASS, CpuStep
from .bench import mtbench_prompts
from .prompts import split
from .speculative import SpecConfig, draft_gates, draft_policy

if TYPE_CHECKING:
    from .model import SpecGateModel

log = logging.getLogger("specgate")

DEFAULT_VOCABS = (4096, 8192, 16384)  # draft vocabulary sizes tried when the gates rank tokens
_logged: set[str] = set()  # settings labels already logged by this process


@dataclass(frozen=True)
class TuneConfig:
    """What to try and how long to measure."""

    budgets: tuple[float, ...] | None = None  # None: every budget the gates are calibrated for
    vocabs: tuple[int, ...] | None = None  # restricted draft vocabularies; None: DEFAULT_VOCABS (full head always)
    kv_fills: tuple[str, ...] = KV_FILLS  # the draft's K/V of tokens that skip attention (Engine.forward)
    # the draft's weight precisions, each at every setting (others than float32 cost a copy in memory);
    # None: float32, and the int8 / int4 copies that run here as drafts that skip nothing (DEFAULT_LOW)
    precisions: tuple[str, ...] | None = None
    max_draft: int = 8  # k is chosen in 1..max_draft
    # also try rounds of up to max_draft drafts that stop once the draft's top-1 probability is below each
    draft_probs: tuple[float, ...] = (0.5,)
    prompts: int = 6  # calibration prompts (the last MT-Bench questions) for the acceptance runs
    tokens: int = 64  # new tokens per acceptance run
    rounds: int = 20  # timed repetitions of every kind of step

    def __post_init__(self):
        for name in ("max_draft", "prompts", "tokens", "rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be 1 or more, got {getattr(self, name)}")
        if not self.kv_fills or not set(self.kv_fills) <= set(KV_FILLS):
            raise ValueError(f"kv_fills must be some of {KV_FILLS}, got {self.kv_fills}")
        if self.precisions is not None and (not self.precisions or not set(self.precisions) <= set(PRECISIONS)):
            raise ValueError(f"precisions must be some of {PRECISIONS}, got {self.precisions}")
        if not all(0 < p < 1 for p in self.draft_probs):
            raise ValueError(f"draft_probs are top-1 probabilities in (0, 1), got {self.draft_probs}")


# -- the choice --------------------------------------------------------------------------------------


def expected_tokens(a: float, k: int) -> float:
    """Tokens one round emits on average: the accepted drafts plus the verifier's token, when each
    of k drafts is accepted with probability a given that the ones before it were."""
    return float(k + 1) if a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)


def speedup(a: float, k: int, c: float, v: float) -> float:
    """Predicted speed-up over plain decoding: tokens per round over the round's cost in plain steps."""
    return expected_tokens(a, k) / (k * c + v)


def confident_speedup(tau: float, drafts: float, c: list[float] | float, verify: dict[int, float]) -> float:
    """Predicted speed-up of rounds whose length the draft's confidence decides: tau tokens and
    ``drafts`` draft steps per round on average, the verify cost interpolated between draft lengths
    (c as for :func:`best_k`)."""
    lo = min(max(int(drafts), 1), max(verify))
    hi = min(lo + 1, max(verify))
    v = verify[lo] + (verify[hi] - verify[lo]) * (drafts - lo)
    return tau / (drafts * draft_cost(c, max(1, round(drafts))) + v)


def best_k(a: float, c: list[float] | float, verify: dict[int, float]) -> tuple[int, float]:
    """The draft length (a key of ``verify``: k -> cost of verifying k + 1 tokens) with the highest
    predicted speed-up, and that speed-up. c: the draft step's cost, or its costs at positions 1, 2, ..."""
    return max(((k, speedup(a, k, draft_cost(c, k), v)) for k, v in verify.items()), key=lambda kv: kv[1])


# -- measuring ---------------------------------------------------------------------------------------


Setting = tuple[float, "int | None", str, str]  # (draft budget, draft vocabulary (None: full head), kv_fill, precision)


def candidates(m: SpecGateModel, config: TuneConfig) -> list[Setting]:
    """Settings to try: calibrated budgets (filtered by ``config.budgets``) times the full head and
    the restricted vocabularies smaller than the model's, times ``config.kv_fills`` and ``config.precisions``
    (None: float32); and the drafts over each low-precision copy that skip nothing (None: those of
    :data:`DEFAULT_LOW` that run here). Without gates, only those (with the vocabularies of the model's
    own ranking where it has one, :attr:`SpecGateModel.token_ranking`)."""
    gates = m.gates
    precisions = config.precisions or ("float32",)
    # these drafts save without skipping too: budget 0
    low = [p for p in precisions if p != "float32"] if config.precisions else [p for p in DEFAULT_LOW if _low_drafts(m, p)]
    vocabs: list[int | None] = [None]
    if m.token_ranking is None:
        if config.vocabs:
            log.warning("no token ranking: tuning the full draft head only (eval/draft_vocab.py adds one)")
    else:
        wanted = DEFAULT_VOCABS if config.vocabs is None else config.vocabs
        vocabs += sorted({n for n in wanted if n < len(m.token_ranking)})
    if gates is None:
        if not low:
            raise ValueError(
                "without gates the only drafts are the model itself over a low-precision copy of its weights, and "
                "none runs here: pass --precisions int8 (or bfloat16 / int4) on a CPU with the fused pass, or --gates "
                "DIR with calibrated gates"
            )
        if config.budgets:
            log.warning("no gates: tuning drafts that skip nothing (budgets need gates)")
        return [(0.0, v, "project", p) for v in vocabs for p in low]
    if not gates.thresholds:
        raise ValueError("tuning needs calibrated gates: pass --gates DIR, and run `specgate calibrate --gates DIR` first")
    calibrated = sorted(gates.thresholds)
    budgets = calibrated if config.budgets is None else sorted(set(config.budgets))
    missing = [b for b in budgets if not any(abs(b - c) < 1e-6 for c in calibrated)]
    if missing:
        raise ValueError(
            f"the gates are not calibrated for budgets {missing}: pick from {calibrated} or run `specgate calibrate --budgets ...`"
        )
    budgets = [c for c in calibrated if any(abs(b - c) < 1e-6 for b in budgets)]  # the stored keys, exactly
    return [(0.0, v, "project", p) for v in vocabs for p in low] + [
        (b, v, f, p) for b in budgets for v in vocabs for f in config.kv_fills for p in precisions
    ]


def prompt_ids(m: SpecGateModel, n: int) -> list[torch.Tensor]:
    """The last n MT-Bench questions (``specgate bench`` times the first ones), chat-encoded; without
    the MT-Bench package, the held-out split of :mod:`specgate.prompts`, with a warning.

    Not specgate's training prompts: the draft vocabulary is ranked on the model's answers to them,
    where it covers more than elsewhere (the int8 draft with the 8,192-token head was accepted at
    0.97 per position there, and in 0.69 of its drafts on MT-Bench, where the full head's were 0.94)."""
    try:
        questions = mtbench_prompts()
    except ModuleNotFoundError as e:
        warnings.warn(f"{e}; tuning on specgate's held-out prompts instead", stacklevel=2)
        questions = split()[1]
    if not 1 <= n <= len(questions):
        raise ValueError(f"--prompts must be 1 to {len(questions)} (the calibration prompts there are), got {n}")
    if m.tokenizer is None:
        raise ValueError("the model has no tokenizer to encode the calibration prompts: pass prompt ids to tune()")
    return [m.encode_chat(p) for p in questions[-n:]]


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer measures the step and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def step_costs(m: SpecGateModel, ids: torch.Tensor, settings: list[Setting], max_draft: int, rounds: int) -> dict:
    """What each kind of step costs here, as a ratio to a plain step, timed where the decoding loops run
    it: "plain" (a plain step after plain steps), "verify k" (k + 1 tokens, after k draft steps),
    "draft b v f [p]" (a list: the draft step at each position 1..max_draft of a round, after a verify
    pass and the drafts before it); "plain_ms" in milliseconds.

    Where a step runs matters on a CPU: a verify pass streams the float32 weights and evicts a draft's
    copy from the caches, so the first draft step of a round costs more than the later ones (an int8
    draft's 0.37x against 0.26x of a plain step here), and a verify pass after drafts more than one
    after verify passes. Timing each kind apart, after other kinds, predicted 1.96x where the loop ran
    1.84x. Every round runs each kind once, in turn (a busy neighbour slows all alike); the figures
    are medians over ``rounds`` rounds."""
    tail = 2 * max_draft + 2
    if ids.shape[1] <= tail:
        raise ValueError(f"the timing prompt has {ids.shape[1]} tokens: it needs more than 2 max_draft + 2 = {tail}")
    engine, gates = m.engine, m.gates
    cache = engine.new_cache(1, ids.shape[1])
    engine(ids[:, :-tail], cache)
    base = cache.host_lengths[0]
    drafts = {}
    for b, v, f, pr in settings:
        draft = SpecConfig(draft_budget=b)
        policy = draft_policy(draft_gates(gates, draft), draft)  # as the loop drafts: no gates at budget 0
        drafts[draft_name(b, v, f, pr)] = dict(policy=policy, head=m.draft_head(v) if v else None, kv_fill=f, precision=pr)

    def steps(start: int, n: int, T: int = 1, policy=None, **kw) -> list[float]:
        """n passes of T tokens from tail position start on, each after the last; their times."""
        cache.rewind([base + start])  # a list: no read from the device in the timed steps
        times = []
        for j in range(start, start + n * T, T):
            pos = ids.shape[1] - tail + j
            _sync(engine.device)
            t = time.perf_counter()
            engine(ids[:, pos : pos + T], cache, gates if policy else None, policy, exact_logits=False, **kw)  # greedy
            _sync(engine.device)
            times.append(time.perf_counter() - t)
        return times

    names = list(drafts)
    times: dict[str, list] = {"plain": [], **{f"verify {k}": [] for k in range(1, max_draft + 1)}}
    times |= {name: [[] for _ in range(max_draft)] for name in names}
    for r in range(rounds + 2):  # two warm-up rounds: backend probes, kernel builds, caches
        keep = r >= 2
        plain = steps(r % max_draft, max_draft + 1)[1:]  # plain decoding's steady state
        if keep:
            times["plain"].append(statistics.median(plain))
        for name in names:  # a round as the loop runs it: verify, then max_draft drafts
            steps(0, 1, T=max_draft + 1)
            for i, t in enumerate(steps(max_draft + 1, max_draft, **drafts[name])):
                if keep:
                    times[name][i].append(t)
        for k in range(1, max_draft + 1):  # k drafts (of the settings in turn), then the verify pass
            if names:
                steps(0, k, **drafts[names[(r + k) % len(names)]])
            t = steps(0, 1, T=k + 1)[0]
            if keep:
                times[f"verify {k}"].append(t)
    plain = statistics.median(times["plain"])
    return {"plain_ms": plain * 1e3, "plain": 1.0,
            **{f"verify {k}": statistics.median(times[f"verify {k}"]) / plain for k in range(1, max_draft + 1)},
            **{name: [statistics.median(ts) / plain for ts in times[name]] for name in names}}  # fmt: skip


def draft_cost(costs: list[float] | float, k: int) -> float:
    """A draft step's mean cost (x plain) over a round of k drafts, from the per-position costs of
    :func:`step_costs` (a number: the same at every position)."""
    return statistics.mean(costs[:k]) if isinstance(costs, list) else costs


def draft_name(budget: float, vocab: int | None, kv_fill: str, precision: str = "float32") -> str:
    """The step-cost entry of a draft setting."""
    return f"draft {budget:g} {vocab or 'full'} {kv_fill}" + ("" if precision == "float32" else f" {precision}")


class _RoundSizes:
    """A streamer that records how many tokens each ``put`` carries: speculative decoding puts the
    prompt, then the first token, then each round's accepted drafts plus the verifier's token."""

    def __init__(self):
        self.sizes: list[int] = []

    def put(self, value: torch.Tensor) -> None:
        self.sizes.append(value.numel())

    def end(self) -> None:
        pass


def acceptance(m: SpecGateModel, prompts: list[torch.Tensor], setting: Setting, max_draft: int, tokens: int) -> dict[str, float]:
    """Per-position acceptance at one setting: every round drafts max_draft tokens; a round that
    accepted n < max_draft drafts tested n + 1 positions and accepted n, a full one tested and
    accepted all. Pooled over the prompts' rounds (the last one of each, maybe cut short by the
    token limit, left out); greedy decoding, as the choice assumes."""
    budget, vocab, kv_fill, precision = setting
    spec = SpecConfig(draft_budget=budget, max_draft=max_draft, init_draft=max_draft, draft_vocab=vocab, adaptive=False,
                      kv_fill=kv_fill, draft_precision=precision)  # fmt: skip
    accepted = tested = 0
    skipped: list[float] = []
    for ids in prompts:
        sizes = _RoundSizes()
        out = m.generate(ids, max_new_tokens=tokens, do_sample=False, speculative=True, spec_config=spec,
                         streamer=sizes, return_dict_in_generate=True)  # fmt: skip
        for size in sizes.sizes[2:-1]:
            accepted += size - 1
            tested += min(size, max_draft)
        skipped.append(out.spec_stats.skip_fraction)
    if tested == 0:
        raise ValueError(f"{tokens} new tokens gave no complete speculation round to count: raise --tokens")
    return {"a": accepted / tested, "tested": tested, "skip_fraction": statistics.mean(skipped)}


def confident_rounds(m: SpecGateModel, prompts: list[torch.Tensor], setting: Setting, max_draft: int, tokens: int,
                     min_prob: float) -> dict[str, float]:  # fmt: skip
    """Tokens (tau) and draft steps per round, and alpha, of rounds of up to max_draft drafts that
    stop once the draft's top-1 probability falls below ``min_prob``; pooled over the prompts."""
    budget, vocab, kv_fill, precision = setting
    spec = SpecConfig(draft_budget=budget, max_draft=max_draft, init_draft=max_draft, draft_vocab=vocab, adaptive=False,
                      min_draft_prob=min_prob, kv_fill=kv_fill, draft_precision=precision)  # fmt: skip
    stats = [m.generate(ids, max_new_tokens=tokens, do_sample=False, speculative=True, spec_config=spec,
                        return_dict_in_generate=True).spec_stats for ids in prompts]  # fmt: skip
    rounds = sum(s.rounds for s in stats)
    if rounds == 0:
        raise ValueError(f"{tokens} new tokens gave no speculation round to count: raise --tokens")
    return {"tau": sum(s.tau * s.rounds for s in stats) / rounds, "drafts": sum(s.drafted for s in stats) / rounds,
            "a": sum(s.accepted for s in stats) / max(1, sum(s.drafted for s in stats)),
            "skip_fraction": statistics.mean(s.skip_fraction for s in stats)}  # fmt: skip


# -- tuning, storing, loading ------------------------------------------------------------------------


def gates_hash(m: SpecGateModel) -> str:
    """Hash of everything in the gates that changes the draft: config, weights, thresholds, the draft
    vocabulary's ranking (a model's own where it has no gates; "none" without either)."""
    g, ranking = m.gates, m.token_ranking
    if g is None and ranking is None:
        return "none"
    h = hashlib.sha256(b"none" if g is None else json.dumps(dataclasses.asdict(g.config), sort_keys=True).encode())
    tensors = [] if g is None else sorted(g.state_dict().items()) + sorted((f"thresholds.{b!r}", t) for b, t in g.thresholds.items())
    if ranking is not None:
        tensors.append(("token_ranking", ranking))
    for name, t in tensors:
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def tune_key(m: SpecGateModel, threads: int | None = None) -> str:
    """What a stored choice is valid for: model, dtype, device, gates, CPU, torch and thread count."""
    text = "\n".join([m.name, str(m.engine.dtype), str(m.engine.device), gates_hash(m), machine_key(threads)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def tune_file(m: SpecGateModel) -> Path:
    return cache_dir() / f"tune-{tune_key(m)}.json"


def tune(m: SpecGateModel, config: TuneConfig = TuneConfig(), prompts: list[torch.Tensor] | None = None) -> dict:
    """Measure costs and acceptance, choose, and return the result (what :func:`save` stores).
    prompts: (1, T) ids for the acceptance runs (default: ``config.prompts`` calibration prompts)."""
    settings = candidates(m, config)
    prompts = prompt_ids(m, config.prompts) if prompts is None else prompts
    threads = torch.get_num_threads()
    costs = step_costs(m, prompts[0], settings, config.max_draft, config.rounds)
    verify = {k: costs[f"verify {k}"] for k in range(1, config.max_draft + 1)}
    rows = []
    for b, v, f, pr in settings:
        acc = acceptance(m, prompts, (b, v, f, pr), config.max_draft, config.tokens)
        c = costs[draft_name(b, v, f, pr)]
        k, s = best_k(acc["a"], c, verify)
        setting = {"budget": b, "vocab": v, "kv_fill": f, "precision": pr}
        rows.append({**setting, **acc, "draft_cost": draft_cost(c, k), "k": k, "min_draft_prob": 0.0,
                     "verify_cost": verify[k], "speedup": s})  # fmt: skip
        for p in config.draft_probs:
            r = confident_rounds(m, prompts, (b, v, f, pr), config.max_draft, config.tokens, p)
            rows.append({**setting, **r, "draft_cost": draft_cost(c, max(1, round(r["drafts"]))), "k": config.max_draft,
                         "min_draft_prob": p, "speedup": confident_speedup(r["tau"], r["drafts"], c, verify)})  # fmt: skip
    best = max(rows, key=lambda r: r["speedup"])
    spec = SpecConfig(draft_budget=best["budget"], max_draft=best["k"], init_draft=best["k"], adaptive=False,
                      min_draft_prob=best["min_draft_prob"], draft_vocab=best["vocab"], kv_fill=best["kv_fill"],
                      draft_precision=best["precision"])  # fmt: skip
    return {
        "key": tune_key(m, threads),
        "model": m.name,
        "gates": gates_hash(m),
        "threads": threads,
        "fastest_threads": probe_threads(_thread_counts(threads)),
        "torch": torch.__version__,
        "costs": costs,
        "settings": rows,
        "speculate": best["speedup"] > 1.0,
        "predicted_speedup": max(1.0, best["speedup"]),
        "spec_config": dataclasses.asdict(spec),
        "config": dataclasses.asdict(config),
    }


def _thread_counts(current: int) -> tuple[int, ...]:
    """Thread counts worth probing: 1, 2 and every core (those there are), and the one in use."""
    cores = os.cpu_count() or 1
    return tuple(sorted({n for n in (1, 2, cores) if n <= cores} | {current}))


def save(result: dict, path: Path) -> Path:
    """Write the result as JSON, atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def load_tuned(m: SpecGateModel) -> tuple[SpecConfig, Path] | None:
    """The stored best speculative settings for this model, gates and machine, and their file; None
    if ``specgate tune`` has not been run for them. An unreadable file warns and counts as none."""
    path = tune_file(m)
    if not path.is_file():
        return None
    try:
        return SpecConfig(**json.loads(path.read_text())["spec_config"]), path
    except (OSError, ValueError, TypeError, KeyError) as e:
        warnings.warn(f"{path} is unreadable ({e}): using the default speculation settings; run `specgate tune` again",
                      stacklevel=3)  # fmt: skip
        return None


UNTUNED = SpecConfig(draft_budget=0.0, max_draft=6, draft_precision="int4")
UNTUNED_PRECISIONS = ("int4", "int8")  # the untuned draft's copy: the first that fits the model and runs here
UNTUNED_VOCAB = 16384  # the untuned draft's vocabulary where the model's holds over 4x as many tokens, and it has a ranking
# Settings chosen for the caller (tuned or untuned) speculate on batches up to this size and decode larger ones
# plainly. eval/batch_decode.py (AMD EPYC, 2 threads, SmolLM2, the tuned int4 draft, 5 drafts a round): 1.84x
# plain at batch 1, 1.51x at 2, 0.59x at 4 and 0.57x at 8; forced to at most k = 1-3 drafts, 1.02-1.09x at 4 and
# 0.63-0.95x at 8: a batched plain step reads the weights once for every row, so verifying k + 1 tokens per row
# costs about what the rounds save.
SPEC_MAX_BATCH = 2
# A verify pass of B sequences runs B (k + 1) token rows, and the fused pass reads the weights once per
# ROWS_PER_PASS of them, so tuned or untuned settings at a batch B > 1 draft at most ROWS_PER_PASS // B - 1
# tokens a round (3 at batch 2). eval/batch_decode.py --batch-sizes 2 (AMD EPYC, 16 questions, four runs;
# results/batch_k_amd_s29.txt): 3 drafts 1.30-1.54x plain, the tune's 5 (12 rows, two passes) 1.20-1.48x, 4-9%
# less in each run.


def resolve(
    m: SpecGateModel, spec_config: SpecConfig | None, overrides: dict[str, float | int | None], batch: int = 1
) -> tuple[SpecConfig | None, str]:
    """The speculation settings of one ``generate`` call and where they came from: ``spec_config``,
    else the tuned ones, else :data:`UNTUNED` when the engine can draft from an int4 copy, or else an
    int8 one (:data:`UNTUNED_PRECISIONS`; the fused CPU pass), else the ``SpecConfig`` defaults; then
    the overrides (``draft_budget``, ``max_draft``: see :func:`_override`). Where the overrides ask a
    tuned or untuned low-precision draft to skip where the fused pass cannot run it (a batch, gates
    it does not take), that draft reads the float32 weights. Tuned or untuned settings without
    overrides meeting a batch of more than :data:`SPEC_MAX_BATCH` sequences on the CPU give ``None``:
    decode plainly (an explicit ``spec_config`` or override speculates at any batch; the rule was
    measured on the CPU only); on smaller batches they draft at most ``ROWS_PER_PASS // batch - 1``
    tokens a round (see :data:`SPEC_MAX_BATCH`) unless ``max_draft`` is given. Each distinct origin
    is logged once per process.

    :data:`UNTUNED` (a draft over the int4 copy that skips nothing, up to 6 tokens per round, +18%
    memory for the copy) ran SmolLM2 at 1.86-1.87x plain decoding on a 2-core AMD EPYC against
    1.62-1.64x with the int8 copy (eval/sweep_spec.py, two runs, once greedy drafts screened their
    float32 head), Gemma 3 270M at 1.42x against 1.41x. A model with a token ranking and a
    vocabulary over 4x :data:`UNTUNED_VOCAB` drafts over that many tokens: Gemma 3 (262,144 tokens,
    its head two thirds of its weights) ran 1.70x plain with int4 and 1.66x with int8 over 16,384
    tokens, 1.30x / 1.34x over its full head (one eval/sweep_spec.py run); SmolLM2 (49,152) keeps
    its full head, where 16,384 tokens lost a little (1.82x against 1.86x). int8 was the default before (what ``specgate
    tune`` chose among float32 and int8 drafts on both CPUs measured, 1.8-2.1x plain); the
    ``SpecConfig`` defaults (a float32 draft skipping 10%) do not beat plain decoding there."""
    given = {k: v for k, v in overrides.items() if v is not None}
    ours, cpu = spec_config is None, m.engine.device.type == "cpu"  # ours: the settings are ours to choose
    if ours and not given and batch > SPEC_MAX_BATCH and cpu:
        return _logged_once(None, f"plain decoding: a batch of {batch} > {SPEC_MAX_BATCH} (tune.SPEC_MAX_BATCH; pass spec_config= to speculate)")
    if not ours:
        spec, label = spec_config, "spec_config"
    elif (tuned := load_tuned(m)) is not None:
        spec, label = tuned[0], f"tuned ({_home(tuned[1])})"
    elif low := next((p for p in UNTUNED_PRECISIONS if _low_drafts(m, p)), None):
        vocab = _untuned_vocab(m)
        spec = dataclasses.replace(UNTUNED, draft_precision=low, draft_vocab=vocab)
        label = f"defaults ({low} draft{f', {vocab}-token vocabulary' if vocab else ''})"
    else:
        spec, label = SpecConfig(), "defaults"
    most = max(1, ROWS_PER_PASS // batch - 1)  # drafts whose verify rows take one pass over the weights
    if ours and "max_draft" not in given and batch > 1 and cpu and spec.max_draft > most:
        spec = _override(spec, {"max_draft": most})
        label += f" (at most {most} drafts a round: a batch of {batch})"
    if given:
        spec = _override(spec, given)
        label += " + " + ", ".join(f"{k}={v}" for k, v in given.items())
        if ours and spec.draft_precision != "float32" and not _fused_draft(m, spec, batch):
            spec = dataclasses.replace(spec, draft_precision="float32")  # the copy was our choice: give it up
            label += " (float32 draft: the fused pass drafts a low-precision copy that skips for one sequence only)"
    return _logged_once(spec, label)


def _logged_once(spec: SpecConfig | None, label: str) -> tuple[SpecConfig | None, str]:
    """(spec, label), logging each distinct label once per process."""
    if label not in _logged:
        _logged.add(label)
        log.info("speculation settings: %s%s", label, f": {spec}" if spec is not None else "")
    return spec, label


def _override(spec: SpecConfig, given: dict) -> SpecConfig:
    """``spec`` with a call's overrides. A new ``max_draft`` sets the first round's length too where
    the length is fixed (``adaptive=False``, as tuned settings are), and bounds it where it adapts."""
    if "max_draft" in given and spec.init_draft is not None:
        k = given["max_draft"]
        given = {**given, "init_draft": k if not spec.adaptive else min(spec.init_draft, k)}
    return dataclasses.replace(spec, **given)


def _fused_draft(m: SpecGateModel, spec: SpecConfig, batch: int) -> bool:
    """Whether the fused CPU pass runs this draft's steps for ``batch`` sequences (a low-precision
    draft runs nowhere else)."""
    gates = draft_gates(m.gates, spec)
    return CpuStep.covers(batch, 1, gates, None if gates is None else gates.policy(spec.draft_budget))


DEFAULT_LOW = ("int8", "int4")  # the copies tune tries by default, as drafts that skip nothing


def _low_drafts(m: SpecGateModel, precision: str) -> bool:
    """Whether the engine can draft from a ``precision`` copy here, skipping nothing (makes the copy,
    which drafting then uses)."""
    if draft_gates(m.gates, UNTUNED) is not None:  # gates that scale outputs run even at budget 0: not fused
        return False
    try:
        m.engine.low_precision_step(precision)
    except (RuntimeError, ValueError):
        return False
    return True


def _untuned_vocab(m: SpecGateModel) -> int | None:
    """:data:`UNTUNED_VOCAB` where the model has a token ranking and more than 4x as many tokens, else None (the full head)."""
    return UNTUNED_VOCAB if m.token_ranking is not None and m.config.vocab_size > 4 * UNTUNED_VOCAB else None


def _home(path: Path) -> str:
    """A path with the home folder written ~, as a user would type it."""
    home = str(Path.home())
    return "~" + str(path)[len(home) :] if str(path).startswith(home + os.sep) else str(path)


def report(result: dict) -> str:
    """The measured table, the choice and what it predicts, for the terminal."""
    c = result["costs"]
    verify = "  ".join(f"k={k}: {c[f'verify {k}']:.2f}" for k in range(1, result["config"]["max_draft"] + 1))
    lines = [
        f"plain step {c['plain_ms']:.2f} ms at {result['threads']} threads; verify k+1 tokens (x plain): {verify}",
        f"{'budget':>6} {'vocab':>6} {'kv_fill':>10} {'weights':>8} {'draft cost':>10} {'skipped':>8} {'accept a':>9} "
        f"{'best k':>6} {'stop p':>6} {'speed-up':>9}",
        "(stop p: rounds of up to k drafts that stop below this top-1 probability; accept a is then alpha)",
    ]
    for r in result["settings"]:
        stop = f"{r['min_draft_prob']:g}" if r.get("min_draft_prob") else "-"
        lines.append(f"{r['budget']:>6g} {r['vocab'] or 'full':>6} {r['kv_fill']:>10} {r.get('precision', 'float32'):>8} {r['draft_cost']:>9.2f}x "
                     f"{r['skip_fraction']:>8.1%} {r['a']:>9.2f} {r['k']:>6} {stop:>6} {r['speedup']:>8.2f}x")  # fmt: skip
    s = result["spec_config"]
    best = (f"draft_budget={s['draft_budget']:g}, max_draft={s['max_draft']}, draft_vocab={s['draft_vocab'] or 'full'}, "
            f"kv_fill={s['kv_fill']}, draft_precision={s.get('draft_precision', 'float32')}"
            + (f", min_draft_prob={s['min_draft_prob']:g}" if s.get("min_draft_prob") else ""))  # fmt: skip
    if result["speculate"]:
        lines.append(f"choice: {best}, predicted {result['predicted_speedup']:.2f}x plain decoding")
    else:
        top = max(r["speedup"] for r in result["settings"])
        lines.append(f"choice: plain decoding: speculation does not pay here (best setting, {best}, predicts {top:.2f}x); "
                     "`generate(speculative=True)` still uses that best setting")  # fmt: skip
        if tuple(result["config"].get("precisions") or ()) == ("float32",):  # asked for float32 drafts only
            lines.append("hint: `--precisions float32 int8` also tries drafts over an int8 copy of the weights "
                         "(+25% memory, still lossless)")  # fmt: skip
    if result["fastest_threads"] != result["threads"]:
        lines.append(f"note: a decode product ran fastest at {result['fastest_threads']} threads; tuned at {result['threads']} "
                     f"(tune again with --threads {result['fastest_threads']} and decode with it)")  # fmt: skip
    return "\n".join(lines)
