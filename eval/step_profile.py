"""Where a decode step's time goes on the PyTorch path (``kernels="torch"``; the fused CPU pass runs
a whole step in one call, which the profiler cannot split): torch.profiler over 20 plain steps and
20 draft steps (budget 0.5, draft vocabulary 8,192), split into the linear products and everything
else, and the operators a step calls (nested ones included).

    python eval/step_profile.py [--threads 2]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import specgate

PRODUCTS = ("specgate::small_linear", "mkldnn::_linear_pointwise", "aten::addmm", "aten::mm")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    m = specgate.load(kernels="torch")
    ids = m.encode_chat("Write a short story about a robot learning to paint.")
    cache = m.engine.new_cache(1, ids.shape[1] + 16)
    with torch.inference_mode():
        m.engine(ids, cache)
        base = cache.lengths.clone()

        def step(policy=None, head=None):
            cache.rewind(base)
            m.engine(ids[:, -1:], cache, m.gates if policy else None, policy, head=head)

        for name, policy, head in (("plain", None, None), ("draft 0.5, vocab 8192", m.gates.policy(0.5), m.draft_head(8192))):
            for _ in range(5):
                step(policy, head)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(20):
                    step(policy, head)
            events = prof.key_averages()
            total = sum(e.self_cpu_time_total for e in events) / 20 / 1e3
            products = sum(e.self_cpu_time_total for e in events if e.key in PRODUCTS) / 20 / 1e3
            ops = sum(e.count for e in events if "::" in e.key) / 20  # operators, nested ones included
            print(f"{name}: {total:.2f} ms per step under the profiler; linear products (gates' included) "
                  f"{products:.2f} ms, everything else {total - products:.2f} ms; {ops:.0f} operators")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
