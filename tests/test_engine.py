"""The engine against the Hugging Face forward, the static cache, and skipping for real."""

import dataclasses

import pytest
import torch
from conftest import FAMILIES, VOCAB, left_padded, tiny

from specgate import BudgetPolicy
from specgate.engine import SkipCounter



@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _ids(B=2, T=11, seed=0):
    return torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_hf_forward(family):
    m = tiny(family)
    ids = _ids()
    cache = m.engine.new_cache(2, 16)
    torch.testing.assert_close(m.engine(ids, cache), m.hf_model(ids).logits)
    assert cache.lengths.tolist() == [11, 11]


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_then_single_steps_equal_full_forward(family):
    m = tiny(family)
    ids = _ids(T=14)  # longer than gemma3's sliding window of 5
    full = m.hf_model(ids).logits
    cache = m.engine.new_cache(2, 20)
    parts = [m.engine(ids[:, :4], cache), m.engine(ids[:, 4:7], cache)]  # prefill, a verify-style pass
    parts += [m.engine(ids[:, t : t + 1], cache) for t in range(7, 14)]
    torch.testing.assert_close(torch.cat(parts, 1), full)


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_equals_unpadded_rows(family):
    m = tiny(family)
    long, short = _ids(1, 9, seed=1)[0], _ids(1, 5, seed=2)[0]
    ids = torch.stack([long, torch.cat([torch.zeros(4, dtype=torch.long), short])])
    mask = (torch.arange(9)[None] >= torch.tensor([[0], [4]])).long()
    cache = m.engine.new_cache(2, 12)
    cache.reset(torch.tensor([0, 4]))
    logits = m.engine(ids, cache)
    torch.testing.assert_close(logits[0], m.hf_model(long[None]).logits[0])
    torch.testing.assert_close(logits[1, 4:], m.hf_model(short[None]).logits[0])
    torch.testing.assert_close(logits, m.hf_model(ids, attention_mask=mask).logits * mask[..., None] + logits * (1 - mask[..., None]))


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_transformers_generate_batch1(family):
    m = tiny(family)
    ids = _ids(1, 6)
    ref = m.hf_model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(m.generate(ids, max_new_tokens=24, eos_token_id=None, pad_token_id=0), ref)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_greedy_equals_transformers_generate_left_padded_batch(family):
    m = tiny(family)
    ids, mask = left_padded(_ids(3, 8, seed=3), [0, 3, 5])
    kwargs = dict(attention_mask=mask, max_new_tokens=20, eos_token_id=7, pad_token_id=0)
    ref = m.hf_model.generate(ids, do_sample=False, **kwargs)
    assert torch.equal(m.generate(ids, **kwargs), ref)


def test_sampling_is_seeded_and_respects_top_k():
    m = tiny("llama")
    ids = _ids(1, 5)
    run = lambda seed, **kw: m.generate(  # noqa: E731
        ids, max_new_tokens=30, do_sample=True, eos_token_id=None, generator=torch.Generator().manual_seed(seed), **kw
    )
    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))
    out = run(0, top_k=1)  # top-k 1 is greedy whatever the seed
    assert torch.equal(out, m.generate(ids, max_new_tokens=30, eos_token_id=None))


def test_right_padding_and_unknown_arguments_are_refused():
    m = tiny("llama")
    ids = _ids(2, 5)
    with pytest.raises(ValueError, match="left padding"):
        m.generate(ids, attention_mask=torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]), max_new_tokens=2)
    with pytest.raises(NotImplementedError, match="num_beams"):
        m.generate(ids, max_new_tokens=2, num_beams=2)
    with pytest.raises(TypeError, match="not_an_argument"):
        m.generate(ids, max_new_tokens=2, not_an_argument=1)


def test_weights_are_shared_not_copied():
    m = tiny("llama")
    attn = m.hf_model.model.layers[0].self_attn
    fused = m.engine.weights.layers[0].qkv_w
    assert attn.q_proj.weight.data_ptr() == fused.data_ptr()
    assert attn.k_proj.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    with torch.no_grad():
        attn.v_proj.weight.mul_(2)  # an edit through the HF module is what the engine sees
    ids = _ids()
    torch.testing.assert_close(m.engine(ids, m.engine.new_cache(2, 16)), m.hf_model(ids).logits)


# -- gates and skipping ----------------------------------------------------------------------------


class FixedMasks:
    """A policy whose active tokens are given: masks[(layer, branch)] (B, T) bool."""

    def __init__(self, masks):
        self.masks = masks

    def may_skip(self, layer, branch, T):
        return True

    def active(self, importance, valid, layer, branch):
        return self.masks[(layer, branch)]


def _dense_masked_reference(m, ids, masks, scale_output=True):
    """HF forward where every branch output is multiplied by gate * active (compute, then mask)."""
    handles = []
    for i, layer in enumerate(m.hf_model.model.layers):
        for branch, module in ((0, layer.self_attn), (1, layer.mlp)):

            def hook(mod, args, kwargs, out, i=i, branch=branch):
                x = kwargs["hidden_states"] if branch == 0 else args[0]
                g = m.gates.gate(i, branch)(x) if scale_output else 1.0
                scale = g * masks[(i, branch)][..., None]
                return (out[0] * scale, *out[1:]) if branch == 0 else out * scale

            handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        return m.hf_model(ids).logits
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("scale_output", [True, False])
def test_sparse_gather_scatter_equals_dense_compute_and_mask(scale_output):
    m = tiny("llama", gates=True)
    ids = _ids(2, 9)
    gen = torch.Generator().manual_seed(5)
    masks = {(i, b): torch.rand(2, 9, generator=gen) < 0.6 for i in range(4) for b in (0, 1)}
    masks[(2, 0)][:] = False  # a branch nobody runs
    m.gates.config = dataclasses.replace(m.gates.config, scale_output=scale_output)
    got = m.engine(ids, m.engine.new_cache(2, 12), m.gates, FixedMasks(masks))
    torch.testing.assert_close(got, _dense_masked_reference(m, ids, masks, scale_output))


def test_gated_full_compute_scales_branches_and_starts_near_original():
    m = tiny("llama", gates=False)
    m.gates = m.new_gates()  # fresh gates: bias 5, sigmoid ~ 0.993
    ids = _ids()
    full = m.hf_model(ids).logits
    gated = m.engine(ids, m.engine.new_cache(2, 16), m.gates)
    assert not torch.allclose(gated, full)
    masks = {(i, b): torch.ones(2, 11, dtype=torch.bool) for i in range(4) for b in (0, 1)}
    torch.testing.assert_close(gated, _dense_masked_reference(m, ids, masks))


def test_budget_one_passes_the_residual_through():
    m = tiny("llama", gates=True)
    ids = _ids()
    w = m.engine.weights
    counter = SkipCounter()
    got = m.engine(ids, m.engine.new_cache(2, 16), m.gates, BudgetPolicy(budget=1.0), counter=counter)
    h = torch.nn.functional.embedding(ids, w.embed)  # nothing ran: h is the embedding
    expected = torch.nn.functional.linear(torch.nn.functional.rms_norm(h, (64,), w.final_norm, w.eps), w.lm_head)
    torch.testing.assert_close(got, expected)
    assert counter.fraction == 1.0 and counter.total == 2 * 4 * 2 * 11


def test_budget_skips_the_requested_share_of_valid_tokens():
    m = tiny("llama", gates=True)
    ids = _ids(2, 10)
    cache = m.engine.new_cache(2, 12)
    cache.reset(torch.tensor([0, 4]))  # 16 valid tokens, padding never counted
    counter = SkipCounter()
    m.engine(ids, cache, m.gates, BudgetPolicy(budget=0.25), counter=counter)
    assert counter.total == 16 * 8 and counter.skipped == 4 * 8


@pytest.mark.parametrize("kv_fill", ["project", "copy_below"])
def test_kv_fill_at_skipped_positions(kv_fill):
    m = tiny("llama", gates=True)
    ids = _ids(1, 6)
    cache = m.engine.new_cache(1, 8)
    m.engine(ids, cache, m.gates, BudgetPolicy(budget=1.0), kv_fill=kv_fill)
    k = torch.stack(cache.k)[:, 0, :, :6]  # (L, kv_heads, 6, hd)
    assert k.abs().sum(-1).gt(0).all(), "every layer's K at every position is filled"
    if kv_fill == "copy_below":
        for i in range(1, 4):
            torch.testing.assert_close(k[i], k[0])
    else:  # K of layer i from its own projection of the unchanged (embedding) hidden state
        ref = torch.empty(0)
        hf = m.hf_model.model
        h = hf.embed_tokens(ids)
        cos, sin = hf.rotary_emb(h, torch.arange(6)[None])
        for i in range(1, 4):
            attn = hf.layers[i].self_attn
            kk = attn.k_proj(hf.layers[i].input_layernorm(h)).view(1, 6, 2, 16).transpose(1, 2)
            from specgate.ops import apply_rope

            ref = apply_rope(kk, cos, sin)[0]
            torch.testing.assert_close(k[i], ref)


def test_single_token_steps_use_thresholds():
    m = tiny("llama", gates=True)
    ids = _ids(1, 6)
    off = torch.full((2, 4), -1.0)  # importance in (0, 1) is always above: nothing skips
    on = torch.full((2, 4), 2.0)  # always at or below: everything skips
    results = {}
    for name, th in (("off", off), ("on", on)):
        cache = m.engine.new_cache(1, 8)
        m.engine(ids[:, :5], cache, m.gates)
        counter = SkipCounter()
        results[name] = m.engine(ids[:, 5:], cache, m.gates, BudgetPolicy(budget=0.5, thresholds=th), counter=counter)
        assert counter.fraction == (0.0 if name == "off" else 1.0)
    cache = m.engine.new_cache(1, 8)
    gated = m.engine(ids, cache, m.gates)[:, -1:]
    torch.testing.assert_close(results["off"], gated)
    # without thresholds a single token has no quantile: nothing skips
    cache = m.engine.new_cache(1, 8)
    m.engine(ids[:, :5], cache, m.gates)
    counter = SkipCounter()
    m.engine(ids[:, 5:], cache, m.gates, BudgetPolicy(budget=0.5), counter=counter)
    assert counter.skipped == 0


def test_gates_off_is_exactly_the_original_model():
    m = tiny("gemma3", gates=True)
    ids = _ids()
    torch.testing.assert_close(m.engine(ids, m.engine.new_cache(2, 16), gates=None), m.hf_model(ids).logits)


@pytest.mark.parametrize("kv_fill", ["project", "copy_below"])
def test_gradients_reach_the_gates_through_the_cached_forward(kv_fill):
    """Gates that scale their branches learn through the engine's cached forward too (gates that
    only decide learn at skipped tokens, which only the dense training forward computes)."""
    m = tiny("llama", gates=True)
    ids = _ids()
    with torch.enable_grad():
        out = m.engine(ids, m.engine.new_cache(2, 11), m.gates, BudgetPolicy(budget=0.3), kv_fill=kv_fill)
        out.logsumexp(-1).mean().backward()
    grads = [p.grad for p in m.gates.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


class _Delegate:
    """A BudgetPolicy seen through the SkipPolicy protocol only: the engine's general path."""

    def __init__(self, policy):
        self.policy = policy

    def may_skip(self, layer, branch, T):
        return self.policy.may_skip(layer, branch, T)

    def active(self, importance, valid, layer, branch):
        return self.policy.active(importance, valid, layer, branch)


@torch.no_grad()
def test_the_batch_one_draft_step_decides_as_the_general_path():
    """A single-token, batch-1 step with calibrated thresholds takes a shortcut (one host read per
    branch); it skips the same branches and gives the same logits and counts as the protocol path."""
    m = tiny("llama", gates=True)
    m.gates.config = dataclasses.replace(m.gates.config, scale_output=False)
    L = m.engine.num_layers
    imp = torch.rand(2, L, generator=torch.Generator().manual_seed(0))
    policy = BudgetPolicy(thresholds=imp * 0.9 + 0.05)
    ids = torch.randint(3, 101, (1, 8), generator=torch.Generator().manual_seed(2))
    for kv_fill in ("project", "copy_below"):
        got, counts = [], []
        for p in (policy, _Delegate(policy)):
            cache, counter = m.engine.new_cache(1, 8), SkipCounter()
            m.engine(ids[:, :4], cache)
            got.append(torch.cat([m.engine(ids[:, t : t + 1], cache, m.gates, p, kv_fill=kv_fill, counter=counter) for t in range(4, 8)]))
            counts.append((counter.total, counter.skipped, counter.compute_skipped))
        assert torch.equal(got[0], got[1]) and counts[0] == counts[1] and 0 < counts[0][1] < counts[0][0]
