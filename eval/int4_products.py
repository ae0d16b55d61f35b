"""An int4 draft's cost at one token row on this checkout: the decoder's 120 products over the int4
copy (random inputs, one op call each) and a whole draft step (the fused pass, 16,384-token head,
screened), under each prefetch setting (L2 only, L2 + L1), 30 interleaved rounds, medians.

To compare two versions of the kernels, run it from each checkout in turn, alternating (the kernels
build per source; a second checkout imports its own with PYTHONPATH and a ``specgate/kernels`` link):

    git worktree add /tmp/old COMMIT && ln -s ../kernels /tmp/old/specgate/kernels
    python eval/int4_products.py new; (cd /tmp/old && PYTHONPATH=/tmp/old python /path/to/eval/int4_products.py old)
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

import specgate
from specgate.kernels.cpu_step import low_precision


def main(argv: list[str] | None = None) -> int:
    label = (argv if argv is not None else sys.argv[1:] or ["this"])[0]
    torch.set_num_threads(2)
    m = specgate.load("smollm2-135m-instruct")
    e = m.engine
    ws = [w for lw in e.weights.layers for w in (lw.qkv_w, lw.o_w, lw.gate_up_w, lw.down_w)]
    mats = [low_precision(w, "int4") for w in ws]
    xs = [torch.randn(1, w.shape[1]) for w in ws]
    ids = m.encode_chat("Write a short story about a robot learning to paint.")
    head = m.draft_head(16384)
    cache = e.new_cache(1, ids.shape[1] + 16)
    with torch.inference_mode():
        e(ids, cache)
        base = cache.host_lengths
        e.low_precision_step("int4")

        def products() -> float:
            t = time.perf_counter()
            for x, (q, s) in zip(xs, mats):
                torch.ops.specgate.small_linear(x, q, None, s if s.numel() else None)
            return time.perf_counter() - t

        def step() -> float:
            cache.rewind(base)
            t = time.perf_counter()
            e(ids[:, -1:], cache, head=head, precision="int4", exact_logits=False)
            return time.perf_counter() - t

        out = []
        for name, near in (("L2", 0), ("L2+L1", 1024)):
            torch.ops.specgate.set_block_rows(4, "int4")
            torch.ops.specgate.set_prefetch(1, 24576, near, "int4")
            for f in (products, step):
                f(), f()
            times = {"products": [], "step": []}
            for _ in range(30):
                times["products"].append(products())
                times["step"].append(step())
            out.append(f"prefetch {name}: products {statistics.median(times['products']) * 1e3:.3f} ms, "
                       f"step {statistics.median(times['step']) * 1e3:.3f} ms")  # fmt: skip
    print(f"{label}: " + "; ".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
