"""Tiny random-weight models of each supported family, and the real default model (loaded once)."""

import dataclasses

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
import specgate.linear as L
from specgate import gradient as G
from specgate.layers import dense_forward
from specgate.policy import budget_quantile
from specgate.standin import StandIns
from specgate.train import TrainConfig

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


def scalar_gates(m: specgate.SpecGateModel, rank: int, seed: int = 0):
    """Scalar gates that only pick skips, stand-ins and adapters of the given rank, and thresholds
    that skip about half of the branches."""
    torch.manual_seed(seed)
    gates = m.new_gates(kind="scalar")
    gates.config = dataclasses.replace(gates.config, scale_output=False)
    for p in gates.parameters():
        torch.nn.init.normal_(p, std=0.3)
    L, d = gates.config.num_layers, gates.config.hidden_size
    gates.standins, gates.adapters = StandIns(L, d, rank), StandIns(L, d, rank)
    for p in [*gates.standins.parameters(), *gates.adapters.parameters()]:
        p.data.normal_(0, 0.1)
    return gates, torch.rand(2, L, generator=torch.Generator().manual_seed(seed)) * 0.6 + 0.2


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    """What `specgate tune` stored in the user's cache must not change what the tests see."""
    patch = pytest.MonkeyPatch()
    patch.setenv("SPECGATE_CACHE", str(tmp_path_factory.mktemp("specgate-cache")))
    yield
    patch.undo()


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


# -- training ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: several threads only wait on each other (and on a busy machine, for long).
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trainee():
    """A 3-layer tiny Llama with peaked next-token distributions, as a trained model has, frozen."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
    )  # fmt: skip
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        hf.lm_head.weight.mul_(20)  # peaked next-token distributions, as a trained model has
    m = specgate.SpecGateModel(hf, tokenizer=None)
    for p in m.hf_model.parameters():
        p.requires_grad_(False)
    return m


def pattern_docs(n: int = 24, length: int = 40, seed: int = 0) -> list[list[int]]:
    """Learnable text: each document repeats a short random motif."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n):
        motif = torch.randint(3, VOCAB, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g).tolist()
        docs.append((motif * length)[:length])
    return docs


def own_docs(m, n: int = 24, length: int = 40) -> list[list[int]]:
    """The tiny model's own greedy continuations of random two-token starts."""
    ids = torch.randint(3, VOCAB, (n, 2), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        while ids.shape[1] < length:
            ids = torch.cat([ids, dense_forward(m.engine.weights, ids)[:, -1:].argmax(-1)], dim=1)
    return ids.tolist()


def interrupting(fn, at_call: int):
    """fn, except that its at_call-th call raises KeyboardInterrupt (a Ctrl-C during that step)."""
    calls = []

    def wrapped(*a, **kw):
        calls.append(1)
        if len(calls) == at_call:
            raise KeyboardInterrupt
        return fn(*a, **kw)

    return wrapped


def random_gates(m, seed: int = 0, std: float = 0.5):
    torch.manual_seed(seed)
    gates = m.new_gates(rank=8)
    with torch.no_grad():
        for p in gates.parameters():
            p.normal_(0, std)
    return gates


def train_config(tmp_path, **kw) -> TrainConfig:
    """A small, fast training run into tmp_path/run."""
    base = dict(output_dir=str(tmp_path / "run"), steps=10, batch_size=4, seq_len=32, gate_rank=8, threads=None,
                checkpoint_every=2, warmup_steps=4)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def fixed_budget_loss(m, gates, config, ids, budget=0.3) -> float:
    """The objective's loss at a fixed budget, the threshold taken from the gates' importances."""
    valid = torch.ones_like(ids, dtype=torch.bool)
    rec = G.ForwardRecord()
    with torch.no_grad():
        G.gated_forward(m.engine, ids, gates, None, rec)
        threshold = float(budget_quantile(torch.stack(rec.importance), budget))
        return G.train_step(m.engine, gates, ids, valid, config, budget, threshold)[1].loss


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """Selection state of a new process, its disk cache in tmp_path, no forced backend."""
    monkeypatch.setenv("SPECGATE_CACHE", str(tmp_path))
    monkeypatch.delenv("SPECGATE_LINEAR", raising=False)
    for name in ("_choice", "_report", "_disk"):
        monkeypatch.setattr(L, name, {})
    L.available.cache_clear()
    yield tmp_path
    L.available.cache_clear()
