"""One prepared benchmark for a GPU machine: the Triton kernels against their PyTorch references,
and end-to-end decoding (transformers ``generate()``, specgate plain, specgate speculative).

    python eval/gpu_bench.py                       # everything, on CUDA
    python eval/gpu_bench.py --skip-e2e            # kernels only
    TRITON_INTERPRET=1 python eval/gpu_bench.py --smoke --skip-e2e --dtypes float32 --out /tmp/smoke.json
                                                   # CPU check of the kernel section

Kernel shapes are those of SmolLM2-135M (hidden 576, 9 heads, 3 kv heads, head_dim 64, ff 1536,
vocab 49152) and Gemma 3 270M (hidden 640, 4 heads, 1 kv head, head_dim 256, ff 2048, vocab
262144), in bf16 and fp32, for a decode step of batch 4 and a verify pass of 4 x 5 tokens.
Each row records the kernel's and the reference's time (``triton.testing.do_bench``, median ms;
wall clock under ``--smoke``) and their largest difference. The end-to-end rows report failures
per row instead of stopping. Writes JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

SHAPES = {
    "smollm2-135m": dict(hidden=576, heads=9, kv_heads=3, head_dim=64, ff=1536, vocab=49152),
    "gemma-3-270m": dict(hidden=640, heads=4, kv_heads=1, head_dim=256, ff=2048, vocab=262144),
}
SMOKE_SHAPES = {"tiny": dict(hidden=72, heads=3, kv_heads=1, head_dim=16, ff=96, vocab=500)}
E2E_MODELS = ["smollm2-135m-instruct", "gemma-3-270m"]
PROMPTS = [
    "Explain photosynthesis in one sentence.",
    "Write a haiku about the sea.",
    "List three uses of a paperclip.",
    "What is the capital of Australia, and why is it not Sydney?",
]


@dataclass
class Case:
    """One kernel call and its reference on the same inputs; ``compare`` picks what to diff."""

    name: str
    kernel: Callable[[], object]
    reference: Callable[[], object]
    compare: Callable[[object, object], float]


def timer(fn: Callable[[], object], device: torch.device, smoke: bool) -> float:
    """Median milliseconds: do_bench on the GPU; under --smoke a few wall-clock calls."""
    if device.type == "cuda" and not smoke:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[0]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def kernel_cases(s: dict, dtype: torch.dtype, device: torch.device) -> list[Case]:
    """The benchmarked calls at one model's shapes: batch 4, half the rows active."""
    from specgate.kernels import accept, draft_head, kv_fill, projection, residual, route

    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dt)

    d, hd, n_kv, ff, V = s["hidden"], s["head_dim"], s["kv_heads"], s["ff"], s["vocab"]
    qkv_out = (s["heads"] + 2 * n_kv) * hd
    B, T, k, L = 4, 5, 4, 256
    N = B * T
    x = rand(B, T, d)
    active = torch.arange(N, device=device) % 2 == 0
    r = route.route_from_mask(active, torch.zeros(N, device=device))
    n = int(r.count)
    w_qkv, w_gu, w_down = rand(qkv_out, d, scale=d**-0.5), rand(2 * ff, d, scale=d**-0.5), rand(d, ff, scale=ff**-0.5)
    gate_w, gate_b = rand(d, scale=0.05), rand(1)
    imp, valid = torch.rand(B, T, generator=g).to(device), torch.ones(B, T, dtype=torch.bool, device=device)
    h, o, gval, standin = rand(B, T, d), rand(N, d), torch.rand(N, generator=g).to(device), rand(d)
    x_ff, thr = rand(B, T, ff), torch.full((1,), 0.5, device=device)
    caches = [rand(B, n_kv, L, hd) for _ in range(4)]
    angle = torch.rand(B, T, hd, generator=g).to(device) * 6
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    slots = (torch.arange(T, device=device) + 100).repeat(B, 1)
    w_kv = w_qkv[s["heads"] * hd :]
    sub = V // 4  # the draft head's vocabulary subset
    hd_in, w_sub, vmap = rand(B, d), rand(sub, d, scale=d**-0.5), torch.randperm(V, generator=g)[:sub].to(device)
    u = torch.rand(B, generator=g).to(device)
    logits = rand(B, k + 1, V, dt=torch.float32)
    drafts = logits.argmax(-1)[:, :k]
    q, p = torch.softmax(rand(B, k, V, dt=torch.float32), -1), torch.softmax(logits, -1)
    uk = torch.rand(B, k, generator=g).to(device)
    # sparse inputs: one decode row, half its inputs zeroed, input-major weights (read: the kept half)
    x1, a1 = x[:1, 0], x_ff[:1, 0]
    one = torch.zeros(1, dtype=torch.int32, device=device), torch.ones(1, dtype=torch.int32, device=device)  # order, count
    t_x, t_a = float(x1.float().abs().median()), float(a1.float().abs().median())
    w_gu_t, w_down_t = w_gu.t().contiguous(), w_down.t().contiguous()

    def rows(a, b):
        return max_diff(a[:n], b)

    def pair(a, b):
        return max(max_diff(x_, y_) for x_, y_ in zip(a, b))

    def cache_case(fn, ref, *args, **kw):
        got, exp = [c.clone() for c in caches[:2]], [c.clone() for c in caches[:2]]
        return Case(
            fn.__name__, lambda: fn(*args, *got, **kw), lambda: ref(*args, *exp, **kw), lambda *_: pair(got, exp)
        )

    return [
        Case("route_threshold (decode, B=4)", lambda: route.route_threshold(x[:, 0], thr, gate_w, gate_b).order,
             lambda: route.route_threshold_reference(x[:, 0], thr, gate_w, gate_b).order, max_diff),
        Case("route_budget (4 x 5 tokens)", lambda: route.route_budget(imp, valid, 0.3).order,
             lambda: route.route_budget_reference(imp, valid, 0.3).order, max_diff),
        Case("gathered_linear qkv", lambda: projection.gathered_linear(x, w_qkv, None, r.order, r.count),
             lambda: projection.gathered_linear_reference(x, w_qkv, None, r.order, r.count), rows),
        Case("gathered_gate_up", lambda: projection.gathered_gate_up(x, w_gu, r.order, r.count),
             lambda: projection.gathered_gate_up_reference(x, w_gu, r.order, r.count), rows),
        Case("gathered_linear down", lambda: projection.gathered_linear(x_ff, w_down, None, r.order, r.count),
             lambda: projection.gathered_linear_reference(x_ff, w_down, None, r.order, r.count), rows),
        Case("sparse_linear gate_up (1 row, half the inputs)",
             lambda: projection.sparse_linear(x1, w_gu_t, None, t_x, *one, "silu"),
             lambda: projection.sparse_linear_reference(x1, w_gu_t, None, t_x, *one, "silu")[0], max_diff),
        Case("sparse_linear down (1 row, half the inputs)",
             lambda: projection.sparse_linear(a1, w_down_t, None, t_a, *one),
             lambda: projection.sparse_linear_reference(a1, w_down_t, None, t_a, *one)[0], max_diff),
        Case("gathered_gate_up (1 row, every input)", lambda: projection.gathered_gate_up(x1, w_gu, *one),
             lambda: projection.gathered_gate_up_reference(x1, w_gu, *one), max_diff),
        Case("residual_add_ (+standin)", lambda: residual.residual_add_(h.clone(), o, r.order, r.count, gval, standin),
             lambda: residual.residual_add_reference(h, o, r.order, r.count, gval, standin), max_diff),
        cache_case(kv_fill.kv_fill_project, kv_fill.kv_fill_project_reference, x, w_kv, None, cos, sin, slots, r.order, r.count),
        Case("kv_fill_copy_below", lambda: kv_fill.kv_fill_copy_below(slots, r.order, r.count, *caches),
             lambda: kv_fill.kv_fill_copy_below_reference(slots, r.order, r.count, T, *caches), lambda *_: 0.0),
        Case(f"draft_argmax (subset {sub})", lambda: draft_head.draft_argmax(hd_in, w_sub, vmap),
             lambda: draft_head.draft_argmax_reference(hd_in, w_sub, vmap), pair),
        Case(f"draft_sample_topk k=8 (subset {sub})", lambda: draft_head.draft_sample_topk(hd_in, w_sub, vmap, u, 8),
             lambda: draft_head.draft_sample_topk_reference(hd_in, w_sub, vmap, u, 8), pair),
        Case("greedy_accept (B=4, k=4)", lambda: accept.greedy_accept(drafts, logits),
             lambda: accept.greedy_accept_reference(drafts, logits), pair),
        Case("rejection_sample (B=4, k=4)", lambda: accept.rejection_sample(drafts, q, p, uk, u),
             lambda: accept.rejection_sample_reference(drafts, q, p, uk, u), pair),
    ]  # fmt: skip


def bench_kernels(shapes: dict, dtypes: list[torch.dtype], device: torch.device, smoke: bool) -> list[dict]:
    rows = []
    for model, s in shapes.items():
        for dtype in dtypes:
            for case in kernel_cases(s, dtype, device):
                row = dict(section="kernel", model=model, dtype=str(dtype).removeprefix("torch."), name=case.name)
                try:
                    got, ref = case.kernel(), case.reference()
                    row["max_diff"] = case.compare(got, ref)
                    row["triton_ms"] = timer(case.kernel, device, smoke)
                    row["torch_ms"] = timer(case.reference, device, smoke)
                    row["speedup"] = row["torch_ms"] / row["triton_ms"]
                except Exception as e:  # one broken kernel must not hide the others
                    row["error"] = f"{type(e).__name__}: {e}"[:500]
                rows.append(row)
                print(row, flush=True)
    return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_e2e(models: list[str], dtypes: list[torch.dtype], device: torch.device, max_new: int, n_prompts: int) -> list[dict]:
    """Greedy decode of the prompts one at a time: tokens/s and exact match with transformers."""
    import specgate

    rows = []
    for name in models:
        for dtype in dtypes:
            base = dict(section="e2e", model=name, dtype=str(dtype).removeprefix("torch."))
            try:
                m = specgate.load(name, device=str(device), dtype=dtype)
                prompts = [m.encode_chat(t).to(device) for t in PROMPTS[:n_prompts]]
            except Exception as e:
                rows.append({**base, "name": "load", "error": f"{type(e).__name__}: {e}"[:500]})
                print(rows[-1], flush=True)
                continue
            methods = {
                "transformers generate()": lambda ids: m.hf_model.generate(ids, max_new_tokens=max_new, do_sample=False),
                "specgate plain": lambda ids: m.generate(ids, max_new_tokens=max_new),
                "specgate speculative": lambda ids: m.generate(
                    ids, max_new_tokens=max_new, speculative=True, return_dict_in_generate=True
                ),
            }
            reference: list[torch.Tensor] = []
            for method, run in methods.items():
                row = {**base, "name": method}
                try:
                    run(prompts[0])  # warm-up: kernels compiled, caches allocated
                    outs, tokens, stats, seconds = [], 0, [], 0.0
                    for ids in prompts:
                        _sync(device)
                        t0 = time.perf_counter()
                        out = run(ids)
                        _sync(device)
                        seconds += time.perf_counter() - t0
                        seq = out.sequences if hasattr(out, "sequences") else out
                        stats.append(getattr(out, "spec_stats", None))
                        outs.append(seq[0, ids.shape[1] :].cpu())
                        tokens += outs[-1].numel()
                    row["tokens_per_s"] = tokens / seconds
                    if not reference:
                        reference = outs
                    row["exact_match"] = sum(
                        torch.equal(a, b[: len(a)]) and len(a) == len(b) for a, b in zip(outs, reference)
                    ) / len(outs)
                    if stats[0] is not None:
                        row["tau"] = sum(s_.tau for s_ in stats) / len(stats)
                        row["alpha"] = sum(s_.alpha for s_ in stats) / len(stats)
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {e}"[:500]
                    traceback.print_exc()
                rows.append(row)
                print(row, flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    """Two tables: kernels (ms, speed-up, max diff), end-to-end (tokens/s, tau, alpha, exact)."""

    def f(v, spec=".3f"):
        return "-" if v is None else format(v, spec)

    out = ["| model | dtype | kernel | triton ms | torch ms | speed-up | max diff |", "|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["section"] == "kernel"):
        if "error" in r:
            out.append(f"| {r['model']} | {r['dtype']} | {r['name']} | error: {r['error'][:80]} | | | |")
        else:
            out.append(
                f"| {r['model']} | {r['dtype']} | {r['name']} | {f(r['triton_ms'])} | {f(r['torch_ms'])} | "
                f"{f(r['speedup'], '.2f')}x | {f(r['max_diff'], '.2e')} |"
            )
    e2e = [r for r in rows if r["section"] == "e2e"]
    if e2e:
        out += ["", "| model | dtype | method | tokens/s | tau | alpha | exact match |", "|---|---|---|---|---|---|---|"]
        for r in e2e:
            if "error" in r:
                out.append(f"| {r['model']} | {r['dtype']} | {r['name']} | error: {r['error'][:80]} | | | |")
            else:
                out.append(
                    f"| {r['model']} | {r['dtype']} | {r['name']} | {f(r['tokens_per_s'], '.1f')} | "
                    f"{f(r.get('tau'), '.2f')} | {f(r.get('alpha'), '.2f')} | {f(r['exact_match'], '.0%')} |"
                )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, wall-clock timing (CPU: needs TRITON_INTERPRET=1)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32", "float16"])
    ap.add_argument("--models", nargs="+", default=E2E_MODELS, help="end-to-end models (specgate.load names)")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=4, help=f"at most {len(PROMPTS)}")
    ap.add_argument("--out", default="results/gpu_bench.json", help="JSON; the markdown table goes beside it (.md)")
    args = ap.parse_args(argv)

    from specgate.kernels import require_triton

    device = torch.device(args.device)
    dtypes = [getattr(torch, d) for d in args.dtypes]
    rows: list[dict] = []
    if not args.skip_kernels:
        require_triton(device)
        rows += bench_kernels(SMOKE_SHAPES if args.smoke else SHAPES, dtypes, device, args.smoke)
    if not args.skip_e2e:
        rows += bench_e2e(args.models, dtypes, device, args.max_new_tokens, args.prompts)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__)
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(rows))
    print(markdown(rows))
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
