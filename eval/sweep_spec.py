"""Speculation settings side by side: plain decode vs speculative decode at several draft budgets,
draft lengths (adaptive or fixed, stopped by the draft's confidence) and K/V fills, on the same
MT-Bench prompts in one run (greedy, ratios to plain).

    python eval/sweep_spec.py --prompts 4 --max-new-tokens 96 --out results/sweep.json
"""

import argparse
import itertools

import torch

import specgate
from specgate import bench
from specgate.speculative import SpecConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--gates", default="default")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.2, 0.3, 0.5])
    p.add_argument("--max-draft", type=int, nargs="+", default=[4, 8])
    p.add_argument("--min-draft-prob", type=float, nargs="+", default=[0.0, 0.5])
    p.add_argument("--kv-fill", nargs="+", default=["project", "copy_below"])
    p.add_argument("--adaptive", nargs="+", choices=["yes", "no"], default=["yes"],
                   help="no: draft up to max-draft tokens every round (stopped only by min-draft-prob)")  # fmt: skip
    p.add_argument("--draft-vocab", nargs="+", default=["full"], help="draft vocabulary sizes ('full': the whole head)")
    p.add_argument("--vocab-context", nargs="+", choices=["yes", "no"], default=["yes"],
                   help="whether the draft vocabulary grows with the text (draft_vocab_context)")  # fmt: skip
    p.add_argument("--draft-precision", nargs="+", default=["float32"], help="the draft's weight precisions (float32, int8, ...)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    m = specgate.load(args.model, gates=None if args.gates == "none" else args.gates)
    encoded = [m.encode_chat(q) for q in bench.mtbench_prompts(args.prompts)]
    n = args.max_new_tokens
    methods = {"plain": lambda ids: m.generate(ids, max_new_tokens=n)}
    vocabs = [None if v == "full" else int(v) for v in args.draft_vocab]
    grid = itertools.product(args.budgets, args.max_draft, args.min_draft_prob, args.kv_fill, args.adaptive, args.vocab_context, vocabs,
                             args.draft_precision)  # fmt: skip
    for b, k, pmin, fill, adapt, grow, vocab, precision in grid:
        spec = SpecConfig(draft_budget=b, max_draft=k, min_draft_prob=pmin, kv_fill=fill, draft_vocab=vocab,
                          adaptive=adapt == "yes", init_draft=None if adapt == "yes" else k, draft_vocab_context=grow == "yes",
                          draft_precision=precision)  # fmt: skip
        name = f"b={b} k={k}{'' if adapt == 'yes' else ' fixed'} pmin={pmin} {fill} vocab={vocab or 'full'} {precision}" + (
            "" if grow == "yes" else " static"
        )
        methods[name] = lambda ids, spec=spec: m.generate(
            ids, max_new_tokens=n, speculative=True, spec_config=spec, return_dict_in_generate=True
        )
    with torch.inference_mode():
        results = bench.run(encoded, methods)
    print(bench.report(results, reference="plain"))
    if args.out:
        bench.save(results, args.out, **vars(args))


if __name__ == "__main__":
    main()
