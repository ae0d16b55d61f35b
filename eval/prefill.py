"""Prefill of a long prompt: the engine against the transformers forward, side by side (ratios).

    python eval/prefill.py --tokens 9000 [--threads 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import specgate
from specgate.data import pydoc_texts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=9000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    m = specgate.load(gates=None)
    text = "\n".join(pydoc_texts())
    ids = m.tokenizer(text, return_tensors="pt").input_ids[:, : args.tokens]
    runs = {
        "transformers": lambda: m.hf_model(ids, use_cache=True, logits_to_keep=1),
        "engine": lambda: m.engine(ids, m.engine.new_cache(1, ids.shape[1]), logits_to_keep=1),
    }
    times = {name: [] for name in runs}
    with torch.inference_mode():
        for _ in range(args.repeats):  # interleaved
            for name, fn in runs.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    ref = statistics.median(times["transformers"])
    for name, ts in times.items():
        print(f"{name:<14} {ids.shape[1]} tokens: median {statistics.median(ts):7.2f} s  ({statistics.median(ts) / ref:.2f}x transformers)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
