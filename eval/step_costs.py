"""What one step costs, as a ratio to a plain decode step, measured side by side in one run.

Steps after a prompt (SmolLM2-135M-Instruct, fp32, the shipped gates): a plain decode step, verify
passes of k + 1 tokens (k = 2, 4, 8), and draft steps at several budgets (with the full LM head and
with the draft vocabulary). Every kind of step runs once per round, rounds interleaved, and each
figure is the median over rounds, so drift on a shared machine hits all kinds alike.

``--backends auto onednn`` measures every step once per backend of the linear products
(``SPECGATE_LINEAR``), interleaved too: ``onednn`` is what the engine used before it chose by
measurement.

    python eval/step_costs.py [--gates DIR] [--threads 2] [--rounds 30] [--budgets 0.3 0.5 0.7] [--vocab 8192]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import specgate
from specgate import SkipCounter, linear


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            flags = next((x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags")), "")
            extra = [f for f in ("avx2", "avx512f", "amx_tile") if f" {f}" in flags]
            return f"{line.split(':', 1)[1].strip()} ({', '.join(extra)})"
    return platform.processor()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--verify", type=int, nargs="+", default=[2, 4, 8], help="draft lengths k: verify k + 1 tokens")
    ap.add_argument("--vocab", type=int, default=8192, help="draft vocabulary size for the draft rows (0: none)")
    ap.add_argument("--kv-fill", default="project", choices=["project", "copy_below"])
    ap.add_argument("--gates", default="default")
    ap.add_argument("--backends", nargs="+", default=["auto"], help="linear backends to compare (SPECGATE_LINEAR)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    m = specgate.load(gates=args.gates)
    ids = m.encode_chat("Write a short story about a robot learning to paint.")
    head = m.draft_head(args.vocab) if args.vocab else None
    cache = m.engine.new_cache(1, ids.shape[1] + 16)
    steps, skipped = {}, {}

    with torch.inference_mode():
        m.engine(ids, cache)
        base = cache.lengths.clone()

        def step(T=1, policy=None, head=None, counter=None):
            cache.rewind(base)
            m.engine(ids[:, -T:], cache, m.gates if policy else None, policy, kv_fill=args.kv_fill, head=head, counter=counter)

        steps["plain"] = lambda: step()
        for k in args.verify:
            steps[f"verify k={k} ({k + 1} tokens)"] = lambda k=k: step(T=k + 1)
        for b in args.budgets:
            policy = m.gates.policy(b)
            counter = SkipCounter()
            step(policy=policy, counter=counter)
            skipped[b] = counter
            steps[f"draft b={b}"] = lambda p=policy: step(policy=p)
            if head is not None:
                steps[f"draft b={b} vocab {len(head)}"] = lambda p=policy: step(policy=p, head=head)
        if head is not None:
            steps[f"plain, vocab {len(head)} head"] = lambda: step(head=head)

        times = {(b, name): [] for b in args.backends for name in steps}
        for b in args.backends:  # warm-up: kernel builds and backend probes happen here
            os.environ["SPECGATE_LINEAR"] = b
            for fn in steps.values():
                fn(), fn()
        for _ in range(args.rounds):
            for b in args.backends:
                os.environ["SPECGATE_LINEAR"] = b
                for name, fn in steps.items():
                    t = time.perf_counter()
                    fn()
                    times[b, name].append(time.perf_counter() - t)

    print(f"CPU: {cpu_name()}; threads {args.threads}; torch {torch.__version__}; rounds {args.rounds}; gates {args.gates}")
    print(f"{'linear':<8}{'step':<34}{'median ms':>10}{'vs plain':>10}")
    for (b, name), ts in times.items():
        ms, plain = statistics.median(ts) * 1e3, statistics.median(times[b, "plain"]) * 1e3
        print(f"{b:<8}{name:<34}{ms:>10.2f}{ms / plain:>9.2f}x")
    for b, c in skipped.items():
        print(f"draft b={b}: {c.fraction:.3f} of branch evaluations and {c.compute_fraction:.3f} of layer compute skipped")
    used = sorted({c["backend"] for c in linear.choices()["choices"].values()})
    print(f"linear backends chosen by auto: {', '.join(used) or 'none recorded'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
