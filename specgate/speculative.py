"""Self-speculative decoding: the gated model at a high skip budget drafts, the full model verifies.

Both share the weights and one :class:`StaticKVCache`. A round:

1. draft up to ``k`` tokens, one single-token pass each, with the skip policy (cheap, approximate
   K/V written into the cache);
2. verify the last emitted token and the drafts in one full-compute pass, which overwrites those
   cache slots with exact K/V;
3. accept the agreed prefix plus one token from the verifier (the bonus token);
4. rewind each sequence's write position to just after its accepted tokens: a pointer move.

Greedy output equals plain greedy decoding token for token; sampled output follows the verifier's
distribution (standard speculative sampling).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch

from .engine import Engine, KVFill, SkipCounter
from .gates import GateSet
from .generation import Sampling, logit_flags, next_token, prefill, probabilities, sample
from .kernels.cpu_step import PRECISIONS
from .output import Emitter
from .policy import SkipPolicy
from .sparse_inputs import InputCuts
from .vocab import DraftHead


@dataclass(frozen=True)
class SpecConfig:
    """Speculation settings; the one source of defaults (the CLI reads them too)."""

    # defaults: the best of eval/sweep_spec.py with the shipped SmolLM2 gates (see README)
    draft_budget: float = 0.1  # share of the draft's layer compute to skip (see Engine.branch_costs)
    max_draft: int = 4  # most tokens drafted per round
    init_draft: int | None = None  # tokens drafted in the first round; None: min(3, max_draft)
    adaptive: bool = True  # after a fully accepted round draft one more, after a rejection one fewer
    min_draft_prob: float = 0.0  # stop drafting once the draft's top-1 probability is below this
    verifier: Literal["original", "gated"] = "original"
    kv_fill: KVFill = "project"
    draft_vocab: int | None = None  # draft LM head over the n tokens the model writes most; None: all
    draft_vocab_context: bool = True  # ... and over the prompt's tokens and those generated so far
    # the draft's weight matrices: "float32" shares the model's; "bfloat16" / "int8" / "int4" read a copy made
    # on first use (extra memory; the fused CPU pass only); the verifier keeps float32: still lossless
    draft_precision: Literal["float32", "bfloat16", "int8", "int4"] = "float32"
    # share of the compute a sparse-inputs draft skips inside the branches it runs: the gates' thresholds for it
    # (`specgate calibrate --sparse-inputs`) zero each projection's small inputs (specgate.sparse_inputs); 0: off
    sparse_inputs: float = 0.0

    def __post_init__(self):
        if self.verifier not in ("original", "gated"):
            raise ValueError(f"verifier must be 'original' or 'gated', got {self.verifier!r}")
        if self.max_draft < 1:
            raise ValueError(f"max_draft must be >= 1, got {self.max_draft}")
        if self.init_draft is not None and not 1 <= self.init_draft <= self.max_draft:
            raise ValueError(
                f"init_draft must be between 1 and max_draft ({self.max_draft}), got {self.init_draft}; "
                "leave it None to draft min(3, max_draft) tokens in the first round"
            )
        if not 0.0 <= self.min_draft_prob < 1.0:
            raise ValueError(f"min_draft_prob must be in [0, 1), got {self.min_draft_prob}")
        if self.draft_precision not in PRECISIONS:
            raise ValueError(f"draft_precision must be one of {PRECISIONS}, got {self.draft_precision!r}")
        if not 0.0 <= self.sparse_inputs < 1.0:
            raise ValueError(f"sparse_inputs must be a share of the compute in [0, 1), got {self.sparse_inputs}")
        if self.draft_vocab is not None and self.draft_vocab < 1:
            raise ValueError(f"draft_vocab must be a number of tokens >= 1 (or None: the full vocabulary), got {self.draft_vocab}")

    @property
    def first_draft(self) -> int:
        """Tokens drafted in the first round."""
        return min(3, self.max_draft) if self.init_draft is None else self.init_draft


@dataclass(frozen=True)
class SpecStats:
    """What speculation bought in one ``generate`` call (all sequences of the batch together).

    tau: tokens emitted per verify pass and sequence, bonus token included. alpha: accepted /
    drafted. skip_fraction: share of the draft's (token, branch) evaluations skipped;
    compute_skipped: share of the draft's layer compute skipped (weights not read).
    verifier_logprob / draft_logprob: mean log-likelihood per emitted token under the verifier, and
    under the draft where it proposed a distribution (not for bonus tokens after a full accept; nan
    where the draft wrote no logits: the Triton path's fused draft head; -inf once the verifier
    emitted a token outside a draft vocabulary, to which the draft gives probability 0). draft_s / verify_s: host
    time of the drafts and verify passes; on a GPU, where the drafts do not wait on the device, the
    time the device takes past their launches falls in other_s (the round waits at acceptance).
    settings: where the speculation settings came from ("defaults", "spec_config", "tuned (FILE)",
    plus per-call overrides), set by ``SpecGateModel.generate``.
    """

    rounds: int
    drafted: int
    accepted: int
    new_tokens: int
    tau: float
    alpha: float
    skip_fraction: float
    compute_skipped: float
    draft_s: float
    verify_s: float
    other_s: float
    tokens_per_s: float
    verifier_logprob: float
    draft_logprob: float
    settings: str = "spec_config"


def greedy_accept(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """draft_tokens (B, k), target_logits (B, k+1, V) -> accepted count (B,), next token (B,).

    Accepted: the longest prefix where the verifier's argmax equals the draft. Next: the verifier's
    argmax right after it (a correction if a draft was rejected, the bonus token if none was)."""
    target = target_logits.argmax(-1)  # (B, k+1)
    n = (target[:, :-1] == draft_tokens).to(torch.long).cumprod(1).sum(1)
    return n, target.gather(1, n[:, None]).squeeze(1)


def rejection_sample(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling. draft_tokens (B, k) sampled from draft_probs q (B, k, V); target_probs
    p (B, k+1, V). Returns accepted count (B,) and next token (B,).

    Draft token i is accepted with probability min(1, p_i(x) / q_i(x)), in order, until the first
    rejection. At a rejection at i the next token is recovered from normalised max(p_i - q_i, 0);
    if all k are accepted it is a bonus token from p_k. The emitted tokens are distributed exactly
    as samples from p."""
    B, k = draft_tokens.shape
    p_x = target_probs[:, :k].gather(2, draft_tokens[..., None]).squeeze(2)  # (B, k)
    q_x = draft_probs.gather(2, draft_tokens[..., None]).squeeze(2)
    u = torch.rand(B, k, generator=generator, device=draft_tokens.device)
    n = (u * q_x <= p_x).to(torch.long).cumprod(1).sum(1)  # u < p/q without dividing by q
    p_n = target_probs.gather(1, n[:, None, None].expand(-1, 1, target_probs.shape[2])).squeeze(1)
    q_n = torch.cat([draft_probs, torch.zeros_like(draft_probs[:, :1])], 1)  # q = 0 after the last draft
    q_n = q_n.gather(1, n[:, None, None].expand(-1, 1, q_n.shape[2])).squeeze(1)
    residual = (p_n - q_n).clamp(min=0)
    empty = residual.sum(-1, keepdim=True) <= 0  # p == q there: sampling from p is the same law
    residual = torch.where(empty, p_n, residual)
    return n, sample(residual / residual.sum(-1, keepdim=True), generator)


class _Totals:
    def __init__(self):
        self.rounds = self.seq_rounds = self.drafted = self.accepted = self.round_tokens = 0
        self.draft_s = self.verify_s = 0.0
        self.verifier_lp: list[float] = []
        self.draft_lp: list[float] = []


@torch.inference_mode()
def speculative_generate(
    engine: Engine,
    gates: GateSet | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    out: Emitter,
    sampling: Sampling,
    config: SpecConfig = SpecConfig(),
    generator: torch.Generator | None = None,
    head: DraftHead | None = None,
) -> SpecStats:
    """Decode into ``out`` by drafting and verifying; returns the statistics of the call. ``head``:
    the draft vocabulary's LM head (:mod:`specgate.vocab`), None for the full one."""
    start_time = time.perf_counter()
    if config.draft_precision != "float32":
        engine.low_precision_step(config.draft_precision)  # made now, or refused with what to do
    counter = SkipCounter()
    if head is not None and config.draft_vocab_context:  # this call's copy, growing with its text
        head = head.with_context(input_ids if attention_mask is None else input_ids[attention_mask.bool()])
    run = draft_gates(gates, config)
    draft = _Drafter(engine, run, draft_policy(run, config), head, sampling, config, generator, counter, draft_cuts(gates, config))
    verifier = gates if config.verifier == "gated" else None
    max_len = input_ids.shape[1] + out.max_new + config.max_draft + 2
    flags = logit_flags(sampling, out)
    cache, logits = prefill(engine, input_ids, attention_mask, max_len, verifier, **flags)
    last = next_token(logits, sampling, generator)  # (B,) the first new token comes from the verifier
    grow = head.add if head is not None and config.draft_vocab_context else lambda tokens: None
    grow(last)
    tot, k = _Totals(), config.first_draft
    for b, t in enumerate(last.tolist()):
        out.emit(b, [t], logits[b : b + 1])
        tot.verifier_lp.append(float(logits[b].float().log_softmax(-1)[t]))
    while not out.done:
        active = [not f for f in out.finished]
        start = list(cache.host_lengths)  # the cache's positions, known on the host
        cache.reserve(max(start) + k + 1, max_len)  # k drafts, then k + 1 verified
        # 1. Draft up to k tokens with the skipping model.
        t0 = time.perf_counter()
        drafts, draft_logits, q = draft(cache, last, k)
        # 2. Verify the last token and the drafts in one full-compute pass.
        t1 = time.perf_counter()
        cache.rewind(start)
        target_logits = engine(torch.cat([last[:, None], drafts], 1), cache, verifier, **flags)  # (B, n+1, V)
        t2 = time.perf_counter()
        # 3. Accept the agreed prefix and one more token from the verifier.
        kern = engine.kernels  # the Triton kernels, or None: the PyTorch functions above
        if sampling.do_sample:
            accept = rejection_sample if kern is None else kern.rejection_sample
            n_acc, last = accept(drafts, q, probabilities(target_logits, sampling), generator)
        else:
            n_acc, last = greedy_accept(drafts, target_logits) if kern is None else kern.greedy_accept(drafts, target_logits)
        # 4. Keep the accepted tokens: the cache already holds their exact K/V; rewind past them.
        # Reading the acceptance is where a round waits on the device: the drafts do not.
        accepted = n_acc.tolist()
        taken = _emit_round(out, tot, active, drafts, n_acc, last, draft_logits, target_logits)
        grow(last)  # the drafts were in the vocabulary already
        # Each row's cache keeps what it emitted: the last token and its n accepted drafts, fewer
        # where the row ended in this round (0 for rows that had ended).
        cache.rewind([s + t for s, t in zip(start, taken)])
        tot.rounds += 1
        tot.draft_s += t1 - t0
        tot.verify_s += t2 - t1
        if config.adaptive:
            full = all(n == drafts.shape[1] for n, a in zip(accepted, active) if a)
            k = min(config.max_draft, k + 1) if full else max(1, k - 1)
    return _stats(tot, out, counter, time.perf_counter() - start_time)


def draft_gates(gates: GateSet | None, config: SpecConfig) -> GateSet | None:
    """The gates the draft runs: none for a draft that skips nothing where the gates only pick skips
    (it is the model itself then), so it takes the fused pass whatever their kind."""
    return gates if config.draft_budget > 0 or (gates is not None and gates.config.scale_output) else None


def draft_cuts(gates: GateSet | None, config: SpecConfig) -> InputCuts | None:
    """The draft's sparse-input thresholds (None: it reads every input)."""
    if not config.sparse_inputs:
        return None
    if gates is None:
        raise ValueError("sparse_inputs needs the thresholds stored with gates: load gates calibrated with "
                         "`specgate calibrate --sparse-inputs SHARE`, or set sparse_inputs=0")  # fmt: skip
    return gates.cuts(config.sparse_inputs)


def draft_policy(gates: GateSet | None, config: SpecConfig) -> SkipPolicy | None:
    """The draft's skip policy: calibrated single-token thresholds at the draft budget (None
    without gates: a budget-0 draft, the model itself at its draft precision)."""
    if gates is None:
        return None
    policy = gates.policy(config.draft_budget)
    if policy.thresholds is None and config.draft_budget > 0:
        raise ValueError(
            "the gates have no calibrated thresholds, so single-token draft steps would skip nothing: "
            "run `specgate calibrate --gates DIR`, or decode without speculation"
        )
    return policy


@dataclass
class _Drafter:
    """The draft: the skipping model with its policy, K/V fill and (draft vocabulary) head."""

    engine: Engine
    gates: GateSet | None
    policy: SkipPolicy | None
    head: DraftHead | None
    sampling: Sampling
    config: SpecConfig
    generator: torch.Generator | None
    counter: SkipCounter
    cuts: InputCuts | None = None

    def __call__(self, cache, last: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Up to k single-token passes after token ``last`` (B,): tokens (B, n), logits (B, n, V),
        None where the Triton path picks greedy tokens with its fused draft head (no logits), and
        when sampling the distributions they were drawn from (B, n, V), else None.

        The drafts never wait on the device, except with ``min_draft_prob`` (one read per step)."""
        kern = self.engine.kernels
        fused = kern is not None and self.head is not None and not self.sampling.do_sample
        tokens, logits, dists = [], [], []
        token = last
        for _ in range(k):
            args = (token[:, None], cache, self.gates, self.policy)
            if fused:
                h = self.engine.hidden(*args, kv_fill=self.config.kv_fill, counter=self.counter, cuts=self.cuts,
                                       precision=self.config.draft_precision)[:, -1]  # fmt: skip
                token, top = kern.draft_argmax(self.head, h)
            else:
                step = self.engine(*args, kv_fill=self.config.kv_fill, counter=self.counter, head=self.head, cuts=self.cuts,
                                   precision=self.config.draft_precision, exact_logits=self.sampling.do_sample)[:, -1]  # fmt: skip
                probs = probabilities(step, self.sampling) if self.sampling.do_sample or self.config.min_draft_prob else None
                token = sample(probs, self.generator) if self.sampling.do_sample else step.argmax(-1)
                top = None if probs is None else probs.max(-1).values
                logits.append(step)
                if self.sampling.do_sample:
                    dists.append(probs)
            tokens.append(token)
            if self.config.min_draft_prob and bool((top < self.config.min_draft_prob).all()):
                break
        stack = lambda xs: torch.stack(xs, 1) if xs else None  # noqa: E731
        return torch.stack(tokens, 1), stack(logits), stack(dists)


def _emit_round(out: Emitter, tot: _Totals, active, drafts, n_acc, last, draft_logits, target_logits) -> list[int]:
    """Hand each sequence's accepted drafts and next token to the emitter; count what happened.
    Returns the tokens each sequence took (0 for ended ones)."""
    n_drafted = drafts.shape[1]
    v_lp = target_logits.float().log_softmax(-1)
    d_lp = None if draft_logits is None else draft_logits.float().log_softmax(-1)
    took = [0] * len(active)
    for b, running in enumerate(active):
        if not running:
            continue
        m = int(n_acc[b])
        tokens = drafts[b, :m].tolist() + [int(last[b])]
        took[b] = taken = out.emit(b, tokens, target_logits[b, : m + 1])
        tot.seq_rounds += 1
        tot.drafted += n_drafted
        tot.accepted += m
        tot.round_tokens += taken
        tot.verifier_lp += [float(v_lp[b, j, t]) for j, t in enumerate(tokens[:taken])]
        if d_lp is not None:
            tot.draft_lp += [float(d_lp[b, j, t]) for j, t in enumerate(tokens[: min(taken, n_drafted)])]
    return took


def _stats(tot: _Totals, out: Emitter, counter: SkipCounter, seconds: float) -> SpecStats:
    new = sum(map(len, out.tokens))
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return SpecStats(
        rounds=tot.rounds,
        drafted=tot.drafted,
        accepted=tot.accepted,
        new_tokens=new,
        tau=tot.round_tokens / tot.seq_rounds if tot.seq_rounds else 0.0,
        alpha=tot.accepted / tot.drafted if tot.drafted else 0.0,
        skip_fraction=counter.fraction,
        compute_skipped=counter.compute_fraction,
        draft_s=tot.draft_s,
        verify_s=tot.verify_s,
        other_s=seconds - tot.draft_s - tot.verify_s,
        tokens_per_s=new / seconds if seconds else 0.0,
        verifier_logprob=mean(tot.verifier_lp),
        draft_logprob=mean(tot.draft_lp),
    )
