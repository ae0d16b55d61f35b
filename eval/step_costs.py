"""Per-step cost of a plain decode step, a 4-token verify pass, and draft steps with the shipped
gates at several budgets (2 threads by default), as ratios to the plain step.

    python eval/step_costs.py
"""
import torch, time, specgate
from specgate import SkipCounter
m = specgate.load()
g = m.gates
ids = m.encode_chat("Write a short story about a robot learning to paint.")
def timeit(fn, n=40):
    for _ in range(3): fn()
    t = time.perf_counter()
    for _ in range(n): fn()
    return (time.perf_counter() - t) / n * 1e3
with torch.inference_mode():
    cache = m.engine.new_cache(1, 512)
    m.engine(ids, cache)
    base = cache.lengths.clone()
    def step(gates=None, policy=None, T=1, counter=None):
        cache.rewind(base)
        m.engine(ids[:, -T:], cache, gates, policy, counter=counter)
    res = {'plain': timeit(lambda: step()), 'verify4': timeit(lambda: step(T=4))}
    for b in (0.1, 0.3, 0.5):
        pol = g.policy(b)
        c = SkipCounter(); step(g, pol, counter=c)
        res[f'draft b={b} (skips {c.fraction:.2f})'] = timeit(lambda: step(g, pol))
        res[f'draft b={b} +counter'] = timeit(lambda: step(g, pol, counter=SkipCounter()))
    for k, v in res.items(): print(f'{k:28s} {v:6.2f} ms  {v/res["plain"]:.2f}x')
