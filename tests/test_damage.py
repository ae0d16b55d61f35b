"""The damage objective: exact removal-damage labels, the Poisson fit, and the loop around them."""

import dataclasses

import pytest
import torch
from conftest import FAMILIES, fixed_budget_loss, interrupting, own_docs, tiny, train_config

import specgate
from specgate import damage
from specgate import train as T
from specgate.damage import CHECKPOINT_NAME, poisson_fit, removal_damage
from specgate.policy import BudgetPolicy

pytestmark = pytest.mark.usefixtures("one_thread")


def _kl(logp_ref: torch.Tensor, logp: torch.Tensor) -> float:
    return float((logp_ref.exp() * (logp_ref - logp)).sum())


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_removal_damage_is_a_draft_step_skipping_one_branch(family):
    """Label (k, t) is the KL of the engine's single-token step at t, against the original model's
    cache, with branch k skipped and nothing else: the first draft step after a verify pass."""
    m = tiny(family)
    m.gates = m.new_gates(kind="scalar")
    m.gates.config = dataclasses.replace(m.gates.config, scale_output=False)
    eng, T_, L = m.engine, 9, m.engine.num_layers
    ids = torch.randint(3, 101, (1, T_), generator=torch.Generator().manual_seed(1))
    _, damage = removal_damage(eng, ids, torch.ones_like(ids, dtype=torch.bool))
    assert damage.shape == (2 * L, T_)
    for t in (0, 4, 8):  # 8: past gemma3's sliding window of 5
        cache = eng.new_cache(1, T_)
        if t:
            eng(ids[:, :t], cache)
        ref = eng(ids[:, t : t + 1], cache)[0, 0].float().log_softmax(-1)
        for k in range(2 * L):
            thresholds = torch.full((2, L), -1.0)
            thresholds[k % 2, k // 2] = 2.0  # importance is in (0, 1): only branch k skips
            cache.rewind(torch.tensor([t]))
            policy = BudgetPolicy(thresholds=thresholds)
            logp = eng(ids[:, t : t + 1], cache, m.gates, policy)[0, 0].float().log_softmax(-1)
            assert float(damage[k, t]) == pytest.approx(_kl(ref, logp), rel=1e-3, abs=1e-5), (t, k)


def test_poisson_fit_recovers_the_expected_damage():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 20000, 3, generator=g) * torch.tensor([1.0, 3.0, 0.1])  # unequal feature scales
    w_true = torch.tensor([[0.8, -0.2, 0.0], [0.0, 0.3, 5.0]])
    b_true = torch.tensor([-1.0, 0.5])
    rate = (torch.einsum("gnd,gd->gn", x, w_true) + b_true[:, None]).exp()
    y = torch.poisson(rate, generator=g) * 0.01  # scale does not matter to a log link
    w, b = poisson_fit(x, y, ridge=0.0)
    log_rate = torch.einsum("gnd,gd->gn", x, w) + b[:, None]
    true = rate.log() + torch.tensor(0.01).log()
    assert float((log_rate - true).abs().mean()) < 0.03
    assert torch.allclose(w[:, :2], w_true[:, :2], atol=0.02)


def test_damage_gates_skip_better_than_random_and_resume_after_ctrl_c(trainee, tmp_path, monkeypatch):
    docs = own_docs(trainee)
    config = train_config(tmp_path, objective="damage", steps=6, checkpoint_every=2, gate_rank=64)
    gates = T.train(trainee, config, documents=docs)
    assert gates.config.kind == "scalar" and not gates.config.scale_output
    assert (tmp_path / "run" / CHECKPOINT_NAME).is_file() and (tmp_path / "run" / "gates").is_dir()
    most_frequent = torch.tensor([t for d in docs for t in d]).bincount().argmax()
    assert specgate.load_gates(tmp_path / "run" / "gates").token_ranking[0] == most_frequent  # the draft vocabulary

    # fitted gates beat gates that rank (token, branch) pairs at random, at the same budget
    ids = torch.tensor([d[:32] for d in own_docs(trainee, n=8)])
    evalcfg = T.TrainConfig(objective="distill")
    torch.manual_seed(3)
    rand = trainee.new_gates(kind="scalar")
    for p in rand.parameters():
        torch.nn.init.normal_(p, std=1.0)
    for budget in (0.2, 0.4):
        assert fixed_budget_loss(trainee, gates, evalcfg, ids, budget) < 0.7 * fixed_budget_loss(
            trainee, rand, evalcfg, ids, budget
        )

    # Ctrl-C during step 4 leaves 3 steps of labels and usable gates; resuming gives the same gates
    split = train_config(tmp_path, objective="damage", steps=6, checkpoint_every=2, output_dir=str(tmp_path / "split"))
    with monkeypatch.context() as patch:
        patch.setattr(damage, "removal_damage", interrupting(damage.removal_damage, at_call=4))
        with pytest.raises(KeyboardInterrupt):
            T.train(trainee, split, documents=docs)
    assert torch.load(tmp_path / "split" / CHECKPOINT_NAME)["step"] == 3
    assert specgate.load_gates(tmp_path / "split" / "gates", trainee.config) is not None
    resumed = T.train(trainee, split, documents=docs)
    for a, b in zip(gates.state_dict().values(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5)


def test_damage_refuses_gates_it_cannot_fit():
    with pytest.raises(ValueError, match="scalar gates"):
        T.TrainConfig(objective="damage", gate_kind="lowrank")
    with pytest.raises(ValueError, match="scalar gates"):
        T.TrainConfig(objective="damage", scale_output=True)
