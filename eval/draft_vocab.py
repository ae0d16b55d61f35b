"""Rank the tokens of the model's own outputs for the draft vocabulary, store the ranking with a gate
directory, and measure how much of held-out answers each vocabulary size covers.

The ranking counts the tokens of the model's greedy answers to the train split of
:mod:`specgate.prompts` (what ``specgate train`` ranks from its default corpus); coverage is measured
on its answers to the held-out split, which the ranking never saw.

    python eval/draft_vocab.py --gates specgate/gates/smollm2-135m-instruct --out DIR [--tokens 256]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import specgate
from specgate.data import self_answers
from specgate.prompts import split
from specgate.vocab import coverage, rank_tokens

SIZES = (1024, 2048, 4096, 8192, 16384, 32768)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--gates", required=True, help="gate directory to add the ranking to")
    ap.add_argument("--out", required=True, help="where to save the gates with their ranking")
    ap.add_argument("--tokens", type=int, default=256, help="answer tokens per prompt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--report", default="results/draft_vocab.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    m = specgate.load(args.model, gates=args.gates)
    tok = m.tokenizer
    train, heldout = split()
    t0 = time.perf_counter()
    answers = {name: [tok(a, add_special_tokens=False).input_ids for a in self_answers(m, prompts, args.tokens)]
               for name, prompts in (("train", train), ("heldout", heldout))}  # fmt: skip
    ranking = rank_tokens(answers["train"], m.config.vocab_size)
    cover = coverage(ranking, answers["heldout"], SIZES)
    m.gates.token_ranking = ranking
    specgate.save_gates(m.gates, args.out)
    seconds = time.perf_counter() - t0
    seen = int((torch.bincount(torch.tensor([t for a in answers["train"] for t in a]), minlength=len(ranking)) > 0).sum())
    print(f"ranked from {sum(map(len, answers['train']))} answer tokens ({seen} distinct) in {seconds:.0f} s")
    for n, c in cover.items():
        print(f"draft vocabulary {n:>6}: covers {c:.4f} of {sum(map(len, answers['heldout']))} held-out answer tokens")
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(json.dumps({"coverage": cover, "distinct_train_tokens": seen, "seconds": seconds,
                                             "train_tokens": sum(map(len, answers["train"]))}, indent=1) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
