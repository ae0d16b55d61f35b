"""How fast the small-M float32 kernel (``torch.ops.specgate.small_linear``) multiplies, two ways:

- hot: one 576 x 576 matrix that stays in the core's caches, one thread, 1-8 token rows, in
  GMAC/s: what the kernel's instructions allow when the weights are near;
- streaming: every layer's matrices of SmolLM2-135M-Instruct in a row (the fused q/k/v, output,
  gate/up and down products, as a decode step reads them from memory), at 1, 5 and 8 token rows,
  as ratios to 1 row and in GB/s of weights read;
- with ``--prefetch``: the streaming products under several prefetch distances (``FAR:NEAR`` bytes,
  see ``Prefetch`` in kernels/cpu_linear.h), interleaved per round, as ratios to the first.

Row counts are interleaved per round and each figure is a median over rounds.

    python eval/kernel_rates.py [--threads 2] [--rounds 25] [--prefetch 24576:1024 24576:0 ...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import specgate
from specgate.kernels import cpu_linear


def mean_time(fn, reps: int = 1) -> float:
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="for the streaming part (the hot part runs on one)")
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--prefetch", nargs="+", default=[], metavar="FAR:NEAR", help="prefetch distances to compare")
    args = ap.parse_args(argv)
    op = cpu_linear.load()
    if op is None:
        raise SystemExit("the CPU kernels did not build: nothing to measure")

    torch.set_num_threads(1)
    w = torch.randn(576, 576)
    xs = {M: torch.randn(M, 576) for M in range(1, 9)}
    hot = {M: [] for M in xs}
    for M in xs:
        mean_time(lambda: op(xs[M], w), reps=50)  # warm-up
    for _ in range(args.rounds):
        for M, x in xs.items():
            hot[M].append(mean_time(lambda: op(x, w), reps=100))
    print("hot 576 x 576, 1 thread, GMAC/s:", "  ".join(f"{M} rows {M * w.numel() / statistics.median(ts) / 1e9:.0f}" for M, ts in hot.items()))

    torch.set_num_threads(args.threads)
    layers = specgate.load("smollm2-135m-instruct", gates=None).engine.weights.layers
    kinds = {k: [getattr(lw, k) for lw in layers] for k in ("qkv_w", "o_w", "gate_up_w", "down_w")}
    rows = (1, 5, 8)
    if args.prefetch:
        return compare_prefetch(op, kinds, [tuple(int(b) for b in p.split(":")) for p in args.prefetch], args.rounds)
    times = {(k, T): [] for k in kinds for T in rows}
    for _ in range(args.rounds):
        for T in rows:
            for k, mats in kinds.items():
                x = torch.randn(T, mats[0].shape[1])
                times[k, T].append(mean_time(lambda: [op(x, m) for m in mats]))
    print(f"streaming, {args.threads} threads, all {len(layers)} layers of each kind:")
    for k, mats in kinds.items():
        gb = sum(m.numel() * m.element_size() for m in mats) / 1e9
        one = statistics.median(times[k, 1])
        cells = [f"{T} rows {statistics.median(times[k, T]) / one:.2f}x {gb / statistics.median(times[k, T]):.0f} GB/s" for T in rows]
        print(f"  {k:<10} {tuple(mats[0].shape)!s:<12} {one * 1e3:6.2f} ms   " + "   ".join(cells))
    return 0


def compare_prefetch(op, kinds: dict, plans: list[tuple[int, int]], rounds: int) -> int:
    rows = (1, 2, 5, 8)
    times = {(k, T, p): [] for k in kinds for T in rows for p in plans}
    for _ in range(rounds):
        for T in rows:
            for p in plans:
                torch.ops.specgate.set_prefetch(T, *p)
                for k, mats in kinds.items():
                    x = torch.randn(T, mats[0].shape[1])
                    times[k, T, p].append(mean_time(lambda: [op(x, m) for m in mats]))
    print("prefetch FAR:NEAR bytes, as ratios to " + ":".join(map(str, plans[0])) + " (ms of the first)")
    for T in rows:
        for k in kinds:
            first = statistics.median(times[k, T, plans[0]])
            cells = [f"{p[0]}:{p[1]} {statistics.median(times[k, T, p]) / first:.2f}x" for p in plans[1:]]
            print(f"  {T} rows {k:<10} {first * 1e3:6.2f} ms   " + "   ".join(cells))
        total = {p: sum(statistics.median(times[k, T, p]) for k in kinds) for p in plans}
        print(f"  {T} rows all        {total[plans[0]] * 1e3:6.2f} ms   " + "   ".join(f"{p[0]}:{p[1]} {total[p] / total[plans[0]]:.2f}x" for p in plans[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
