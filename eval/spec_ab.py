"""One side of an A/B between two checkouts: plain decoding, then speculation, per MT-Bench question,
on the first N questions (greedy, 2 threads); prints one JSON line (tokens/s, alpha, tau, exact matches).

Speculation takes the settings `generate` chooses (the stored tune, else the untuned defaults), or
the `SpecConfig` fields given with ``--spec key=value ...``. Run it from each checkout in turn,
alternating (the kernels build per source; the other checkout imports its own with PYTHONPATH and a
``specgate/kernels`` link):

    git worktree add /tmp/old COMMIT && ln -sfn /tmp/old/kernels /tmp/old/specgate/kernels
    for i in 1 2 3; do
      PYTHONPATH=/tmp/old python /tmp/old/eval/spec_ab.py old --spec draft_budget=0 draft_precision=int4 ...
      python eval/spec_ab.py new --spec draft_budget=0 draft_precision=int4 ...
    done

(an older checkout without this script can run this file by path: it uses only the public API).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import specgate
from specgate.bench import mtbench_prompts


def spec_value(text: str):
    """A SpecConfig field's value from the command line: None, true/false, an int, a float, else the text."""
    if text in ("None", "none"):
        return None
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("label", help="the side's name in the output")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--spec", nargs="*", default=[], metavar="KEY=VALUE", help="SpecConfig fields (none: the chosen settings)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    fields = dict(item.split("=", 1) for item in args.spec)
    config = specgate.SpecConfig(**{k: spec_value(v) for k, v in fields.items()}) if fields else None

    m = specgate.load("smollm2-135m-instruct")
    prompts = [m.encode_chat(p) for p in mtbench_prompts(args.prompts)]
    m.generate(prompts[0], max_new_tokens=16)  # warm-up: kernels, copies, caches
    m.generate(prompts[0], max_new_tokens=16, speculative=True, spec_config=config)
    plain_s = spec_s = 0.0
    tokens = drafted = accepted = rounds = same = 0
    settings = ""
    for ids in prompts:
        t0 = time.perf_counter()
        plain = m.generate(ids, max_new_tokens=args.max_new_tokens)
        t1 = time.perf_counter()
        spec = m.generate(ids, max_new_tokens=args.max_new_tokens, speculative=True, spec_config=config, return_dict_in_generate=True)
        t2 = time.perf_counter()
        plain_s, spec_s = plain_s + t1 - t0, spec_s + t2 - t1
        stats = spec.spec_stats
        tokens += plain.shape[1] - ids.shape[1]
        drafted, accepted, rounds = drafted + stats.drafted, accepted + stats.accepted, rounds + stats.rounds
        same += plain[0].tolist() == spec.sequences[0].tolist()
        settings = stats.settings
    print(json.dumps({
        "side": args.label, "plain_tokens_per_s": round(tokens / plain_s, 1), "spec_tokens_per_s": round(tokens / spec_s, 1),
        "ratio": round(plain_s / spec_s, 3), "alpha": round(accepted / max(drafted, 1), 3),
        "tokens_per_round": round(tokens / max(rounds, 1), 2),
        "exact": f"{same}/{len(prompts)}", "settings": settings,
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
