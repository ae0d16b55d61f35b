"""Where a verify pass's extra time goes: the decoder's linear products alone (all layers in a row,
streaming the weights as a step does), the screened LM head, and the whole fused step, each at 1,
2 and 5 token rows, interleaved. SmolLM2-135M-Instruct (or ``--model``). ``--block-rows 8 4`` times
each under both kernel block sizes (``dispatch.block_rows``), interleaved too, instead of the
engine's choice.

    python eval/verify_parts.py [--threads 2] [--rounds 30] [--block-rows 8 4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import specgate
from specgate import linear
from specgate.kernels import cpu_linear

ROWS = (1, 2, 5)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--block-rows", nargs="+", type=int, choices=(8, 4), default=[], help="default: the engine's choice")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if cpu_linear.load() is None:
        raise SystemExit("the CPU kernels did not build: nothing to measure")
    m = specgate.load(args.model, gates=None)
    engine, w = m.engine, m.engine.weights
    mats = [t for lw in w.layers for t in (lw.qkv_w, lw.o_w, lw.gate_up_w, lw.down_w)]
    ids = m.encode_chat("Write a short story about a robot learning to paint.")
    cache = engine.new_cache(1, ids.shape[1] + 8)
    with torch.inference_mode():
        engine(ids, cache)
        base = cache.host_lengths
        # the head's input: normed states along head rows, as confident predictions give (see dispatch.screened_head)
        states = w.lm_head[torch.linspace(0, w.lm_head.shape[0] - 1, max(ROWS)).long()]
        states = states * (4 * states.shape[1] ** 0.5 / states.norm(dim=1, keepdim=True))

        def products(T):
            xs = {t.shape[1]: torch.randn(T, t.shape[1]) for t in mats}
            return lambda: [torch.ops.specgate.small_linear(xs[t.shape[1]], t) for t in mats]

        def step(T):
            def run():
                cache.rewind(base)
                engine(ids[:, -T:], cache, exact_logits=False)

            return run

        parts = {("products", T): products(T) for T in ROWS}
        if engine.screened is not None:
            parts |= {("screened head", T): (lambda T=T: engine.screened(states[:T])) for T in ROWS}
        parts |= {("whole step", T): step(T) for T in ROWS}
        chosen = [c["backend"] for name, c in linear.choices()["choices"].items() if name.startswith("block rows")]
        runs = {(*key, cap): fn for cap in args.block_rows or [None] for key, fn in parts.items()}
        times = {key: [] for key in runs}
        for r in range(args.rounds + 2):
            for key, fn in runs.items():
                if key[-1]:
                    torch.ops.specgate.set_block_rows(key[-1])
                t = time.perf_counter()
                fn()
                if r >= 2:
                    times[key].append(time.perf_counter() - t)
    print(f"{args.model}, {args.threads} threads, {args.rounds} rounds; weight rows per block: {args.block_rows or chosen or 'forced'}")
    for (part, T, cap), ts in times.items():
        ms, one = statistics.median(ts) * 1e3, statistics.median(times[part, 1, cap]) * 1e3
        print(f"{part + ', T=' + str(T):<22}{'' if cap is None else f'block {cap}':>8}{ms:8.2f} ms {ms / one:6.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
