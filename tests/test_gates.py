"""Gate modules, policies, and gate files."""

import json

import pytest
import torch
from conftest import tiny

from specgate import BudgetPolicy, Gate, load_gates, save_gates


@pytest.mark.parametrize("kind,out", [("full", 64), ("lowrank", 64), ("scalar", 1)])
def test_gate_kinds_start_open(kind, out):
    g = Gate(64, kind, rank=8)(torch.randn(3, 5, 64))
    assert g.shape == (3, 5, out)
    assert g.min() > 0.98  # bias 5.0: the gated model starts as the original


def test_gate_input_is_detached():
    gate = Gate(16, "lowrank", rank=4)
    x = torch.randn(2, 16, requires_grad=True)
    gate(x).sum().backward()
    assert x.grad is None and gate.proj[0].weight.grad is not None


def test_save_load_round_trip_with_thresholds(tmp_path):
    m = tiny("llama", gates=True)
    m.gates.thresholds[0.3] = torch.rand(2, 4)
    save_gates(m.gates, tmp_path / "g")
    loaded = load_gates(tmp_path / "g", m.config)
    for (k, a), (k2, b) in zip(m.gates.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert torch.equal(loaded.thresholds[0.3], m.gates.thresholds[0.3])
    assert loaded.policy(0.3).thresholds is loaded.thresholds[0.3]
    with pytest.raises(ValueError, match="calibrated for budgets"):
        loaded.policy(0.5)
    ids = torch.randint(3, 100, (1, 6))
    run = lambda g: m.engine(ids, m.engine.new_cache(1, 8), g, BudgetPolicy(budget=0.5))  # noqa: E731
    torch.testing.assert_close(run(m.gates), run(loaded))


def test_gates_for_another_model_are_refused(tmp_path):
    m = tiny("llama", gates=True)
    save_gates(m.gates, tmp_path / "g")
    other = tiny("gemma3")
    with pytest.raises(ValueError, match="model_type 'llama'"):
        load_gates(tmp_path / "g", other.config)
    other.config.num_hidden_layers = 5
    with pytest.raises(ValueError, match="5 layers"):
        load_gates(tmp_path / "g", other.config)


def test_broken_gate_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a gate directory"):
        load_gates(tmp_path)
    m = tiny("llama", gates=True)
    save_gates(m.gates, tmp_path / "g")
    config = json.loads((tmp_path / "g" / "gate_config.json").read_text())
    (tmp_path / "g" / "gate_config.json").write_text(json.dumps({**config, "rank": 16}))
    with pytest.raises(ValueError, match="does not match its config"):
        load_gates(tmp_path / "g", m.config)
    (tmp_path / "g" / "gate_config.json").write_text(json.dumps({**config, "colour": "blue"}))
    with pytest.raises(ValueError, match="not a valid gate config"):
        load_gates(tmp_path / "g", m.config)


def test_policy_validates_its_arguments():
    with pytest.raises(ValueError, match="budget"):
        BudgetPolicy(budget=1.5)
    m = tiny("llama", gates=True)
    with pytest.raises(ValueError, match="kv_fill"):
        m.engine(torch.ones(1, 2, dtype=torch.long), m.engine.new_cache(1, 4), m.gates, BudgetPolicy(0.5), kv_fill="zeros")
