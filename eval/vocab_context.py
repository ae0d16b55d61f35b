"""The draft vocabulary grown by the text (``SpecConfig.draft_vocab_context``) against the static one:
coverage of held-out answers, and alpha / tau of the speculative loop, per vocabulary size.

A static frequency ranking misses the words of each text's own topic; the draft vocabulary of one
``generate`` call also covers its prompt's tokens and the tokens it has emitted so far.

    python eval/vocab_context.py [--gates DIR] [--sizes 4096,8192,16384] [--budgets 0.5,0.7] [--out results/vocab_context.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from gate_quality import acceptance

import specgate
from specgate.data import self_answers
from specgate.prompts import split
from specgate.vocab import coverage


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gates", default="default")
    ap.add_argument("--sizes", default="4096,8192,16384", help="draft vocabulary sizes")
    ap.add_argument("--budgets", default="0.5,0.7", help="draft budgets of the acceptance loop")
    ap.add_argument("--prompts", type=int, default=34, help="held-out prompts for coverage (at most 34)")
    ap.add_argument("--answer-tokens", type=int, default=128)
    ap.add_argument("--accept-prompts", type=int, default=8, help="held-out prompts for the acceptance loop (64 tokens each)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="results/vocab_context.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = [int(n) for n in args.sizes.split(",")]
    budgets = [float(b) for b in args.budgets.split(",")]

    m = specgate.load("smollm2-135m-instruct", gates=args.gates)
    if m.gates is None or m.gates.token_ranking is None:
        print("these gates have no token ranking (eval/draft_vocab.py adds one)", file=sys.stderr)
        return 2
    _, heldout = split()
    prompts = heldout[: args.prompts]
    answers = [m.tokenizer(a, add_special_tokens=False).input_ids for a in self_answers(m, prompts, args.answer_tokens, len(prompts))]
    chats = [m.encode_chat(p)[0].tolist() for p in prompts]
    report = {"gates": args.gates, "answer_tokens": sum(map(len, answers)),
              "coverage": {"static": coverage(m.gates.token_ranking, answers, sizes),
                           "context": coverage(m.gates.token_ranking, answers, sizes, prompts=chats)},
              "acceptance": {}}  # fmt: skip
    for n in sizes:
        print(f"vocabulary {n:>6}: covers {report['coverage']['static'][n]:.3f} of {report['answer_tokens']} held-out answer "
              f"tokens, {report['coverage']['context'][n]:.3f} with the text's own")  # fmt: skip
    for n in sizes:
        for context in (False, True):
            t0 = time.perf_counter()
            print(f"vocabulary {n}, {'grown by the text' if context else 'static'}:")
            r = acceptance(m, heldout[: args.accept_prompts], budgets, 64, draft_vocab=n, draft_vocab_context=context)
            report["acceptance"][f"{n} {'context' if context else 'static'}"] = r
            print(f"  [{time.perf_counter() - t0:.0f} s]")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
