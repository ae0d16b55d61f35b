"""Drafts side by side: the ``gateskip`` rows (else the one method's) of several ``eval/gate_quality.py`` results.

    python eval/compare_drafts.py shipped=results/gate_quality_cost.json standins=results/gate_quality_standin_r32.json \\
        [--out results/drafts]

Prints one markdown table (per budget: compute skipped, log-likelihood and top-1 agreement of the
first draft token, alpha and tau in the acceptance loop) and plots them against compute skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def rows(paths: list[Path]) -> list[dict]:
    """One draft's rows: the first file's quality table, the acceptance of all (a sparse-inputs draft
    alone is measured one share per run, its acceptance filed under budget 0: its share is its budget)."""
    runs = [json.loads(p.read_text()) for p in paths]
    accept = {}
    for r in runs:
        a = r.get("acceptance") or {}
        if r.get("sparse_inputs") and "0.0" in a:
            a = {str(float(r["sparse_inputs"])): a["0.0"]}
        accept.update(a)
    methods = runs[0]["methods"]
    out = []
    for budget, q in methods.get("gateskip", next(iter(methods.values()), {})).items():
        if float(budget) == 0:
            continue
        a = accept.get(str(float(budget)), {})
        out.append({"budget": float(budget), **q, "alpha": a.get("alpha"), "tau": a.get("tau"), "loop_compute": a.get("compute_skipped")})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", help="NAME=PATH[,PATH...] of one draft's gate_quality JSONs (quality from the first)")
    ap.add_argument("--out", default=None, help="plot to OUT.png")
    args = ap.parse_args(argv)
    table = {name: rows([Path(p) for p in paths.split(",")]) for name, paths in (r.split("=", 1) for r in args.results)}
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    print("| draft | budget | compute (one step) | log-lik | top-1 | loop compute | alpha | tau |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rs in table.items():
        for r in rs:
            print(f"| {name} | {r['budget']:.1f} | {r['compute']:.3f} | {r['ll']:.3f} | {r['agree']:.3f} | "
                  f"{fmt(r['loop_compute'], '.3f')} | {fmt(r['alpha'], '.3f')} | {fmt(r['tau'], '.2f')} |")  # fmt: skip
    if args.out:
        _plot(table, Path(args.out).with_suffix(".png"))
    return 0


def _plot(table: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        print("matplotlib is not installed (pip install matplotlib): no plot", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.5))
    for name, rs in table.items():
        axes[0].plot([r["compute"] for r in rs], [r["ll"] for r in rs], marker="o", label=name)
        axes[1].plot([r["compute"] for r in rs], [r["agree"] for r in rs], marker="o", label=name)
        looped = [r for r in rs if r["alpha"] is not None]
        axes[2].plot([r["loop_compute"] for r in looped], [r["alpha"] for r in looped], marker="o", label=name)
    labels = ("log-likelihood of held-out answers", "top-1 agreement, first draft token", "alpha, acceptance loop")
    for ax, label in zip(axes, labels):
        ax.set(xlabel="share of the draft's layer compute skipped", ylabel=label)
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=9)
    fig.suptitle("SmolLM2-135M-Instruct drafts, held-out prompts")
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=120)
    print(f"plot: {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
