"""The layer math, in one place: every forward of specgate is built from these functions.

- the engine (:mod:`specgate.engine`) runs them on the tokens a branch selects, against the cache;
- the dense training forward (:func:`dense_forward`) runs them on every token and then masks;
- the damage labels (:mod:`specgate.damage`) run them against another pass's K/V (``history``).

Each function takes the flat weights of :mod:`specgate.adapters` (``w``: :class:`ModelWeights`,
``lw``: one layer's :class:`LayerWeights`). Tensors are (B, T, d) hidden states, (B, heads, T, hd)
queries/keys/values, and RoPE tables ``cos, sin`` (B, T, hd).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F

from .adapters import LayerWeights, ModelWeights
from .ops import apply_rope, linear, rms_norm

# -- the pieces ------------------------------------------------------------------------------------


def embed(w: ModelWeights, ids: torch.Tensor) -> torch.Tensor:
    h = F.embedding(ids, w.embed)  # (B, T, d)
    return h * torch.tensor(w.embed_scale, dtype=h.dtype) if w.embed_scale != 1.0 else h


def norm(w: ModelWeights, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A branch's input norm (``lw.attn_norm``, ``lw.mlp_norm``)."""
    return rms_norm(h, weight, w.eps)


def queries(w: ModelWeights, lw: LayerWeights, x: torch.Tensor, cos, sin) -> torch.Tensor:
    """x (B, n, d) -> q (B, heads, n, hd): projection, per-head norm, RoPE."""
    q_dim = w.n_heads * w.head_dim
    q = linear(x, lw.qkv_w[:q_dim], _rows(lw.qkv_b, 0, q_dim))
    return finish_queries(w, lw, q, cos, sin)


def keys_values(w: ModelWeights, lw: LayerWeights, x: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, n, d) -> k, v (B, kv_heads, n, hd): projections, per-head norm of k, RoPE of k."""
    q_dim = w.n_heads * w.head_dim
    return finish_keys_values(w, lw, linear(x, lw.qkv_w[q_dim:], _rows(lw.qkv_b, q_dim, None)), cos, sin)


def qkv(w: ModelWeights, lw: LayerWeights, x: torch.Tensor, cos, sin) -> tuple[torch.Tensor, ...]:
    """:func:`queries` and :func:`keys_values` of the same tokens in one product."""
    q_dim = w.n_heads * w.head_dim
    fused = linear(x, lw.qkv_w, lw.qkv_b)
    return (finish_queries(w, lw, fused[..., :q_dim], cos, sin), *finish_keys_values(w, lw, fused[..., q_dim:], cos, sin))


def attend(w: ModelWeights, q, k, v, mask: torch.Tensor | None, causal: bool = False) -> torch.Tensor:
    """Softmax attention of q (B, heads, n, hd) over k, v (B, kv_heads, S, hd); mask (B|1, 1, n, S)
    bool, True where a query may look. ``causal``: no mask, query i sees keys 0..i."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=w.scaling, enable_gqa=True)


def attend_with_history(w: ModelWeights, q, k, v, history: tuple[torch.Tensor, torch.Tensor], mask, round_len: int = 1) -> torch.Tensor:
    """Causal attention of every position over another pass's keys and values (``history``, same
    positions), except that in each round of ``round_len`` positions (0..R-1, R..2R-1, ...) the keys
    and values of the round's own positions come from this pass (k, v). ``round_len=1``: for every
    position at once, a single-token step against a cache that other pass filled; R: draft rounds of
    R tokens after a prefix the other pass verified."""
    T = q.shape[2]
    j = torch.arange(T, device=q.device)
    start = (j // round_len * round_len)[:, None]  # (T, 1): the first position of each query's round
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril() if mask is None else mask
    own = causal & (j[None] >= start)
    both = torch.cat([causal & ~own, own], dim=-1)  # (.., T, 2T): history keys, then this pass's
    k_all, v_all = torch.cat([history[0], k], dim=2), torch.cat([history[1], v], dim=2)
    return attend(w, q, k_all, v_all, both)


# cut(x, projection, n_out) -> x with the entries a sparse-inputs draft does not read zeroed
# (:mod:`specgate.sparse_inputs`; projections 0 q/k/v, 1 output, 2 gate/up, 3 down); None: all read
Cut = Callable[[torch.Tensor, int, int], torch.Tensor]


def attention_output(w: ModelWeights, lw: LayerWeights, o: torch.Tensor, cut: Cut | None = None) -> torch.Tensor:
    """o (B, heads, n, hd) -> the branch output (B, n, d): output projection, then post-norm."""
    B, _, n, _ = o.shape
    o = o.transpose(1, 2).reshape(B, n, w.n_heads * w.head_dim)
    o = linear(o if cut is None else cut(o, 1, lw.o_w.shape[0]), lw.o_w, lw.o_b)
    return post_norm(w, o, lw.post_attn_norm)


def mlp(w: ModelWeights, lw: LayerWeights, x: torch.Tensor, cut: Cut | None = None) -> torch.Tensor:
    """The MLP branch's output (post-norm included) for its normed input x (B, n, d)."""
    if cut is not None:
        x = cut(x, 2, lw.gate_up_w.shape[0])
    gate, up = linear(x, lw.gate_up_w).chunk(2, dim=-1)
    a = w.act(gate) * up
    return post_norm(w, linear(a if cut is None else cut(a, 3, lw.down_w.shape[0]), lw.down_w), lw.post_mlp_norm)


def head(w: ModelWeights, h: torch.Tensor, product: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Final norm, LM head and soft-capping -> logits. ``product``: the head's product of the normed
    states, if not the full float32 LM head (a draft vocabulary's rows, a low-precision copy)."""
    x = rms_norm(h, w.final_norm, w.eps)
    logits = linear(x, w.lm_head) if product is None else product(x)
    return torch.tanh(logits / w.final_softcap) * w.final_softcap if w.final_softcap else logits


def branch_factor(g: torch.Tensor, run: torch.Tensor | None, scale_output: bool) -> torch.Tensor | None:
    """What multiplies a branch's output o before the residual add (None: 1), for gate values g
    (B, T, d|1) and the run mask (B, T) (None: every token runs). The one gradient rule of gates:

    - ``scale_output``: the GateSkip model, g where the branch runs, 0 where it is skipped;
    - otherwise the gates only decide: the value is 1 where the branch runs, 0 where skipped, and
      the gradient reaches g only at skipped tokens, as <d loss / d o, o>: what adding the branch
      back would gain. (At a running token the gradient at scale 1 is a local sensitivity, not the
      cost of removing the branch; following it degraded a static skip order here.) The engine
      never computes o at skipped tokens, so this gradient exists only in :func:`dense_forward`.
    """
    if scale_output:
        return g if run is None else g * run[..., None].to(g.dtype)
    if run is None:
        return None
    keep = run[..., None].to(g.dtype)
    return keep + (1.0 - keep) * (g - g.detach()) if g.requires_grad else keep


# -- dense forwards over whole sequences -----------------------------------------------------------


def dense_rope_masks(w: ModelWeights, ids: torch.Tensor) -> tuple[dict, dict]:
    """RoPE tables per kind and masks per sliding window (absent: plain causal) for sequences
    (B, T) that start at position 0."""
    B, T = ids.shape
    positions = torch.arange(T, device=ids.device)[None].expand(B, T)
    empty = torch.empty(0, dtype=w.embed.dtype, device=w.embed.device)
    rope = {k: fn(empty, positions) for k, fn in w.rope.items()}
    j = torch.arange(T, device=ids.device)
    masks = {win: (j[None] <= j[:, None]) & (j[:, None] - j[None] < win) for win in {lw.window for lw in w.layers} if win}
    return rope, masks


def attention_branch(w: ModelWeights, lw: LayerWeights, h, rope, masks, history=None, round_len: int = 1, cut: Cut | None = None):
    """The attention branch on every position -> (x, o, (k, v)): its normed input, its output and
    this pass's k, v. ``history``, ``round_len``: see :func:`attend_with_history`."""
    x = norm(w, h, lw.attn_norm)
    cos, sin = rope[lw.rope]
    q, k, v = qkv(w, lw, x if cut is None else cut(x, 0, lw.qkv_w.shape[0]), cos, sin)
    mask = masks.get(lw.window)
    if history is None:
        o = attend(w, q, k, v, mask, causal=mask is None)
    else:
        o = attend_with_history(w, q, k, v, history, mask, round_len)
    return x, attention_output(w, lw, o, cut), (k, v)


def mlp_branch(w: ModelWeights, lw: LayerWeights, h, cut: Cut | None = None):
    """The MLP branch on every position -> (x, o)."""
    x = norm(w, h, lw.mlp_norm)
    return x, mlp(w, lw, x, cut)


# add(h, x, o, layer, branch) -> the residual stream after the branch; the default is h + o
BranchAdd = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, int], torch.Tensor]


def dense_forward(
    w: ModelWeights,
    ids: torch.Tensor,
    add: BranchAdd | None = None,
    kvs: list | None = None,
    history: list | None = None,
    round_len: int = 1,
    cuts=None,
) -> torch.Tensor:
    """Whole sequences (B, T) from position 0 -> logits (B, T, V), differentiable. Every branch
    runs on every token; ``add`` decides what reaches the residual stream (masking a branch's
    output is skipping it; the K/V of a skipped token come from its passed-through hidden state,
    as the engine's ``kv_fill="project"``). ``kvs``: a list that receives each layer's (k, v);
    ``history``: such a list from another pass, attended as in :func:`attend_with_history`.
    ``cuts``: a sparse-inputs draft's :class:`~specgate.sparse_inputs.InputCuts`."""
    rope, masks = dense_rope_masks(w, ids)
    h = embed(w, ids)
    for i, lw in enumerate(w.layers):
        cut = None if cuts is None else functools.partial(cuts.apply, layer=i)
        x, o, kv = attention_branch(w, lw, h, rope, masks, history[i] if history else None, round_len, cut)
        if kvs is not None:
            kvs.append(kv)
        h = add(h, x, o, i, 0) if add else h + o
        x, o = mlp_branch(w, lw, h, cut)
        h = add(h, x, o, i, 1) if add else h + o
    return head(w, h)


# -- after a projection (also for projections computed elsewhere, e.g. gathered by a kernel) -------


def finish_queries(w: ModelWeights, lw: LayerWeights, q: torch.Tensor, cos, sin) -> torch.Tensor:
    """Projected queries (B, n, q_dim) -> (B, heads, n, hd): per-head norm, RoPE."""
    B, n, _ = q.shape
    q = q.reshape(B, n, w.n_heads, w.head_dim).transpose(1, 2)
    if lw.q_norm is not None:
        q = rms_norm(q, lw.q_norm, w.eps)
    return apply_rope(q, cos, sin)


def finish_keys_values(w: ModelWeights, lw: LayerWeights, kv: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected keys and values (B, n, 2 kv_dim) -> k, v (B, kv_heads, n, hd): norm and RoPE of k."""
    B, n, _ = kv.shape
    k, v = kv.reshape(B, n, 2, w.n_kv_heads, w.head_dim).permute(2, 0, 3, 1, 4)  # 2 x (B, kv_heads, n, hd)
    if lw.k_norm is not None:
        k = rms_norm(k, lw.k_norm, w.eps)
    return apply_rope(k, cos, sin), v


def post_norm(w: ModelWeights, o: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """A branch output's post-norm (Gemma), if the layer has one."""
    return o if weight is None else rms_norm(o, weight, w.eps)


def _rows(t: torch.Tensor | None, start: int, stop: int | None) -> torch.Tensor | None:
    return None if t is None else t[start:stop]
