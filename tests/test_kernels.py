"""The Triton kernels of specgate.kernels against their PyTorch references, on the CPU.

The kernels run in Triton's interpreter, which needs TRITON_INTERPRET=1 set before Triton is first
imported: Triton decorates its own language library (tl.max, tl.sigmoid, ...) on import, for the
interpreter or not, and torch imports Triton. A pytest session imports torch in conftest.py before
this module, so unless the variable was set for the whole session
(``TRITON_INTERPRET=1 pytest -m kernels``), the kernel tests skip here and
``test_kernels_in_interpreter`` runs this file again in a subprocess with it set.

Once interpreted kernels have run, Triton's language module is patched for the interpreter in that
process, so the check that every kernel also compiles for an H100/H200 (sm_90, with the ptxas
that ships with Triton) runs in another subprocess: this file run as a script.

Dtypes: float32, and float16 where a kernel multiplies matrices (the interpreter computes bfloat16
wrongly, so bfloat16 is covered by the sm_90 compile only). Shapes are small and odd on purpose
(hidden 72 and 576, head_dim 16 and 64, vocabularies that are not multiples of the block).
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package (pip install triton)")

from specgate import kernels  # noqa: E402
from specgate.kernels import accept, draft_head, kv_fill, projection, residual, route  # noqa: E402

INTERPRETED = kernels.triton_available("cpu")
needs_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="Triton was imported without TRITON_INTERPRET=1: run by test_kernels_in_interpreter"
)
pytestmark = pytest.mark.kernels
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-2, rtol=1e-2)}


def _route(mask: torch.Tensor) -> route.Route:
    return route.route_from_mask(mask.reshape(-1), torch.zeros(mask.numel()))


MASKS = {  # per-row masks of a (3, 5) batch: each row its own, then none and all active
    "mixed": torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool),
    "none": torch.zeros(3, 5, dtype=torch.bool),
    "all": torch.ones(3, 5, dtype=torch.bool),
}


# -- availability ---------------------------------------------------------------------------------


@pytest.mark.skipif(INTERPRETED, reason="this session runs the kernel tests themselves")
def test_kernels_in_interpreter():
    """The kernel tests in a fresh process with TRITON_INTERPRET=1 set before torch is imported."""
    here = Path(__file__)
    cmd = [sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here),
           "--deselect", f"{here}::test_kernels_compile_for_sm90"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]


def test_availability(monkeypatch):
    assert kernels.triton_available("cpu") == INTERPRETED
    if not INTERPRETED:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        with pytest.raises(RuntimeError, match="set it before the process imports torch"):
            kernels.require_triton("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not kernels.triton_available(torch.zeros(1))
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1"):
        kernels.require_triton("cpu")
    assert kernels.triton_available("cuda")


_WITHOUT_TRITON = """
import importlib.abc, sys
class NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, NoTriton())
import torch
from specgate import kernels
from specgate.kernels import accept, draft_head, kv_fill, projection, residual, route
assert not kernels.triton_available("cpu") and not kernels.triton_available("cuda")
x = torch.randn(4, 8)
print(route.route_threshold_reference(x, torch.tensor([0.5]), torch.ones(8), torch.zeros(1)).count.item())
"""


def test_imports_without_triton():
    """Where Triton is missing the kernel modules still import and their references run."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-P", "-c", _WITHOUT_TRITON], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]


# -- route ----------------------------------------------------------------------------------------


@needs_interpreter
@pytest.mark.parametrize("n,d", [(1, 72), (5, 576), (37, 72)])
@pytest.mark.parametrize("scalar", [True, False])
def test_route_threshold(n, d, scalar):
    torch.manual_seed(n + d)
    x = torch.randn(n, d)
    w, b = (torch.randn(d) * 0.05, torch.tensor([0.3])) if scalar else (None, None)
    imp = route.importance_reference(x, w, b)
    torch.testing.assert_close(route.importance(x, w, b), imp, atol=1e-6, rtol=1e-5)
    s = imp.sort().values
    middle = (s[n // 2] + s[max(n // 2 - 1, 0)]) / 2  # between two importances: no rounding flips
    for thr in (middle, torch.tensor(1.0), torch.tensor(-1.0)):  # some, none, all active
        got = route.route_threshold(x, thr.reshape(1), w, b)
        ref = route.route_threshold_reference(x, thr.reshape(1), w, b)
        assert torch.equal(got.order, ref.order) and torch.equal(got.count, ref.count)
        assert torch.equal(got.active, ref.active)


def _skip_lowest():
    try:
        from specgate.policy import skip_lowest
    except ImportError:
        from specgate.gates import skip_lowest
    return skip_lowest


@needs_interpreter
@pytest.mark.parametrize("B,T", [(1, 1), (2, 7), (3, 45)])
@pytest.mark.parametrize("budget", [0.0, 0.1, 0.3, 0.5, 1.0])
def test_route_budget(B, T, budget):
    torch.manual_seed(B * T)
    imp = torch.rand(B, T).to(torch.float16).float()  # rounded: ties, broken by position
    valid = torch.rand(B, T) > 0.25
    got = route.route_budget(imp, valid, budget)
    ref = route.route_budget_reference(imp, valid, budget)
    assert torch.equal(got.order, ref.order) and torch.equal(got.count, ref.count)
    mask = _skip_lowest()(imp, valid, int(budget * int(valid.sum())))  # the policy's own ranking
    assert torch.equal(ref.active, torch.ones(B * T, dtype=torch.bool) if mask is None else mask.reshape(-1))


@needs_interpreter
def test_route_budget_float64_floor():
    """0.29 * 100 is 28.999999999999996 in float64 (as Python computes it), 29.0 in float32."""
    imp, valid = torch.rand(100), torch.ones(100, dtype=torch.bool)
    assert int(route.route_budget(imp, valid, 0.29).count) == 100 - int(0.29 * 100) == 72


# -- projection -----------------------------------------------------------------------------------


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("K,M", [(72, 40), (576, 100)])
@pytest.mark.parametrize("mask", MASKS)
def test_gathered_linear(dtype, K, M, mask):
    torch.manual_seed(K + M)
    x, w, bias = torch.randn(3, 5, K, dtype=dtype), torch.randn(M, K, dtype=dtype) / 8, torch.randn(M, dtype=dtype)
    r = _route(MASKS[mask])
    for skipped in (False, True):
        n = len(projection.selected_rows(r.order, r.count, skipped))
        got = projection.gathered_linear(x, w, bias if skipped else None, r.order, r.count, skipped)
        ref = projection.gathered_linear_reference(x, w, bias if skipped else None, r.order, r.count, skipped)
        torch.testing.assert_close(got[:n], ref, **TOL[dtype])


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("mask", ["mixed", "all"])
def test_gathered_gate_up(dtype, act, mask):
    torch.manual_seed(1)
    K, ff = 72, 96
    x, w = torch.randn(3, 5, K, dtype=dtype), torch.randn(2 * ff, K, dtype=dtype) / 8
    r = _route(MASKS[mask])
    got = projection.gathered_gate_up(x, w, r.order, r.count, act)
    ref = projection.gathered_gate_up_reference(x, w, r.order, r.count, act)
    torch.testing.assert_close(got[: int(r.count)], ref, **TOL[dtype])


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("act", [None, "silu", "gelu_tanh"])
@pytest.mark.parametrize("mask", ["mixed", "all", "none"])
def test_sparse_linear(dtype, act, mask):
    """Against the reference at a threshold that zeroes about half the inputs, with the count of
    zeroed inputs; weights are a column slice of a wider input-major matrix, as the engine passes."""
    torch.manual_seed(3)
    K, M = 72, 2 * 48
    x, wide = torch.randn(3, 5, K, dtype=dtype), torch.randn(K, M + 8, dtype=dtype) / 8
    w_t, bias = wide[:, 8:], (torch.randn(M, dtype=dtype) if act is None else None)
    r, t = _route(MASKS[mask]), 0.67
    dropped = torch.zeros(1)
    got = projection.sparse_linear(x, w_t, bias, t, r.order, r.count, act, dropped, col_share=0.5)
    ref, n_zeroed = projection.sparse_linear_reference(x, w_t, bias, t, r.order, r.count, act)
    n = int(r.count)
    torch.testing.assert_close(got[:n], ref, **TOL[dtype])
    assert float(dropped) == 0.5 * n_zeroed
    assert n == 0 or 0.3 < n_zeroed / (n * K) < 0.7


@needs_interpreter
def test_sparse_linear_reads_no_weight_row_of_a_zeroed_input():
    """Weight rows whose input no selected row keeps are never read: NaN there changes nothing."""
    torch.manual_seed(4)
    x, w_t = torch.randn(2, 40), torch.randn(40, 24)
    x[:, ::3] = 0.01  # inputs 0, 3, 6, ... are small in every row
    poisoned = w_t.clone()
    poisoned[::3] = float("nan")
    order, count = torch.arange(2, dtype=torch.int32), torch.tensor([2], dtype=torch.int32)
    got = projection.sparse_linear(x, poisoned, None, 0.05, order, count)
    torch.testing.assert_close(got, projection.sparse_linear_reference(x, w_t, None, 0.05, order, count)[0])


def test_sparse_linear_wants_input_major_weights():
    order, count = torch.arange(2, dtype=torch.int32), torch.tensor([2], dtype=torch.int32)
    with pytest.raises(ValueError, match="input-major"):
        projection.sparse_linear(torch.randn(2, 8), torch.randn(16, 8).t(), None, 0.1, order, count)


# -- residual -------------------------------------------------------------------------------------


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("gate", [None, "row", "channel"])
@pytest.mark.parametrize("standin", [None, "vector", "rows"])
def test_residual_add(dtype, mask, gate, standin):
    torch.manual_seed(2)
    d = 576 if gate == "channel" else 72
    h, o = torch.randn(3, 5, d, dtype=dtype), torch.randn(15, d, dtype=dtype)
    g = {None: None, "row": torch.rand(15), "channel": torch.rand(3, 5, d, dtype=dtype)}[gate]
    s = {None: None, "vector": torch.randn(d, dtype=dtype), "rows": torch.randn(15, d, dtype=dtype)}[standin]
    r = _route(MASKS[mask])
    ref = residual.residual_add_reference(h, o, r.order, r.count, g, s)
    got = residual.residual_add_(h.clone(), o, r.order, r.count, g, s)
    torch.testing.assert_close(got, ref, **TOL[dtype])


# -- K/V fill -------------------------------------------------------------------------------------


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n_kv,hd,d", [(3, 16, 72), (1, 64, 576)])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("norm_bias", [False, True])
def test_kv_fill_project(dtype, n_kv, hd, d, mask, norm_bias):
    torch.manual_seed(hd)
    B, T, L = 3, 5, 11
    x = torch.randn(B, T, d, dtype=dtype)
    w = torch.randn(2 * n_kv * hd, d, dtype=dtype) / 8
    bias = torch.randn(2 * n_kv * hd, dtype=dtype) if norm_bias else None
    k_norm = torch.randn(hd, dtype=dtype) if norm_bias else None
    angle = torch.rand(B, T, hd) * 6
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    slots = torch.stack([torch.randperm(L)[:T] for _ in range(B)])
    r = _route(MASKS[mask])
    caches = [torch.randn(B, n_kv, L, hd, dtype=dtype) for _ in range(2)]
    got, ref = [c.clone() for c in caches], [c.clone() for c in caches]
    kv_fill.kv_fill_project(x, w, bias, cos, sin, slots, r.order, r.count, *got, k_norm=k_norm)
    kv_fill.kv_fill_project_reference(x, w, bias, cos, sin, slots, r.order, r.count, *ref, k_norm=k_norm)
    for g, e in zip(got, ref):
        torch.testing.assert_close(g, e, **TOL[dtype])


@needs_interpreter
@pytest.mark.parametrize("mask", MASKS)
def test_kv_fill_copy_below(mask):
    torch.manual_seed(3)
    B, T, n_kv, L, hd = 3, 5, 3, 9, 24
    slots = torch.stack([torch.randperm(L)[:T] for _ in range(B)])
    below = [torch.randn(B, n_kv, L, hd) for _ in range(2)]
    here = [torch.randn(B, n_kv, L, hd) for _ in range(2)]
    got, ref = [c.clone() for c in here], [c.clone() for c in here]
    r = _route(MASKS[mask])
    kv_fill.kv_fill_copy_below(slots, r.order, r.count, *below, *got)
    kv_fill.kv_fill_copy_below_reference(slots, r.order, r.count, T, *below, *ref)
    assert all(torch.equal(g, e) for g, e in zip(got, ref))


# -- draft head -----------------------------------------------------------------------------------


def _head(B: int, d: int, Vs: int, dtype=torch.float32):
    torch.manual_seed(Vs)
    h, w = torch.randn(B, d, dtype=dtype), torch.randn(Vs, d, dtype=dtype) / 4
    vocab_map = torch.randperm(4 * Vs)[:Vs]
    return h, w, vocab_map


@needs_interpreter
@pytest.mark.parametrize("B,d,Vs", [(1, 72, 50), (3, 72, 300), (17, 576, 129)])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_draft_argmax(B, d, Vs, softcap):
    h, w, vocab_map = _head(B, d, Vs)
    w[Vs // 2] = w[Vs // 3]  # an exact tie, possibly the maximum: the first occurrence wins
    tok, prob = draft_head.draft_argmax(h, w, vocab_map, softcap)
    ref_tok, ref_prob = draft_head.draft_argmax_reference(h, w, vocab_map, softcap)
    assert torch.equal(tok, ref_tok)
    torch.testing.assert_close(prob, ref_prob)


@needs_interpreter
def test_draft_argmax_chunked_merge(monkeypatch):
    monkeypatch.setattr(draft_head, "MERGE_CHUNK", 4)  # 24 vocabulary blocks: 6 merge chunks
    h, w, vocab_map = _head(2, 72, 3000)
    assert torch.equal(draft_head.draft_argmax(h, w, vocab_map)[0], draft_head.draft_argmax_reference(h, w, vocab_map)[0])


@needs_interpreter
@pytest.mark.parametrize("top_k,chunk", [(1, 1024), (5, 1024), (5, 16), (40, 64)])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_draft_sample_topk(monkeypatch, top_k, chunk, softcap):
    monkeypatch.setattr(draft_head, "MERGE_CHUNK", chunk)
    h, w, vocab_map = _head(4, 72, 700)
    u = torch.tensor([0.0, 0.3, 0.7, 0.999])
    got = draft_head.draft_sample_topk(h, w, vocab_map, u, top_k, 0.7, softcap)
    ref = draft_head.draft_sample_topk_reference(h, w, vocab_map, u, top_k, 0.7, softcap)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    torch.testing.assert_close(got[2], ref[2])


# -- acceptance -----------------------------------------------------------------------------------


@needs_interpreter
@pytest.mark.parametrize("k,V", [(1, 50), (4, 1500)])
def test_greedy_accept(k, V):
    torch.manual_seed(k)
    B = 4
    logits = torch.randn(B, k + 1, V)
    logits[0, 0, 7] = logits[0, 0, 3] = logits[0, 0].max() + 1  # a tie: 3 wins, as in torch
    target = logits.argmax(-1)
    drafts = target[:, :k].clone()
    drafts[1, k - 1] += 1  # reject the last draft
    drafts[2, 0] += 1  # reject the first; row 0 and 3 accept all
    got = accept.greedy_accept(drafts, logits)
    ref = accept.greedy_accept_reference(drafts, logits)
    from specgate.speculative import greedy_accept as engine_greedy_accept

    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    assert all(torch.equal(a, b) for a, b in zip(ref, engine_greedy_accept(drafts, logits)))


@needs_interpreter
@pytest.mark.parametrize("k,V", [(1, 37), (4, 1500)])
def test_rejection_sample(k, V):
    torch.manual_seed(V)
    B = 6
    q = torch.softmax(torch.randn(B, k, V) * 2, -1)
    p = torch.softmax(torch.randn(B, k + 1, V) * 2, -1)
    p[0, :k] = q[0]  # p == q: every draft accepted, then a bonus token from p
    p[1, 0] = q[1, 0]  # p == q where the test may reject: the residual is empty
    drafts = torch.multinomial(q.reshape(-1, V), 1).view(B, k)
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        u, u_next = torch.rand(B, k, generator=gen), torch.rand(B, generator=gen)
        got = accept.rejection_sample(drafts, q, p, u, u_next)
        ref = accept.rejection_sample_reference(drafts, q, p, u, u_next)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
        from specgate.speculative import rejection_sample as engine_rejection_sample

        n, _ = engine_rejection_sample(drafts, q, p, torch.Generator().manual_seed(seed))
        assert torch.equal(got[0], n)  # same uniforms for the accept tests as the engine draws
    assert int(got[0][0]) == k


# -- compiles for the GPU -------------------------------------------------------------------------


def test_kernels_compile_for_sm90():
    """Every launch the tests make, in fp32 and bf16, compiles to a cubin for sm_90 (no GPU
    needed). Run in a subprocess: see the module docstring."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=300)
    if "NO-PTXAS" in out.stdout:
        pytest.skip("no ptxas to compile with")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def _exercise_launchers(dtype: torch.dtype) -> None:
    """One call of every launcher and variant, at small shapes (the kernels are only recorded)."""
    x, w, r = torch.randn(3, 5, 72, dtype=dtype), torch.randn(96, 72, dtype=dtype), _route(MASKS["mixed"])
    route.route_threshold(x, torch.tensor([0.5]), torch.randn(72, dtype=dtype), torch.zeros(1, dtype=dtype))
    route.route_threshold(x, torch.tensor([0.5]))
    route.route_budget(torch.rand(3, 5), torch.ones(3, 5, dtype=torch.bool), 0.3)
    for skipped in (False, True):
        projection.gathered_linear(x, w, torch.zeros(96, dtype=dtype), r.order, r.count, skipped)
    for act in projection.ACTIVATIONS:
        projection.gathered_gate_up(x, w, r.order, r.count, act)
    w_t, dropped = torch.randn(72, 96, dtype=dtype), torch.zeros(1)
    for act in (None, *projection.ACTIVATIONS):
        projection.sparse_linear(x, w_t, None if act else torch.zeros(96, dtype=dtype), 0.5, r.order, r.count, act, dropped, 0.1)
    projection.sparse_linear(x, w_t, None, 0.5, r.order, r.count)
    for g in (None, torch.rand(15), torch.rand(15, 72)):
        residual.residual_add_(x.clone(), x, r.order, r.count, g, torch.zeros(72, dtype=dtype))
    residual.residual_add_(x.clone(), x, r.order, r.count, None, x)  # a stand-in per row
    residual.residual_add_(x.clone(), x, r.order, r.count)
    cache = [torch.zeros(3, 1, 9, 64, dtype=dtype) for _ in range(4)]
    cs, slots = torch.rand(3, 5, 64, dtype=dtype), torch.arange(5).repeat(3, 1)
    kv_fill.kv_fill_project(x, torch.randn(128, 72, dtype=dtype), None, cs, cs, slots, r.order, r.count, *cache[:2])
    kv_fill.kv_fill_project(
        x, torch.randn(128, 72, dtype=dtype), torch.zeros(128, dtype=dtype), cs, cs, slots, r.order, r.count,
        *cache[:2], k_norm=torch.ones(64, dtype=dtype),
    )  # fmt: skip
    kv_fill.kv_fill_copy_below(slots, r.order, r.count, *cache)
    h, vmap = x[0], torch.arange(96)
    draft_head.draft_argmax(h, w, vmap)
    draft_head.draft_sample_topk(h, w, vmap, torch.rand(5), 8, 0.7, 30.0)
    logits = torch.randn(2, 4, 96, dtype=dtype)
    accept.greedy_accept(torch.zeros(2, 3, dtype=torch.long), logits)
    probs = logits.float().softmax(-1)
    accept.rejection_sample(torch.zeros(2, 3, dtype=torch.long), probs[:, :3], probs, torch.rand(2, 3), torch.rand(2))


_TRITON_TYPES = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
    torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.bool: "i1",
}  # fmt: skip


def _compile_all_for_sm90() -> None:
    """Record the launches of _exercise_launchers instead of running them, compile each distinct
    one for sm_90 and print what failed; exit status 1 if anything did."""
    import shutil

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    if not shutil.which("ptxas") and not (Path(triton.__file__).parent / "backends/nvidia/bin/ptxas").exists():
        print("NO-PTXAS")
        return
    launches = []
    kernels.LazyKernel.__getitem__ = lambda self, grid: lambda *a, **kw: launches.append((self.fn, a, kw))
    for dtype in (torch.float32, torch.bfloat16):
        _exercise_launchers(dtype)
    failed, done = [], set()
    for fn, args, kw in launches:
        names = list(inspect.signature(fn).parameters)
        values = dict(zip(names, args))
        signature = {}
        for name in names[: len(args)]:
            v = values[name]
            if isinstance(v, torch.Tensor):
                signature[name] = "*" + _TRITON_TYPES[v.dtype]
            else:
                signature[name] = "i1" if isinstance(v, bool) else "i32" if isinstance(v, int) else "fp32"
        signature.update({k: "constexpr" for k in kw})
        key = (fn.__name__, repr(signature), repr(sorted(kw.items())))
        if key in done:
            continue
        done.add(key)
        try:
            triton.compile(ASTSource(JITFunction(fn), signature, kw), target=GPUTarget("cuda", 90, 32))
        except Exception as e:  # report them all, not just the first
            failed.append(f"{fn.__name__} {kw}: {e}")
    print(f"compiled {len(done) - len(failed)} of {len(done)} kernel variants for sm_90")
    print("\n".join(failed))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    _compile_all_for_sm90()
