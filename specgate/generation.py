"""Plain autoregressive decoding on the engine, and the sampling pieces speculation shares."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from .cache import GROWTH
from .engine import Engine, SkipCounter
from .gates import GateSet
from .policy import SkipPolicy
from .output import Emitter


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen; the same settings shape the draft's and the verifier's
    distributions in speculative sampling."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        # What transformers' warpers refuse is refused, nothing is reinterpreted. As there, the
        # settings are unused, and unchecked, when decoding greedily.
        if not self.do_sample:
            return
        if not self.temperature > 0:
            raise ValueError(
                f"temperature must be > 0 when sampling, got {self.temperature}: for greedy decoding pass do_sample=False"
            )
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral) or self.top_k < 0:
            raise ValueError(f"top_k must be a whole number >= 0 (0 turns it off), got {self.top_k!r}")
        if not 0 <= self.top_p <= 1:
            raise ValueError(
                f"top_p must be in [0, 1] (1 turns it off, 0 keeps only the most likely token), got {self.top_p}"
            )


def warp(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Logits (..., V) after temperature, top-k and top-p (filtered entries -inf), in float32;
    what ``transformers`` reports as ``scores`` when sampling. Greedy decoding leaves them as they are.

    On the CPU the whole-vocabulary passes cost more than the rest of a draft step's sampling
    (a sort of 49k logits ~3.7 ms a row): top-k takes the k largest and works on those alone
    (unless another logit ties the k-th, which keeps it too), and top-p alone grows its set of
    largest logits until it holds the nucleus (:func:`_top_p`). On other devices the whole-row
    operations need no host read, and are kept."""
    logits = logits.float()
    if not sampling.do_sample:
        return logits
    logits = logits / sampling.temperature
    if sampling.top_k and sampling.top_k < logits.shape[-1]:
        values, idx = logits.topk(sampling.top_k, dim=-1)  # largest first
        kth = values[..., -1:]
        if logits.device.type == "cpu" and not bool(((logits >= kth).sum(-1) > sampling.top_k).any()):  # no tie at the k-th
            if sampling.top_p < 1.0:
                values = _nucleus(values, values.logsumexp(-1, keepdim=True), sampling.top_p)
            return torch.full_like(logits, float("-inf")).scatter(-1, idx, values)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        logits = _top_p(logits, sampling.top_p)
    return logits


def _nucleus(values: torch.Tensor, log_z: torch.Tensor, top_p: float) -> torch.Tensor:
    """values (..., n) sorted largest first, of a row whose logsumexp is log_z, with the tokens
    past the smallest set reaching top_p -inf (the most likely kept even at top_p=0, as in
    transformers)."""
    probs = (values - log_z).exp()
    drop = probs.cumsum(-1) - probs >= top_p  # the more likely tokens reach top_p already
    drop[..., 0] = False
    return values.masked_fill(drop, float("-inf"))


def _top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """:func:`_nucleus` of whole rows (..., V). On the CPU the nucleus is usually a few tokens and
    a top-64 costs 1/30 of a sort: the largest k logits are taken, k growing 8x until they hold
    top_p of the mass in every row. Elsewhere k = V (a sort), with no host read."""
    V = logits.shape[-1]
    log_z = logits.logsumexp(-1, keepdim=True)
    k = min(V, 64) if logits.device.type == "cpu" else V
    while True:
        values, idx = logits.topk(k, dim=-1)
        if k == V or bool(((values - log_z).exp().cumsum(-1)[..., -1] >= top_p).all()):  # every token past the k-th is dropped
            break
        k = min(V, 8 * k)
    return torch.full_like(logits, float("-inf")).scatter(-1, idx, _nucleus(values, log_z, top_p))


def probabilities(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Next-token distribution (..., V) of the warped logits."""
    return warp(logits, sampling).softmax(-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of probs (N, V) -> (N,), by inverting the cumulative distribution: one
    uniform number per row (``torch.multinomial`` draws an exponential per token, ~1.1 ms a row of
    49k on the CPU, 10x this). A token of probability 0 is never drawn."""
    cdf = probs.double().cumsum(-1)
    cdf = cdf / cdf[:, -1:]  # the last entry is exactly 1, and u < 1
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=cdf.dtype)
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> tokens (B,)."""
    if not sampling.do_sample:
        return logits.argmax(-1)
    return sample(probabilities(logits, sampling), generator)


def logit_flags(sampling: Sampling, out: Emitter) -> dict:
    """:meth:`Engine.forward`'s flags for what decoding reads of the verifier's logits: each row's
    argmax when greedy, its top_k largest when sampling with top-k (:func:`warp` reads nothing else),
    which the engine's screened head may give; every logit when sampling without top-k, or when
    scores are kept for the caller."""
    if out.scores is not None or (sampling.do_sample and not sampling.top_k):
        return {"exact_logits": True}
    return {"exact_logits": False, "exact_top": sampling.top_k if sampling.do_sample else 1}


def left_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(B,) number of left-padding tokens; right padding is refused (it would be silently wrong)."""
    if attention_mask is None:
        return torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    mask = attention_mask.to(torch.long)
    pad = mask.shape[1] - mask.sum(1)
    T = mask.shape[1]
    expected = torch.arange(T, device=mask.device)[None] >= pad[:, None]
    if not torch.equal(mask.bool(), expected):
        raise ValueError(
            "attention_mask must be left padding (zeros, then ones): set tokenizer.padding_side = 'left'"
        )
    if bool((pad == T).any()):
        raise ValueError("a prompt in the batch is empty (its attention_mask is all zeros)")
    return pad


def prefill(
    engine: Engine,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_len: int,
    gates: GateSet | None = None,
    policy: SkipPolicy | None = None,
    exact_logits: bool = True,
    exact_top: int = 1,
):
    """A fresh cache holding the prompt, and the logits (B, V) of its last position (``exact_logits``,
    ``exact_top``: see :meth:`Engine.forward`). The cache has room for GROWTH more tokens; callers
    :meth:`~StaticKVCache.reserve` more, up to ``max_len``."""
    cache = engine.new_cache(input_ids.shape[0], min(max_len, input_ids.shape[1] + GROWTH))
    cache.reset(left_padding(input_ids, attention_mask))
    logits = engine(input_ids, cache, gates, policy, logits_to_keep=1, exact_logits=exact_logits, exact_top=exact_top)[:, -1]
    return cache, logits


@torch.inference_mode()
def plain_generate(
    engine: Engine,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    out: Emitter,
    sampling: Sampling = Sampling(),
    generator: torch.Generator | None = None,
    gates: GateSet | None = None,
    policy: SkipPolicy | None = None,
    counter: SkipCounter | None = None,
) -> None:
    """Token-by-token decoding into ``out``."""
    max_len = input_ids.shape[1] + out.max_new
    flags = logit_flags(sampling, out)
    cache, logits = prefill(engine, input_ids, attention_mask, max_len, gates, policy, **flags)
    while not out.done:
        token = next_token(logits, sampling, generator)  # (B,)
        for b, t in enumerate(token.tolist()):
            out.emit(b, [t], logits[b : b + 1])
        if out.done:
            break
        cache.reserve(max(cache.host_lengths) + 1, max_len)
        logits = engine(token[:, None], cache, gates, policy, counter=counter, **flags)[:, -1]
