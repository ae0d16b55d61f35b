"""Gate training and calibration on a trainee random-weight Llama (seconds, CPU)."""

import dataclasses
import json

import pytest
import torch
from conftest import FAMILIES, tiny
from conftest import VOCAB as V
from conftest import fixed_budget_loss, interrupting, own_docs, pattern_docs, random_gates, train_config

import specgate
from specgate import data
from specgate import gradient as G
from specgate import train as T
from specgate.calibrate import calibrate, measure
from specgate.gradient import gated_forward, quantile_decider
from specgate.standin import StandIns
from specgate.policy import BudgetPolicy, budget_quantile
from specgate.train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scale", [True, False])
def test_training_forward_is_the_engine(family, scale):
    """The dense training forward computes what the engine computes, for every family, with and
    without skipping, with gates that scale and gates that only decide, with and without stand-ins
    and adapters."""
    m = tiny(family, gates=True)
    m.gates.config = dataclasses.replace(m.gates.config, scale_output=scale)
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    valid = torch.ones(2, 12, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(m.engine(ids, m.engine.new_cache(2, 12)), gated_forward(m.engine, ids))
        want = m.engine(ids, m.engine.new_cache(2, 12), m.gates, BudgetPolicy(0.3))
        got = gated_forward(m.engine, ids, m.gates, quantile_decider(0.3, valid, "branch"))
        torch.testing.assert_close(got, want)
        for name in ("standins", "adapters"):  # and with stand-ins, then adapters too
            setattr(m.gates, name, StandIns(m.engine.num_layers, m.config.hidden_size, 2))
            for p in getattr(m.gates, name).parameters():
                p.normal_(0, 0.3)
            want = m.engine(ids, m.engine.new_cache(2, 12), m.gates, BudgetPolicy(0.3))
            got = gated_forward(m.engine, ids, m.gates, quantile_decider(0.3, valid, "branch"))
            torch.testing.assert_close(got, want)


def test_gradients_reach_the_gates(trainee):
    gates = random_gates(trainee, std=0.05)
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(2))
    loss, _, _ = G.train_step(trainee.engine, gates, ids, torch.ones_like(ids, dtype=torch.bool),
                              TrainConfig(objective="distill"), 0.3, 0.5)  # fmt: skip
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gates.parameters())


@pytest.mark.parametrize("objective", ["paper", "distill"])
def test_training_reduces_the_loss(trainee, tmp_path, objective):
    """At a fixed 30% skip budget the gates learn what to skip: the loss on the data falls."""
    docs = own_docs(trainee)
    # one importance threshold for all branches; gates only decide skips (straight-through)
    if objective == "paper":  # CE on the model's own text + L2
        config = train_config(tmp_path, objective="paper", budget_max=0.3, warmup_steps=0, sparsity=1.0)
    else:  # KL to the original model
        config = train_config(tmp_path, objective="distill", budget_min=0.3, budget_max=0.3, warmup_steps=0)
    config = TrainConfig(**{**config.__dict__, "steps": 20})
    ids = torch.tensor([d[:32] for d in docs])
    torch.manual_seed(config.seed)
    before = fixed_budget_loss(trainee, specgate.GateSet(T.gate_config(trainee, config)), config, ids)
    after = fixed_budget_loss(trainee, T.train(trainee, config, documents=docs), config, ids)
    assert after < 0.9 * before, (before, after)


def test_sparsity_pushes_gates_down(trainee, tmp_path):
    docs = pattern_docs()
    gates = T.train(trainee, train_config(tmp_path, objective="paper", budget_max=0.0, sparsity=10.0, steps=8, lr=0.1), documents=docs)
    ids = torch.tensor([d[:32] for d in docs[:4]])
    rec = G.ForwardRecord()
    with torch.no_grad():
        gated_forward(trainee.engine, ids, gates, None, rec)
    assert float(torch.stack(rec.importance).mean()) < 0.95  # from sigmoid(5) = 0.993


@pytest.mark.parametrize("allocation", ["branch", "global"])
def test_warmup_skips_the_scheduled_fraction(trainee, allocation):
    config = TrainConfig(objective="paper", budget_max=0.4, warmup_steps=4, allocation=allocation)
    assert [round(G.step_budget(config, s), 3) for s in range(6)] == [0.1, 0.2, 0.3, 0.4, 0.4, 0.4]
    gates = random_gates(trainee, std=0.3)
    g = torch.Generator().manual_seed(3)
    prev = None
    for step in range(6):
        ids = torch.randint(0, V, (4, 32), generator=g)
        valid = torch.ones_like(ids, dtype=torch.bool)
        budget = G.step_budget(config, step)
        if prev is None:
            rec = G.ForwardRecord()
            with torch.no_grad():
                gated_forward(trainee.engine, ids, gates, None, rec)
            prev = torch.stack(rec.importance).flatten()
        with torch.no_grad():
            _, stats, prev = G.train_step(trainee.engine, gates, ids, valid, config, budget, float(budget_quantile(prev, budget)))
        tol = 1 / valid.sum() if allocation == "branch" else 0.05  # global: threshold of the previous batch
        assert abs(stats.skipped - budget) <= tol + 1e-6, (step, stats)


def test_resume_and_interrupt_give_the_uninterrupted_result(trainee, tmp_path, monkeypatch):
    docs = pattern_docs()
    whole = T.train(trainee, train_config(tmp_path / "a", steps=6, objective="distill"), documents=docs)
    # an interrupted run (Ctrl-C during step 4) resumed to the end
    with monkeypatch.context() as patch:
        patch.setattr(G, "train_step", interrupting(G.train_step, at_call=4))
        with pytest.raises(KeyboardInterrupt):
            T.train(trainee, train_config(tmp_path / "b", steps=6, objective="distill"), documents=docs)
    state = torch.load(tmp_path / "b" / "run" / G.CHECKPOINT_NAME, weights_only=False)
    assert state["step"] == 3
    assert specgate.load_gates(tmp_path / "b" / "run" / "gates", trainee.config) is not None  # usable
    resumed = T.train(trainee, train_config(tmp_path / "b", steps=6, objective="distill"), documents=docs)
    for (k, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k


def test_a_cosine_schedule_decays_the_lr_and_resumes_where_it_was(trainee, tmp_path, monkeypatch):
    """--lr-schedule cosine: the lr of step s is lr * (1 + cos(pi s / steps)) / 2, the run differs
    from a constant one, and an interrupted run resumed to the end gives the uninterrupted result."""
    docs = pattern_docs()
    cosine = lambda d: train_config(tmp_path / d, steps=6, objective="distill", lr_schedule="cosine")  # noqa: E731
    assert [G.lr_factor(cosine("x"), s) for s in (0, 3, 6)] == pytest.approx([1.0, 0.5, 0.0])
    whole = T.train(trainee, cosine("a"), documents=docs)
    state = torch.load(tmp_path / "a" / "run" / G.CHECKPOINT_NAME, weights_only=False)
    (group,) = state["optimizer"]["param_groups"]
    assert group["lr"] == pytest.approx(0.5 * G.lr_factor(cosine("a"), 5)) and group["initial_lr"] == 0.5
    constant = T.train(trainee, train_config(tmp_path / "c", steps=6, objective="distill"), documents=docs)
    assert any(not torch.equal(a, b) for a, b in zip(whole.state_dict().values(), constant.state_dict().values()))
    with monkeypatch.context() as patch:
        patch.setattr(G, "train_step", interrupting(G.train_step, at_call=4))
        with pytest.raises(KeyboardInterrupt):
            T.train(trainee, cosine("b"), documents=docs)
    resumed = T.train(trainee, cosine("b"), documents=docs)
    for (k, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("allocation", ["global", "branch"])
def test_calibrated_decode_skips_the_budget(trainee, allocation):
    gates = random_gates(trainee, std=0.3)
    g = torch.Generator().manual_seed(4)
    calib, heldout = torch.randint(0, V, (8, 72), generator=g), torch.randint(0, V, (8, 72), generator=g)
    budgets = (0.2, 0.5)
    calibrate(trainee, gates, calib, budgets, allocation, prefix=8, iterations=3)
    assert gates.thresholds[0.2].shape == (2, 3)
    for b in budgets:
        assert abs(measure(trainee, gates, heldout, b, prefix=8) - b) <= 0.05, b


def test_bad_data_files_are_refused(tmp_path):
    class Tok:
        chat_template = None

        def __call__(self, text, add_special_tokens=False):
            return type("Enc", (), {"input_ids": [ord(c) % V for c in text]})()

    tok = Tok()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_documents(tmp_path / "missing.txt", tok)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        data.load_documents(tmp_path / "empty.txt", tok)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "fine"}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        data.load_documents(tmp_path / "bad.jsonl", tok)
    (tmp_path / "keys.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ValueError, match=r'keys.jsonl:1: expected an object with a string "text"'):
        data.load_documents(tmp_path / "keys.jsonl", tok)
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match="chat template"):
        data.load_documents(tmp_path / "chat.jsonl", tok)
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="not UTF-8"):
        data.load_documents(tmp_path / "bin.txt", tok)
    (tmp_path / "ok.jsonl").write_text(json.dumps({"text": "abc"}) + "\n\n")
    assert data.load_documents(tmp_path / "ok.jsonl", tok) == [[97 % V, 98 % V, 99 % V]]


def test_cli_defaults_are_the_train_config():
    from specgate.cli import parser

    args = vars(parser().parse_args(["train"]))
    assert TrainConfig(**{k: v for k, v in args.items() if k in TrainConfig.__dataclass_fields__}) == TrainConfig()
    args = parser().parse_args(["train", "--never-skip", "0:1,1:0", "--no-scale-output", "--steps", "5"])
    assert (args.never_skip, args.scale_output, args.steps) == (((0, 1), (1, 0)), False, 5)
    assert parser().parse_args(["calibrate", "--budgets", "0.3,0.5"]).budgets == [0.3, 0.5]
    with pytest.raises(ValueError, match="lr_schedule must be"):
        TrainConfig(lr_schedule="linear")


def test_init_from_order_skips_branches_in_that_order(trainee):
    """Static-order init: at budget k / 2L the global threshold skips exactly the first k branches."""
    gates = specgate.GateSet(T.gate_config(trainee, TrainConfig(gate_kind="scalar")))
    order = [(2, 0), (1, 0), (0, 0), (2, 1), (1, 1), (0, 1)]
    G.init_from_order(gates, order)
    ids = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(6))
    rec = G.ForwardRecord()
    with torch.no_grad():
        gated_forward(trainee.engine, ids, gates, None, rec)
    imp = torch.stack(rec.importance)  # (2L, B, T) in (layer, branch) order
    for k in range(1, 6):
        skipped = (imp <= budget_quantile(imp, k / 6)).all(-1).all(-1)
        assert {(i // 2, i % 2) for i in skipped.nonzero().flatten().tolist()} == set(order[:k])


def test_a_run_made_from_another_model_is_not_resumed(trainee, tmp_path, capsys):
    """Checkpoints remember what they were made from: another model or sequence length is refused
    (it would "train in 0 s" on the wrong labels); --no-resume starts afresh, and says so."""
    docs = pattern_docs()
    config = train_config(tmp_path, objective="damage", steps=2)
    T.train(trainee, config, documents=docs)
    other = tiny("llama", seed=3)
    with pytest.raises(ValueError, match="another run.*weights_checksum"):
        T.train(other, config, documents=docs)
    with pytest.raises(ValueError, match="seq_len: 32 there, 16 now"):
        T.train(trainee, dataclasses.replace(config, seq_len=16), documents=docs)
    gates = T.train(other, dataclasses.replace(config, resume=False), documents=docs)
    assert "starting afresh" in capsys.readouterr().out
    assert gates.config.num_layers == other.config.num_hidden_layers


def test_training_says_when_it_replaces_calibrated_gates(trainee, tmp_path, capsys):
    config = train_config(tmp_path, objective="damage", steps=2)
    gates = T.train(trainee, config, documents=pattern_docs())
    gates.thresholds[0.3] = torch.zeros(2, 3)
    specgate.save_gates(gates, tmp_path / "run" / "gates")
    T.train(trainee, dataclasses.replace(config, steps=3), documents=pattern_docs())
    assert "calibrated for budgets [0.3]" in capsys.readouterr().err


def test_default_output_dirs_differ_by_model_and_objective(trainee):
    a = T.output_dir(trainee, TrainConfig())
    trainee.name = "smollm2-135m-instruct"
    try:
        b, c = T.output_dir(trainee, TrainConfig()), T.output_dir(trainee, TrainConfig(objective="distill"))
    finally:
        trainee.name = ""
    assert len({a, b, c}) == 3 and b.name == "smollm2-135m-instruct-damage"
