"""Sparse-inputs drafts: the engine's pass is the reference math, calibration reaches its share,
the verifier never sees the cuts, and speculation with them stays lossless."""

import pytest
import torch
from conftest import FAMILIES, VOCAB, tiny

from specgate import SpecConfig, load_gates, save_gates
from specgate.calibrate import cut_share
from specgate.engine import SkipCounter
from specgate.layers import dense_forward
from specgate.sparse_inputs import PROJECTIONS, InputCuts, allocations, calibrate_cuts, projection_weights

NO_EOS = dict(eos_token_id=None, pad_token_id=0)


def _ids(B=2, T=24, seed=0):
    return torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def test_a_cut_zeroes_the_entries_at_or_below_its_threshold():
    cuts = InputCuts(torch.tensor([[0.5, 0.0, 0.0, 0.0]]))
    x = torch.tensor([[0.1, -0.7, 0.5, 2.0]])
    assert torch.equal(cuts.apply(x, 0, 10, layer=0), torch.tensor([[0.0, -0.7, 0.0, 2.0]]))


@pytest.mark.parametrize("family", FAMILIES)
def test_the_engines_sparse_pass_is_the_reference_math(family):
    """Prefill and single-token steps with cuts equal the dense reference with the same cuts, and
    the counter's compute share is the columns not read over all layers' weights."""
    m = tiny(family)
    eng, ids = m.engine, _ids()
    cuts = InputCuts(torch.rand(eng.num_layers, 4, generator=torch.Generator().manual_seed(1)) * 0.05)
    ref = dense_forward(eng.weights, ids, cuts=cuts)
    counter, cache = SkipCounter(), eng.new_cache(2, 24)
    cache.reset()
    out = torch.cat([eng(ids[:, :20], cache, cuts=cuts, counter=counter), *(eng(ids[:, t : t + 1], cache, cuts=cuts) for t in range(20, 24))], 1)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out, dense_forward(eng.weights, ids), atol=1e-3)  # the cuts changed something
    rec = _Counting(cuts)  # the prefill's columns not read, counted by hand
    dense_forward(eng.weights, ids[:, :20], cuts=rec)
    total = sum(lw.qkv_w.numel() + lw.o_w.numel() + lw.gate_up_w.numel() + lw.down_w.numel() for lw in eng.weights.layers)
    assert 0.0 < counter.compute_fraction == pytest.approx(rec.weights_not_read / (total * 2 * 20), rel=1e-6)


class _Counting(InputCuts):
    """Cuts as ``cuts`` do, and adds up the weight columns they leave unread."""

    def __init__(self, cuts: InputCuts):
        super().__init__(cuts.thresholds)
        self.weights_not_read = 0

    def apply(self, x, proj, n_out, layer):
        self.weights_not_read += int((x.abs() <= self.values[layer][proj]).sum()) * n_out
        return super().apply(x, proj, n_out, layer)


def test_allocations_skip_the_share_asked_for():
    weights = [960 * 576, 576 * 576, 3072 * 576, 1536 * 576]
    for share in (0.3, 0.5, 0.7):
        splits = allocations(share, weights)
        assert len(splits) > 3
        for split in splits:
            assert sum(s * n for s, n in zip(split, weights)) / sum(weights) == pytest.approx(share)
            assert split[0] == split[1] and split[3] >= share - 1e-9 and all(0 <= s <= 0.95 for s in split)


def test_calibration_reaches_its_share_on_the_text_it_saw():
    m = tiny("llama")
    ids = _ids(4, 40)
    for share in (0.3, 0.6):
        found = calibrate_cuts(m.engine.weights, ids, share, prefix=8)
        assert found.thresholds.shape == (m.engine.num_layers, len(PROJECTIONS)) and 0 < found.agreement <= 1
        assert found.split in allocations(share, projection_weights(m.engine.weights)) and found.spread in (0.0, 0.05, 0.1, 0.15)
        assert cut_share(m.engine, InputCuts(found.thresholds), ids) == pytest.approx(share, abs=0.03)


def _calibrated(family="llama", share=0.5):
    m = tiny(family, gates=True)
    m.gates.input_cuts[share] = calibrate_cuts(m.engine.weights, _ids(4, 40, seed=3), share).thresholds
    return m


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("budget", [0.0, 0.5])
def test_greedy_speculation_with_sparse_inputs_equals_plain(family, budget):
    """Alone (gates' budget 0) and inside the gates' skips: plain decoding's tokens, some drafts
    rejected (the cuts change the draft) and the cuts' compute counted."""
    m = _calibrated(family)
    if budget:
        m.gates.thresholds[budget] = torch.full((2, m.engine.num_layers), 0.5)
    ids = _ids(1, 9, seed=2)
    plain = m.generate(ids, max_new_tokens=40, **NO_EOS)
    spec = SpecConfig(draft_budget=budget, sparse_inputs=0.5)
    out = m.generate(ids, max_new_tokens=40, speculative=True, spec_config=spec, return_dict_in_generate=True, **NO_EOS)
    assert torch.equal(out.sequences, plain)
    s = out.spec_stats
    assert s.alpha < 1.0 and s.compute_skipped > 0.3, s


def test_the_verifier_never_sees_the_cuts(monkeypatch):
    """Every full-compute pass of a speculative call runs without cuts, so its logits are
    bit-identical to a model that has none."""
    m = _calibrated()
    calls = []
    forward = type(m.engine).forward

    def spy(self, ids, cache, gates=None, policy=None, **kw):
        calls.append((ids.shape[1], kw.get("cuts") is not None, policy))
        return forward(self, ids, cache, gates, policy, **kw)

    monkeypatch.setattr(type(m.engine), "forward", spy)
    monkeypatch.setattr(type(m.engine), "__call__", spy)
    m.generate(_ids(1, 9), max_new_tokens=20, speculative=True, spec_config=SpecConfig(draft_budget=0, sparse_inputs=0.5), **NO_EOS)
    drafts = [c for c in calls if c[1]]
    assert drafts and all(T == 1 for T, _, _ in drafts)  # only single-token draft steps are cut
    assert any(not cut and T > 1 for T, cut, _ in calls)  # verify passes ran, uncut


def test_gate_files_keep_the_cuts_and_refuse_damaged_ones(tmp_path):
    m = _calibrated()
    save_gates(m.gates, tmp_path / "g")
    back = load_gates(tmp_path / "g", m.config)
    assert torch.equal(back.input_cuts[0.5], m.gates.input_cuts[0.5])
    with pytest.raises(ValueError, match="specgate calibrate --sparse-inputs 0.3"):
        back.cuts(0.3)
    m.gates.input_cuts[0.5] = torch.zeros(3, 4)
    save_gates(m.gates, tmp_path / "bad")
    with pytest.raises(ValueError, match="damaged"):
        load_gates(tmp_path / "bad", m.config)


def test_bad_settings_say_what_to_do():
    with pytest.raises(ValueError, match=r"sparse_inputs must be a share"):
        SpecConfig(sparse_inputs=1.0)
    spec = SpecConfig(draft_budget=0, sparse_inputs=0.5)
    with pytest.raises(ValueError, match="needs gates"):  # no gates: nowhere to read thresholds from
        tiny("llama").generate(_ids(1, 5), max_new_tokens=4, speculative=True, spec_config=spec, **NO_EOS)
    with pytest.raises(ValueError, match="calibrate --sparse-inputs 0.5"):  # gates without them
        tiny("llama", gates=True).generate(_ids(1, 5), max_new_tokens=4, speculative=True, spec_config=spec, **NO_EOS)
