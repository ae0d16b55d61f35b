"""``kernels="triton"``: the engine's Triton path against its PyTorch path, on the CPU.

The kernels run in Triton's interpreter, which needs TRITON_INTERPRET=1 set before torch is
imported (torch imports Triton; see tests/test_kernels.py). A plain pytest session has imported
torch already, so the interpreter tests skip here and ``test_triton_path_in_interpreter`` runs this
file again in a subprocess with the variable set. The integration test (the real SmolLM2) runs its
own subprocess.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton", reason="the Triton path needs the triton package (pip install triton)")

import specgate  # noqa: E402
from specgate import dispatch, kernels  # noqa: E402
from specgate.engine import SkipCounter  # noqa: E402
from specgate.generation import Sampling, prefill  # noqa: E402
from specgate.policy import BudgetPolicy  # noqa: E402
from specgate.sparse_inputs import calibrate_cuts  # noqa: E402
from specgate.speculative import SpecConfig, _Drafter  # noqa: E402
from specgate.standin import StandIns  # noqa: E402

from conftest import VOCAB, left_padded, tiny  # noqa: E402

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
    cmd = [sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not integration", str(here)]
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


def test_auto_on_cpu_takes_no_triton():
    """On the CPU "auto" means the fused CPU pass (kernels/cpu_step.py) where it builds, never Triton."""
    assert dispatch.resolve("auto", "cpu") == "cpu"
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


def _standins(m, rank: int) -> StandIns:
    torch.manual_seed(rank)
    s = StandIns(m.engine.num_layers, m.config.hidden_size, rank)
    for t in s.parameters():
        t.data.normal_(0, 0.1)
    return s


@needs_interpreter
@pytest.mark.parametrize("family,rank,kv_fill", [("llama", 4, "project"), ("gemma3", 0, "copy_below")])
def test_stand_ins_on_the_triton_path(family, rank, kv_fill):
    """With stand-ins and adapters, a skipping pass and two draft steps give the PyTorch path's
    logits (rank 0: the same vector for every row; rank 4: one per row), and they do change them."""
    m = _model(family)
    policy = m.gates.policy(0.5)
    g = torch.Generator().manual_seed(5)
    steps = [(torch.randint(3, 101, (2, 7), generator=g), True)]
    steps += [(torch.randint(3, 101, (2, 1), generator=g), True) for _ in range(2)]
    without, _, _ = _passes(m, "torch", kv_fill, policy, steps)
    m.gates.standins, m.gates.adapters = _standins(m, rank), _standins(m, rank + 1)
    ref, _, ref_counter = _passes(m, "torch", kv_fill, policy, steps)
    tri, _, _ = _passes(m, "triton", kv_fill, policy, steps)
    assert ref_counter.skipped > 0
    for a, b, c in zip(ref, tri, without):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(a, c, atol=1e-3)


def _draft_vocab_model(family: str = "llama"):
    m = _model(family)
    m.gates.token_ranking = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(6))
    return m


@needs_interpreter
@pytest.mark.parametrize("family,softcap", [("llama", None), ("gemma3", 5.0)])
def test_fused_draft_head_picks_the_draft_heads_argmax(family, softcap):
    m = _use(_draft_vocab_model(family), "triton")
    m.engine.weights.final_softcap = softcap
    head = m.draft_head(40)
    h = torch.randn(5, m.config.hidden_size, generator=torch.Generator().manual_seed(7)) * 3
    tokens, prob = m.engine.kernels.draft_argmax(head, h)
    logits = head.logits(h)
    assert torch.equal(tokens, logits.argmax(-1))
    torch.testing.assert_close(prob, logits.softmax(-1).max(-1).values)


@needs_interpreter
def test_greedy_speculation_with_a_draft_vocabulary():
    """kernels='triton' drafts with the fused head (so no draft log-probabilities): the same
    tokens and the same accepted drafts as kernels='torch'."""
    a, b = _speculate_on_both_paths(_draft_vocab_model(), SpecConfig(draft_budget=0.5, max_draft=3, draft_vocab=60), 10)
    assert (a.drafted, a.accepted) == (b.drafted, b.accepted) and a.accepted > 0
    assert math.isnan(b.draft_logprob) and not math.isnan(a.draft_logprob)


def _speculate_on_both_paths(m, spec: SpecConfig, max_new: int):
    """Greedy speculation on the PyTorch path and the Triton path: the same tokens as plain
    decoding on both; their SpecStats."""
    ids = torch.tensor([[5, 17, 33, 8, 71, 12]])
    out = {}
    for name in ("torch", "triton"):
        with torch.no_grad():
            out[name] = _use(m, name).generate(ids, max_new_tokens=max_new, speculative=True, spec_config=spec,
                                               return_dict_in_generate=True)  # fmt: skip
    assert torch.equal(out["torch"].sequences, out["triton"].sequences)
    assert torch.equal(out["triton"].sequences, m.generate(ids, max_new_tokens=max_new))
    return out["torch"].spec_stats, out["triton"].spec_stats


def _with_cuts(family: str, share: float = 0.5):
    """The tiny model with gates and sparse-input thresholds calibrated at ``share``."""
    m = _model(family)
    ids = torch.randint(3, 101, (4, 40), generator=torch.Generator().manual_seed(8))
    m.gates.input_cuts[share] = calibrate_cuts(m.engine.weights, ids, share).thresholds
    return m


def _cut_passes(m, name, gated, steps):
    """As :func:`_passes`, every pass with the sparse inputs at 0.5 (and the gates at 0.5, ``gated``)."""
    _use(m, name)
    cache, counter, cuts = m.engine.new_cache(2, 32), SkipCounter(), m.gates.cuts(0.5)
    args = (m.gates, m.gates.policy(0.5)) if gated else ()
    with torch.inference_mode():
        logits = [m.engine(ids, cache, *args, counter=counter, cuts=cuts) for ids in steps]
    return logits, cache, counter


@needs_interpreter
@pytest.mark.parametrize("family,gated", [("llama", False), ("llama", True), ("gemma3", False), ("qwen3", True)])
def test_sparse_inputs_on_the_triton_path(family, gated):
    """A multi-token pass, then two single-token draft steps, with sparse inputs alone and inside
    the gates' skips: the PyTorch path's logits, cache entries and counts of weights not read."""
    m = _with_cuts(family)
    g = torch.Generator().manual_seed(9)
    steps = [torch.randint(3, 101, (2, 7), generator=g)] + [torch.randint(3, 101, (2, 1), generator=g) for _ in range(2)]
    ref, ref_cache, ref_counter = _cut_passes(m, "torch", gated, steps)
    tri, tri_cache, tri_counter = _cut_passes(m, "triton", gated, steps)
    for a, b in zip(ref, tri):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    for a, b in zip(ref_cache.k + ref_cache.v, tri_cache.k + tri_cache.v):
        torch.testing.assert_close(b[:, :, :9], a[:, :, :9], atol=1e-4, rtol=1e-4)
    assert ref_counter.compute_skipped > 0.2 * ref_counter.compute_total
    assert (tri_counter.total, tri_counter.skipped) == (ref_counter.total, ref_counter.skipped)
    assert tri_counter.compute_skipped == pytest.approx(ref_counter.compute_skipped)
    assert tri_counter.compute_total == pytest.approx(ref_counter.compute_total)


@needs_interpreter
def test_greedy_speculation_with_sparse_inputs_on_the_triton_path(monkeypatch):
    """Sparse inputs alone, drafted with the fused head: plain decoding's tokens, and the same
    drafts accepted as on the PyTorch path, whose products its kernel ran; with the copy_below
    K/V fill the passes take the PyTorch path."""
    from specgate.kernels import projection

    calls = []
    launch = projection.sparse_linear
    monkeypatch.setattr(projection, "sparse_linear", lambda *a, **k: calls.append(1) or launch(*a, **k))
    m = _with_cuts("llama")
    m.gates.token_ranking = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(6))
    a, b = _speculate_on_both_paths(m, SpecConfig(draft_budget=0.0, sparse_inputs=0.5, max_draft=3, draft_vocab=60), 12)
    assert (a.drafted, a.accepted) == (b.drafted, b.accepted) and 0 < a.accepted < a.drafted
    assert b.compute_skipped == pytest.approx(a.compute_skipped) and a.compute_skipped > 0.2
    assert len(calls) == b.drafted * 4 * m.engine.num_layers  # each draft step's products, none of the verifier's
    with torch.no_grad():
        kern, cuts = m.engine.kernels, m.gates.cuts(0.5)
        assert kern.applies(None, None, cuts) and not kern.applies(None, None, cuts, "copy_below")


# -- no host synchronisation in a draft step ------------------------------------------------------

# What reads a tensor's values on the host (item, int(t), bool(t): _local_scalar_dense, or item and
# is_nonzero under inference mode), and ops whose output shape depends on the values.
_HOST_READS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select"}


class _RefuseHostReads(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        masks = name in ("index", "index_put", "index_put_") and any(
            i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1]
        )  # a boolean mask index runs nonzero inside the op, where this mode does not see it
        if name in _HOST_READS or masks:
            raise AssertionError(f"host read of a tensor: {func}")
        return func(*args, **(kwargs or {}))


class _RefuseCopiesToPython(TorchFunctionMode):
    """tolist() and numpy() read CPU tensors' memory without an op a dispatch mode would see."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("tolist", "numpy"):
            raise AssertionError(f"host read of a tensor: Tensor.{func.__name__}")
        return func(*args, **(kwargs or {}))


@contextmanager
def _no_host_reads():
    with _RefuseCopiesToPython(), _RefuseHostReads():
        yield


def test_no_host_reads_catches_them():
    t = torch.tensor([1, 2])
    reads = (lambda: int(t[0]), lambda: bool(t.any()), lambda: t.tolist(), lambda: t[t > 1], lambda: t.nonzero())
    for read in reads:
        with pytest.raises(AssertionError, match="host read"), torch.inference_mode(), _no_host_reads():
            read()
    with _no_host_reads():
        assert max([1, 2]) == 2 and (t + 1).shape == (2,)


@needs_interpreter
@pytest.mark.parametrize("family,kv_fill,sparse", [("llama", "project", False), ("gemma3", "copy_below", False),
                                                   ("qwen3", "project", True)])  # fmt: skip
def test_a_draft_round_reads_nothing_on_the_host(family, kv_fill, sparse):
    """Greedy drafts on the Triton path (single-token steps with stand-ins and skip counting, with
    sparse inputs or not, the full head and the fused draft-vocabulary head), and a plain decode
    step on the PyTorch path, read no tensor on the host: a left-padded batch whose rows sit at
    different positions. The first draft step runs outside the check: it reads the policy's
    thresholds once and copies them to the device (CUDA-graph capture, too, runs a step before
    capturing)."""
    m = _use(_draft_vocab_model(family), "triton")
    m.gates.standins = _standins(m, 4)
    if sparse:
        m.gates.input_cuts[0.5] = _with_cuts(family).gates.input_cuts[0.5]
    e, policy, counter = m.engine, m.gates.policy(0.5), SkipCounter()
    ids, mask = left_padded(torch.randint(3, 101, (2, 7), generator=torch.Generator().manual_seed(8)), [0, 2])
    with torch.inference_mode():
        cache, logits = prefill(e, ids, mask, 32)
        cache.rewind([7, 6])  # row 1 one token behind
        last = logits.argmax(-1)
        config = SpecConfig(draft_budget=0.5, kv_fill=kv_fill, sparse_inputs=0.5 if sparse else 0.0)
        cuts = m.gates.cuts(0.5) if sparse else None
        for head in (None, m.draft_head(40)):
            draft = _Drafter(e, m.gates, policy, head, Sampling(), config, None, counter, cuts)
            draft(cache, last, 1)
            with _no_host_reads():
                tokens, draft_logits, dists = draft(cache, last, 3)
            assert tokens.shape == (2, 3) and (draft_logits is None) == (head is not None) and dists is None
        _use(m, "torch")
        with _no_host_reads():
            e(last[:, None], cache)
    assert counter.skipped > 0 and cache.host_lengths == cache.lengths.tolist() == [16, 15]
    assert counter.compute_skipped > (0.6 if sparse else 0.3) * counter.compute_total  # gates: 0.41-0.53 here


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
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, env=_interpreted_env(), timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    print(out.stdout, f"({time.time() - t0:.0f} s)")
