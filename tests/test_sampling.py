"""The sampling pieces (specgate.generation): warped logits as transformers' warpers give them, and
the sampler's draws."""

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from specgate.generation import Sampling, sample, warp


def _nucleus(logits, temperature, top_k, top_p):
    """Each token's mass of the more likely tokens (float64, after temperature and top-k) and
    whether the reference keeps it: sort, then keep while that mass is below top_p."""
    x = logits.double() / temperature
    if top_k:
        x = x.masked_fill(x < x.topk(top_k, dim=-1).values[..., -1:], float("-inf"))
    sorted_x, idx = x.sort(-1, descending=True)
    p = sorted_x.softmax(-1)
    before = torch.zeros_like(p).scatter(-1, idx, p.cumsum(-1) - p)
    return before, (before < top_p) & (x > float("-inf")) | (x == x.amax(-1, keepdim=True))


@pytest.mark.parametrize("scale", [0.05, 1.0, 8.0])  # 0.05: nearly flat, the nucleus is most of the vocabulary
@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (0, 0.3), (50, 0.95), (0, 0.999), (7, 1.0)])
def test_warp_keeps_the_nucleus(scale, top_k, top_p):
    """The nucleus is found among the largest logits, their number growing until it holds top_p:
    the tempered logits of the tokens a sort of the whole row keeps (in float64; a token whose
    preceding mass is within float32 rounding of top_p may fall either way), -inf elsewhere."""
    g = torch.Generator().manual_seed(int(scale * 100) + top_k)
    logits = torch.randn(3, 4, 20_000, generator=g) * scale
    ours = warp(logits, Sampling(True, 0.7, top_k, top_p))
    before, kept = _nucleus(logits, 0.7, top_k, top_p)
    edge = (before - top_p).abs() < 1e-4
    assert torch.equal((ours > float("-inf")) & ~edge, kept & ~edge)
    assert torch.equal(ours[kept & ~edge], logits[kept & ~edge] / 0.7)
    n = kept.sum(-1)
    assert n.min() >= 1 and (top_p == 1 or n.max() < 20_000)
    assert top_k or scale > 1 or n.max() > 64  # large nuclei too: k grew past its first 64


def test_warp_equals_transformers_warpers():
    """Where the nucleus is a few tokens (as in decoding), exactly transformers' logits."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 20_000, generator=g) * 6
    for top_k, top_p in [(0, 0.9), (50, 0.95), (20, 1.0)]:
        theirs = TemperatureLogitsWarper(0.7)(None, logits.clone())
        theirs = TopKLogitsWarper(top_k)(None, theirs) if top_k else theirs
        theirs = TopPLogitsWarper(top_p)(None, theirs) if top_p < 1 else theirs
        assert torch.equal(warp(logits, Sampling(True, 0.7, top_k, top_p)), theirs)
    tied = (logits * 2).round() / 2  # many logits tie with the k-th largest: top-k keeps them all
    for top_k, top_p in [(50, 1.0), (50, 0.95)]:
        theirs = TopKLogitsWarper(top_k)(None, TemperatureLogitsWarper(0.7)(None, tied.clone()))
        theirs = TopPLogitsWarper(top_p)(None, theirs) if top_p < 1 else theirs
        ours = warp(tied, Sampling(True, 0.7, top_k, top_p))
        kept = ours > float("-inf")
        assert (kept.sum(-1) > top_k).all() if top_p == 1 else (kept.sum(-1) < top_k).all()
        # which of the tokens tied at the nucleus' edge stay is the sort's choice: the same number, of the same values
        assert all(torch.equal(o[o > float("-inf")].sort().values, t[t > float("-inf")].sort().values) for o, t in zip(ours, theirs))


def test_warp_is_the_identity_when_greedy():
    logits = torch.randn(2, 10)
    assert torch.equal(warp(logits, Sampling(False, 0.5, 3, 0.5)), logits)


def test_sample_follows_the_distribution_and_never_draws_a_zero():
    probs = torch.tensor([0.1, 0.0, 0.45, 0.05, 0.0, 0.4])
    N = 200_000
    draws = sample(probs.expand(N, -1), torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=6).float() / N
    assert freq[1] == 0 and freq[4] == 0
    assert 0.5 * float((freq - probs).abs().sum()) < 0.005  # sampling noise is about 0.002 here
    unnormalised = sample(torch.tensor([[0.0, 3.0, 1.0]]).expand(N, -1), torch.Generator().manual_seed(1))
    assert float((unnormalised == 1).float().mean()) == pytest.approx(0.75, abs=0.01)
    again = lambda seed: sample(probs.expand(50, -1), torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(again(3), again(3)) and not torch.equal(again(3), again(4))


def test_bench_seeds_every_method_alike_and_reports_no_exact_match_when_sampled():
    """specgate bench --temperature: each method's call on a prompt starts from the same seed, so
    a rerun gives the same samples; samples of different methods are not compared token by token."""
    from conftest import tiny

    from specgate import bench

    m = tiny("llama")
    ids = [torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    flags = dict(max_new_tokens=12, do_sample=True, temperature=1.5, eos_token_id=None)
    methods = {"plain": lambda x: m.generate(x, **flags), "again": lambda x: m.generate(x, **flags)}
    first, second = bench.run(ids, methods, seed=5), bench.run(ids, methods, seed=5)
    assert first["plain"].outputs == first["again"].outputs == second["plain"].outputs
    assert bench.run(ids, methods, seed=6)["plain"].outputs != first["plain"].outputs
    table = bench.report(first, reference="plain", sampled=True)
    assert "100%" not in table and "100%" in bench.report(first, reference="plain")
