"""Greedy and sampled decoding, plain and speculative (the settings generate() chooses), on the
first MT-Bench questions: tokens/s of each, every prompt running every mode in turn (the order
reversed on odd prompts), each call seeded with the prompt's index. It runs at any commit (it uses
only ``generate``), so two commits compare by alternating processes:

    git worktree add /tmp/old COMMIT && ln -s ../kernels /tmp/old/specgate/kernels
    PYTHONPATH=/tmp/old python eval/sampled_decode.py; python eval/sampled_decode.py   # and again

    python eval/sampled_decode.py [--prompts 8] [--max-new-tokens 128] [--temperature 0.7] [--top-p 0.95] [--top-k 50]
"""

from __future__ import annotations

import argparse
import time

import torch

import specgate
from specgate.bench import mtbench_prompts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--top-k", type=int, default=50, help="0: off (the float32 head for every sampled step)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    m = specgate.load("smollm2-135m-instruct")
    sampled = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    modes = {
        "greedy plain": {},
        "greedy speculative": dict(speculative=True),
        "sampled plain": sampled,
        "sampled speculative": dict(speculative=True, **sampled),
    }
    prompts = [m.encode_chat(p) for p in mtbench_prompts(args.prompts)]
    for flags in modes.values():  # one-time costs (kernel probes, the draft's copy) out of the timings
        m.generate(prompts[0][:, :8], max_new_tokens=4, **flags)
    tokens, seconds, stats = dict.fromkeys(modes, 0), dict.fromkeys(modes, 0.0), {}
    for i, ids in enumerate(prompts):
        for name in list(modes)[:: 1 if i % 2 == 0 else -1]:
            torch.manual_seed(i)
            start = time.perf_counter()
            out = m.generate(ids, max_new_tokens=args.max_new_tokens, return_dict_in_generate=True, **modes[name])
            seconds[name] += time.perf_counter() - start
            tokens[name] += out.sequences.shape[1] - ids.shape[1]
            if out.spec_stats is not None:
                s = stats.setdefault(name, {"accepted": 0, "drafted": 0, "rounds": 0})
                for key in s:
                    s[key] += getattr(out.spec_stats, key)
                s["settings"] = out.spec_stats.settings
    rate = {name: tokens[name] / seconds[name] for name in modes}
    print(f"{args.prompts} MT-Bench prompts, {args.max_new_tokens} new tokens; sampled: temperature {args.temperature}, "
          f"top-p {args.top_p}, top-k {args.top_k}; {torch.get_num_threads()} threads")  # fmt: skip
    for name in modes:
        plain = rate[name.replace("speculative", "plain")]
        line = f"{name:<20} {rate[name]:7.1f} tokens/s  {rate[name] / plain:5.2f}x plain"
        if name in stats:
            s = stats[name]
            line += f"  alpha {s['accepted'] / s['drafted']:.3f}  tau {(s['accepted'] + s['rounds']) / s['rounds']:.2f}  ({s['settings']})"
        print(line)
    print(f"sampled plain / greedy plain {rate['sampled plain'] / rate['greedy plain']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
