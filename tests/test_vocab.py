"""The draft vocabulary: ranking, the restricted head, and lossless greedy decoding with it.
(Sampling with it is checked against the exact distribution in tests/test_speculative.py.)"""

import dataclasses

import pytest
import torch
from conftest import VOCAB, tiny

from specgate import SpecConfig, load_gates, save_gates
from specgate.kernels import cpu_linear
from specgate.vocab import DraftHead, coverage, load_ranking, rank_tokens, save_ranking, shipped_ranking


def test_ranking_puts_frequent_tokens_first_and_coverage_counts_them():
    docs = [[5, 5, 5, 7, 7, 9], [7, 5, 3]]
    ranking = rank_tokens(docs, 12)
    assert ranking[:4].tolist() == [5, 7, 3, 9]  # 4x, 3x, then 1x each in id order
    assert sorted(ranking.tolist()) == list(range(12))
    assert coverage(ranking, [[5, 7, 3, 11]], [1, 3, 12]) == {1: 0.25, 3: 0.75, 12: 1.0}
    # the text's own tokens: 11 from the prompt, the second 10 from the document
    assert coverage(ranking, [[5, 11, 10, 10]], [1], prompts=[[11, 2]]) == {1: 0.75}


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


def test_a_calls_vocabulary_grows_with_its_text_and_leaves_the_shared_one_alone():
    m = tiny("llama")
    shared = DraftHead(m.engine.weights, torch.tensor([4, 17, 2, 90, 33]))
    call = shared.with_context(torch.tensor([[17, 8, 8, 5], [VOCAB + 3, -1, 61, 4]]))  # ids outside the vocabulary: ignored
    assert call.ids.tolist() == [4, 17, 2, 90, 33, 5, 8, 61] and shared.ids.tolist() == [4, 17, 2, 90, 33]
    for _ in range(3):  # many at a time
        call.add(torch.arange(VOCAB)[torch.randperm(VOCAB)[:120]])
    call.add(torch.tensor([7, 7]))
    assert sorted(call.ids.tolist()) == sorted(set(call.ids.tolist())) and 7 in call.ids.tolist()
    assert call.inside.sum() == len(call) and not shared.inside[7] and len(shared) == 5
    from specgate.layers import head

    h = torch.randn(2, m.config.hidden_size)
    full, sub = head(m.engine.weights, h), call.logits(h)
    torch.testing.assert_close(sub[:, call.ids], full[:, call.ids])
    assert torch.isneginf(sub[:, ~call.inside]).all()


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
    for n, context in ((None, True), (30, False), (30, True)):
        out = m.generate(ids, max_new_tokens=40, speculative=True, eos_token_id=None, pad_token_id=0, return_dict_in_generate=True,
                         spec_config=SpecConfig(0.5, draft_vocab=n, draft_vocab_context=context))  # fmt: skip
        assert torch.equal(out.sequences, plain), (n, context)
        stats[n, context] = out.spec_stats.alpha
    assert stats[None, True] == 1.0 and stats[30, False] < 1.0  # drafts outside the vocabulary were rejected
    assert stats[30, False] < stats[30, True]  # the text's own tokens: far fewer rejections
    # (with the text's tokens, a row ended in a round where it had accepted more drafts than it
    # emitted: its cache once stayed past them and the next round asked for more slots than exist)


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


@pytest.mark.skipif(cpu_linear.load() is None, reason="the CPU kernels cannot be built here")
@torch.inference_mode()
def test_a_low_precision_draft_reads_its_vocabulary_in_that_precision():
    """The draft vocabulary's rows in bfloat16 / int8 (static rows made once and shared, added rows
    made anew): close to the float32 logits, not the same, -inf outside; greedy speculation with an
    int8 draft and a grown vocabulary stays lossless."""
    m = _model()
    call = m.draft_head(30).with_context(torch.tensor([[7, 9, 11]]))
    h = torch.randn(2, m.config.hidden_size)
    exact = call.logits(h)
    for precision in ("bfloat16", "int8"):
        low = call.logits(h, precision)
        torch.testing.assert_close(low[:, call.ids], exact[:, call.ids], atol=0.05, rtol=0.05)
        assert not torch.equal(low[:, call.ids], exact[:, call.ids]) and torch.isneginf(low[:, ~call.inside]).all()
    assert "int8" in m.draft_head(30)._low  # made once, on the shared head
    call.add(torch.tensor([5, 6, 8]))
    torch.testing.assert_close(call.logits(h, "int8")[:, call.ids], call.logits(h)[:, call.ids], atol=0.05, rtol=0.05)
    ids = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(4))
    plain = m.generate(ids, max_new_tokens=30, eos_token_id=None, pad_token_id=0)
    spec = SpecConfig(0.0, draft_vocab=30, draft_precision="int8", max_draft=3)
    out = m.generate(ids, max_new_tokens=30, eos_token_id=None, pad_token_id=0, speculative=True, spec_config=spec)
    assert torch.equal(out, plain)


@pytest.mark.skipif(cpu_linear.load() is None, reason="the CPU kernels cannot be built here")
@torch.inference_mode()
def test_a_greedy_draft_screens_its_vocabulary_to_the_float32_argmax():
    """The screened draft head (greedy drafts): the argmax of the float32 rows, also where the int8
    rows (what int8 and int4 drafts read) pick another token of a near tie; exact logits where they
    could be the maximum, -inf outside; added rows taken in float32; the engine screens only greedy
    steps of an engine that screens its own head."""
    m = _model()
    w = m.engine.weights.lm_head
    call = m.draft_head(30).with_context(torch.tensor([[7, 9, 11]]))
    a, b = call.ids[0].item(), call.ids[1].item()
    g = torch.Generator().manual_seed(5)
    w[b] = w[a] + 1e-4 * torch.randn(w.shape[1], generator=g)  # a near tie the int8 copy cannot resolve
    call = m.draft_head(30).with_context(torch.tensor([[7, 9, 11]]))  # rows read anew
    call.add(torch.tensor([5, 6, 8]))
    norm_w = m.engine.weights.final_norm
    h = w[a] / norm_w + 0.3 * torch.randn(64, w.shape[1], generator=g)  # states pointing at the tie
    exact, int8, screened = call.logits(h), call.logits(h, "int8"), call.logits(h, "int8", screened=True)
    assert torch.equal(screened.argmax(-1), exact.argmax(-1))
    assert not torch.equal(int8.argmax(-1), exact.argmax(-1))  # the int8 rows alone pick wrong
    top = exact.argmax(-1, keepdim=True)
    torch.testing.assert_close(screened.gather(-1, top), exact.gather(-1, top), atol=1e-5, rtol=1e-5)
    assert torch.isneginf(screened[:, ~call.inside]).all() and torch.isfinite(screened[:, call.ids]).all()
    added = torch.tensor([5, 6, 8])
    torch.testing.assert_close(screened[:, added], exact[:, added], atol=1e-5, rtol=1e-5)
    assert m.draft_head(30)._low["screened"].int8 is m.draft_head(30)._low["int8"]  # one int8 copy, shared

    from specgate.kernels.screened_head import ScreenedHead

    ids = torch.randint(3, VOCAB, (1, 5), generator=g)
    steps = {}
    for exact_logits in (True, False):
        m.engine.screened = ScreenedHead(w)
        cache = m.engine.new_cache(1, 6)
        steps[exact_logits] = m.engine(ids, cache, head=call, exact_logits=exact_logits)
    assert torch.equal(steps[False].argmax(-1), steps[True].argmax(-1)) and not torch.equal(steps[False], steps[True])


def test_a_ranking_file_round_trips_and_a_bad_one_is_refused(tmp_path):
    """save_ranking keeps the first ranked ids; load_ranking refuses a file that is not a ranking, or
    whose ids do not fit the model's vocabulary; the ranking shipped for Gemma 3 270M loads."""
    ranking = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(3))
    path = save_ranking(ranking, tmp_path / "r.safetensors", keep=40)
    assert torch.equal(load_ranking(path, VOCAB), ranking[:40])
    with pytest.raises(ValueError, match="another tokenizer"):
        load_ranking(path, 20)  # ids beyond a smaller vocabulary
    save_ranking(torch.tensor([3, 5, 3]), tmp_path / "dup.safetensors")
    with pytest.raises(ValueError, match="distinct"):
        load_ranking(tmp_path / "dup.safetensors", VOCAB)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file of tensors")
    for bad in (tmp_path / "junk.safetensors", tmp_path / "missing.safetensors"):
        with pytest.raises(ValueError, match="eval/draft_vocab.py"):
            load_ranking(bad, VOCAB)
    gemma = shipped_ranking("gemma-3-270m", 262144)
    assert gemma is not None and len(gemma) == 32768 and len(gemma.unique()) == 32768
    assert shipped_ranking("smollm2-135m-instruct", 49152) is None and shipped_ranking("", VOCAB) is None


def test_a_model_without_gates_drafts_over_its_own_ranking():
    """draft_head takes the gates' ranking, else the model's own (default_ranking); with neither it
    says where one comes from. Greedy output with an int8 draft over that vocabulary is unchanged."""
    m = tiny("llama")
    with pytest.raises(ValueError, match="--gates none"):
        m.draft_head(30)
    m.default_ranking = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(2))
    assert torch.equal(m.draft_head(30).ranked, m.default_ranking[:30])
    if cpu_linear.load() is None:
        return
    ids = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(4))
    plain = m.generate(ids, max_new_tokens=30, eos_token_id=None, pad_token_id=0)
    spec = SpecConfig(0.0, draft_vocab=30, draft_precision="int8", max_draft=3)
    assert torch.equal(m.generate(ids, max_new_tokens=30, eos_token_id=None, pad_token_id=0, speculative=True, spec_config=spec), plain)
