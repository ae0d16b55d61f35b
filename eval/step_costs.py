"""What one step costs, as a ratio to a plain decode step, measured side by side in one run.

Steps after a prompt (SmolLM2-135M-Instruct, fp32, the shipped gates): a plain decode step, verify
passes of k + 1 tokens (k = 2, 4, 8), and draft steps at several budgets (with the full LM head and
with the draft vocabulary). Every kind of step runs once per round, rounds interleaved, and each
figure is the median over rounds, so drift on a shared machine hits all kinds alike.

``--paths`` measures every step once per code path, interleaved too: ``fused`` (the fused CPU
pass, what ``kernels="auto"`` takes on the CPU), ``torch`` (the engine's PyTorch path, linear
products by the measured choice) and ``onednn`` (the PyTorch path with every product through
oneDNN: what the engine ran before it measured). ``--precisions`` adds draft steps over bfloat16 /
int8 copies of the weights (fused path only). Plain and verify steps are greedy decoding's: the LM
head is the screened one where the engine has it (``Engine.screened``); the rows "float32 head" time
the same steps with the whole float32 head, what sampling and ``output_scores`` need.
``--prefetch FAR:NEAR`` times every step again with the float32 products' prefetch distances set to
those bytes at every row count, beside the engine's measured choice (``specgate.dispatch.prefetch``).

    python eval/step_costs.py [--gates DIR] [--threads 2] [--rounds 30] [--budgets 0.3 0.5 0.7] [--vocab 8192]
        [--paths fused torch] [--precisions float32 int8] [--prefetch 24576:1024]
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
from specgate import Engine, SkipCounter, linear

# path -> (kernels=, SPECGATE_LINEAR=)
PATHS = {"fused": ("cpu", "auto"), "torch": ("torch", "auto"), "onednn": ("torch", "onednn")}


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
    ap.add_argument("--paths", nargs="+", default=["fused"], choices=list(PATHS), help="code paths to compare")
    ap.add_argument("--precisions", nargs="+", default=["float32"], choices=["float32", "bfloat16", "int8", "int4"],
                    help="draft weight precisions (not float32: the fused path only)")  # fmt: skip
    ap.add_argument("--prefetch", nargs="+", default=[], metavar="FAR:NEAR", help="prefetch distances to time every step with too")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    m = specgate.load(gates=args.gates)
    engines = {p: m.engine if PATHS[p][0] == "cpu" else Engine(m.hf_model, kernels=PATHS[p][0]) for p in args.paths}
    ids = m.encode_chat("Write a short story about a robot learning to paint.")
    head = m.draft_head(args.vocab) if args.vocab else None
    steps, skipped = {}, {}

    with torch.inference_mode():
        caches = {}
        for p, e in engines.items():
            caches[p] = e.new_cache(1, ids.shape[1] + 16)
            e(ids, caches[p])
        base = caches[args.paths[0]].host_lengths

        def step(path, T=1, policy=None, head=None, counter=None, precision="float32", exact=False):
            cache = caches[path]
            cache.rewind(base)
            engines[path](ids[:, -T:], cache, m.gates if policy else None, policy, kv_fill=args.kv_fill, head=head,
                          counter=counter, precision=precision, exact_logits=exact)  # fmt: skip

        for p in args.paths:
            steps[p, "plain"] = lambda p=p: step(p)
            for k in args.verify:
                steps[p, f"verify k={k} ({k + 1} tokens)"] = lambda p=p, k=k: step(p, T=k + 1)
            if engines[p].screened is not None:  # greedy steps above take the screened head; sampling's take this
                steps[p, "plain, float32 head (exact logits)"] = lambda p=p: step(p, exact=True)
                for k in args.verify:
                    steps[p, f"verify k={k}, float32 head"] = lambda p=p, k=k: step(p, T=k + 1, exact=True)
            for b in args.budgets:
                policy = m.gates.policy(b)
                counter = SkipCounter()
                step(p, policy=policy, counter=counter)
                skipped[b] = counter
                for pr in args.precisions if PATHS[p][0] == "cpu" else ["float32"]:
                    tag = "" if pr == "float32" else f" {pr}"
                    steps[p, f"draft b={b}{tag}"] = lambda p=p, q=policy, pr=pr: step(p, policy=q, precision=pr)
                    if head is not None:
                        steps[p, f"draft b={b} vocab {len(head)}{tag}"] = lambda p=p, q=policy, pr=pr: step(p, policy=q, head=head, precision=pr)
            if head is not None:
                steps[p, f"plain, vocab {len(head)} head"] = lambda p=p: step(p, head=head)
            for pr in args.precisions if PATHS[p][0] == "cpu" else []:
                if pr != "float32" and head is not None:
                    steps[p, f"draft b=0 vocab {len(head)} {pr}"] = lambda p=p, pr=pr: step(p, head=head, precision=pr)

        for plan in args.prefetch:
            far, near = (int(b) for b in plan.split(":"))
            for (p, name), fn in list(steps.items()):
                steps[p, f"{name} [prefetch {plan}]"] = lambda fn=fn, far=far, near=near: with_prefetch(fn, far, near)
        times = {key: [] for key in steps}
        for _ in range(2):  # warm-up: kernel builds, backend probes, low-precision copies happen here
            for (p, _name), fn in steps.items():
                os.environ["SPECGATE_LINEAR"] = PATHS[p][1]
                fn()
        for _ in range(args.rounds):
            for (p, name), fn in steps.items():
                os.environ["SPECGATE_LINEAR"] = PATHS[p][1]
                t = time.perf_counter()
                fn()
                times[p, name].append(time.perf_counter() - t)

    print(f"CPU: {cpu_name()}; threads {args.threads}; torch {torch.__version__}; rounds {args.rounds}; gates {args.gates}")
    print(f"{'path':<8}{'step':<40}{'median ms':>10}{'vs plain':>10}{'vs first plain':>16}")
    first = statistics.median(times[args.paths[0], "plain"]) * 1e3
    for (p, name), ts in times.items():
        ms, plain = statistics.median(ts) * 1e3, statistics.median(times[p, "plain"]) * 1e3
        print(f"{p:<8}{name:<40}{ms:>10.2f}{ms / plain:>9.2f}x{ms / first:>15.2f}x")
    for b, c in skipped.items():
        print(f"draft b={b}: {c.fraction:.3f} of branch evaluations and {c.compute_fraction:.3f} of layer compute skipped")
    used = sorted({c["backend"] for c in linear.choices()["choices"].values()})
    print(f"linear backends chosen by auto: {', '.join(used) or 'none recorded'}")
    return 0


def with_prefetch(fn, far: int, near: int) -> None:
    """fn() with the float32 products' prefetch distances set to (far, near) at every row count, then put back."""
    previous = [torch.ops.specgate.set_prefetch(T, far, near) for T in range(1, 9)]
    try:
        fn()
    finally:
        for T, plan in enumerate(previous, 1):
            torch.ops.specgate.set_prefetch(T, *plan)


if __name__ == "__main__":
    raise SystemExit(main())
