"""The draft vocabulary: ranking, the restricted head, and lossless greedy decoding with it.
(Sampling with it is checked against the exact distribution in tests/test_speculative.py.)"""

import dataclasses

import pytest
import torch
from conftest import VOCAB, tiny

from specgate import SpecConfig, load_gates, save_gates
from specgate.vocab import DraftHead, coverage, rank_tokens


def test_ranking_puts_frequent_tokens_first_and_coverage_counts_them():
    docs = [[5, 5, 5, 7, 7, 9], [7, 5, 3]]
    ranking = rank_tokens(docs, 12)
    assert ranking[:4].tolist() == [5, 7, 3, 9]  # 4x, 3x, then 1x each in id order
    assert sorted(ranking.tolist()) == list(range(12))
    assert coverage(ranking, [[5, 7, 3, 11]], [1, 3, 12]) == {1: 0.25, 3: 0.75, 12: 1.0}


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_draft_head_is_the_lm_head_on_its_tokens_and_minus_inf_elsewhere(family):
    m = tiny(family)
    if family == "gemma3":  # soft-capping applies to the subset as to the full head
        m.engine.weights.final_softcap = 3.0
    ids = torch.tensor([4, 17, 2, 90, 33])
    h = torch.randn(2, 3, m.config.hidden_size)
    from specgate.layers import head

    full, sub = head(m.engine.weights, h), DraftHead(m.engine.weights, ids).logits(h)
    torch.testing.assert_close(sub[..., ids], full[..., ids])
    outside = torch.ones(VOCAB, dtype=torch.bool)
    outside[ids] = False
    assert torch.isneginf(sub[..., outside]).all()


def _model():
    m = tiny("llama", gates=True)
    m.gates.config = dataclasses.replace(m.gates.config, scale_output=False)
    m.gates.thresholds[0.5] = torch.full((2, 4), -1.0)  # skips nothing: the draft is the model but for its head
    m.gates.token_ranking = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(2))
    return m


def test_greedy_output_is_unchanged_by_the_draft_vocabulary():
    m = _model()
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    plain = m.generate(ids, max_new_tokens=40, eos_token_id=None, pad_token_id=0)
    stats = {}
    for n in (None, 30):
        out = m.generate(ids, max_new_tokens=40, speculative=True, eos_token_id=None, pad_token_id=0,
                         spec_config=SpecConfig(0.5, draft_vocab=n), return_dict_in_generate=True)  # fmt: skip
        assert torch.equal(out.sequences, plain), n
        stats[n] = out.spec_stats.alpha
    assert stats[None] == 1.0 and stats[30] < 1.0  # drafts outside the vocabulary were rejected


def test_ranking_travels_with_the_gates_and_is_checked(tmp_path):
    m = _model()
    save_gates(m.gates, tmp_path / "g")
    assert torch.equal(load_gates(tmp_path / "g", m.config).token_ranking, m.gates.token_ranking)
    m.config.vocab_size = VOCAB + 1
    with pytest.raises(ValueError, match="another tokenizer"):
        load_gates(tmp_path / "g", m.config)


def test_bad_draft_vocabularies_are_refused():
    with pytest.raises(ValueError, match="draft_vocab"):
        SpecConfig(draft_vocab=0)
    m = _model()
    m.gates.token_ranking = None
    with pytest.raises(ValueError, match="token ranking"):
        m.generate(torch.tensor([[5, 6]]), max_new_tokens=3, speculative=True, spec_config=SpecConfig(0.5, draft_vocab=8))
