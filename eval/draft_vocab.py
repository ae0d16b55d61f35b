"""Rank the tokens of the model's own outputs for the draft vocabulary, store the ranking with a gate
directory (or, for a model without gates, in a file of its own), and measure how much of held-out
answers each vocabulary size covers.

The ranking counts the tokens of the model's greedy answers to the train split of
:mod:`specgate.prompts` (what ``specgate train`` ranks from its default corpus; a base model's
continuations of them); coverage is measured on its answers to the held-out split, which the
ranking never saw.

    python eval/draft_vocab.py --gates specgate/gates/smollm2-135m-instruct --out DIR [--tokens 256]
    python eval/draft_vocab.py --model gemma-3-270m --gates none --out specgate/rankings/gemma-3-270m.safetensors
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
from specgate.vocab import coverage, rank_tokens, save_ranking

SIZES = (1024, 2048, 4096, 8192, 16384, 32768)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--gates", required=True, help="gate directory to add the ranking to, or 'none'")
    ap.add_argument("--out", required=True, help="where to save the gates with their ranking (with --gates none: the ranking's file)")
    ap.add_argument("--tokens", type=int, default=256, help="answer tokens per prompt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--report", default="results/draft_vocab.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    m = specgate.load(args.model, gates=None if args.gates == "none" else args.gates)
    tok = m.tokenizer
    train, heldout = split()
    t0 = time.perf_counter()
    answers = {name: [tok(a, add_special_tokens=False).input_ids for a in self_answers(m, prompts, args.tokens)]
               for name, prompts in (("train", train), ("heldout", heldout))}  # fmt: skip
    ranking = rank_tokens(answers["train"], m.config.vocab_size)
    cover = coverage(ranking, answers["heldout"], SIZES)
    grown = coverage(ranking, answers["heldout"], SIZES, prompts=[m.encode_chat(p)[0].tolist() for p in heldout])
    if m.gates is None:
        save_ranking(ranking, args.out)
    else:
        m.gates.token_ranking = ranking
        specgate.save_gates(m.gates, args.out)
    seconds = time.perf_counter() - t0
    seen = int((torch.bincount(torch.tensor([t for a in answers["train"] for t in a]), minlength=len(ranking)) > 0).sum())
    print(f"ranked from {sum(map(len, answers['train']))} answer tokens ({seen} distinct) in {seconds:.0f} s")
    for n, c in cover.items():
        print(f"draft vocabulary {n:>6}: covers {c:.4f} of {sum(map(len, answers['heldout']))} held-out answer tokens, "
              f"{grown[n]:.4f} with the prompt's and the answer's own tokens")
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(json.dumps({"coverage": cover, "coverage_grown": grown, "distinct_train_tokens": seen, "seconds": seconds,
                                             "train_tokens": sum(map(len, answers["train"]))}, indent=1) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
