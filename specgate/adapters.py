"""Architecture adapters: read a Hugging Face decoder's modules into the flat form the engine runs.

One small function per family. Weights are never copied: q/k/v (and MLP gate/up) are fused by
moving each projection's weight into one buffer and pointing the Hugging Face parameter at its
slice of that buffer, so the Hugging Face model and the engine read the same memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
GEMMA_FAMILY = ("gemma3_text",)
SUPPORTED = LLAMA_FAMILY + GEMMA_FAMILY


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor
    qkv_w: torch.Tensor  # (q_dim + 2 * kv_dim, d): rows of q_proj, k_proj, v_proj
    qkv_b: torch.Tensor | None
    o_w: torch.Tensor
    o_b: torch.Tensor | None
    mlp_norm: torch.Tensor
    gate_up_w: torch.Tensor  # (2 * ff, d): rows of gate_proj, up_proj
    down_w: torch.Tensor
    q_norm: torch.Tensor | None = None  # per-head RMSNorm of q and k (Qwen3, Gemma 3)
    k_norm: torch.Tensor | None = None
    post_attn_norm: torch.Tensor | None = None  # norms on the branch outputs (Gemma 2/3)
    post_mlp_norm: torch.Tensor | None = None
    window: int | None = None  # sliding-window size, None for global attention
    rope: str = "default"  # key into ModelWeights.rope


@dataclass
class ModelWeights:
    layers: list[LayerWeights]
    embed: torch.Tensor  # (V, d)
    embed_scale: float
    final_norm: torch.Tensor
    lm_head: torch.Tensor  # (V, d)
    eps: float
    n_heads: int
    n_kv_heads: int
    head_dim: int
    scaling: float
    act: Callable[[torch.Tensor], torch.Tensor]
    rope: dict[str, Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]
    final_softcap: float | None = None


def read_weights(model: nn.Module) -> ModelWeights:
    """The engine's view of a ``*ForCausalLM`` model."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type in LLAMA_FAMILY:
        return _llama(model)
    if model_type in GEMMA_FAMILY:
        return _gemma3(model)
    raise NotImplementedError(
        f"model_type {model_type!r} is not supported; specgate runs the Llama family "
        f"({', '.join(LLAMA_FAMILY)}) and Gemma 3 ({', '.join(GEMMA_FAMILY)})"
    )


def _fuse(modules: list[nn.Module], name: str) -> torch.Tensor | None:
    """Concatenate ``module.<name>`` along dim 0 and make each module's parameter a view of it."""
    params = [getattr(m, name) for m in modules]
    if any(p is None for p in params):
        return None
    fused = getattr(modules[0], "_specgate_fused", {}).get(name)
    if fused is not None and params[0].data_ptr() == fused.data_ptr():
        return fused  # fused by an earlier engine on the same model
    fused = torch.cat([p.data for p in params], dim=0)
    start = 0
    for m, p in zip(modules, params):
        rows = p.shape[0]
        setattr(m, name, nn.Parameter(fused[start : start + rows], requires_grad=p.requires_grad))
        start += rows
    modules[0].__dict__.setdefault("_specgate_fused", {})[name] = fused
    return fused


def _common(layer: nn.Module, norm: Callable[[nn.Module], torch.Tensor]) -> LayerWeights:
    attn, mlp = layer.self_attn, layer.mlp
    qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
    return LayerWeights(
        attn_norm=norm(layer.input_layernorm),
        qkv_w=_fuse(qkv, "weight"),
        qkv_b=_fuse(qkv, "bias"),
        o_w=attn.o_proj.weight,
        o_b=attn.o_proj.bias,
        mlp_norm=norm(getattr(layer, "pre_feedforward_layernorm", None) or layer.post_attention_layernorm),
        gate_up_w=_fuse([mlp.gate_proj, mlp.up_proj], "weight"),
        down_w=mlp.down_proj.weight,
        q_norm=norm(attn.q_norm) if hasattr(attn, "q_norm") else None,
        k_norm=norm(attn.k_norm) if hasattr(attn, "k_norm") else None,
    )


def _check_mlp(config) -> None:
    if getattr(config, "mlp_bias", False):
        raise NotImplementedError("MLP biases (mlp_bias=True) are not supported yet")


def _window(config, i: int) -> int | None:
    types = getattr(config, "layer_types", None)
    sliding = types[i] == "sliding_attention" if types else getattr(config, "sliding_window", None) is not None
    return config.sliding_window if sliding and getattr(config, "sliding_window", None) else None


def _llama(model: nn.Module) -> ModelWeights:
    config, core = model.config, model.model
    _check_mlp(config)
    layers = []
    for i, layer in enumerate(core.layers):
        lw = _common(layer, lambda m: m.weight)
        lw.window = _window(config, i)
        layers.append(lw)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return ModelWeights(
        layers=layers,
        embed=core.embed_tokens.weight,
        embed_scale=1.0,
        final_norm=core.norm.weight,
        lm_head=model.lm_head.weight,
        eps=config.rms_norm_eps,
        n_heads=config.num_attention_heads,
        n_kv_heads=config.num_key_value_heads,
        head_dim=head_dim,
        scaling=head_dim**-0.5,
        act=core.layers[0].mlp.act_fn,
        rope={"default": core.rotary_emb},
    )


def _gemma3(model: nn.Module) -> ModelWeights:
    config, core = model.config, model.model
    if getattr(config, "attn_logit_softcapping", None):
        raise NotImplementedError("attention logit soft-capping (Gemma 2) is not supported")
    if getattr(config, "use_bidirectional_attention", False):
        raise NotImplementedError("bidirectional attention is not a decoder and is not supported")
    gemma_norm = lambda m: 1.0 + m.weight.detach().float()  # noqa: E731 Gemma scales by (1 + w)
    layers = []
    for i, layer in enumerate(core.layers):
        lw = _common(layer, gemma_norm)
        lw.post_attn_norm = gemma_norm(layer.post_attention_layernorm)
        lw.post_mlp_norm = gemma_norm(layer.post_feedforward_layernorm)
        lw.window = _window(config, i)
        lw.rope = config.layer_types[i]
        layers.append(lw)
    rotary = core.rotary_emb
    return ModelWeights(
        layers=layers,
        embed=core.embed_tokens.weight,
        embed_scale=float(core.embed_tokens.embed_scale.to(core.embed_tokens.weight.dtype)),
        final_norm=gemma_norm(core.norm),
        lm_head=model.lm_head.weight,
        eps=config.rms_norm_eps,
        n_heads=config.num_attention_heads,
        n_kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        scaling=config.query_pre_attn_scalar**-0.5,
        act=core.layers[0].mlp.act_fn,
        rope={t: (lambda x, pos, t=t: rotary(x, pos, t)) for t in set(config.layer_types)},
        final_softcap=getattr(config, "final_logit_softcapping", None),
    )
