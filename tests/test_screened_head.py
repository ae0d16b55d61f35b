"""The screened LM head: its kernel against the PyTorch reference, its bound, and greedy decoding with it."""

from __future__ import annotations

import pytest
import torch

import specgate
from conftest import FAMILIES, tiny, tiny_hf
from specgate import Engine
from specgate.kernels import cpu_linear
from specgate.kernels.screened_head import ScreenedHead

pytestmark = pytest.mark.skipif(cpu_linear.load() is None, reason="no C++ toolchain: the CPU kernels cannot be built")


def head_and_rows(V: int, d: int, rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A head (V, d) with a near tie (rows 3 and 7) and token rows (rows, d), one of them along row 3."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(V, d, generator=g) * 0.05
    w[7] = w[3] + 1e-5 * torch.randn(d, generator=g)
    x = torch.randn(rows, d, generator=g) * 2
    x[0] = w[3] * 40
    return w, x


@pytest.mark.parametrize("rows", [1, 5, 11])
@pytest.mark.parametrize("V, d", [(1823, 83), (5000, 640), (301, 64)])
def test_kernel_matches_the_reference_and_the_float32_argmax(V, d, rows):
    w, x = head_and_rows(V, d, rows)
    head = ScreenedHead(w)
    out, exact = head(x), (x.double() @ w.double().T).float()
    torch.testing.assert_close(out, head.reference(x), atol=1e-4, rtol=1e-4)
    approx, bound = head.bounds(x)
    candidate = approx + bound >= (approx - bound).amax(-1, keepdim=True)
    assert candidate.sum(-1).max() < V // 4  # screening, not a whole float32 head
    torch.testing.assert_close(out[candidate], exact[candidate], atol=1e-4, rtol=1e-5)  # recomputed in float32
    assert torch.equal(out.argmax(-1), exact.argmax(-1))


@pytest.mark.parametrize("V, d", [(1823, 83), (4096, 640)])
def test_every_int8_logit_is_within_its_bound(V, d):
    """The int8 product's logits, as the kernel rounds weights and (on VNNI CPUs) activations, are within
    the stated bound of the exact dot products, also for rows far larger than the rest."""
    w, x = head_and_rows(V, d, 6, seed=1)
    w[11] *= 30  # an outlier row: its own scale
    x[1, :4] = 50.0  # an outlier feature: its group's rounding step
    head = ScreenedHead(w)
    approx, bound = head.bounds(x)
    q, scale = head.int8
    kernel = torch.ops.specgate.small_linear(x, q, None, scale)
    torch.testing.assert_close(kernel, approx, atol=1e-3, rtol=1e-4)  # the reference rounds as the kernel does
    exact = x.double() @ w.double().T
    assert bool(((kernel.double() - exact).abs() <= bound.double()).all())
    assert float(bound.mean()) < float(exact.std())  # and the bound is far tighter than the logits' spread


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("rank", [2, 50, 400])
def test_rank_k_gives_the_float32_heads_k_largest(rank, rows):
    """rank=k (top-k sampling): the k largest logits of each row are the float32 head's tokens and
    values, also where two rows nearly tie at the k-th; rank past the vocabulary recomputes it all."""
    V, d = 5000, 640
    w, x = head_and_rows(V, d, rows, seed=2)
    exact = (x.double() @ w.double().T).float()
    kth = exact[0].topk(rank).indices[-1]
    w[kth + 1 if kth + 1 < V else kth - 1] = w[kth] + 1e-6 * torch.randn(d, generator=torch.Generator().manual_seed(5))  # a near tie at the k-th
    exact = (x.double() @ w.double().T).float()
    head = ScreenedHead(w, max_exact=V // 2)
    out = head(x, rank)
    torch.testing.assert_close(out, head.reference(x, rank), atol=1e-4, rtol=1e-4)
    top = exact.topk(rank, -1)
    torch.testing.assert_close(out.gather(-1, top.indices), top.values, atol=1e-4, rtol=1e-5)  # recomputed in float32
    near = (exact - top.values[:, -1:]).abs() < 1e-3  # which of a near tie at the k-th is in is float rounding's choice
    ours = torch.zeros_like(near).scatter(-1, out.topk(rank, -1).indices, True)
    theirs = torch.zeros_like(near).scatter(-1, top.indices, True)
    assert torch.equal(ours & ~near, theirs & ~near)
    approx, bound = head.bounds(x)
    candidate = approx + bound >= (approx - bound).topk(rank, -1).values[:, -1:]
    assert candidate.sum(-1).max() < V // 2  # screening, not a whole float32 head
    torch.testing.assert_close(out[~candidate], approx[~candidate], atol=1e-3, rtol=1e-4)  # the rest from int8
    everything = head(x, V + 1)
    torch.testing.assert_close(everything, exact, atol=1e-4, rtol=1e-5)


def test_too_many_candidates_take_the_float32_head():
    w, x = head_and_rows(777, 83, 3)
    out = ScreenedHead(w, max_exact=0)(x)
    for m in range(3):  # the float32 kernel's own row, bit for bit
        assert torch.equal(out[m], torch.ops.specgate.small_linear(x[m : m + 1], w, None, None)[0])


def screened(m: specgate.SpecGateModel) -> specgate.SpecGateModel:
    m.engine.screened = ScreenedHead(m.engine.weights.lm_head)
    return m


@pytest.mark.parametrize("family", FAMILIES)
@torch.inference_mode()
def test_greedy_decoding_with_the_screened_head_is_unchanged(family):
    """Plain and speculative greedy decoding give the same tokens with the screened head as with the
    float32 head; scores kept for the caller are the float32 head's (the screened head is not used)."""
    m = tiny(family)
    ids = torch.randint(3, 101, (2, 6), generator=torch.Generator().manual_seed(3))
    m.engine.screened = None
    plain = m.generate(ids, max_new_tokens=20)
    scores = m.generate(ids, max_new_tokens=8, output_scores=True, return_dict_in_generate=True).scores
    screened(m)
    assert torch.equal(m.generate(ids, max_new_tokens=20), plain)
    spec = specgate.SpecConfig(draft_budget=0.0, draft_precision="int8")
    assert torch.equal(m.generate(ids[:1], max_new_tokens=20, speculative=True, spec_config=spec), plain[:1])
    again = m.generate(ids, max_new_tokens=8, output_scores=True, return_dict_in_generate=True).scores
    assert all(torch.equal(a, b) for a, b in zip(scores, again))


@pytest.mark.parametrize("family", FAMILIES)
@torch.inference_mode()
def test_top_k_sampling_with_the_screened_head_draws_the_same_tokens(family):
    """Sampling with top-k reads only each row's k largest logits: with the screened head at rank k
    they are the float32 head's, so a seeded run draws the same tokens, plain and speculative
    (to float rounding, which no seed here meets); without top-k, or with a k past max_exact / 16
    (here 64 / 16), the float32 head is used."""
    m = tiny(family)
    ids = torch.randint(3, 101, (2, 6), generator=torch.Generator().manual_seed(3))
    spec = specgate.SpecConfig(draft_budget=0.0, draft_precision="int8")
    runs = {}
    for head in ("float32", "screened"):
        m.engine.screened = None if head == "float32" else ScreenedHead(m.engine.weights.lm_head)
        draw = lambda **kw: m.generate(ids[:1] if kw else ids, max_new_tokens=20, do_sample=True, top_k=4, temperature=1.5,  # noqa: E731
                                       generator=torch.Generator().manual_seed(0), **kw)  # fmt: skip
        runs[head] = draw(), draw(speculative=True, spec_config=spec)
    assert torch.equal(runs["float32"][0], runs["screened"][0]) and torch.equal(runs["float32"][1], runs["screened"][1])
    calls = []

    class Spy(ScreenedHead):
        def __call__(self, x, rank=1):
            calls.append(rank)
            return super().__call__(x, rank)

    m.engine.screened = Spy(m.engine.weights.lm_head)
    m.generate(ids, max_new_tokens=3, do_sample=True, top_k=4)
    assert calls and set(calls) == {4}
    for flags in (dict(top_k=5), dict(top_k=0, top_p=0.9)):
        calls.clear()
        m.generate(ids, max_new_tokens=3, do_sample=True, **flags)
        assert not calls


@torch.inference_mode()
def test_the_engine_screens_only_greedy_steps():
    """forward(exact_logits=False) gives the screened head's logits: the argmax of the float32 head's,
    and its values wherever they could be the maximum."""
    m = screened(tiny("llama"))
    ids = torch.randint(3, 101, (1, 9), generator=torch.Generator().manual_seed(4))
    c1, c2 = m.engine.new_cache(1, 9), m.engine.new_cache(1, 9)
    exact = m.engine(ids, c1)
    greedy = m.engine(ids, c2, exact_logits=False)
    assert torch.equal(greedy.argmax(-1), exact.argmax(-1))
    top = exact.argmax(-1, keepdim=True)
    torch.testing.assert_close(greedy.gather(-1, top), exact.gather(-1, top), atol=1e-5, rtol=1e-5)
    assert not torch.equal(greedy, exact)  # the rest comes from the int8 copy


@pytest.mark.parametrize("precision", ["bfloat16", "int8", "int4"])
@torch.inference_mode()
def test_a_greedy_low_precision_draft_takes_the_float32_heads_token(precision):
    """A draft pass over a low-precision copy reads its LM head in that precision (int8 under int4)
    where it needs the logits (sampling); a greedy one screens the float32 head: the argmax of the
    float32 head on the draft's own hidden states."""
    from specgate.layers import head

    m = screened(tiny("llama"))
    e = m.engine
    ids = torch.randint(3, 101, (1, 9), generator=torch.Generator().manual_seed(6))
    h = e.hidden(ids, e.new_cache(1, 9), precision=precision)
    full = head(e.weights, h)
    low = e(ids, e.new_cache(1, 9), precision=precision)
    greedy = e(ids, e.new_cache(1, 9), precision=precision, exact_logits=False)
    assert torch.equal(greedy.argmax(-1), full.argmax(-1))
    top = full.argmax(-1, keepdim=True)
    torch.testing.assert_close(greedy.gather(-1, top), full.gather(-1, top), atol=1e-5, rtol=1e-5)
    assert not torch.equal(low, full)  # the copy's own head


def test_which_engines_have_a_screened_head(fresh, monkeypatch):
    """kernels='auto' times the screened head against the float32 head once per machine and head shape
    (kept on disk, as the products' choices); the PyTorch path, SPECGATE_SCREENED_HEAD=0 and a forced
    BLAS backend have none; a forced small-M backend has one without timing. An int8 draft shares its copy."""
    import specgate.linear as L

    engine = Engine(tiny_hf("llama"))
    ((name, entry),) = [(k, v) for k, v in L.choices()["choices"].items() if k.startswith("screened head")]
    assert entry["source"] == "measured" and set(entry["us"]) == {"screened", "float32"}
    assert (engine.screened is not None) == (entry["backend"] == "screened")
    assert Engine(tiny_hf("llama"), kernels="torch").screened is None
    monkeypatch.setenv("SPECGATE_SCREENED_HEAD", "0")
    assert Engine(tiny_hf("llama")).screened is None
    monkeypatch.delenv("SPECGATE_SCREENED_HEAD")
    monkeypatch.setenv("SPECGATE_LINEAR", "torch")
    assert Engine(tiny_hf("llama")).screened is None
    monkeypatch.setenv("SPECGATE_LINEAR", "smallm")
    with monkeypatch.context() as m:
        m.setattr(L, "measure", lambda *a, **k: pytest.fail("timed although a backend is forced"))
        engine = Engine(tiny_hf("llama"))
    assert engine.screened is not None
    assert engine.low_precision_step("int8").head[0] is engine.screened.int8[0]  # (its streaming settings are timed)
