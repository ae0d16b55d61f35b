"""Self-speculative decoding: greedy equivalence first, then sampling, statistics and the drop-in."""

import dataclasses

import pytest
import torch
from conftest import VOCAB, left_padded, tiny

import specgate.generation
import specgate.speculative
from specgate.generation import sample
from specgate.speculative import SpecConfig, greedy_accept, rejection_sample

NO_EOS = dict(eos_token_id=None, pad_token_id=0)


def _prompt(B=1, T=7, seed=0):
    return torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def _model(draft: str, seed: int = 0):
    """A tiny Llama with gates whose draft is perfect (skips nothing, output unscaled) or garbage
    (thresholds above every importance: every branch skipped)."""
    m = tiny("llama", seed=seed, gates=True)
    m.gates.config = dataclasses.replace(m.gates.config, scale_output=draft != "perfect")
    m.gates.thresholds[0.5] = torch.full((2, 4), -1.0 if draft == "perfect" else 2.0)
    return m


def _spec(m, ids, **kw):
    kw = {**NO_EOS, **kw}
    return m.generate(ids, speculative=True, draft_budget=0.5, return_dict_in_generate=True, **kw)


@pytest.mark.parametrize("draft", ["perfect", "garbage"])
def test_greedy_speculative_equals_plain_many_rounds(draft):
    m = _model(draft)
    ids = _prompt()
    out = _spec(m, ids, max_new_tokens=60)
    assert torch.equal(out.sequences, m.generate(ids, max_new_tokens=60, **NO_EOS))
    s = out.spec_stats
    assert s.new_tokens == 60 and s.rounds > 5
    if draft == "perfect":
        assert s.alpha == 1.0 and s.tau > 3 and s.skip_fraction == 0.0
    else:
        assert s.alpha < 0.2 and s.skip_fraction == 1.0


def test_eos_inside_an_accepted_block():
    m = _model("perfect")
    ids = _prompt(seed=1)
    plain = m.generate(ids, max_new_tokens=40, **NO_EOS)
    eos = int(plain[0, ids.shape[1] + 9])  # the 10th new token ends the sequence
    first = (plain[0, ids.shape[1] :] == eos).nonzero()[0].item()
    out = _spec(m, ids, max_new_tokens=40, eos_token_id=eos)
    assert torch.equal(out.sequences, m.generate(ids, max_new_tokens=40, eos_token_id=eos, pad_token_id=0))
    assert out.sequences.shape[1] == ids.shape[1] + first + 1
    assert out.spec_stats.alpha == 1.0  # so the EOS came inside a block of accepted drafts


@pytest.mark.parametrize("max_new", [1, 2, 13])
def test_max_new_tokens_reached_mid_block(max_new):
    m = _model("perfect")
    ids = _prompt()
    out = _spec(m, ids, max_new_tokens=max_new, spec_config=SpecConfig(draft_budget=0.5, max_draft=8, init_draft=8, adaptive=False))
    assert torch.equal(out.sequences, m.generate(ids, max_new_tokens=max_new, **NO_EOS))


def test_cache_at_accepted_positions_equals_the_plain_run(monkeypatch):
    caches = {}

    def recording(module):
        original = module.prefill

        def prefill(*args, **kwargs):
            cache, logits = original(*args, **kwargs)
            caches[module.__name__] = cache
            return cache, logits

        monkeypatch.setattr(module, "prefill", prefill)

    recording(specgate.speculative)
    recording(specgate.generation)
    m = _model("garbage")
    ids = _prompt()
    out = _spec(m, ids, max_new_tokens=30)
    assert out.spec_stats.accepted < out.spec_stats.drafted  # there were rejections
    m.generate(ids, max_new_tokens=30, **NO_EOS)
    n = ids.shape[1] + 30 - 1  # the last token is never fed back
    spec, plain = caches["specgate.speculative"], caches["specgate.generation"]
    assert spec.lengths.item() == plain.lengths.item() == n
    for a, b in zip(spec.k + spec.v, plain.k + plain.v):
        torch.testing.assert_close(a[..., :n, :], b[..., :n, :], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("draft", ["perfect", "garbage"])
def test_batch_with_left_padding_equals_plain(draft):
    m = _model(draft)
    ids, mask = left_padded(_prompt(3, 9, seed=4), [0, 4, 2])
    kw = dict(attention_mask=mask, max_new_tokens=25, eos_token_id=5, pad_token_id=0)
    plain = m.generate(ids, **kw)
    out = m.generate(ids, speculative=True, draft_budget=0.5, **kw)
    assert torch.equal(out, plain)


def test_partly_good_draft_batch_rows_accept_different_amounts():
    m = tiny("llama", seed=3, gates=True)
    m.gates.thresholds[0.3] = torch.tensor([[0.0, 0.0, 2.0, 0.0], [0.0, 2.0, 0.0, 0.0]])  # two branches off
    ids = _prompt(4, 6, seed=5)
    kw = dict(max_new_tokens=40, **NO_EOS)
    out = m.generate(ids, speculative=True, draft_budget=0.3, return_dict_in_generate=True, **kw)
    assert torch.equal(out.sequences, m.generate(ids, **kw))
    assert 0 < out.spec_stats.alpha < 1


def test_gated_verifier_equals_plain_decoding_of_the_gated_model():
    m = tiny("llama", gates=True)
    m.gates.thresholds[0.5] = torch.full((2, 4), 0.5)
    ids = _prompt()
    out = m.generate(ids, speculative=True, spec_config=SpecConfig(draft_budget=0.5, verifier="gated"), max_new_tokens=30, **NO_EOS)
    from specgate.output import Emitter

    emitter = Emitter(ids, 30)
    specgate.generation.plain_generate(m.engine, ids, None, emitter, gates=m.gates)
    assert torch.equal(out, emitter.sequences())
    assert not torch.equal(out, m.generate(ids, max_new_tokens=30, **NO_EOS))  # not the original model


@pytest.mark.parametrize("kv_fill", ["project", "copy_below"])
def test_kv_fill_modes_stay_lossless(kv_fill):
    m = tiny("llama", gates=True)
    m.gates.thresholds[0.5] = torch.full((2, 4), 0.5)
    ids = _prompt()
    out = m.generate(ids, speculative=True, spec_config=SpecConfig(draft_budget=0.5, kv_fill=kv_fill), max_new_tokens=30, **NO_EOS)
    assert torch.equal(out, m.generate(ids, max_new_tokens=30, **NO_EOS))


def test_streamer_receives_the_accepted_tokens_and_stats_add_up():
    class Collect:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.tolist())

        def end(self):
            self.ended = True

    m = _model("perfect")
    ids = _prompt()
    streamer = Collect()
    out = _spec(m, ids, max_new_tokens=25, streamer=streamer, output_scores=True, output_logits=True)
    new = out.sequences[0, ids.shape[1] :].tolist()
    assert streamer.chunks[0] == ids.tolist()  # the prompt first, as transformers does
    assert [t for c in streamer.chunks[1:] for t in c] == new and streamer.ended
    assert max(map(len, streamer.chunks[1:])) > 1  # whole accepted blocks at once
    s = out.spec_stats
    assert s.drafted >= s.accepted and s.new_tokens == 25
    assert s.tau == pytest.approx((s.new_tokens - 1) / s.rounds)  # the first token comes from the prefill
    assert s.draft_s > 0 and s.verify_s > 0 and s.other_s > 0 and s.tokens_per_s > 0
    assert s.verifier_logprob <= 0 and s.draft_logprob <= 0
    plain = m.generate(ids, max_new_tokens=25, return_dict_in_generate=True, output_scores=True, **NO_EOS)
    assert len(out.scores) == len(plain.scores) == 25
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(plain.scores), atol=1e-4, rtol=1e-4)


def test_sampling_is_seeded_and_lossless_in_distribution_setup():
    m = _model("garbage")
    ids = _prompt()
    run = lambda seed: _spec(  # noqa: E731
        m, ids, max_new_tokens=30, do_sample=True, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(seed)
    ).sequences
    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))


def test_bad_speculative_calls_are_refused():
    m = tiny("llama")
    ids = _prompt()
    with pytest.raises(ValueError, match="needs gates"):
        m.generate(ids, speculative=True, draft_budget=0.3, max_new_tokens=4)
    m.gates = m.new_gates()
    with pytest.raises(ValueError, match="calibrate"):
        m.generate(ids, speculative=True, draft_budget=0.5, max_new_tokens=4)
    with pytest.raises(ValueError, match="verifier"):
        SpecConfig(verifier="draft")


# -- the acceptance rules alone ----------------------------------------------------------------------


def _onehot_logits(tokens, V=8, value=100.0):
    return torch.nn.functional.one_hot(torch.tensor(tokens), V).float() * 2 * value - value


def test_greedy_accept_prefix_and_bonus():
    drafts = torch.tensor([[1, 2, 3], [1, 2, 3], [4, 2, 3]])
    target = torch.stack([_onehot_logits(r) for r in ([1, 2, 3, 7], [1, 5, 3, 7], [1, 2, 3, 7])])
    n, nxt = greedy_accept(drafts, target)
    assert n.tolist() == [3, 1, 0] and nxt.tolist() == [7, 5, 1]


def test_rejection_sample_with_forced_logits():
    drafts = torch.tensor([[1, 2, 3], [1, 2, 3]])
    q = torch.stack([_onehot_logits([1, 2, 3]).softmax(-1)] * 2)
    p = torch.stack([_onehot_logits(r).softmax(-1) for r in ([1, 2, 3, 6], [1, 4, 3, 6])])
    n, nxt = rejection_sample(drafts, q, p, torch.Generator().manual_seed(0))
    assert n.tolist() == [3, 1]  # perfect match: all accepted, bonus from p_3
    assert nxt.tolist() == [6, 4]  # early mismatch: recovered from max(p - q, 0)


def test_rejection_sample_accepts_with_min_1_p_over_q_and_recovers_from_the_residual():
    """One draft token x ~ q: accepted with probability min(1, p(x)/q(x)); after a rejection the
    token comes from normalised max(p - q, 0), after an acceptance the bonus token from p_1."""
    V, N = 5, 200_000
    g = torch.Generator().manual_seed(3)
    q1 = (torch.rand(V, generator=g) * 3).softmax(-1)
    p1 = (torch.rand(2, V, generator=g) * 3).softmax(-1)
    assert (p1[0] < q1).any() and (p1[0] > q1).any()  # some drafts are always accepted, some not
    drafts = torch.multinomial(q1, N, replacement=True, generator=g)[:, None]  # (N, 1)
    n, nxt = rejection_sample(drafts, q1.expand(N, 1, V), p1.expand(N, 2, V), g)
    accepted = n == 1
    for x in range(V):
        rate = accepted[drafts[:, 0] == x].float().mean()
        assert float(rate) == pytest.approx(min(1.0, float(p1[0, x] / q1[x])), abs=0.02), x
    residual = (p1[0] - q1).clamp(min=0)
    tv = lambda tokens, want: 0.5 * float((torch.bincount(tokens, minlength=V) / len(tokens) - want).abs().sum())  # noqa: E731
    assert tv(nxt[~accepted], residual / residual.sum()) < 0.02
    assert tv(nxt[accepted], p1[1]) < 0.02


def _emitted(drafts, n, nxt, position):
    """The token emitted at ``position`` of each row (-1 if the round emitted fewer)."""
    full = torch.cat([drafts, torch.full_like(drafts[:, :1], -1)], 1)
    tok = torch.where(n > position, full[:, position], torch.where(n == position, nxt, torch.full_like(nxt, -1)))
    return tok


@pytest.mark.parametrize("k", [1, 3])
def test_rejection_sampling_output_follows_the_verifier(k):
    """Many rounds at once: the emitted tokens at positions 0 and 1 must be distributed as p_0 and
    p_1 (total variation below 0.02), whatever q is. Sampling from q, or accepting with p alone,
    fails this."""
    V, N = 6, 200_000
    g = torch.Generator().manual_seed(1)
    q1 = (torch.rand(k, V, generator=g) * 3).softmax(-1)
    p1 = (torch.rand(k + 1, V, generator=g) * 3).softmax(-1)
    q, p = q1.expand(N, k, V), p1.expand(N, k + 1, V)
    drafts = torch.multinomial(q.reshape(-1, V), 1, generator=g).view(N, k)
    n, nxt = rejection_sample(drafts, q, p, g)
    for pos in range(min(k, 2)):
        tok = _emitted(drafts, n, nxt, pos)
        tok = tok[tok >= 0]
        freq = torch.bincount(tok, minlength=V).float() / len(tok)
        assert 0.5 * (freq - p1[pos]).abs().sum() < 0.02, (pos, freq, p1[pos])
    assert 0.5 * (q1[0] - p1[0]).abs().sum() > 0.1  # q is far from p: emitting drafts as-is would fail


def _first_two_tokens_tv(N: int = 6000, draft_vocab: int | None = None, context: bool = False) -> tuple[float, float, float]:
    """Sample the first two new tokens of N copies of one prompt with speculative sampling; return
    the total variation distance of each from the verifier's exact distribution, and alpha. The
    first comes from the prefill; the second is the one draft token of the first round, accepted
    or replaced, so the draft (which skips the last MLP) shapes what is proposed there.
    ``draft_vocab``: the draft proposes only the first n tokens of a seeded random ranking (and,
    with ``context``, the prompt's tokens and the first new tokens of the whole batch)."""
    m = tiny("llama", seed=0, gates=True)
    m.gates.thresholds[0.5] = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]])
    m.gates.token_ranking = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(1))
    ids = _prompt(T=5)
    sampling = specgate.generation.Sampling(True, temperature=0.05)  # random weights: flat logits, sharpened
    with torch.inference_mode():
        p0 = specgate.generation.probabilities(m.engine(ids, m.engine.new_cache(1, 5))[0, -1], sampling)
        both = torch.cat([ids.expand(VOCAB, -1), torch.arange(VOCAB)[:, None]], 1)  # prompt + every first token
        p1 = specgate.generation.probabilities(m.engine(both, m.engine.new_cache(VOCAB, 6))[:, -1], sampling)
    out = m.generate(
        ids.expand(N, -1), speculative=True, spec_config=SpecConfig(0.5, max_draft=1, draft_vocab=draft_vocab, draft_vocab_context=context),
        do_sample=True, temperature=0.05, top_k=0, max_new_tokens=2, return_dict_in_generate=True,
        generator=torch.Generator().manual_seed(0), **NO_EOS,
    )  # fmt: skip
    new = out.sequences[:, -2:]
    tv = lambda tokens, want: 0.5 * float((torch.bincount(tokens, minlength=VOCAB) / N - want).abs().sum())  # noqa: E731
    return tv(new[:, 0], p0), tv(new[:, 1], p0 @ p1), out.spec_stats.alpha


@pytest.mark.parametrize("draft_vocab, context", [(None, False), (40, False), (40, True)])
def test_sampled_speculative_output_follows_the_verifier(draft_vocab, context):
    """Also with a draft vocabulary, alone or grown by the text: the draft's distribution is zero
    outside it, and speculative sampling still emits the verifier's distribution exactly."""
    tv0, tv1, alpha = _first_two_tokens_tv(draft_vocab=draft_vocab, context=context)
    assert 0.1 < alpha < 0.9  # the draft differs from the verifier, and its tokens are used
    assert tv0 < 0.06 and tv1 < 0.06  # sampling noise alone is about 0.025 at N=6000


def _always_accept(drafts, draft_probs, target_probs, generator=None):
    return torch.full_like(drafts[:, 0], drafts.shape[1]), sample(target_probs[:, -1], generator)


def _resample_from_p(drafts, draft_probs, target_probs, generator=None):
    """The right acceptance test, but a rejected draft is replaced by a sample of p, not of max(p - q, 0)."""
    n, _ = rejection_sample(drafts, draft_probs, target_probs, generator)
    return n, sample(target_probs.gather(1, n[:, None, None].expand(-1, 1, target_probs.shape[2])).squeeze(1), generator)


@pytest.mark.parametrize("broken", [_always_accept, _resample_from_p])
@pytest.mark.parametrize("draft_vocab", [None, 40])
def test_the_distribution_check_catches_a_wrong_sampler(monkeypatch, broken, draft_vocab):
    monkeypatch.setattr(specgate.speculative, "rejection_sample", broken)
    tv0, tv1, _ = _first_two_tokens_tv(draft_vocab=draft_vocab)
    assert tv0 < 0.06 and tv1 > 0.06  # the first token does not involve the draft; the second does


def test_unmodified_hf_model_through_custom_generate(tmp_path):
    from conftest import tiny_hf

    import specgate

    hf = tiny_hf("llama")
    ids = _prompt(2, 6, seed=9)
    ref = hf.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    with pytest.raises(ValueError, match="attach"):
        hf.generate(ids, max_new_tokens=4, custom_generate=specgate.custom_generate)
    gates = _model("garbage").gates
    specgate.attach(hf, gates)
    kw = dict(max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    out = hf.generate(ids, custom_generate=specgate.custom_generate, draft_budget=0.5, **kw)
    assert torch.equal(out, ref)
    out = hf.generate(ids, custom_generate=specgate.custom_generate, return_dict_in_generate=True, draft_budget=0.5, **kw)
    assert out.spec_stats.rounds > 0
    with pytest.raises(NotImplementedError, match="RepetitionPenalty"):
        hf.generate(ids, custom_generate=specgate.custom_generate, repetition_penalty=1.3, **kw)
