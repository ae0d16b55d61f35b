"""Tiny random-weight models of each supported family, and the real default model (loaded once)."""

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import specgate

VOCAB = 101
_COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=2,
)  # fmt: skip


def tiny_hf(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**_COMMON))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**_COMMON))  # q/k/v biases
    elif family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**_COMMON, head_dim=16))  # q/k norms
    elif family == "gemma3":
        config = Gemma3TextConfig(
            **_COMMON, head_dim=16, query_pre_attn_scalar=16, sliding_window=5,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        )  # fmt: skip
        model = Gemma3ForCausalLM(config)
        with torch.no_grad():  # random norm weights: zeros would hide a missing (1 + w)
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0, 0.3)
    else:
        raise ValueError(family)
    return model.eval()


def tiny(family: str = "llama", seed: int = 0, gates: bool = False) -> specgate.SpecGateModel:
    m = specgate.SpecGateModel(tiny_hf(family, seed))
    if gates:
        torch.manual_seed(seed + 1)
        m.gates = m.new_gates(kind="lowrank", rank=8)
        for p in m.gates.parameters():  # spread importances so skipping picks distinct tokens
            torch.nn.init.normal_(p, std=0.5)
    return m


FAMILIES = ["llama", "qwen2", "qwen3", "gemma3"]


def left_padded(ids: torch.Tensor, pads: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (B, T) with pads[b] leading pad tokens (id 0) in row b, and the attention mask."""
    mask = (torch.arange(ids.shape[1])[None] >= torch.tensor(pads)[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


@pytest.fixture(scope="session")
def smollm2():
    try:
        return specgate.load("smollm2-135m-instruct", gates=None)
    except ModuleNotFoundError as e:
        pytest.fail(f"the integration set needs the default model: {e}")
