"""How much float32 work the screened LM head leaves, and what it costs, on real decoding.

Greedy-decodes a few MT-Bench questions with the engine and, at every step, screens the final
hidden state: how many of the V head rows could still be the argmax (and are recomputed in float32),
whether the argmax is the float32 head's, and how far the log-probability of the chosen token moves
when the non-candidate logits come from the int8 copy (what ``SpecStats.verifier_logprob`` then
reports). Then times the head products side by side, interleaved: float32 against screened, for 1
and 5 token rows of those states.

    python eval/screened_head.py [--model smollm2-135m-instruct] [--prompts 4] [--tokens 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import specgate
from specgate import layers, linear
from specgate.kernels.screened_head import ScreenedHead
from specgate.bench import mtbench_prompts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    m = specgate.load(args.model, gates=None)
    w = m.engine.weights
    head = m.engine.screened or ScreenedHead(w.lm_head)

    states = []
    with torch.inference_mode():
        for question in mtbench_prompts(args.prompts):
            ids = m.encode_chat(question)
            cache = m.engine.new_cache(1, ids.shape[1] + args.tokens)
            h = m.engine.hidden(ids, cache)[:, -1:]
            for _ in range(args.tokens):
                x = layers.rms_norm(h, w.final_norm, w.eps)[0, 0]
                states.append(x)
                h = m.engine.hidden((x @ w.lm_head.T).argmax().view(1, 1), cache)
        X = torch.stack(states)  # (steps, d)
        approx, bound = head.bounds(X)
        candidates = (approx + bound >= (approx - bound).amax(-1, keepdim=True)).sum(-1).float()
        exact, screened = X @ w.lm_head.T, head(X)
        top = exact.argmax(-1, keepdim=True)
        moved = (screened.log_softmax(-1).gather(-1, top) - exact.log_softmax(-1).gather(-1, top)).abs()

        rows = {}
        for T in (1, 5):
            xs = X[:T]
            options = {"float32": lambda xs=xs: linear.linear(xs, w.lm_head), "screened": lambda xs=xs: head(xs)}
            for fn in options.values():
                fn()
            rows[T] = {name: [] for name in options}
            for _ in range(args.reps):  # interleaved
                for name, fn in options.items():
                    rows[T][name].append(_once(fn))

    print(f"{args.model}: head {tuple(w.lm_head.shape)}, {len(states)} greedy steps, CPU {linear.choices()['cpu']}, threads {args.threads}")
    print(f"candidate rows per step: median {candidates.median():.0f}, mean {candidates.mean():.1f}, max {candidates.max():.0f}"
          f" (recomputed in float32 when <= {head.max_exact})")
    print(f"argmax equal to the float32 head's: {int((screened.argmax(-1) == top[:, 0]).sum())} / {len(states)}")
    print(f"|log p(chosen)| moved: median {moved.median():.2e}, max {moved.max():.2e} nats")
    for T, times in rows.items():
        f32, scr = (statistics.median(times[k]) * 1e3 for k in ("float32", "screened"))
        print(f"{T} row(s): float32 head {f32:.3f} ms, screened {scr:.3f} ms ({f32 / scr:.2f}x)")
    return 0


def _once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    raise SystemExit(main())
