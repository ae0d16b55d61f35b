"""The low-precision draft's streaming settings in the loop: rounds of a 7-token verify pass and 6
int4 draft steps (16,384-token head), each round under one setting of the int4 products' block rows
and prefetch (``specgate.dispatch.low_precision_streaming``): the one timed when the copy was made,
and fixed ones; settings interleaved over 30 rounds, medians of the draft steps. (int4 matrices
now come in blocks of 4 rows by their layout: for them the block settings differ in prefetch only.)

    python eval/draft_settings.py [--precision int4] [--rounds 30]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import specgate

FIXED = {"block 8, prefetch L2": (8, 24576, 0), "block 8, prefetch L2+L1": (8, 24576, 1024), "block 4, prefetch L2": (4, 24576, 0)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precision", default="int4", choices=["int8", "int4", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    m = specgate.load("smollm2-135m-instruct")
    e, pr = m.engine, args.precision
    ids = m.encode_chat("Write a short story about a robot learning to paint.")
    head = m.draft_head(16384)
    e.low_precision_step(pr)  # makes the copy and times its setting
    timed = (torch.ops.specgate.set_block_rows(8, pr), *torch.ops.specgate.set_prefetch(1, 24576, 0, pr))
    settings = {f"timed: block {timed[0]}, {'prefetch L2+L1' if timed[2] else 'prefetch L2'}": timed, **FIXED}
    cache = e.new_cache(1, ids.shape[1] + 16)

    def draft_step_s(cap: int, far: int, near: int) -> float:
        torch.ops.specgate.set_block_rows(cap, pr)
        torch.ops.specgate.set_prefetch(1, far, near, pr)
        cache.rewind(base)
        e(ids[:, -7:], cache)
        t = time.perf_counter()
        for _ in range(6):
            e(ids[:, -1:], cache, head=head, precision=pr)
        return (time.perf_counter() - t) / 6

    with torch.inference_mode():
        e(ids, cache)
        base = cache.host_lengths
        times = {k: [] for k in settings}
        for r in range(args.rounds + 1):  # the first round warms up
            for k, s in settings.items():
                t = draft_step_s(*s)
                if r:
                    times[k].append(t)
    first = statistics.median(times[next(iter(settings))])
    print(f"{pr} draft steps after a 7-token verify, threads 2, {args.rounds} rounds")
    for k, ts in times.items():
        print(f"  {k:<32} {statistics.median(ts) * 1e3:6.2f} ms  {statistics.median(ts) / first:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
