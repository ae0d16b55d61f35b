"""Gate training: the paper's objective, distillation into the skipping draft, and the fitted
removal damage (:mod:`specgate.damage`), on ``accelerate``.

The engine's forward writes K/V in place into one preallocated cache, which autograd cannot
differentiate through (a later layer's write invalidates the K/V an earlier layer saved for
backward). Training therefore runs :func:`gated_forward`: the same layer math over the same weights
(``engine.spec``), computed densely over whole sequences, with skipping applied as a hard 0/1 mask
on each branch's output. A masked branch adds exactly what a really skipped branch adds (nothing),
and its token's K/V come from the passed-through hidden state, as the engine's ``kv_fill="project"``.

Three objectives (``TrainConfig.objective``):

- ``paper``: next-token cross-entropy + lambda * mean over branches of mean(g^2), with hard skipping
  at a per-batch importance quantile that warms up from 0 to ``budget_max``.
- ``distill``: KL(original model || skipping model) of the next-token distributions, at budgets
  sampled in [``budget_min``, ``budget_max``] (plus the same L2 term): what draft acceptance against
  the original model rewards. The original model's pass (no grad) also gives this batch's
  importances, whose budget quantile is the step's skip threshold.
- ``damage``: no gradient descent. Every (token, branch) of the data is labelled with what skipping
  that branch alone for that token alone costs (KL to the original model), and each scalar gate is
  fitted to predict it; see :mod:`specgate.damage`.

Budgets are spread over branches by ``allocation``: ``global`` (default) skips every (token, branch)
whose importance is at or below one threshold shared by all branches, so the gates decide which
branches give up compute; ``branch`` skips the budget's share in every branch (the paper).

``scale_output=False`` (the default) keeps every computed branch output unscaled: the gates only
decide what to skip, so at budget 0 the draft *is* the original model. The gate then learns from a
straight-through gradient at the skipped tokens: d loss / d g = <d loss / d branch output, branch
output>, the first-order gain of running the branch for that token after all.

``init_order`` starts the gates as a static skip order (least harmful branches first, measured by
``eval/gate_quality.py``); see the README / report for what training on top of it measured.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn.functional as F

from .adapters import ModelSpec
from .engine import Engine
from .gates import GateConfig, GateSet, save_gates, skip_lowest
from .ops import apply_rope, rms_norm

Objective = Literal["paper", "distill", "damage"]
Allocation = Literal["global", "branch"]
CHECKPOINT_NAME = "checkpoint.pt"


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; the ``specgate train`` flags read their defaults here."""

    objective: Objective = "damage"  # see the module docstring; README: which drafts best
    data: str | None = None  # .txt or .jsonl file; None: the default corpus (see default_corpus)
    output_dir: str = "runs/gates"
    steps: int = 1000
    batch_size: int = 4  # sequences per step and process
    seq_len: int = 256
    optimizer: Literal["sgd", "adamw"] = "sgd"  # see make_optimizer
    lr: float = 0.5
    clip: float = 1.0  # sgd: each parameter tensor's gradient norm is clipped to this
    sparsity: float = 0.1  # lambda of the L2 term mean(g^2)
    ridge: float = 1.0  # damage: L2 penalty on the (standardized) weights of the Poisson fit
    budget_max: float = 0.5  # share of (token, branch) evaluations skipped (warm-up target for paper)
    budget_min: float = 0.1  # distill: lower end of the sampled budgets
    warmup_steps: int = 200  # budget warm-up: 0 -> budget_max (paper); range scaled up (distill)
    allocation: Allocation = "global"  # one importance threshold over all branches, or per branch
    scale_output: bool = False  # True: gates scale branch outputs (the GateSkip model)
    gate_kind: str | None = None  # None: "scalar" for damage, "lowrank" otherwise
    gate_rank: int = 32
    gate_bias_init: float | None = None  # None: 5.0 with scale_output (starts as the original model), else 0.0
    init_order: str | None = None  # JSON list of [layer, branch], least harmful first: see init_from_order
    never_skip: tuple[tuple[int, int], ...] = ()  # (layer, branch) pairs that always run
    seed: int = 0
    checkpoint_every: int = 50
    resume: bool = True  # continue from output_dir/checkpoint.pt when it exists
    time_limit_s: float | None = None  # stop (with a checkpoint) after this many seconds
    threads: int | None = None  # torch.set_num_threads on CPU
    # default corpus: the model's own answers to specgate.prompts (train split) + pydoc topics
    answers_per_prompt: int = 2  # 1 greedy, the rest sampled at temperature 0.8
    answer_tokens: int = 256
    pydoc_share: float = 0.3  # share of default-corpus tokens taken from pydoc_data.topics

    def __post_init__(self):
        if self.objective not in ("paper", "distill", "damage"):
            raise ValueError(f"objective must be 'paper', 'distill' or 'damage', got {self.objective!r}")
        if self.objective == "damage" and (self.gate_kind not in (None, "scalar") or self.scale_output):
            raise ValueError("the damage objective fits scalar gates that only pick skips: drop --gate-kind and --scale-output")
        if self.allocation not in ("global", "branch"):
            raise ValueError(f"allocation must be 'global' or 'branch', got {self.allocation!r}")
        if not (0.0 <= self.budget_min <= 1.0 and 0.0 <= self.budget_max <= 1.0):
            raise ValueError(f"budgets must be in [0, 1], got {self.budget_min}, {self.budget_max}")
        if self.objective == "distill" and self.budget_min > self.budget_max:
            raise ValueError(f"budget_min {self.budget_min} is above budget_max {self.budget_max}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.steps < 0 or self.batch_size < 1 or self.seq_len < 2:
            raise ValueError("steps must be >= 0, batch_size >= 1 and seq_len >= 2")


@dataclass(frozen=True)
class StepStats:
    loss: float  # objective term (CE or KL), without the sparsity term
    sparsity: float  # mean over branches of mean(g^2)
    gate_mean: float  # mean importance
    skipped: float  # share of valid (token, branch) evaluations skipped
    budget: float  # the budget of this step
    tokens: int  # valid tokens in the batch


# -- data --------------------------------------------------------------------------------------


def load_documents(path: str | Path, tokenizer) -> list[list[int]]:
    """Token ids of each document of a user file: plain text (one document), or JSONL with one
    ``{"text": ...}`` or ``{"messages": [{"role", "content"}, ...]}`` object per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training data {path} does not exist")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"training data {path} is not UTF-8 text: {e}") from e
    if not raw.strip():
        raise ValueError(f"training data {path} is empty")
    if path.suffix not in (".jsonl", ".json"):
        return [tokenizer(raw, add_special_tokens=False).input_ids]
    docs = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg}); expected one JSON object per line") from e
        docs.append(_record_ids(record, tokenizer, f"{path}:{n}"))
    if not docs:
        raise ValueError(f"training data {path} has no records")
    return docs


def _record_ids(record, tokenizer, where: str) -> list[int]:
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return tokenizer(record["text"], add_special_tokens=False).input_ids
    if isinstance(record, dict) and isinstance(record.get("messages"), list):
        msgs = record["messages"]
        if not all(isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m for m in msgs):
            raise ValueError(f"{where}: every message needs 'role' and a string 'content'")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{where}: 'messages' records need a tokenizer with a chat template")
        return tokenizer(tokenizer.apply_chat_template(msgs, tokenize=False), add_special_tokens=False).input_ids
    raise ValueError(f'{where}: expected an object with a string "text" or a "messages" list, got {str(record)[:80]!r}')


@torch.inference_mode()
def self_answers(
    model, prompts: list[str], max_new_tokens: int = 256, batch_size: int = 8, temperature: float = 0.0, seed: int = 0
) -> list[str]:
    """The model's own answers to chat prompts, decoded with our engine in left-padded batches."""
    tok = model.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    generator = torch.Generator().manual_seed(seed)
    answers = []
    try:
        for i in range(0, len(prompts), batch_size):
            texts = [
                tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                for p in prompts[i : i + batch_size]
            ]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(
                enc.input_ids, enc.attention_mask, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                temperature=temperature or None, top_p=1.0, top_k=0, generator=generator,
            )  # fmt: skip
            answers += tok.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
    finally:
        tok.padding_side = side
    return [a.strip() for a in answers]


def chat_ids(tokenizer, prompt: str, answer: str) -> list[int]:
    """One conversation (user prompt, assistant answer) through the chat template."""
    msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return tokenizer(tokenizer.apply_chat_template(msgs, tokenize=False), add_special_tokens=False).input_ids


def default_corpus(model, config: TrainConfig, cache_file: str | Path | None = None) -> list[list[int]]:
    """The model's own answers to the train split of :mod:`specgate.prompts` (cached as JSONL in
    ``cache_file``), plus ``pydoc_data.topics`` text for ``pydoc_share`` of the tokens."""
    from .prompts import split

    train_prompts, _ = split()
    cache_file = Path(cache_file) if cache_file else None
    if cache_file is not None and cache_file.is_file():
        records = [json.loads(line) for line in cache_file.read_text().splitlines() if line.strip()]
    else:
        records = []
        for k in range(config.answers_per_prompt):
            temp = 0.0 if k == 0 else 0.8
            answers = self_answers(model, train_prompts, config.answer_tokens, temperature=temp, seed=config.seed + k)
            records += [{"prompt": p, "answer": a} for p, a in zip(train_prompts, answers)]
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            cache_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    docs = [chat_ids(model.tokenizer, r["prompt"], r["answer"]) for r in records]
    n_answer = sum(map(len, docs))
    budget = int(n_answer * config.pydoc_share / max(1e-9, 1 - config.pydoc_share))
    for text in pydoc_texts():
        if budget <= 0:
            break
        ids = model.tokenizer(text, add_special_tokens=False).input_ids[: config.seq_len * 4]
        docs.append(ids)
        budget -= len(ids)
    return docs


def pydoc_texts() -> list[str]:
    """Python's own help topics (installed with every Python), in a fixed order."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def chunk(docs: list[list[int]], seq_len: int, min_len: int = 16) -> list[list[int]]:
    """Split documents into pieces of at most seq_len tokens (shorter tails of < min_len dropped)."""
    out = []
    for ids in docs:
        for i in range(0, len(ids), seq_len):
            piece = ids[i : i + seq_len]
            if len(piece) >= min(min_len, len(ids)) and len(piece) >= 2:
                out.append(piece)
    if not out:
        raise ValueError("the training data has no sequence of 2 or more tokens")
    return out


def collate(pieces: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T) and valid mask (B, T)."""
    T = max(map(len, pieces))
    ids = torch.full((len(pieces), T), pad_id, dtype=torch.long)
    valid = torch.zeros(len(pieces), T, dtype=torch.bool)
    for b, p in enumerate(pieces):
        ids[b, : len(p)] = torch.tensor(p)
        valid[b, : len(p)] = True
    return ids, valid


def batch_indices(n: int, batch: int, step: int, seed: int) -> list[int]:
    """The sequences of one step: epochs of seeded permutations, a pure function of the step."""
    start = step * batch
    out = []
    while len(out) < batch:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out += perm[offset : offset + batch - len(out)].tolist()
    return out


# -- the training forward -----------------------------------------------------------------------

# decide(importance (B, T), layer, branch) -> run mask (B, T) bool, or None: every token runs
Decide = Callable[[torch.Tensor, int, int], "torch.Tensor | None"]


@dataclass
class ForwardRecord:
    """What one :func:`gated_forward` saw: per branch the importances and skip masks (B, T)."""

    importance: list[torch.Tensor] = field(default_factory=list)  # 2L entries, order (layer, branch)
    run: list[torch.Tensor | None] = field(default_factory=list)
    sq: list[torch.Tensor] = field(default_factory=list)  # mean_j g_j^2, (B, T), with grad


def gated_forward(
    engine: Engine,
    input_ids: torch.Tensor,
    gates: GateSet | None = None,
    decide: Decide | None = None,
    scale_output: bool = True,
    record: ForwardRecord | None = None,
) -> torch.Tensor:
    """Differentiable dense forward over whole sequences (B, T) from position 0 -> logits (B, T, V).

    Same semantics as ``engine(ids, fresh_cache, gates, policy)`` with ``kv_fill="project"`` when
    ``decide`` picks the same tokens: a skipped (token, branch) adds nothing to the residual stream.
    """
    s = engine.spec
    rope, masks = dense_rope_masks(s, input_ids)
    h = embed(s, input_ids)

    def add(h, x, o, i, branch):
        if gates is None:
            return h + o
        g = gates.gate(i, branch)(x)  # (B, T, d|1)
        imp = g.mean(-1)
        run = decide(imp.detach(), i, branch) if decide is not None else None
        if record is not None:
            record.importance.append(imp.detach())
            record.run.append(run)
            record.sq.append(g.pow(2).mean(-1))
        if scale_output:  # the GateSkip model: skipped tokens add nothing and teach the gate nothing
            factor = g if run is None else g * run[..., None].to(g.dtype)
        elif run is None:  # nothing skipped: the original branch, and no gradient to the gate
            return h + o
        else:  # value: 1 where the branch runs, 0 where skipped. Gradient only where skipped:
            # <d loss / d branch output, branch output> there is what adding the branch back would
            # give. (At a running token the gradient at scale 1 is a local sensitivity, not the
            # cost of removing the branch; following it degraded a static skip order here.)
            keep = run[..., None].to(g.dtype)
            factor = keep + (1.0 - keep) * (g - g.detach())
        return h + factor * o

    for i, lw in enumerate(s.layers):
        x, o, _ = attention_branch(s, lw, h, rope, masks)  # K/V of skipped tokens: passed-through state
        h = add(h, x, o, i, 0)
        x, o = mlp_branch(s, lw, h)
        h = add(h, x, o, i, 1)
    return head(s, h)


# The layer math of a dense forward over whole sequences (B, T) from position 0, one function per
# branch: each returns the branch's normed input x and its output o (post-norm applied), so the
# caller decides what reaches the residual stream.


def dense_rope_masks(s: ModelSpec, input_ids: torch.Tensor) -> tuple[dict, dict]:
    """RoPE tables per kind and attention masks per sliding window (None: plain causal)."""
    B, T = input_ids.shape
    positions = torch.arange(T, device=input_ids.device)[None].expand(B, T)
    empty = torch.empty(0, dtype=s.embed.dtype, device=s.embed.device)
    rope = {k: fn(empty, positions) for k, fn in s.rope.items()}
    j = torch.arange(T, device=input_ids.device)
    masks = {w: (j[None] <= j[:, None]) & (j[:, None] - j[None] < w) for w in {lw.window for lw in s.layers} if w}
    return rope, masks


def embed(s: ModelSpec, input_ids: torch.Tensor) -> torch.Tensor:
    h = F.embedding(input_ids, s.embed)  # (B, T, d)
    return h * torch.tensor(s.embed_scale, dtype=h.dtype) if s.embed_scale != 1.0 else h


def attention_branch(s: ModelSpec, lw, h, rope, masks, history=None):
    """-> (x, o, (k, v)) with k, v (B, kv_heads, T, hd) of this pass.

    ``history``: (k, v) of another pass, e.g. the original model's. Each position then attends to
    the history's keys and values for all earlier positions and to its own from this pass: exactly
    a single-token step against a cache filled by that other pass, done for every position at once.
    """
    B, T, _ = h.shape
    q_dim = s.n_heads * s.head_dim
    x = rms_norm(h, lw.attn_norm, s.eps)
    qkv = F.linear(x, lw.qkv_w, lw.qkv_b)
    q = qkv[..., :q_dim].view(B, T, s.n_heads, s.head_dim).transpose(1, 2)  # (B, nh, T, hd)
    k, v = qkv[..., q_dim:].view(B, T, 2, s.n_kv_heads, s.head_dim).permute(2, 0, 3, 1, 4)
    if lw.q_norm is not None:
        q, k = rms_norm(q, lw.q_norm, s.eps), rms_norm(k, lw.k_norm, s.eps)
    cos, sin = rope[lw.rope]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    mask = masks.get(lw.window)
    if history is None:
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=s.scaling, enable_gqa=True
        )  # (B, nh, T, hd)
    else:
        o = _attend_with_history(q, k, v, *history, mask, s.scaling)
    o = F.linear(o.transpose(1, 2).reshape(B, T, q_dim), lw.o_w, lw.o_b)
    return x, _post(s, o, lw.post_attn_norm), (k, v)


def _attend_with_history(q, k, v, k_hist, v_hist, mask, scaling):
    """Causal attention of q (B, nh, T, hd) over k_hist, v_hist, except that the diagonal (each
    position's own key and value) comes from k, v."""
    rep = q.shape[1] // k.shape[1]
    k, v, k_hist, v_hist = (t.repeat_interleave(rep, dim=1) for t in (k, v, k_hist, v_hist))
    scores = (q @ k_hist.transpose(-1, -2)) * scaling  # (B, nh, T, T)
    scores.diagonal(dim1=-2, dim2=-1).copy_((q * k).sum(-1) * scaling)
    T = q.shape[2]
    if mask is None:
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    p = scores.masked_fill(~mask, float("-inf")).float().softmax(-1).to(q.dtype)
    return p @ v_hist + p.diagonal(dim1=-2, dim2=-1)[..., None] * (v - v_hist)


def mlp_branch(s: ModelSpec, lw, h):
    """-> (x, o)."""
    x = rms_norm(h, lw.mlp_norm, s.eps)
    gate, up = F.linear(x, lw.gate_up_w).chunk(2, dim=-1)
    return x, _post(s, F.linear(s.act(gate) * up, lw.down_w), lw.post_mlp_norm)


def _post(s: ModelSpec, o, norm):
    return o if norm is None else rms_norm(o, norm, s.eps)


def head(s: ModelSpec, h: torch.Tensor) -> torch.Tensor:
    """Final norm, LM head and soft-capping -> logits."""
    logits = F.linear(rms_norm(h, s.final_norm, s.eps), s.lm_head)
    return torch.tanh(logits / s.final_softcap) * s.final_softcap if s.final_softcap else logits


def quantile_decider(
    budget: float,
    valid: torch.Tensor,
    allocation: Allocation,
    never_skip=frozenset(),
    threshold: float | None = None,
    counts: dict[tuple[int, int], int] | None = None,
) -> Decide | None:
    """Skip decisions of one training step.

    ``branch``: each branch skips the floor(budget * n_valid) lowest-importance valid tokens of the
    batch (the paper's per-batch quantile). ``global``: every branch skips the tokens with
    importance <= ``threshold``, one value for all branches (the budget's quantile of all
    importances of the previous step), so the budget is spread over branches by the gates.
    ``counts`` ((layer, branch) -> tokens to skip) fixes how many tokens each branch skips (the
    lowest-importance ones): distill takes them from the original model's pass, so the step skips
    exactly its budget even when skipping lowers the importances of later branches.
    """
    if budget <= 0:
        return None
    n_valid = int(valid.sum())

    def decide(imp: torch.Tensor, layer: int, branch: int) -> torch.Tensor | None:
        if (layer, branch) in never_skip:
            return None
        if counts is not None:
            return skip_lowest(imp, valid, counts.get((layer, branch), 0))
        if allocation == "global":
            if threshold is None:
                return None
            return (imp > threshold) | ~valid
        return skip_lowest(imp, valid, int(budget * n_valid))

    return decide


def global_threshold(importance: torch.Tensor, budget: float) -> float:
    """The budget's quantile of a flat tensor of importances (skip where importance <= it)."""
    if budget <= 0 or importance.numel() == 0:
        return float("-inf")
    k = max(1, min(importance.numel(), int(round(budget * importance.numel()))))
    return float(importance.float().kthvalue(k).values)


# -- one step -----------------------------------------------------------------------------------


def step_budget(config: TrainConfig, step: int) -> float:
    """The skip budget of a step: the warm-up ramp (paper), or a seeded draw in the ramped range."""
    ramp = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps > 0 else 1.0
    if config.objective == "paper":
        return ramp * config.budget_max
    u = float(torch.rand(1, generator=torch.Generator().manual_seed(config.seed * 7919 + step)))
    return ramp * (config.budget_min + u * (config.budget_max - config.budget_min))


def train_step(
    engine: Engine,
    gates: GateSet,
    ids: torch.Tensor,
    valid: torch.Tensor,
    config: TrainConfig,
    budget: float,
    threshold: float | None,
) -> tuple[torch.Tensor, StepStats, torch.Tensor]:
    """Loss (with grad), its stats, and the flat importances of valid (token, branch) pairs."""
    target_logp = None
    if config.objective == "distill":
        with torch.no_grad():  # the original model (gates read along, nothing skipped or scaled)
            full = ForwardRecord()
            target_logp = gated_forward(engine, ids, gates, None, False, full).float().log_softmax(-1)  # (B, T, V)
    counts = None
    if config.objective == "distill" and config.allocation == "global" and threshold is None:
        # this batch's quantile at full compute says how many tokens each branch skips
        imp_full = torch.stack(full.importance)[:, valid]  # (2L, n_valid), order (layer, branch)
        below = (imp_full <= global_threshold(imp_full.flatten(), budget)).sum(1).tolist()
        counts = {(k // 2, k % 2): int(n) for k, n in enumerate(below)}
    record = ForwardRecord()
    decide = quantile_decider(budget, valid, config.allocation, frozenset(config.never_skip), threshold, counts)
    logits = gated_forward(engine, ids, gates, decide, config.scale_output, record).float()
    if config.objective == "distill":
        logp = logits.log_softmax(-1)
        kl = (target_logp.exp() * (target_logp - logp)).sum(-1)  # (B, T)
        loss = kl[valid].mean()
    else:
        mask = valid[:, 1:] & valid[:, :-1]
        loss = F.cross_entropy(logits[:, :-1][mask], ids[:, 1:][mask])
    sq = torch.stack(record.sq)  # (2L, B, T)
    sparsity = sq[:, valid].mean()
    imp = torch.stack(record.importance)[:, valid]  # (2L, n_valid)
    runs = [r[valid] if r is not None else torch.ones_like(valid[valid]) for r in record.run]
    skipped = 1.0 - float(torch.stack(runs).float().mean())
    stats = StepStats(float(loss.detach()), float(sparsity.detach()), float(imp.mean()), skipped, budget, int(valid.sum()))
    return loss + config.sparsity * sparsity, stats, imp.flatten()


# -- the loop -----------------------------------------------------------------------------------


def train(model_or_name, config: TrainConfig = TrainConfig(), documents: list[list[int]] | None = None) -> GateSet:
    """Train gates for a model (a :class:`SpecGateModel` or a name for :func:`specgate.load`).

    Writes ``output_dir/checkpoint.pt`` (gates, optimizer, step) every ``checkpoint_every`` steps,
    at the end, and on Ctrl-C, and the gates themselves into ``output_dir/gates`` (load them with
    ``specgate.load(..., gates=output_dir + "/gates")``). Resumes from the checkpoint when
    ``config.resume``. The data order and budgets are pure functions of (seed, step), so a resumed
    run computes the same steps as an uninterrupted one.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from .model import SpecGateModel, load

    if config.threads:
        torch.set_num_threads(config.threads)
    model: SpecGateModel = load(model_or_name, gates=None) if isinstance(model_or_name, str) else model_or_name
    accelerator = Accelerator(cpu=model.engine.device.type == "cpu")
    out = Path(config.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)

    if config.objective == "damage":  # no gradient: labels, then a convex fit per gate
        from .damage import train_damage

        return train_damage(model, config, lambda: training_pieces(model, config, out, documents), out, accelerator)

    # 1. Gates (seeded), optimizer, and the checkpoint to resume from.
    for p in model.hf_model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(config.seed)
    gates = GateSet(gate_config(model, config)).to(accelerator.device)
    if config.init_order:
        init_from_order(gates, [tuple(x) for x in json.loads(Path(config.init_order).read_text())])
    optimizer = make_optimizer(gates, config)
    start, prev_imp = 0, None
    ckpt = out / CHECKPOINT_NAME
    if config.resume and ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if state["gate_config"] != gates.config.__dict__:
            raise ValueError(f"{ckpt} holds gates of another shape ({state['gate_config']}): use another output_dir")
        gates.load_state_dict(state["gates"])
        optimizer.load_state_dict(state["optimizer"])
        start, prev_imp = state["step"], state["prev_imp"]
    world, rank = accelerator.num_processes, accelerator.process_index

    # 2. Data (only when there are steps left): token ids, cut into pieces of at most seq_len tokens.
    pieces = training_pieces(model, config, out, documents) if start < config.steps else []
    pad_id = getattr(model.tokenizer, "pad_token_id", None) or 0

    def save(step: int) -> None:
        if not accelerator.is_main_process:
            return
        state = {
            "gates": gates.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
            "prev_imp": prev_imp, "config": asdict(config), "gate_config": gates.config.__dict__,
        }  # fmt: skip
        torch.save(state, out / (CHECKPOINT_NAME + ".tmp"))
        os.replace(out / (CHECKPOINT_NAME + ".tmp"), ckpt)  # atomic: a Ctrl-C never leaves half a file
        save_gates(gates, out / "gates")

    # 3. The loop: one seeded batch and budget per step, loss, backward, (all-reduce), update.
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, disable=not accelerator.is_local_main_process)
    t0, tokens, done = time.perf_counter(), 0, start
    try:
        for step in bar:
            idx = batch_indices(len(pieces), config.batch_size * world, step, config.seed)
            ids, valid = collate([pieces[j] for j in idx[rank::world]], pad_id)
            ids, valid = ids.to(accelerator.device), valid.to(accelerator.device)
            budget = step_budget(config, step)
            threshold = None  # distill: the quantile of this batch's importances (see train_step)
            if config.objective == "paper" and config.allocation == "global" and budget > 0:
                if prev_imp is None:
                    with torch.no_grad():  # first step: importances of the gated model at full compute
                        rec = ForwardRecord()
                        gated_forward(model.engine, ids, gates, None, config.scale_output, rec)
                        prev_imp = torch.stack(rec.importance)[:, valid].flatten().cpu()
                threshold = global_threshold(prev_imp, budget)  # the previous step's quantile
            loss, stats, imp = train_step(model.engine, gates, ids, valid, config, budget, threshold)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if world > 1:  # gates are called branch by branch, not through a DDP wrapper: sync by hand
                for p in gates.parameters():
                    if p.grad is not None:
                        p.grad = accelerator.reduce(p.grad, reduction="mean")
            if config.optimizer == "sgd":
                for p in gates.parameters():
                    if p.grad is not None:
                        torch.nn.utils.clip_grad_norm_(p, config.clip)
            optimizer.step()
            prev_imp, done = imp.cpu(), step + 1
            tokens += stats.tokens * world
            bar.set_postfix(
                loss=f"{stats.loss:.4f}", sparsity=f"{stats.sparsity:.3f}", skip=f"{stats.skipped:.3f}",
                budget=f"{stats.budget:.2f}", tok_s=f"{tokens / (time.perf_counter() - t0):.0f}",
            )  # fmt: skip
            if done % config.checkpoint_every == 0:
                save(done)
            if config.time_limit_s is not None and time.perf_counter() - t0 > config.time_limit_s:
                break
    except KeyboardInterrupt:
        save(done)  # the interrupted step did not count: a resumed run redoes it
        bar.close()
        raise
    save(done)
    bar.close()
    return gates


def training_pieces(model, config: TrainConfig, out: Path, documents: list[list[int]] | None = None) -> list[list[int]]:
    """The training sequences: ``documents``, else ``config.data``, else the default corpus (cached
    in ``out``), cut into pieces of at most ``seq_len`` tokens."""
    if documents is None:
        if config.data:
            documents = load_documents(config.data, model.tokenizer)
        else:
            documents = default_corpus(model, config, out / "corpus.jsonl")
    return chunk(documents, config.seq_len)


def init_from_order(gates: GateSet, order: list[tuple[int, int]], spread: float = 4.0) -> None:
    """Start the gates as a static skip order: gate biases rise linearly from -spread (the first,
    least harmful branch of ``order``) to +spread, and the weights start at zero, so a global
    threshold at budget b first skips whole branches in this order (the Draft & Verify draft);
    training then makes the choice token-wise. Branches missing from ``order`` get +spread."""
    n = 2 * gates.config.num_layers
    with torch.no_grad():
        for i in range(gates.config.num_layers):
            for b in (0, 1):
                gate = gates.gate(i, b)
                last = gate.proj[-1] if isinstance(gate.proj, torch.nn.Sequential) else gate.proj
                rank = order.index((i, b)) if (i, b) in order else n - 1
                last.bias.fill_(-spread + 2 * spread * rank / (n - 1))
                last.weight.zero_()


def make_optimizer(gates: GateSet, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum (default) or AdamW over the gate parameters.

    Why SGD: the ranking of (token, branch) pairs across branches is what the global threshold
    uses, and it must follow how much each skip costs. Adam divides every parameter's step by its
    own gradient scale, so a gate whose branch barely matters moves as fast as one whose skipping
    destroys the prediction, and the ranking across branches is lost (measured here: importances
    stayed within +-0.01 of each other and KL at 5% skipped stayed > 1). SGD steps are
    proportional to the gradient (clipped per tensor, for the first catastrophic skips).
    """
    if config.optimizer == "sgd":
        return torch.optim.SGD(gates.parameters(), lr=config.lr, momentum=0.9)
    return torch.optim.AdamW(gates.parameters(), lr=config.lr, weight_decay=0.0)


def gate_config(model, config: TrainConfig) -> GateConfig:
    """The shape of the gates a run trains for ``model``."""
    c = model.config
    bias = config.gate_bias_init if config.gate_bias_init is not None else (5.0 if config.scale_output else 0.0)
    return GateConfig(
        hidden_size=c.hidden_size, num_layers=c.num_hidden_layers, kind=config.gate_kind or ("scalar" if config.objective == "damage" else "lowrank"), rank=config.gate_rank,
        bias_init=bias, model_type=c.model_type, model_name=model.name, scale_output=config.scale_output,
    )  # fmt: skip


