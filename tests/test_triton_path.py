"""``kernels="triton"``: the engine's Triton path against its PyTorch path, on the CPU.

The kernels run in Triton's interpreter, which needs TRITON_INTERPRET=1 set before torch is
imported (torch imports Triton; see tests/test_kernels.py). A plain pytest session has imported
torch already, so the interpreter tests skip here and ``test_triton_path_in_interpreter`` runs this
file again in a subprocess with the variable set. The integration test (the real SmolLM2) runs its
own subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="the Triton path needs the triton package (pip install triton)")

import specgate  # noqa: E402
from specgate import dispatch, kernels  # noqa: E402
from specgate.engine import SkipCounter  # noqa: E402
from specgate.policy import BudgetPolicy  # noqa: E402
from specgate.speculative import SpecConfig  # noqa: E402

from conftest import tiny  # noqa: E402

INTERPRETED = kernels.triton_available("cpu")
needs_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="Triton was imported without TRITON_INTERPRET=1: run by test_triton_path_in_interpreter"
)
FAMILIES = ["llama", "gemma3"]


def _interpreted_env() -> dict:
    return {**os.environ, "TRITON_INTERPRET": "1"}


@pytest.mark.skipif(INTERPRETED, reason="this session runs the interpreter tests themselves")
def test_triton_path_in_interpreter():
    """This file's tests in a fresh process with TRITON_INTERPRET=1 set before torch is imported."""
    here = Path(__file__)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not integration", str(here)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_interpreted_env(), cwd=here.parent.parent)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "failed" not in out.stdout, out.stdout[-3000:]


# -- choosing the path ----------------------------------------------------------------------------


def test_bogus_kernels_is_refused():
    with pytest.raises(ValueError, match="kernels must be one of"):
        specgate.load("no-such-model", kernels="bogus")
    with pytest.raises(ValueError, match="kernels must be one of"):
        dispatch.resolve("cuda", "cpu")


@pytest.mark.skipif(INTERPRETED, reason="the interpreter is on in this process")
def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    # refused before the model loads (the name does not even exist)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1.*kernels='torch'"):
        specgate.load("no-such-model", kernels="triton")


def test_auto_on_cpu_picks_torch():
    assert dispatch.resolve("auto", "cpu") == "torch"
    assert specgate.SpecGateModel(tiny().hf_model, kernels="auto").engine.kernels is None
    assert tiny().engine.kernels is None  # the default


# -- the Triton path against the PyTorch path (interpreter) ---------------------------------------


def _model(family: str):
    m = tiny(family, gates=True)
    m.gates.thresholds[0.5] = torch.full((2, m.engine.num_layers), 0.5)
    return m


def _use(m, name: str):
    """Switch the engine of m to the PyTorch (``torch``) or the Triton path."""
    m.engine.kernels = dispatch.make(name, m.engine.weights)
    return m


@needs_interpreter
@pytest.mark.parametrize("family", FAMILIES)
def test_same_greedy_tokens(family):
    m = _model(family)
    ids = torch.tensor([[5, 17, 33, 8, 71, 12]])
    spec = dict(speculative=True, spec_config=SpecConfig(draft_budget=0.5, max_draft=3), return_dict_in_generate=True)
    out = {}
    for name in ("torch", "triton"):
        _use(m, name)
        assert (m.engine.kernels is None) == (name == "torch")
        with torch.no_grad():
            plain = m.generate(ids, max_new_tokens=8)
            s = m.generate(ids, max_new_tokens=8, **spec)
        out[name] = plain, s.sequences, s.spec_stats
    assert torch.equal(out["torch"][0], out["triton"][0])
    assert torch.equal(out["torch"][1], out["triton"][1])
    assert torch.equal(out["triton"][1], out["triton"][0])  # lossless
    for name in out:  # the drafts really skip, and both paths count the same skips
        assert out[name][2].skip_fraction > 0.1
    assert out["torch"][2].skip_fraction == pytest.approx(out["triton"][2].skip_fraction)
    assert out["torch"][2].accepted == out["triton"][2].accepted


def _passes(m, name, kv_fill, policy, steps):
    """Run ``steps`` (list of (ids, gated)) on a fresh cache; logits of each, the cache, the counter."""
    _use(m, name)
    cache = m.engine.new_cache(2, 32)
    counter = SkipCounter()
    logits = []
    with torch.inference_mode():
        for ids, gated in steps:
            args = (m.gates, policy) if gated else ()
            logits.append(m.engine(ids, cache, *args, kv_fill=kv_fill, counter=counter))
    return logits, cache, counter


@needs_interpreter
@pytest.mark.parametrize("kv_fill", ["project", "copy_below"])
@pytest.mark.parametrize("family", FAMILIES)
def test_draft_step_and_skipping_pass_logits(family, kv_fill):
    """A multi-token skipping pass (budget ranking), then two single-token draft steps (thresholds),
    batch of 2: logits, every cache entry and the skip counts agree."""
    m = _model(family)
    policy = m.gates.policy(0.5)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, 101, (2, 7), generator=g)
    steps = [(prompt, True), (torch.randint(3, 101, (2, 1), generator=g), True), (torch.randint(3, 101, (2, 1), generator=g), True)]
    ref_logits, ref_cache, ref_counter = _passes(m, "torch", kv_fill, policy, steps)
    tri_logits, tri_cache, tri_counter = _passes(m, "triton", kv_fill, policy, steps)
    for a, b in zip(ref_logits, tri_logits):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    for a, b in zip(ref_cache.k + ref_cache.v, tri_cache.k + tri_cache.v):
        torch.testing.assert_close(b[:, :, :9], a[:, :, :9], atol=1e-4, rtol=1e-4)
    assert ref_counter.skipped > 0 and tri_counter.skipped == ref_counter.skipped
    assert tri_counter.total == ref_counter.total
    assert tri_counter.compute_skipped == pytest.approx(ref_counter.compute_skipped)


@needs_interpreter
def test_custom_policy_and_scale_free_gates_use_torch_path():
    """A SkipPolicy that is not a BudgetPolicy runs the PyTorch code; gates that do not scale the
    branches (scale_output=False) take the Triton path and match."""

    class EveryOther:
        def may_skip(self, layer, branch, T):
            return True

        def active(self, importance, valid, layer, branch):
            return torch.arange(importance.shape[1])[None].expand_as(importance) % 2 == 0

    m = _model("llama")
    ids = torch.randint(3, 101, (2, 5), generator=torch.Generator().manual_seed(4))
    steps = [(ids, True)]
    a, _, _ = _passes(m, "torch", "project", EveryOther(), steps)
    b, _, _ = _passes(m, "triton", "project", EveryOther(), steps)
    assert torch.equal(a[0], b[0])  # the same code ran
    m.gates.config = type(m.gates.config)(**{**m.gates.config.__dict__, "scale_output": False})
    policy = BudgetPolicy(0.5, m.gates.thresholds[0.5])
    steps = [(ids, True), (ids[:, :1], True)]
    a, _, _ = _passes(m, "torch", "project", policy, steps)
    b, _, _ = _passes(m, "triton", "project", policy, steps)
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, atol=1e-4, rtol=1e-4)


@needs_interpreter
def test_speculative_sampling_is_reproducible():
    """Rejection sampling on the device draws its uniforms from the caller's generator."""
    m = _use(_model("llama"), "triton")
    ids = torch.tensor([[5, 17, 33, 8]])
    kw = dict(max_new_tokens=8, do_sample=True, speculative=True, spec_config=SpecConfig(draft_budget=0.5))
    with torch.no_grad():
        a = m.generate(ids, generator=torch.Generator().manual_seed(7), **kw)
        b = m.generate(ids, generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(a, b) and a.shape == (1, 12)


# -- the real model (integration) -----------------------------------------------------------------

_REAL = """
import time, torch, specgate
from specgate.speculative import SpecConfig
t0 = time.time()
tri = specgate.load("smollm2-135m-instruct", kernels="triton")
assert tri.engine.kernels is not None
ref = specgate.load("smollm2-135m-instruct", kernels="torch")
ids = tri.encode_chat("What is the capital of France?")
spec = dict(speculative=True, spec_config=SpecConfig(draft_budget=0.5, max_draft=3), return_dict_in_generate=True)
out = {}
for name, m in (("torch", ref), ("triton", tri)):
    with torch.no_grad():
        plain = m.generate(ids, max_new_tokens=N_NEW)
        s = m.generate(ids, max_new_tokens=N_NEW, **spec)
    out[name] = plain, s.sequences, s.spec_stats
    print(name, s.sequences[0, ids.shape[1]:].tolist(), "skip", round(s.spec_stats.skip_fraction, 3), "tau", round(s.spec_stats.tau, 2), flush=True)
assert torch.equal(out["torch"][0], out["triton"][0])
assert torch.equal(out["torch"][1], out["triton"][1]), (out["torch"][1], out["triton"][1])
assert torch.equal(out["triton"][1], out["triton"][0])
assert out["triton"][2].skip_fraction > 0
print("ok", round(time.time() - t0, 1), "s")
"""


@pytest.mark.integration
def test_smollm2_triton_matches_torch():
    """Greedy tokens of SmolLM2, plain and speculative (budget 0.5, at most 2 drafts a round),
    kernels='triton' (interpreted, about 30 s a draft round) against kernels='torch'. 6 tokens: 8
    took 4.4 minutes on 2 busy cores."""
    t0 = time.time()
    code = _REAL.replace("N_NEW", "6").replace("max_draft=3", "max_draft=2")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_interpreted_env(), timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    print(out.stdout, f"({time.time() - t0:.0f} s)")
