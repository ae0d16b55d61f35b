"""Stand-ins for skipped branches (:mod:`specgate.standin`): how much of each branch they explain,
by rank, and gate files with them for ``eval/gate_quality.py``.

Fits the stand-ins of every rank in ``--ranks`` on the training corpus (the model's own answers to
the train prompts plus pydoc text, as ``specgate train`` builds it), reports on a held-out tenth of
its pieces the share of each branch's output variance a stand-in explains (mean over attention and
MLP branches separately, and over all branches weighted by their output variance; a branch with no
token to score, e.g. one the draft never skips, is left out), and writes the
gates of ``--gates`` with each rank's stand-ins to ``OUT/r<rank>``. With ``--where-budget B`` each
branch is fitted and scored only at the tokens the gates' draft at budget B skips.

    .venv/bin/python eval/standins.py --corpus runs/ds/corpus.jsonl --out runs/standins [--ranks 0,8,16,32,64]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

import specgate
from specgate.data import chunk, collate, default_corpus
from specgate.standin import branch_moments, explained, fit_standins
from specgate.train import skipped_by


def batches(pieces: list[list[int]], size: int = 8):
    for i in range(0, len(pieces), size):
        yield collate(pieces[i : i + size])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--gates", default=None, help="gate directory (default: the shipped gates)")
    ap.add_argument("--corpus", required=True, help="corpus.jsonl of a training run (built if missing)")
    ap.add_argument("--ranks", default="0,8,16,32,64")
    ap.add_argument("--ridge", type=float, default=1e-2)
    ap.add_argument("--where-budget", type=float, default=None,
                    help="fit (and score) each branch only at the tokens the gates' draft skips at this budget")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    m = specgate.load(args.model, gates=args.gates or "default")
    pieces = chunk(default_corpus(m, args.corpus, max_doc_tokens=4 * args.seq_len), args.seq_len)
    random.Random(0).shuffle(pieces)
    n_test = len(pieces) // 10
    t = time.time()
    where = None if args.where_budget is None else skipped_by(m.gates, args.where_budget)
    train = branch_moments(m.engine.weights, batches(pieces[n_test:]), where)
    test = branch_moments(m.engine.weights, batches(pieces[:n_test]), where)
    print(f"moments: {int(train.n.max())} train tokens, {int(test.n.max())} held-out (per branch at most), {time.time() - t:.0f} s")
    var = test.soo - (test.so * test.so).sum(1) / test.n.clamp_min(1)  # (2L,) output variance per branch
    rows = []
    for rank in map(int, args.ranks.split(",")):
        t = time.time()
        s = fit_standins(train, rank, args.ridge)
        r2 = explained(test, s)
        row = {
            "rank": rank, "fit_s": round(time.time() - t, 1), "attention": float(r2[0::2].nanmean()), "mlp": float(r2[1::2].nanmean()),
            "weighted": float((r2 * var).nansum() / var.sum()), "per_branch": [round(float(v), 4) for v in r2],
        }  # fmt: skip
        rows.append(row)
        print(f"rank {rank:3d}: explained attention {row['attention']:.3f}  mlp {row['mlp']:.3f}  weighted {row['weighted']:.3f}  ({row['fit_s']} s)")
        m.gates.standins = s
        specgate.save_gates(m.gates, Path(args.out) / f"r{rank}")
    counts = {"train_tokens": train.n.tolist(), "test_tokens": test.n.tolist(), "where_budget": args.where_budget}
    (Path(args.out) / "explained.json").write_text(json.dumps({**counts, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
