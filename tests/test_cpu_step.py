"""The fused CPU pass (kernels/cpu_step.cpp) against the engine's PyTorch path: the same logits, the
same K/V in the cache and the same skips, on every supported family."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import specgate
from specgate import SkipCounter
from specgate.engine import Engine
from specgate.kernels import cpu_linear
from specgate.kernels.cpu_step import CpuStep, dequantized, head_precision, int8_activations, low_precision, rounded_activations
from specgate.policy import BudgetPolicy

from conftest import FAMILIES, scalar_gates, tiny, tiny_hf

pytestmark = pytest.mark.skipif(cpu_linear.load() is None, reason="the CPU kernels cannot be built here")


def engines(family: str):
    """The fused engine and the PyTorch one over the same weights."""
    model = tiny_hf(family)
    fused, ref = Engine(model, kernels="cpu"), Engine(model, kernels="torch")
    assert fused.cpu_step is not None and ref.cpu_step is None
    return fused, ref


def prefilled(engine: Engine, ids: torch.Tensor, room: int = 12):
    cache = engine.new_cache(1, ids.shape[1] + room)
    engine(ids, cache)
    return cache


def assert_caches_close(a, b, upto: int) -> None:
    for ka, kb, va, vb in zip(a.k, b.k, a.v, b.v):
        torch.testing.assert_close(ka[:, :, :upto], kb[:, :, :upto], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(va[:, :, :upto], vb[:, :, :upto], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prompt", [9, 150])
@torch.inference_mode()
def test_plain_and_verify_passes_equal_the_pytorch_path(family, prompt):
    """1, 3, 8 and 12 new tokens after a prompt longer than Gemma's sliding window (5 here); 12
    tokens take two passes over the weights, and their queries several chunks per K/V head."""
    fused, ref = engines(family)
    ids = torch.randint(3, 101, (1, prompt), generator=torch.Generator().manual_seed(1))
    caches = [prefilled(e, ids, room=24) for e in (fused, ref)]
    for T in (1, 3, 8, 12):
        new = torch.randint(3, 101, (1, T), generator=torch.Generator().manual_seed(T))
        a, b = (e(new, c) for e, c in zip((fused, ref), caches))
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        assert torch.equal(a.argmax(-1), b.argmax(-1))
    assert caches[0].host_lengths == caches[1].host_lengths == [prompt + 24]
    assert_caches_close(*caches, upto=prompt + 24)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("rank", [0, 3])
@pytest.mark.parametrize("kv_fill", ["project", "copy_below"])
@torch.inference_mode()
def test_draft_steps_skip_as_the_pytorch_path(family, rank, kv_fill):
    """Single-token draft steps with scalar gates, calibrated thresholds, stand-ins, adapters and a
    branch that never skips: the same skips and counts, logits and cache."""
    m = tiny(family)
    gates, thresholds = scalar_gates(m, rank)
    policy = BudgetPolicy(budget=0.5, thresholds=thresholds, never_skip=frozenset({(1, 1)}))
    fused, ref = Engine(m.hf_model, kernels="cpu"), Engine(m.hf_model, kernels="torch")
    ids = torch.randint(3, 101, (1, 14), generator=torch.Generator().manual_seed(2))
    results = []
    for e in (fused, ref):
        cache, counter = prefilled(e, ids[:, :7]), SkipCounter()
        steps = [e(ids[:, t : t + 1], cache, gates, policy, kv_fill=kv_fill, counter=counter) for t in range(7, 14)]
        results.append((torch.cat(steps, 1), cache, (counter.total, counter.skipped, round(counter.compute_skipped, 9))))
    (a, ca, na), (b, cb, nb) = results
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert na == nb and 0 < na[1] < na[0]
    assert_caches_close(ca, cb, upto=14)


@torch.inference_mode()
def test_a_budget_0_policy_with_thresholds_uses_no_adapters():
    """Adapters belong to passes that may skip as a draft: a policy at budget 0 gets none on the
    fused pass, as on the PyTorch path, even with thresholds that skip."""
    m = tiny("llama")
    gates, thresholds = scalar_gates(m, rank=2)
    policy = BudgetPolicy(budget=0.0, thresholds=thresholds)
    fused, ref = Engine(m.hf_model, kernels="cpu"), Engine(m.hf_model, kernels="torch")
    ids = torch.randint(3, 101, (1, 8), generator=torch.Generator().manual_seed(6))
    a, b = ((e(ids[:, 7:], prefilled(e, ids[:, :7]), gates, policy)) for e in (fused, ref))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_passes_it_does_not_cover_take_the_pytorch_path(monkeypatch):
    """More than 16 token rows, multi-token skipping, draft steps of a batch, low-rank gates and
    autograd are the PyTorch path's; the fused pass is never called for them."""
    m = tiny("llama", gates=True)
    fused = Engine(m.hf_model, kernels="cpu")
    calls = []
    monkeypatch.setattr(fused.cpu_step, "hidden", lambda *a, **k: calls.append(1))
    ids = torch.randint(3, 101, (2, 17), generator=torch.Generator().manual_seed(3))
    fused(ids, fused.new_cache(2, 17))  # 34 rows
    batch = fused.new_cache(2, 20)
    fused(ids[:, :1], batch, m.gates, BudgetPolicy(0.5, torch.zeros(2, 4)))  # a batch's draft step
    cache = fused.new_cache(1, 30)
    fused(ids[:1], cache)  # 17 tokens
    fused(ids[:1, :2], cache, m.gates, BudgetPolicy(budget=0.5))  # a multi-token skipping pass
    fused(ids[:1, :1], cache, m.gates, m.gates.policy(0.5) if m.gates.thresholds else BudgetPolicy(0.5, torch.zeros(2, 4)))  # low-rank gates
    assert calls == []
    fused(ids[:1, :1], cache)
    assert calls == [1]
    with torch.enable_grad():
        assert not CpuStep.applies(ids[:1, :1], cache, None, None)
    assert CpuStep.applies(ids[:, :8], batch, None, None) and not CpuStep.applies(ids[:, :9], batch, None, None)


def test_kernels_cpu_is_refused_where_it_cannot_run():
    model = tiny_hf("llama").to(torch.bfloat16)
    with pytest.raises(ValueError, match="float32.*kernels='torch'"):
        Engine(model, kernels="cpu")
    assert Engine(model, kernels="auto").cpu_step is None  # auto falls back to the PyTorch path
    with pytest.raises(ValueError, match="kernels='cpu' runs CPU tensors"):
        specgate.dispatch.resolve("cpu", "cuda")


def quantized_copy(family: str, precision: str) -> torch.nn.Module:
    """The tiny model with its weight matrices and LM head rounded as a low-precision draft reads them."""
    model = tiny_hf(family)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name and "lm_head" not in name:
                p.copy_(dequantized(p, precision))
        head = dequantized(model.lm_head.weight, head_precision(precision))
        model.lm_head.weight = torch.nn.Parameter(head)  # untied: the embedding stays
    return model


def test_low_precision_rounds_each_matrix():
    w = torch.randn(7, 13) * torch.logspace(-3, 1, 7)[:, None]  # rows of very different sizes
    q, scale = low_precision(w, "int8")
    assert q.dtype == torch.int8 and scale.shape == (7,)
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all()
    assert q.abs().amax(1).eq(127).all()  # each row uses the whole range
    b, none = low_precision(w, "bfloat16")
    assert torch.equal(b, w.to(torch.bfloat16)) and none.numel() == 0


def test_int4_keeps_each_group_within_half_a_step_and_q4_1_weights_exactly():
    """int4: 4-bit codes per group of 32 inputs with the group's own scale and offset, so a group of
    tiny weights beside one of large weights keeps its precision; weights that are already 4-bit
    affine per group (dequantized from GGUF's Q4_1, like the SmolLM2 file) come back to float32 rounding."""
    w = torch.randn(8, 96) * torch.tensor([1e-3, 1.0, 30.0]).repeat_interleave(32)
    q, none = low_precision(w, "int4")
    # blocks of 4 rows, chunks of 64 inputs (the last half one padded) of 40 bytes a row; no scale beside
    assert q.dtype == torch.uint8 and q.shape == (8, 80) and none.numel() == 0
    g = w.reshape(8, 3, 32)
    offset = g.amin(-1).half().float()
    step = ((g.amax(-1) - offset) / 15).half().float()
    step, offset = step.repeat_interleave(32, -1), offset.repeat_interleave(32, -1)
    # a float16 offset is off the group's minimum by up to half its float16 spacing, 2^-11 of it
    assert ((dequantized(w, "int4") - w).abs() <= step / 2 * 1.0001 + offset.abs() * 2**-11 + 1e-7).all()
    scale, offset = torch.rand(8, 3, 1).half().float(), torch.randn(8, 3, 1).half().float()
    codes = torch.randint(0, 16, (8, 3, 32)).float()
    codes[..., 0], codes[..., 1] = 0, 15  # each group spans its range, as Q4_1 quantizing makes it
    q4_1 = (codes * scale + offset).reshape(8, 96)
    torch.testing.assert_close(dequantized(q4_1, "int4"), q4_1, rtol=0, atol=1e-6)
    for bad in ((4, 40), (6, 64)):  # inputs not in groups of 32, rows not in blocks of 4
        with pytest.raises(ValueError, match="multiple of 32 inputs and of 4 rows.*draft_precision='int8'"):
            low_precision(torch.randn(*bad), "int4")


@pytest.mark.parametrize("precision", ["bfloat16", "int8", "int4"])
@pytest.mark.parametrize("family", ["llama", "gemma3"])
@torch.inference_mode()
def test_low_precision_passes_equal_the_rounded_model(family, precision, monkeypatch):
    """The fused pass over a bfloat16 / int8 copy computes what the PyTorch path computes with the
    rounded weights, plain and as a draft step; the float32 pass is untouched by the copy."""
    m = tiny(family)
    gates, thresholds = scalar_gates(m, rank=0)
    policy = BudgetPolicy(budget=0.5, thresholds=thresholds)
    fused, rounded = Engine(m.hf_model, kernels="cpu"), Engine(quantized_copy(family, precision), kernels="torch")
    tol = 1e-4
    if precision in ("int8", "int4") and int8_activations():  # the reference rounds activations as the kernels do
        product = specgate.layers.linear

        def seen(x, w):  # int8 rows of a multiple of 64 inputs, int4 ones always (padded to whole chunks)
            return rounded_activations(x, precision) if x.shape[-1] % 64 == 0 or precision == "int4" else x

        monkeypatch.setattr(specgate.layers, "linear", lambda x, w, b=None: product(seen(x, w), w, b))
        # float32 rounding differences between the paths move an activation across a rounding boundary
        # now and then: one int8 step of one input, ~1e-3 here (the kernel itself is checked to 1e-4)
        tol = 1e-2
    ids = torch.randint(3, 101, (1, 10), generator=torch.Generator().manual_seed(4))
    got = []
    for e, precision_arg in ((fused, precision), (rounded, "float32")):
        cache = e.new_cache(1, 10)
        e(ids[:, :6], cache, precision=precision_arg)  # the same K/V history: from the rounded weights
        plain = e(ids[:, 6:8], cache, precision=precision_arg)
        draft = e(ids[:, 8:9], cache, gates, policy, precision=precision_arg)
        got.append((plain, draft))
    for a, b in zip(*got):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    monkeypatch.undo()
    full = Engine(m.hf_model, kernels="torch")
    c1, c2 = prefilled(fused, ids[:, :6]), prefilled(full, ids[:, :6])
    torch.testing.assert_close(fused(ids[:, 6:8], c1), full(ids[:, 6:8], c2), atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_low_precision_drafts_stay_lossless():
    """Greedy speculation with a bfloat16, int8 or int4 draft gives plain decoding's tokens."""
    m = tiny("llama")
    m.gates, thresholds = scalar_gates(m, rank=0)
    m.gates.thresholds[0.3] = thresholds
    ids = torch.randint(3, 101, (1, 6), generator=torch.Generator().manual_seed(5))
    plain = m.generate(ids, max_new_tokens=24)
    for precision in ("bfloat16", "int8", "int4"):
        spec = specgate.SpecConfig(draft_budget=0.3, draft_precision=precision)
        out = m.generate(ids, max_new_tokens=24, speculative=True, spec_config=spec, return_dict_in_generate=True)
        assert torch.equal(out.sequences, plain), precision
        assert out.spec_stats.drafted > 0
        # sampling: the draft's probabilities come from the low-precision pass, rejection sampling corrects them
        sample = lambda seed: m.generate(ids, max_new_tokens=24, speculative=True, spec_config=spec, do_sample=True,  # noqa: E731
                                         generator=torch.Generator().manual_seed(seed))  # fmt: skip
        assert torch.equal(sample(0), sample(0)) and torch.equal(sample(0)[:, : ids.shape[1]], ids)


def test_low_precision_outside_the_fused_pass_is_refused():
    m = tiny("llama")
    torch_engine = Engine(m.hf_model, kernels="torch")
    ids = torch.randint(3, 101, (1, 4))
    with pytest.raises(ValueError, match="fused CPU pass"):
        torch_engine(ids, torch_engine.new_cache(1, 4), precision="int8")
    with pytest.raises(ValueError, match="draft_precision must be one of"):
        specgate.SpecConfig(draft_precision="fp8")


@torch.inference_mode()
def test_a_low_precision_draft_needs_no_gates():
    """Without gates a budget-0 draft over the int8 copy still speculates, losslessly; a skipping
    draft without gates is refused with what to do."""
    m = tiny("llama")
    assert m.gates is None
    ids = torch.randint(3, 101, (1, 6), generator=torch.Generator().manual_seed(6))
    spec = specgate.SpecConfig(draft_budget=0.0, draft_precision="int8")
    out = m.generate(ids, max_new_tokens=16, speculative=True, spec_config=spec, return_dict_in_generate=True)
    assert torch.equal(out.sequences, m.generate(ids, max_new_tokens=16)) and out.spec_stats.drafted > 0
    with pytest.raises(ValueError, match="needs gates.*draft_budget=0, draft_precision='int8'"):
        m.generate(ids, max_new_tokens=4, speculative=True, draft_budget=0.3)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 vector units")
@pytest.mark.skipif(bool(os.environ.get("SPECGATE_CPU_CFLAGS")), reason="this run already narrowed the build")
@pytest.mark.parametrize("flags", ["-mno-avx512f", "-mno-avx512f -mno-avx2 -mno-fma"], ids=["avx2", "scalar"])
def test_the_kernels_pass_with_narrower_vector_units(flags):
    """The kernels' AVX2 and scalar code, built by switching the wider units off, passes this file's
    tests, the small-M kernel's and the screened head's: machines differ (AVX-512 on some, AVX2 only on others)."""
    tests = Path(__file__).parent
    out = subprocess.run(
        [sys.executable, "-P", "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(Path(__file__)),
         f"{tests / 'test_linear.py'}::test_kernel_matches_f_linear", f"{tests / 'test_linear.py'}::test_kernel_reads_low_precision_weights",
         f"{tests / 'test_screened_head.py'}::test_kernel_matches_the_reference_and_the_float32_argmax",
         f"{tests / 'test_screened_head.py'}::test_every_int8_logit_is_within_its_bound"],
        env={**os.environ, "SPECGATE_CPU_CFLAGS": flags}, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


@pytest.mark.parametrize("family", FAMILIES)
@torch.inference_mode()
def test_left_padded_batches_equal_the_pytorch_path(family):
    """Three sequences with different left padding (prefilled by the PyTorch path), then passes of
    1 and 4 tokens each: the same logits and cache as the PyTorch path."""
    from conftest import left_padded

    fused, ref = engines(family)
    ids, mask = left_padded(torch.randint(3, 101, (3, 7), generator=torch.Generator().manual_seed(7)), [0, 2, 5])
    caches = []
    for e in (fused, ref):
        cache = e.new_cache(3, 7 + 5)
        cache.reset((mask == 0).sum(1))
        e(ids, cache)
        caches.append(cache)
    for T in (1, 4):
        new = torch.randint(3, 101, (3, T), generator=torch.Generator().manual_seed(T))
        a, b = (e(new, c) for e, c in zip((fused, ref), caches))
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert_caches_close(*caches, upto=12)


@torch.inference_mode()
def test_a_batch_speculates_with_an_int8_draft():
    from conftest import left_padded

    m = tiny("gemma3")
    ids, mask = left_padded(torch.randint(3, 101, (3, 6), generator=torch.Generator().manual_seed(8)), [0, 1, 3])
    plain = m.generate(ids, attention_mask=mask, max_new_tokens=12)
    spec = specgate.SpecConfig(draft_budget=0.0, draft_precision="int8", max_draft=3)
    out = m.generate(ids, attention_mask=mask, max_new_tokens=12, speculative=True, spec_config=spec, return_dict_in_generate=True)
    assert torch.equal(out.sequences, plain) and out.spec_stats.drafted > 0


def test_auto_with_a_forced_product_backend_decides_without_timing(monkeypatch):
    """A forced product backend decides without timing: BLAS forced keeps the PyTorch path (the
    fused pass runs the small-M kernel only); low-precision drafts still get the fused pass."""
    monkeypatch.setenv("SPECGATE_LINEAR", "torch")
    engine = Engine(tiny_hf("llama"))
    assert engine.cpu_step is None and engine.low_precision_step("int8") is not None
    monkeypatch.setenv("SPECGATE_LINEAR", "smallm")
    assert Engine(tiny_hf("llama")).cpu_step is not None


@pytest.mark.skipif(cpu_linear.load() is None, reason="no C++ toolchain: the fused pass cannot be built")
def test_auto_times_the_fused_pass_against_the_pytorch_path_once_per_machine(fresh, monkeypatch):
    """kernels='auto' times whole passes of both paths (on an Intel Xeon BLAS won the one-row
    products, yet the fused pass was 1.5x faster per step), keeps the winner on disk, and a later
    engine follows the disk without timing; an entry naming the other path is followed too."""
    import specgate.linear as L

    engine = Engine(tiny_hf("llama"))
    ((name, entry),) = [(k, v) for k, v in L.choices()["choices"].items() if k.startswith("fused pass")]
    assert entry["source"] == "measured" and set(entry["us"]) == {"fused", "torch"}
    assert (engine.cpu_step is not None) == (entry["backend"] == "fused")
    saved = json.loads(L.cache_file().read_text())["choices"]
    key = name.removesuffix(f" threads={torch.get_num_threads()}")
    assert saved[key]["backend"] == entry["backend"]

    monkeypatch.setattr(L, "measure", lambda *a, **k: pytest.fail("timed although the disk holds the choice"))
    for backend in ("torch", "fused"):
        saved[key] = {"backend": backend, "us": {}}
        L.cache_file().write_text(json.dumps({"choices": saved}))
        L._disk.clear()
        assert (Engine(tiny_hf("llama")).cpu_step is not None) == (backend == "fused")
