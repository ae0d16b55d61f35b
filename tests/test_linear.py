"""The small-M CPU linear kernel against F.linear, and the measured backend selection of specgate.linear."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

import specgate.linear as L
from specgate.kernels import cpu_linear


@pytest.fixture
def kernel():
    op = cpu_linear.load()
    if op is None:
        if shutil.which("c++") and shutil.which("ninja"):
            pytest.fail("the small-M kernel did not build although a C++ compiler and ninja are here")
        pytest.skip("no C++ compiler / ninja: the kernel cannot be built here")
    return op


def test_kernel_runs_on_torch_threads(kernel):
    """at::parallel_for in the extension uses torch's thread count (it ran on one thread when the
    build lacked OpenMP, at half the bandwidth of 2 cores)."""
    if not cpu_linear.OPENMP:
        pytest.skip("this platform's build has no OpenMP")
    before = torch.get_num_threads()
    try:
        for n in sorted({1, min(2, before)}):
            torch.set_num_threads(n)
            assert torch.ops.specgate.parallel_threads() == n
    finally:
        torch.set_num_threads(before)


KINDS = ("float32", "bfloat16", "int8", "int4")  # the weight types the kernels keep settings for


def spy(monkeypatch, backend: str) -> list[int]:
    """Count the calls that reach one backend."""
    calls, run = [], L.RUN[backend]
    monkeypatch.setitem(L.RUN, backend, lambda *a: calls.append(1) or run(*a))
    return calls


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 11])
@pytest.mark.parametrize("d", [83, 600])  # a scalar tail after the vectors; no tail
def test_kernel_matches_f_linear(kernel, rows, d, bias):
    torch.manual_seed(rows)
    x, w = torch.randn(rows, d), torch.randn(131, d)  # odd n: a leftover row after the row blocks
    b = torch.randn(131) if bias else None
    torch.testing.assert_close(kernel(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("d", [576, 1536, 1555, 83])  # whole vectors; a scalar leftover after them
def test_a_rows_sums_are_the_same_bits_at_any_row_count(kernel, d):
    """Each row's sums are those of F.linear, and the same bits whatever rows come with it (a verify
    pass and a decode step agree), float32 and bfloat16 weights."""
    torch.manual_seed(d)
    x, w = torch.randn(11, d), torch.randn(67, d)
    for weight in (w, w.bfloat16()):
        alone = torch.cat([kernel(x[j : j + 1], weight) for j in range(len(x))])
        torch.testing.assert_close(alone, F.linear(x, weight.float()), rtol=1e-5, atol=1e-4)
        for rows in (2, 4, 5, 8, 11):
            assert torch.equal(kernel(x[:rows], weight), alone[:rows]), rows


def test_kernel_non_contiguous_x_and_sliced_weight_rows(kernel):
    torch.manual_seed(0)
    x = torch.randn(3, 77, 2).transpose(1, 2)  # (3, 2, 77): six rows, not contiguous
    big_w, big_b = torch.randn(300, 77), torch.randn(300)
    w, b = big_w[100:233], big_b[100:233]  # a row slice of a bigger buffer, as the fused q/k/v weights
    y = kernel(x, w, b)
    assert y.shape == (3, 2, 133)
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-4)
    column_slice = big_w[:50, 10:60]  # rows not adjacent in memory (row stride 77)
    torch.testing.assert_close(kernel(x[..., :50], column_slice), F.linear(x[..., :50], column_slice))


def test_forced_smallm_falls_back_for_strided_weight_columns(kernel, fresh, monkeypatch):
    monkeypatch.setenv("SPECGATE_LINEAR", "smallm")
    calls = spy(monkeypatch, "torch")
    x, w = torch.randn(2, 40), torch.randn(40, 30).t()  # weight (30, 40) with stride(1) == 30
    torch.testing.assert_close(L.linear(x, w), F.linear(x, w))
    assert L.RUN["smallm"](x, w, None).shape == (2, 30) and not calls  # falls back inside, not by dispatch
    x20 = torch.randn(20, 40)
    torch.testing.assert_close(L.linear(x20, w), F.linear(x20, w))
    assert calls  # more than 8 rows: the forced kernel does not apply, F.linear does


def test_selection_without_kernel_or_onednn(fresh, monkeypatch):
    monkeypatch.setattr(cpu_linear, "load", lambda: None)
    x, w = torch.randn(3, 64), torch.randn(48, 64)
    y = L.linear(x, w)
    torch.testing.assert_close(y, F.linear(x, w))
    assert L.available()["smallm"] is False
    (entry,) = L.choices()["choices"].values()
    assert entry["backend"] in ("torch", "onednn") and "smallm" not in entry["us"]

    L.available.cache_clear()
    monkeypatch.setattr(L, "probe_onednn", lambda: False)
    calls = spy(monkeypatch, "torch")
    L.linear(torch.randn(3, 64), torch.randn(56, 64))  # a new shape: chosen among what is left, torch alone
    report = L.choices()["choices"][f"56x64 float32 M=3 threads={torch.get_num_threads()}"]
    assert calls and report["backend"] == "torch"


def test_forced_unavailable_backend_is_a_clear_error(fresh, monkeypatch):
    monkeypatch.setattr(cpu_linear, "load", lambda: None)
    monkeypatch.setenv("SPECGATE_LINEAR", "smallm")
    with pytest.raises(RuntimeError, match="SPECGATE_LINEAR=smallm.*did not build"):
        L.linear(torch.randn(1, 8), torch.randn(4, 8))
    monkeypatch.setenv("SPECGATE_LINEAR", "mkl")
    with pytest.raises(ValueError, match="auto, torch, onednn, smallm"):
        L.linear(torch.randn(1, 8), torch.randn(4, 8))
    monkeypatch.setattr(L, "probe_onednn", lambda: False)
    L.available.cache_clear()
    monkeypatch.setenv("SPECGATE_LINEAR", "onednn")
    with pytest.raises(RuntimeError, match="no working oneDNN"):
        L.linear(torch.randn(1, 8), torch.randn(4, 8))


@pytest.mark.parametrize("backend", ["torch", "onednn", "smallm"])
def test_forced_backend_is_used(fresh, monkeypatch, backend):
    if not L.available()[backend]:
        pytest.skip(f"{backend} is not available here")
    monkeypatch.setenv("SPECGATE_LINEAR", backend)
    calls = spy(monkeypatch, backend)
    x, w, b = torch.randn(4, 50), torch.randn(70, 50), torch.randn(70)
    torch.testing.assert_close(L.linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-4)
    assert calls == [1]


def test_autograd_takes_f_linear(fresh, monkeypatch):
    calls = [spy(monkeypatch, b) for b in L.BACKENDS]
    x = torch.randn(2, 16, requires_grad=True)
    L.linear(x, torch.randn(8, 16)).sum().backward()
    assert x.grad is not None and not any(calls)


def test_disk_cache_round_trip(fresh, monkeypatch):
    x, w = torch.randn(2, 96), torch.randn(80, 96)
    L.linear(x, w)
    name = "80x96 float32 M=2"
    saved = json.loads(L.cache_file().read_text())
    assert L.cache_file().parent == fresh and saved["choices"][name]["backend"] in L.BACKENDS

    # plant a choice on disk; a new process must use it without measuring
    saved["choices"][name] = {"backend": "torch", "us": {"torch": 1.0}}
    L.cache_file().write_text(json.dumps(saved))
    for state in (L._choice, L._report, L._disk):
        state.clear()
    monkeypatch.setattr(L, "measure", lambda *a, **k: pytest.fail("measured although the disk cache holds the choice"))
    calls = spy(monkeypatch, "torch")
    L.linear(x, w)
    assert calls == [1]
    report = L.choices()["choices"][f"{name} threads={torch.get_num_threads()}"]
    assert report["backend"] == "torch" and report["source"] == "disk"


def test_forgotten_choices_are_measured_again(fresh, monkeypatch):
    x, w = torch.randn(1, 96), torch.randn(80, 96)
    L.linear(x, w)
    assert L.cache_file().is_file() and L.choices()["choices"]
    assert L.forget_choices() == L.cache_file() and not L.cache_file().exists() and not L.choices()["choices"]
    measured = []
    real = L.measure
    monkeypatch.setattr(L, "measure", lambda *a, **k: measured.append(1) or real(*a, **k))
    L.linear(x, w)
    (entry,) = L.choices()["choices"].values()
    assert measured and entry["source"] == "measured" and L.cache_file().is_file()


def test_disk_choice_of_a_missing_backend_is_measured_again(fresh, monkeypatch):
    monkeypatch.setattr(cpu_linear, "load", lambda: None)
    L.cache_file().parent.mkdir(parents=True, exist_ok=True)
    L.cache_file().write_text(json.dumps({"choices": {"24x32 float32 M=1": {"backend": "smallm", "us": {}}}}))
    L.linear(torch.randn(1, 32), torch.randn(24, 32))
    (entry,) = L.choices()["choices"].values()
    assert entry["source"] == "measured" and entry["backend"] != "smallm"


def test_probe_threads_restores_thread_count():
    before = torch.get_num_threads()
    assert L.probe_threads(counts=(1, 2), shape=(256, 128), reps=2) in (1, 2)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("precision", ["bfloat16", "int8", "int4"])
@pytest.mark.parametrize("rows", [1, 5, 11])
@pytest.mark.parametrize("d", [100, 600, 640])  # int4: 96 (a padded half chunk), 576, 640
def test_kernel_reads_low_precision_weights(kernel, precision, rows, d):
    """bfloat16, int8 (with row scales) and int4 (with a scale and offset per 32 inputs, in blocks of 4
    rows) weights give F.linear of the weights they stand for; int8 and int4 ones of activations rounded
    to int8 too where the kernel does that (VNNI; int8 rows of a multiple of 64 inputs)."""
    from specgate.kernels.cpu_step import dequantized, int8_activations, low_precision, rounded_activations

    d, n = (d // 32 * 32, 132) if precision == "int4" else (d, 131)  # int4: groups of 32 inputs, blocks of 4 rows
    torch.manual_seed(rows)
    x, w, b = torch.randn(rows, d), torch.randn(n, d), torch.randn(n)
    x[:, 7] *= 30  # an outlier feature, as hidden states have: it costs only its own group precision
    q, extra = low_precision(w, precision)
    got = kernel(x, q, b, extra if extra.numel() else None)
    rounds = int8_activations() and (precision == "int4" or (precision == "int8" and d % 64 == 0))
    seen = rounded_activations(x, precision) if rounds else x
    torch.testing.assert_close(got, F.linear(seen, dequantized(w, precision), b), rtol=1e-5, atol=1e-4)
    if seen is not x:  # and the rounding is what it claims: within half a step of each group's scale
        assert not torch.allclose(got, F.linear(x, dequantized(w, precision), b), rtol=1e-5, atol=1e-4)
    with pytest.raises(RuntimeError, match="need a scale per row"):
        kernel(x, q, b, None if extra.numel() else torch.ones(n))
    if precision == "int4":  # a 4-bit matrix for other inputs, or cut across a block
        with pytest.raises(RuntimeError, match="4-bit weights"):
            kernel(torch.randn(rows, d + 64), q, b)
        with pytest.raises(RuntimeError, match="4-bit weights"):
            kernel(x, q[:130])


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_int8_rounding_of_zero_and_extreme_groups(kernel, precision):
    """The token rows' rounding (vectorised, 16 inputs at a time) on groups (of 4, or 8 for int4) that are all zero,
    a row that is all zero, and groups spanning 1e-30 to 1e30: the reference's codes, no NaN."""
    from specgate.kernels.cpu_step import dequantized, int8_activations, low_precision, rounded_activations

    torch.manual_seed(0)
    x, w = torch.randn(3, 128), torch.randn(40, 128)
    x[0, 4:12] = 0.0  # two whole groups
    x[1] = 0.0
    x[2, :4] = torch.tensor([1e-30, -1e30, 3.0, -0.5])
    q, extra = low_precision(w, precision)
    got = kernel(x, q, None, extra if extra.numel() else None)
    seen = rounded_activations(x, precision) if int8_activations() else x
    want = F.linear(seen.double(), dequantized(w, precision).double()).float()
    assert torch.isfinite(got).all() and (got[1] == 0).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("rows", [1, 2, 3, 5])
def test_block_rows_change_the_blocking_not_the_result(kernel, rows):
    """4 or 8 weight rows per block: the same sums (each row's in the same order, up to the final
    reduction tree's), int8 and bfloat16 weights too; anything else is refused."""
    torch.manual_seed(rows)
    x, w = torch.randn(rows, 192), torch.randn(133, 192)
    q, scale = (w / w.abs().amax(1, keepdim=True) * 127).round().to(torch.int8), w.abs().amax(1) / 127
    out = {}
    try:
        for cap in (8, 4):
            for k in KINDS:
                torch.ops.specgate.set_block_rows(cap, k)
            out[cap] = [kernel(x, w), kernel(x, w.bfloat16()), kernel(x, q, None, scale)]
    finally:
        for k in KINDS:
            torch.ops.specgate.set_block_rows(8, k)
    for a, b in zip(out[8], out[4]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)
    with pytest.raises(RuntimeError, match="8 or 4"):
        torch.ops.specgate.set_block_rows(6)


@pytest.mark.parametrize("rows", [1, 2, 5, 8])
def test_prefetch_distances_change_the_speed_not_the_result(kernel, rows):
    """Prefetching is a hint: every distance, with or without the L1 prefetch, gives the same bits for
    float32, bfloat16, int8 and int4 weights; bad settings are refused."""
    from specgate.kernels.cpu_step import low_precision

    torch.manual_seed(rows)
    x, w = torch.randn(rows, 192), torch.randn(133, 192)
    q8, s8 = low_precision(w, "int8")
    q4, _ = low_precision(w[:132], "int4")  # blocks of 4 rows
    previous = {k: torch.ops.specgate.set_prefetch(rows, 24576, 1024, k) for k in KINDS}
    out = []
    try:
        for plan in ((24576, 1024), (24576, 0), (64, 0), (4096, 256)):
            for k in KINDS:
                torch.ops.specgate.set_prefetch(rows, *plan, k)
            out.append([kernel(x, w), kernel(x, w.bfloat16()), kernel(x, q8, None, s8), kernel(x, q4)])
    finally:
        for k, plan in previous.items():
            torch.ops.specgate.set_prefetch(rows, *plan, k)
    for got in out[1:]:
        for a, b in zip(out[0], got):
            assert torch.equal(a, b)
    for bad in ((0, 24576, 0), (9, 24576, 0), (1, 0, 0), (1, 24576, -1)):
        with pytest.raises(RuntimeError, match="set_prefetch"):
            torch.ops.specgate.set_prefetch(*bad)
    with pytest.raises(RuntimeError, match="weights must be float32, bfloat16, int8 or int4"):
        torch.ops.specgate.set_prefetch(1, 24576, 0, "int3")


def test_low_precision_streaming_is_timed_once_and_kept(kernel, fresh, monkeypatch):
    """A low-precision copy's 1-row products get their own block rows and prefetch, timed once over
    the copy and kept; the float32 products' settings stay as they were."""
    from specgate import dispatch
    from specgate.adapters import read_weights
    from specgate.kernels.cpu_step import low_precision
    from conftest import tiny_hf

    monkeypatch.delenv("SPECGATE_BLOCK_ROWS", raising=False)
    monkeypatch.delenv("SPECGATE_PREFETCH", raising=False)
    weights = read_weights(tiny_hf("llama"))
    products = [low_precision(w, "int8") for lw in weights.layers for w in (lw.qkv_w, lw.o_w, lw.gate_up_w, lw.down_w)]
    float_cap, float_plan = torch.ops.specgate.set_block_rows(8), torch.ops.specgate.set_prefetch(1, 24576, 0)
    try:
        first = dispatch.low_precision_streaming(weights, "int8", products)
        entry = next(v for k, v in L.choices()["choices"].items() if k.startswith("streaming: int8"))
        assert entry["source"] == "measured" and entry["backend"] == first and len(entry["us"]) == 4
        cap = 4 if "block 4" in first else 8
        plan = next(p for label, p in dispatch.PREFETCH.items() if first.endswith(label))
        assert torch.ops.specgate.set_block_rows(8, "int8") == cap and tuple(torch.ops.specgate.set_prefetch(1, *plan, "int8")) == plan
        assert torch.ops.specgate.set_block_rows(8) == 8 and tuple(torch.ops.specgate.set_prefetch(1, 24576, 0)) == (24576, 0)
        monkeypatch.setattr(L, "measure", lambda *a, **k: pytest.fail("timed again although the disk holds the choice"))
        for state in (L._choice, L._report, L._disk):
            state.clear()
        assert dispatch.low_precision_streaming(weights, "int8", products) == first
        monkeypatch.setenv("SPECGATE_BLOCK_ROWS", "4")
        dispatch.low_precision_streaming(weights, "int8", products)
        assert torch.ops.specgate.set_block_rows(8, "int8") == 4
    finally:
        torch.ops.specgate.set_block_rows(float_cap)
        torch.ops.specgate.set_prefetch(1, *float_plan)
        torch.ops.specgate.set_block_rows(8, "int8")
        torch.ops.specgate.set_prefetch(1, 24576, 1024, "int8")


def test_prefetch_is_timed_once_per_row_count_and_kept(kernel, fresh, monkeypatch):
    from specgate import dispatch
    from specgate.adapters import read_weights
    from conftest import tiny_hf

    monkeypatch.delenv("SPECGATE_PREFETCH", raising=False)
    weights = read_weights(tiny_hf("llama"))
    previous = [torch.ops.specgate.set_prefetch(T, 24576, 1024) for T in range(1, 9)]
    try:
        first = dispatch.prefetch(weights)
        assert set(first) == set(range(1, 9)) and set(first.values()) <= set(dispatch.PREFETCH)
        entries = [v for k, v in L.choices()["choices"].items() if k.startswith("prefetch")]
        assert len(entries) == 8 and all(e["source"] == "measured" and set(e["us"]) == set(dispatch.PREFETCH) for e in entries)
        want = [dispatch.PREFETCH[first[T]] for T in range(1, 9)]
        assert [tuple(torch.ops.specgate.set_prefetch(T, *want[T - 1])) for T in range(1, 9)] == want  # what it set
        monkeypatch.setattr(L, "measure", lambda *a, **k: pytest.fail("timed again although the disk holds the choice"))
        for state in (L._choice, L._report, L._disk):
            state.clear()
        assert dispatch.prefetch(weights) == first
        monkeypatch.setenv("SPECGATE_PREFETCH", "8192:0")
        dispatch.prefetch(weights)
        assert all(tuple(torch.ops.specgate.set_prefetch(T, 24576, 1024)) == (8192, 0) for T in range(1, 9))
        monkeypatch.setenv("SPECGATE_PREFETCH", "8192")
        with pytest.raises(ValueError, match="SPECGATE_PREFETCH must be FAR:NEAR"):
            dispatch.prefetch(weights)
    finally:
        for T, plan in enumerate(previous, 1):
            torch.ops.specgate.set_prefetch(T, *plan)


def test_block_rows_are_timed_once_and_kept(kernel, fresh, monkeypatch):
    from specgate import dispatch
    from specgate.adapters import read_weights
    from conftest import tiny_hf

    weights = read_weights(tiny_hf("llama"))  # no engine: it would time the choice first
    try:
        first = dispatch.block_rows(weights)
        assert first in (8, 4)
        entry = next(v for k, v in L.choices()["choices"].items() if k.startswith("block rows"))
        assert entry["source"] == "measured" and set(entry["us"]) == {"block 8", "block 4"}
        monkeypatch.setattr(L, "measure", lambda *a, **k: pytest.fail("timed again although the disk holds the choice"))
        for state in (L._choice, L._report, L._disk):
            state.clear()
        assert dispatch.block_rows(weights) == first
        monkeypatch.setenv("SPECGATE_BLOCK_ROWS", "4")
        assert dispatch.block_rows(weights) == 4 and torch.ops.specgate.set_block_rows(8) == 4
        monkeypatch.setenv("SPECGATE_BLOCK_ROWS", "5")
        with pytest.raises(ValueError, match="SPECGATE_BLOCK_ROWS must be 8 or 4"):
            dispatch.block_rows(weights)
    finally:
        torch.ops.specgate.set_block_rows(8)
