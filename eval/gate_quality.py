"""How good are the shipped gates as a draft? SmolLM2-135M-Instruct, held-out prompts.

For each budget (share of the draft's layer compute skipped, ``Engine.branch_costs``) and four
ways of choosing what to skip at that budget:

- ``gateskip``: the gates with their calibrated single-token thresholds;
- ``random``: every (token, branch) skipped with probability ``budget``;
- ``static``: whole branches skipped for every token (Draft & Verify style): the branches whose
  removal alone costs least top-1 agreement on calibration text (the train-split answers, not the
  held-out ones), in that order until they make up ``budget`` of the layer compute;
- ``sparse``: no skips, sparse inputs (:mod:`specgate.sparse_inputs`) with the thresholds the gates
  store for ``budget`` (``specgate calibrate --sparse-inputs``).

we measure, teacher-forced over the full model's own greedy answers to the held-out prompts of
:mod:`specgate.prompts` (never in the training corpus): the mean per-token log-likelihood of the
text and the top-1 agreement with the full model, for the *first draft token of a round*: each
position runs as one single-token skipping step against a cache holding the full model's K/V of
everything before it, as in the acceptance loop after a verify pass. The skip share each method
really reached is counted too (evaluations and compute). At the end, the acceptance loop's alpha
and tau at the ``--accept-budgets`` (with the ``--draft-vocab`` head if given; the loop's draft
lengths: ``--max-draft``, ``--min-draft-prob``, ``--fixed-draft``; ``--sparse-inputs S``: the draft
cuts its inputs at share S too, alone where the budget is 0).

    .venv/bin/python eval/gate_quality.py [--gates DIR] [--prompts 34] [--answer-tokens 128] [--draft-vocab 8192]

Writes results/gate_quality.json and results/gate_quality.png (with matplotlib installed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import dataclasses
from pathlib import Path

import torch

import specgate
from specgate.data import chat_ids, self_answers
from specgate.engine import SkipCounter
from specgate.gradient import gated_forward
from specgate.policy import SkipPolicy
from specgate.prompts import split
from specgate.sparse_inputs import InputCuts

ROOT = Path(__file__).resolve().parents[1]


class RandomPolicy:
    """Skips each (token, branch) with probability ``budget``, independently."""

    def __init__(self, budget: float, seed: int = 0):
        self.budget, self.generator = budget, torch.Generator().manual_seed(seed)

    def may_skip(self, layer, branch, T):
        return True

    def active(self, importance, valid, layer, branch):
        return torch.rand(importance.shape, generator=self.generator) >= self.budget


class StaticPolicy:
    """Skips the branches in ``skipped`` ((layer, branch) pairs) for every token."""

    def __init__(self, skipped: frozenset):
        self.skipped = skipped

    def may_skip(self, layer, branch, T):
        return (layer, branch) in self.skipped

    def active(self, importance, valid, layer, branch):
        if (layer, branch) in self.skipped:
            return torch.zeros_like(importance, dtype=torch.bool)
        return None


class RowCounter:
    """Wraps a policy; counts (token, branch) evaluations, skips and the layer compute they stand
    for (``Engine.branch_costs``), of the rows in ``rows`` only (the engine's SkipCounter counts
    every row of a step, prompt positions included)."""

    def __init__(self, policy: SkipPolicy, costs: tuple[list[list[float]], list[list[float]]]):
        self.policy, (self.cost, self.saved) = policy, costs
        self.rows, self.total, self.skipped, self.compute_total, self.compute_skipped = None, 0, 0, 0.0, 0.0

    def step(self, rows: torch.Tensor) -> None:
        self.rows = rows
        self.total += int(rows.sum()) * 2 * len(self.cost[0])
        self.compute_total += int(rows.sum()) * sum(map(sum, self.cost))

    def active(self, importance, valid, layer, branch):
        run = self.policy.active(importance, valid, layer, branch)
        if run is not None:
            n = int((~run[:, 0] & self.rows).sum())
            self.skipped += n
            self.compute_skipped += n * self.saved[branch][layer]
        return run

    def may_skip(self, layer, branch, T):
        return self.policy.may_skip(layer, branch, T)

    @property
    def fraction(self) -> float:
        return self.skipped / self.total if self.total else 0.0

    @property
    def compute_fraction(self) -> float:
        return self.compute_skipped / self.compute_total if self.compute_total else 0.0


def samples(m, prompts: list[str], answer_tokens: int) -> list[tuple[list[int], int]]:
    """(ids, answer start) of the full model's greedy answers, through the chat template."""
    answers = self_answers(m, prompts, max_new_tokens=answer_tokens, batch_size=len(prompts))
    out = []
    for p, a in zip(prompts, answers):
        prompt_len = m.encode_chat(p).shape[1]
        out.append((chat_ids(m.tokenizer, p, a)[: prompt_len + answer_tokens], prompt_len))
    return out


def left_pad(batch: list[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids (B, N) left-padded, pad (B,), and target mask (B, N): position t predicts an answer token."""
    N = max(len(ids) for ids, _ in batch)
    ids = torch.zeros(len(batch), N, dtype=torch.long)
    pad = torch.zeros(len(batch), dtype=torch.long)
    target = torch.zeros(len(batch), N, dtype=torch.bool)
    for b, (seq, start) in enumerate(batch):
        pad[b] = N - len(seq)
        ids[b, pad[b] :] = torch.tensor(seq)
        target[b, pad[b] + start - 1 : N - 1] = True
    return ids, pad, target


@torch.inference_mode()
def first_draft_scores(m, batch, gates, policy) -> dict:
    """Teacher-forced first-draft-token scores of one policy (None: the full model; an
    :class:`InputCuts`: the sparse-inputs draft, without gates) over a batch."""
    eng = m.engine
    ids, pad, target = left_pad(batch)
    B, N = ids.shape
    cache = eng.new_cache(B, N)
    cache.reset(pad)
    full = eng(ids, cache).float().log_softmax(-1)  # (B, N, V)
    nxt = torch.cat([ids[:, 1:], ids[:, :1]], 1)
    full_ll = full.gather(-1, nxt[..., None])[..., 0]
    full_top = full.argmax(-1)
    if policy is None:
        return {"ll": full_ll[target].tolist(), "agree": [1.0] * int(target.sum()), "skipped": 0.0, "compute": 0.0}
    k, v = [t.clone() for t in cache.k], [t.clone() for t in cache.v]  # the full model's K/V, per layer
    cuts = policy if isinstance(policy, InputCuts) else None
    counted = SkipCounter() if cuts is not None else RowCounter(policy, eng.branch_costs())
    ll, agree = [], []
    first = int(target.float().argmax(1).min())
    for t in range(first, N - 1):
        rows = target[:, t]
        if not rows.any():
            continue
        cache.rewind(torch.full((B,), t))
        if cuts is not None:  # every row of the step is counted, prompt positions of other rows too
            logp = eng(ids[:, t : t + 1], cache, cuts=cuts, counter=counted)[:, 0].float().log_softmax(-1)
        else:
            counted.step(rows)
            logp = eng(ids[:, t : t + 1], cache, gates, counted)[:, 0].float().log_softmax(-1)
        for i in range(len(k)):  # restore the full model's K/V at t
            cache.k[i][:, :, t], cache.v[i][:, :, t] = k[i][:, :, t], v[i][:, :, t]
        ll += logp.gather(-1, nxt[:, t, None])[rows, 0].tolist()
        agree += (logp.argmax(-1) == full_top[:, t])[rows].float().tolist()
    return {"ll": ll, "agree": agree, "skipped": counted.fraction, "compute": counted.compute_fraction,
            "full_ll": full_ll[target].tolist()}  # fmt: skip


@torch.no_grad()
def static_order(m, calib: list[tuple[list[int], int]]) -> list[tuple[int, int]]:
    """Branches from least to most harmful to remove alone (top-1 agreement on calibration text)."""
    eng = m.engine
    n = min(len(s) for s, _ in calib)
    ids = torch.tensor([s[:n] for s, _ in calib])
    full_top = gated_forward(eng, ids).argmax(-1)
    harm = {}
    for i in range(eng.num_layers):
        for b in (0, 1):
            decide = lambda imp, layer, br, i=i, b=b: torch.zeros_like(imp, dtype=torch.bool) if (layer, br) == (i, b) else None  # noqa: E731
            top = gated_forward(eng, ids, _dummy_gates(m), decide).argmax(-1)
            harm[(i, b)] = 1.0 - float((top == full_top).float().mean())
    return sorted(harm, key=lambda k: (harm[k], k))


def _dummy_gates(m):
    """Gates that only carry skip decisions (their values do not scale: scale_output=False)."""
    if not hasattr(_dummy_gates, "g"):
        g = m.new_gates(kind="scalar")
        g.config = dataclasses.replace(g.config, scale_output=False)
        _dummy_gates.g = g
    return _dummy_gates.g


def static_branches(order: list[tuple[int, int]], budget: float, saved: list[list[float]]) -> frozenset:
    """The first branches of ``order`` whose skipping saves ``budget`` of the layer compute (the
    last one is taken if that comes closer)."""
    chosen, total = [], 0.0
    for layer, branch in order:
        share = saved[branch][layer]
        if total + share / 2 > budget:
            break
        chosen.append((layer, branch))
        total += share
    return frozenset(chosen)


def acceptance(m, prompts: list[str], budgets: list[float], max_new_tokens: int, **loop) -> dict | None:
    """alpha, tau of the speculative loop per budget, if the loop exists (else None). ``loop``: its
    other ``SpecConfig`` settings (draft vocabulary, draft lengths)."""
    if not prompts:
        return None
    out = {}
    for budget in budgets:
        stats = []
        for p in prompts:
            ids = m.encode_chat(p)
            try:
                config = specgate.SpecConfig(draft_budget=budget, **loop)
                res = m.generate(ids, max_new_tokens=max_new_tokens, speculative=True, spec_config=config,
                                 return_dict_in_generate=True)  # fmt: skip
            except (NotImplementedError, TypeError, ValueError) as e:
                print(f"acceptance loop not available ({type(e).__name__}: {e}); skipped", file=sys.stderr)
                return None
            s = getattr(res, "spec_stats", None)
            if s is None:
                print("generate() returned no spec_stats; acceptance skipped", file=sys.stderr)
                return None
            stats.append(s)
        out[budget] = {
            "alpha": sum(float(s.alpha) for s in stats) / len(stats),
            "tau": sum(float(s.tau) for s in stats) / len(stats),
            "skip_fraction": sum(float(s.skip_fraction) for s in stats) / len(stats),
            "compute_skipped": sum(float(s.compute_skipped) for s in stats) / len(stats),
        }
        r = out[budget]
        print(f"budget {budget:.1f}: alpha {r['alpha']:.3f}  tau {r['tau']:.2f}  decode skips {r['skip_fraction']:.3f}"
              f" (compute {r['compute_skipped']:.3f})")  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gates", default="default", help="gate directory (default: the shipped gates)")
    ap.add_argument("--prompts", type=int, default=34, help="held-out prompts (at most 34)")
    ap.add_argument("--answer-tokens", type=int, default=128)
    ap.add_argument("--budgets", default="0,0.1,0.2,0.3,0.4,0.5,0.6")
    ap.add_argument("--batch", type=int, default=17)
    ap.add_argument("--accept-prompts", type=int, default=8)
    ap.add_argument("--accept-budgets", default="0.3,0.5,0.7")
    ap.add_argument("--draft-vocab", type=int, default=None, help="draft vocabulary size in the acceptance loop")
    ap.add_argument("--draft-vocab-context", action=argparse.BooleanOptionalAction, default=True,
                    help="the draft vocabulary grows with the text (default: yes)")  # fmt: skip
    ap.add_argument("--max-draft", type=int, default=specgate.SpecConfig.max_draft, help="the acceptance loop's most drafts per round")
    ap.add_argument("--min-draft-prob", type=float, default=0.0, help="... stopping a round's drafts below this top-1 probability")
    ap.add_argument("--fixed-draft", action="store_true", help="... drafting up to --max-draft every round (not adapting k)")
    ap.add_argument("--methods", default="gateskip,random,static",
                    help="which of gateskip, random, static, sparse (sparse inputs, calibrated in the gates) to measure")
    ap.add_argument("--sparse-inputs", type=float, default=0.0,
                    help="the acceptance loop's sparse-inputs share (with the gates' skips at each --accept-budgets; 0 there: alone)")
    ap.add_argument("--out", default=str(ROOT / "results" / "gate_quality"))
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    budgets = [float(b) for b in args.budgets.split(",") if b]

    m = specgate.load("smollm2-135m-instruct", gates=args.gates)
    if m.gates is None:
        print("no gates: pass --gates DIR or ship gates in specgate/gates/smollm2-135m-instruct", file=sys.stderr)
        return 2
    train_prompts, heldout = split()
    t0 = time.perf_counter()
    held = samples(m, heldout[: args.prompts], args.answer_tokens)
    cache = ROOT / "results" / "static_order.json"  # depends on the model only: computed once
    if cache.is_file():
        order = [tuple(x) for x in json.loads(cache.read_text())]
    else:
        order = static_order(m, samples(m, train_prompts[::17][:8], 48))
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(order) + "\n")
    print(f"[answers and static ranking: {time.perf_counter() - t0:.0f} s]", file=sys.stderr)
    batches = [held[i : i + args.batch] for i in range(0, len(held), args.batch)]
    _, saved = m.engine.branch_costs()

    def run(policy) -> dict:
        parts = [first_draft_scores(m, b, m.gates, policy) for b in batches]
        ll = [x for p in parts for x in p["ll"]]
        agree = [x for p in parts for x in p["agree"]]
        share = lambda key: sum(p[key] * len(p["ll"]) for p in parts) / len(ll)  # noqa: E731
        return {"ll": sum(ll) / len(ll), "agree": sum(agree) / len(agree), "skipped": share("skipped"),
                "compute": share("compute"), "tokens": len(ll)}  # fmt: skip

    full = run(None)
    methods = [x for x in args.methods.split(",") if x]
    results = {"full_model": full, "gates": args.gates, "sparse_inputs": args.sparse_inputs, "methods": {k: {} for k in methods}, "static_order": order}
    header = f"{'budget':>6} | {'method':>8} | {'skipped':>7} | {'compute':>7} | {'log-lik':>8} | {'d vs full':>9} | {'top-1 agree':>11}"
    print(f"full model: mean log-lik {full['ll']:.3f} over {full['tokens']} held-out answer tokens\n{header}")
    for budget in budgets:
        policies = {
            "gateskip": m.gates.policy(budget) if budget > 0 else None,
            "random": RandomPolicy(budget, seed=0) if budget > 0 else None,
            "static": StaticPolicy(static_branches(order, budget, saved)) if budget > 0 else None,
            "sparse": m.gates.cuts(budget) if budget > 0 and "sparse" in methods else None,
        }
        for name in methods:
            if name not in policies:
                raise SystemExit(f"unknown method {name!r}: pick from {', '.join(policies)}")
            policy = policies[name]
            r = full if policy is None else run(policy)
            results["methods"][name][budget] = {k: r[k] for k in ("ll", "agree", "skipped", "compute")}
            print(f"{budget:6.2f} | {name:>8} | {r['skipped']:7.3f} | {r['compute']:7.3f} | {r['ll']:8.3f} | "
                  f"{r['ll'] - full['ll']:9.3f} | {r['agree']:11.3f}")  # fmt: skip
    print(f"[quality table: {time.perf_counter() - t0:.0f} s]", file=sys.stderr)

    accept_budgets = [float(b) for b in args.accept_budgets.split(",")]
    results["acceptance"] = acceptance(
        m, heldout[: args.accept_prompts], accept_budgets, 64, draft_vocab=args.draft_vocab, draft_vocab_context=args.draft_vocab_context,
        max_draft=args.max_draft, min_draft_prob=args.min_draft_prob, adaptive=not args.fixed_draft,
        init_draft=args.max_draft if args.fixed_draft else None, sparse_inputs=args.sparse_inputs,
    )  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    _plot(results, budgets, out.with_suffix(".png"))
    return 0


def _plot(results: dict, budgets: list[float], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        print("matplotlib is not installed (pip install matplotlib): no plot, the JSON has the numbers", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, rows in results["methods"].items():
        xs = [rows[b]["compute"] if b > 0 else 0.0 for b in budgets]
        axes[0].plot(xs, [rows[b]["ll"] for b in budgets], marker="o", label=name)
        axes[1].plot(xs, [rows[b]["agree"] for b in budgets], marker="o", label=name)
    axes[0].set(xlabel="share of the draft's layer compute skipped", ylabel="mean log-likelihood of held-out answers")
    axes[1].set(xlabel="share of the draft's layer compute skipped", ylabel="top-1 agreement with the full model")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("SmolLM2-135M-Instruct: first draft token vs. the full model")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
