"""What a longer cache costs a step: plain decode steps and verify passes of ``--tokens`` tokens after
``--contexts`` cached tokens (60 and 400 by default), the kinds interleaved over ``--rounds`` rounds
(medians), and the extra time of the longest context over the shortest: attention's share, since
nothing else in a step grows with the cache. SmolLM2-135M-Instruct, fused CPU pass.

    python eval/context_cost.py [--threads 2] [--rounds 40] [--contexts 60 400] [--tokens 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import specgate
from specgate import bench


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--contexts", type=int, nargs="+", default=[60, 400])
    ap.add_argument("--tokens", type=int, default=7, help="tokens of the verify pass")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    m = specgate.load("smollm2-135m-instruct", gates=None)
    e = m.engine
    longest = max(args.contexts) + args.tokens
    ids = m.encode_chat(bench.mtbench_prompts(1)[0])
    ids = ids.repeat(1, longest // ids.shape[1] + 1)[:, :longest]  # a prompt repeated to the longest context
    caches = {}
    with torch.inference_mode():
        for L in args.contexts:
            cache = e.new_cache(1, L + args.tokens)
            e(ids[:, :L], cache)
            caches[L] = (cache, cache.host_lengths[0])
        times = {(L, T): [] for L in args.contexts for T in (1, args.tokens)}
        for r in range(args.rounds + 3):
            for L, T in times:
                cache, base = caches[L]
                cache.rewind([base])
                t = time.perf_counter()
                e(ids[:, L : L + T], cache, exact_logits=False)
                if r >= 3:
                    times[L, T].append(time.perf_counter() - t)
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    short, long = min(args.contexts), max(args.contexts)
    print(f"{args.threads} threads, {args.rounds} rounds; median ms per step")
    for T in (1, args.tokens):
        row = "  ".join(f"{L} cached: {ms[L, T]:6.2f}" for L in args.contexts)
        print(f"{T} token{'s' if T > 1 else ' '}  {row}  | +{ms[long, T] - ms[short, T]:.2f} ms at {long}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
