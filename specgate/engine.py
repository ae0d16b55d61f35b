"""The engine: our own layer loop over the Hugging Face weights, with per-token, per-branch skipping.

One forward serves every pass of decoding: prefill, single-token decode, and multi-token verify
passes (several new tokens against the cache). Gates and the skip policy are arguments of the
forward, never hidden state: ``forward(ids, cache)`` is the original model, ``forward(ids, cache,
gates)`` the gated model at full compute, ``forward(ids, cache, gates, policy)`` the skipping draft.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import LayerWeights, ModelSpec, build_spec
from .cache import StaticKVCache
from .gates import GateSet, SkipPolicy
from .ops import apply_rope, gather_tokens, linear, rms_norm, scatter_add_tokens


@dataclass
class _Pass:
    """What every layer of one forward shares."""

    slots: torch.Tensor  # (B, T) cache slots of the new tokens
    valid: torch.Tensor  # (B, T) False for left padding
    n_valid: int
    uniform: int | None  # first slot when every row writes the same slots
    S: int  # cache slots attended to: 0 .. S-1
    masks: dict[int | None, torch.Tensor | None]  # window -> (B, 1, T, S) bool, None: attend to all
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]]  # key -> cos, sin (B, T, hd)


@dataclass
class _Selection:
    """The tokens that run a branch: ``order`` (B, n) token indices, ``keep`` (B, n) False where a
    row has fewer than n active tokens and the entry only pads the batch."""

    order: torch.Tensor
    keep: torch.Tensor
    active: torch.Tensor  # (B, T) bool

    @staticmethod
    def of(active: torch.Tensor) -> "_Selection":
        counts = active.sum(1)
        n = int(counts.max())
        order = (~active).to(torch.int8).argsort(dim=1, stable=True)[:, :n]  # active tokens first
        keep = torch.arange(n, device=active.device)[None] < counts[:, None]
        return _Selection(order, keep, active)


class SkipCounter:
    """Counts (token, branch) evaluations run and skipped over one or more forwards."""

    def __init__(self):
        self.total = 0
        self.skipped = 0

    @property
    def fraction(self) -> float:
        return self.skipped / self.total if self.total else 0.0


class Engine:
    """Runs a Hugging Face decoder (see :mod:`specgate.adapters`) with a :class:`StaticKVCache`."""

    def __init__(self, model: nn.Module):
        self.spec: ModelSpec = build_spec(model)
        self.config = model.config
        self.dtype = self.spec.embed.dtype
        self.device = self.spec.embed.device

    @property
    def num_layers(self) -> int:
        return len(self.spec.layers)

    def new_cache(self, batch: int, max_len: int) -> StaticKVCache:
        s = self.spec
        return StaticKVCache(self.num_layers, batch, s.n_kv_heads, max_len, s.head_dim, self.dtype, self.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: StaticKVCache,
        gates: GateSet | None = None,
        policy: SkipPolicy | None = None,
        logits_to_keep: int = 0,
        counter: SkipCounter | None = None,
    ) -> torch.Tensor:
        """Run T new tokens (B, T) against the cache; returns logits (B, T, V), or of the last
        ``logits_to_keep`` positions. Writes their K/V and advances the cache by T."""
        B, T = input_ids.shape
        if int(cache.lengths.max()) + T > cache.max_len:
            raise ValueError(f"cache of {cache.max_len} slots cannot take {T} more tokens")
        p = self._prepare(input_ids, cache)
        h = F.embedding(input_ids, self.spec.embed)  # (B, T, d)
        if self.spec.embed_scale != 1.0:
            h = h * torch.tensor(self.spec.embed_scale, dtype=h.dtype)
        for i, lw in enumerate(self.spec.layers):
            h = self._attention(h, i, lw, p, cache, gates, policy, counter)
            h = self._mlp(h, i, lw, p, gates, policy, counter)
        cache.lengths += T
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = linear(rms_norm(h, self.spec.final_norm, self.spec.eps), self.spec.lm_head)
        if self.spec.final_softcap:
            logits = torch.tanh(logits / self.spec.final_softcap) * self.spec.final_softcap
        return logits

    __call__ = forward

    # -- one pass --------------------------------------------------------------------------------

    def _prepare(self, input_ids: torch.Tensor, cache: StaticKVCache) -> _Pass:
        B, T = input_ids.shape
        slots = cache.slots(T)  # (B, T)
        lo, hi = int(cache.lengths.min()), int(cache.lengths.max())
        S = hi + T
        padded = bool(cache.pad.any())
        valid = slots >= cache.pad[:, None]
        masks = {}
        for window in {lw.window for lw in self.spec.layers}:
            if T == 1 and lo == hi and not padded and (window is None or S <= window):
                masks[window] = None
                continue
            j = torch.arange(S, device=slots.device)
            q = slots[:, :, None]  # (B, T, 1)
            m = (j >= cache.pad[:, None, None]) & (j <= q)
            if window is not None:
                m &= q - j < window
            masks[window] = (m | (j == q))[:, None]  # a padding query sees itself: no empty rows
        positions = (slots - cache.pad[:, None]).clamp(min=0)
        x = torch.empty(0, dtype=self.dtype, device=self.device)
        rope = {k: fn(x, positions) for k, fn in self.spec.rope.items()}
        return _Pass(slots, valid, int(valid.sum()), lo if lo == hi else None, S, masks, rope)

    def _select(self, x, i, branch, p, gates, policy, counter):
        """Gate values (B, T, d|1) and the tokens that run the branch (None: all of them)."""
        if gates is None:
            return None, None
        if policy is not None and not policy.scale_output and not policy.may_skip(i, branch, x.shape[1]):
            if counter is not None:
                counter.total += p.n_valid
            return None, None  # the gate would neither skip nor scale anything: do not run it
        g = gates.gate(i, branch)(x)
        if policy is None:
            return g, None
        if not policy.scale_output:  # decide with g, but keep the branch output as it is
            g_out = g - g.detach() + 1.0 if g.requires_grad else None  # straight-through in training
        else:
            g_out = g
        active = policy.active(g.mean(-1), p.valid, i, branch)
        if counter is not None:
            counter.total += p.n_valid
            counter.skipped += p.n_valid - (int((active & p.valid).sum()) if active is not None else p.n_valid)
        if active is None or bool(active.all()):
            return g_out, None
        return g_out, _Selection.of(active)

    def _attention(self, h, i, lw: LayerWeights, p: _Pass, cache, gates, policy, counter) -> torch.Tensor:
        s = self.spec
        B, T, _ = h.shape
        q_dim = s.n_heads * s.head_dim
        x = rms_norm(h, lw.attn_norm, s.eps)  # (B, T, d)
        g, sel = self._select(x, i, 0, p, gates, policy, counter)
        cos, sin = p.rope[lw.rope]

        # 1. K/V of the new tokens into the cache (run on all tokens, or fill the skipped ones).
        copy_below = sel is not None and policy.kv_fill == "copy_below" and i > 0
        if sel is None:
            qkv = linear(x, lw.qkv_w, lw.qkv_b)
            q, kv = qkv[..., :q_dim], qkv[..., q_dim:]
            self._write_kv(kv, i, lw, cos, sin, p.slots, p.uniform, cache)
        elif copy_below:
            kv = linear(gather_tokens(x, sel.order), lw.qkv_w[q_dim:], _rows(lw.qkv_b, q_dim, None))
            slots = gather_tokens(p.slots, sel.order)
            self._write_kv(kv, i, lw, gather_tokens(cos, sel.order), gather_tokens(sin, sel.order), slots, None, cache)
            rows, cols = (~sel.active).nonzero(as_tuple=True)
            cache.copy_from_below(i, p.slots[rows, cols], rows)
        else:
            kv = linear(x, lw.qkv_w[q_dim:], _rows(lw.qkv_b, q_dim, None))
            self._write_kv(kv, i, lw, cos, sin, p.slots, p.uniform, cache)
        if sel is not None and sel.order.shape[1] == 0:
            return h  # every token skips attention

        # 2. Queries of the active tokens attend to the cache.
        mask = p.masks[lw.window]
        if sel is not None:
            x_act = gather_tokens(x, sel.order)
            q = linear(x_act, lw.qkv_w[:q_dim], _rows(lw.qkv_b, 0, q_dim))
            cos, sin = gather_tokens(cos, sel.order), gather_tokens(sin, sel.order)
            if mask is not None:
                mask = mask.gather(2, sel.order[:, None, :, None].expand(-1, 1, -1, p.S))
        n = q.shape[1]
        q = q.view(B, n, s.n_heads, s.head_dim).transpose(1, 2)  # (B, nh, n, hd)
        if lw.q_norm is not None:
            q = rms_norm(q, lw.q_norm, s.eps)
        q = apply_rope(q, cos, sin)
        k, v = cache.k[i][:, :, : p.S], cache.v[i][:, :, : p.S]  # (B, n_kv, S, hd)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=s.scaling, enable_gqa=True)
        o = linear(o.transpose(1, 2).reshape(B, n, q_dim), lw.o_w, lw.o_b)  # (B, n, d)
        return self._residual(h, o, lw.post_attn_norm, g, sel)

    def _write_kv(self, kv, i, lw: LayerWeights, cos, sin, slots, uniform, cache: StaticKVCache) -> None:
        s = self.spec
        B, n, _ = kv.shape
        k, v = kv.view(B, n, 2, s.n_kv_heads, s.head_dim).permute(2, 0, 3, 1, 4)  # 2 x (B, n_kv, n, hd)
        if lw.k_norm is not None:
            k = rms_norm(k, lw.k_norm, s.eps)
        cache.write(i, slots, apply_rope(k, cos, sin), v, uniform)

    def _mlp(self, h, i, lw: LayerWeights, p: _Pass, gates, policy, counter) -> torch.Tensor:
        x = rms_norm(h, lw.mlp_norm, self.spec.eps)
        g, sel = self._select(x, i, 1, p, gates, policy, counter)
        if sel is not None:
            if sel.order.shape[1] == 0:
                return h
            x = gather_tokens(x, sel.order)
        gate, up = linear(x, lw.gate_up_w).chunk(2, dim=-1)
        o = linear(self.spec.act(gate) * up, lw.down_w)
        return self._residual(h, o, lw.post_mlp_norm, g, sel)

    def _residual(self, h, o, post_norm, g, sel: _Selection | None) -> torch.Tensor:
        """h + g * post_norm(o), with o computed for the selected tokens only."""
        if post_norm is not None:
            o = rms_norm(o, post_norm, self.spec.eps)
        if sel is None:
            return h + (o if g is None else g * o)
        o = o * sel.keep[..., None] if g is None else o * gather_tokens(g, sel.order) * sel.keep[..., None]
        return scatter_add_tokens(h, sel.order, o)


def _rows(t: torch.Tensor | None, start: int, stop: int | None) -> torch.Tensor | None:
    return None if t is None else t[start:stop]
