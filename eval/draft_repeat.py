"""Draft steps over the int8 and int4 copies as the acceptance loop runs them: four in a row (a round's),
with the whole head, the static 16,384-token draft vocabulary and one grown by the prompt, the kinds
interleaved over 60 rounds (medians of the last 55). eval/step_costs.py times one step of each kind
in turn, after other kinds' steps; here each step follows its own kind's.

    python eval/draft_repeat.py
"""
import statistics, time, torch, specgate
from specgate import bench
torch.set_num_threads(2)
m = specgate.load("smollm2-135m-instruct")
e = m.engine
ids = m.encode_chat(bench.mtbench_prompts(1)[0])
static = m.draft_head(16384)
grown = static.with_context(ids[0])
for p in ("int8", "int4"):
    e.low_precision_step(p)
cache = e.new_cache(1, ids.shape[1] + 8)
with torch.inference_mode():
    e(ids, cache)
    base = cache.host_lengths[0]
    tok = ids[:, -1:]
    kinds = {f"{p} {name}": (p, h) for name, h in (("full", None), ("static", static), ("grown", grown)) for p in ("int4", "int8")}
    times = {k: [] for k in kinds}
    for r in range(60):
        for k, (p, h) in kinds.items():
            cache.rewind([base])
            t = time.perf_counter()
            for _ in range(4):
                e(tok, cache, None, None, head=h, precision=p, exact_logits=False)
            times[k].append((time.perf_counter() - t) / 4)
for k, ts in times.items():
    print(f"{k:14s} {statistics.median(ts[5:]) * 1e3:6.2f} ms")
