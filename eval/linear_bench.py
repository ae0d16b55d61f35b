"""Linear products per backend on this CPU: SmolLM2-135M's weight shapes at 1-8 token rows, then whole decode
steps (plain, and a 5-token verify pass) with each backend forced and with the measured choice (auto).

All timings interleave the options in one run (a busy neighbour slows them alike) and quote medians. Weights
are timed on copies that overflow the L3, so they stream from DRAM as in decoding.

    python eval/linear_bench.py [--threads 2] [--reps 7] [--steps 20] | tee results/linear_bench.txt
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

import specgate
import specgate.linear as L
from specgate.kernels import cpu_linear

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}
ROWS = (1, 2, 4, 5, 8)
MODES = ("torch", "onednn", "smallm", "auto")


def cpu_line() -> str:
    """CPU model and the vector / matrix flags that decide which kernel wins."""
    model, _, flags = cpu_linear.cpu_signature().partition(" | ")
    wide = sorted(f for f in flags.split() if f.startswith(("avx512", "amx")) or f in ("avx2", "fma"))
    return f"{model} ({platform.machine()}); flags: {' '.join(wide) or 'none of avx2/avx512/amx'}"


def interleaved(fns: dict[str, callable], reps: int) -> dict[str, float]:
    """Median seconds of each fn over reps rounds, the fns taking turns within each round (after one warm-up)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for rep in range(reps + 1):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            if rep:
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def products(reps: int) -> None:
    backends = [b for b in L.BACKENDS if L.available()[b]]
    print(f"\n## Products: median us per product (weights cold, {reps} interleaved rounds); auto = measured choice")
    print(f"{'shape':>8} {'n x d':>11} {'M':>2} " + " ".join(f"{b:>9}" for b in backends)
          + "   " + " ".join(f"{b + '/torch':>13}" for b in backends[1:]) + "   auto")  # fmt: skip
    with torch.inference_mode():
        for name, (n, d) in SHAPES.items():
            weights = L.cold_copies(torch.randn(n, d))
            for rows in ROWS:
                x = torch.randn(rows, d)

                def over_copies(b: str):
                    return lambda: [L.RUN[b](x, w, None) for w in weights]

                secs = interleaved({b: over_copies(b) for b in backends}, reps)
                us = {b: t / len(weights) * 1e6 for b, t in secs.items()}
                L.linear(x, weights[0])  # let auto choose, to show what it picked
                key = f"{n}x{d} float32 M={rows} threads={torch.get_num_threads()}"
                auto = L.choices()["choices"][key]["backend"]
                ratios = " ".join(f"{us['torch'] / us[b]:12.2f}x" for b in backends[1:])
                print(f"{name:>8} {f'{n}x{d}':>11} {rows:>2} " + " ".join(f"{us[b]:9.1f}" for b in backends)
                      + f"   {ratios}   {auto}")  # fmt: skip


def steps(reps: int, n_steps: int) -> None:
    modes = [m for m in MODES if m == "auto" or L.available()[m]]
    m = specgate.load(kernels="torch")  # the PyTorch path, whose products SPECGATE_LINEAR routes (not the fused pass)
    ids = m.encode_chat("Write a short story about a robot learning to paint.")
    print(f"\n## Whole steps on the PyTorch path: SmolLM2-135M-Instruct fp32, prompt {ids.shape[1]} tokens, median ms of "
          f"{reps} rounds x {n_steps} steps, modes interleaved (SPECGATE_LINEAR=mode)")  # fmt: skip
    with torch.inference_mode():
        cache = m.engine.new_cache(1, 512)
        m.engine(ids, cache)
        base = cache.lengths.clone()

        def run(mode: str, T: int):
            def go():
                os.environ["SPECGATE_LINEAR"] = mode
                for _ in range(n_steps):
                    cache.rewind(base)
                    m.engine(ids[:, -T:], cache)

            return go

        fns = {(mode, T): run(mode, T) for mode in modes for T in (1, 5)}
        for fn in fns.values():  # auto measures its choices here, outside the timed rounds
            fn()
        ms = {k: t / n_steps * 1e3 for k, t in interleaved(fns, reps).items()}
    os.environ.pop("SPECGATE_LINEAR")
    ref = ms[("onednn", 1)] if "onednn" in modes else ms[("torch", 1)]
    ref_name = "plain vs " + ("onednn" if "onednn" in modes else "torch")
    print(f"{'mode':>8} {'plain ms':>9} {'verify5 ms':>11} {'verify/plain':>13} {ref_name:>16}")
    for mode in modes:
        p, v = ms[(mode, 1)], ms[(mode, 5)]
        print(f"{mode:>8} {p:9.2f} {v:11.2f} {v / p:12.2f}x {ref / p:15.2f}x")
    print("\nauto's choices in the model (backend, us per product of each backend when measured):")
    for key, entry in L.choices()["choices"].items():
        if any(f"{n}x{d} " in key for n, d in SHAPES.values()):
            print(f"  {key:38s} {entry['backend']:7s} {entry['source']:8s} {entry['us']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=7, help="interleaved rounds per figure")
    p.add_argument("--steps", type=int, default=20, help="decode steps per round in the whole-step figure")
    p.add_argument("--no-model", action="store_true", help="products only")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_line()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, backends available: {L.available()}")
    print(f"choice cache: {L.cache_file()}")
    products(args.reps)
    if not args.no_model:
        steps(args.reps, args.steps)


if __name__ == "__main__":
    main()
