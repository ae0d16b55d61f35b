"""Gate training and calibration on a tiny random-weight Llama (seconds, CPU)."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import specgate
from specgate import train as T
from specgate.calibrate import calibrate, measure
from specgate.train import TrainConfig, gated_forward, quantile_decider

V = 101


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: several threads only wait on each other (and on a busy machine, for long)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
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
        motif = torch.randint(3, V, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g).tolist()
        docs.append((motif * length)[:length])
    return docs


def own_docs(m, n: int = 24, length: int = 40) -> list[list[int]]:
    """The tiny model's own greedy continuations of random two-token starts."""
    ids = torch.randint(3, V, (n, 2), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        while ids.shape[1] < length:
            ids = torch.cat([ids, gated_forward(m.engine, ids)[:, -1:].argmax(-1)], dim=1)
    return ids.tolist()


def interrupting(fn, at_call: int):
    """fn, except that its at_call-th call raises KeyboardInterrupt (a Ctrl-C during that step)."""
    calls = []

    def wrapped(*a):
        calls.append(1)
        if len(calls) == at_call:
            raise KeyboardInterrupt
        return fn(*a)

    return wrapped


def random_gates(m, seed: int = 0, std: float = 0.5):
    torch.manual_seed(seed)
    gates = m.new_gates(rank=8)
    with torch.no_grad():
        for p in gates.parameters():
            p.normal_(0, std)
    return gates


def cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(output_dir=str(tmp_path / "run"), steps=10, batch_size=4, seq_len=32, gate_rank=8, threads=None,
                checkpoint_every=2, warmup_steps=4)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_gated_forward_is_the_engine(tiny):
    """The differentiable training forward computes what the engine computes, skipping included."""
    gates = random_gates(tiny)
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    valid = torch.ones(2, 12, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(tiny.engine(ids, tiny.engine.new_cache(2, 12)), gated_forward(tiny.engine, ids))
        for scale in (True, False):
            want = tiny.engine(ids, tiny.engine.new_cache(2, 12), gates, specgate.SkipPolicy(0.3, scale_output=scale))
            got = gated_forward(tiny.engine, ids, gates, quantile_decider(0.3, valid, "branch"), scale)
            torch.testing.assert_close(got, want)


def test_gradients_reach_the_gates(tiny):
    gates = random_gates(tiny, std=0.05)
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(2))
    loss, _, _ = T.train_step(tiny.engine, gates, ids, torch.ones_like(ids, dtype=torch.bool),
                              TrainConfig(objective="distill"), 0.3, 0.5)  # fmt: skip
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gates.parameters())


@pytest.mark.parametrize("objective", ["paper", "distill"])
def test_training_reduces_the_loss(tiny, tmp_path, objective):
    """At a fixed 30% skip budget the gates learn what to skip: the loss on the data falls."""
    docs = own_docs(tiny)
    # one importance threshold for all branches; gates only decide skips (straight-through)
    if objective == "paper":  # CE on the model's own text + L2
        config = cfg(tmp_path, objective="paper", budget_max=0.3, warmup_steps=0, sparsity=1.0)
    else:  # KL to the original model
        config = cfg(tmp_path, objective="distill", budget_min=0.3, budget_max=0.3, warmup_steps=0)
    config = TrainConfig(**{**config.__dict__, "steps": 20})
    ids = torch.tensor([d[:32] for d in docs])
    torch.manual_seed(config.seed)
    before = fixed_budget_loss(tiny, specgate.GateSet(T.gate_config(tiny, config)), config, ids)
    after = fixed_budget_loss(tiny, T.train(tiny, config, documents=docs), config, ids)
    assert after < 0.9 * before, (before, after)


def fixed_budget_loss(m, gates, config, ids, budget=0.3) -> float:
    valid = torch.ones_like(ids, dtype=torch.bool)
    rec = T.ForwardRecord()
    with torch.no_grad():
        gated_forward(m.engine, ids, gates, None, config.scale_output, rec)
        threshold = T.global_threshold(torch.stack(rec.importance).flatten(), budget)
        return T.train_step(m.engine, gates, ids, valid, config, budget, threshold)[1].loss


def test_sparsity_pushes_gates_down(tiny, tmp_path):
    docs = pattern_docs()
    gates = T.train(tiny, cfg(tmp_path, objective="paper", budget_max=0.0, sparsity=10.0, steps=8, lr=0.1), documents=docs)
    ids = torch.tensor([d[:32] for d in docs[:4]])
    rec = T.ForwardRecord()
    with torch.no_grad():
        gated_forward(tiny.engine, ids, gates, None, True, rec)
    assert float(torch.stack(rec.importance).mean()) < 0.95  # from sigmoid(5) = 0.993


@pytest.mark.parametrize("allocation", ["branch", "global"])
def test_warmup_skips_the_scheduled_fraction(tiny, allocation):
    config = TrainConfig(objective="paper", budget_max=0.4, warmup_steps=4, allocation=allocation)
    assert [round(T.step_budget(config, s), 3) for s in range(6)] == [0.1, 0.2, 0.3, 0.4, 0.4, 0.4]
    gates = random_gates(tiny, std=0.3)
    g = torch.Generator().manual_seed(3)
    prev = None
    for step in range(6):
        ids = torch.randint(0, V, (4, 32), generator=g)
        valid = torch.ones_like(ids, dtype=torch.bool)
        budget = T.step_budget(config, step)
        if prev is None:
            rec = T.ForwardRecord()
            with torch.no_grad():
                gated_forward(tiny.engine, ids, gates, None, True, rec)
            prev = torch.stack(rec.importance).flatten()
        with torch.no_grad():
            _, stats, prev = T.train_step(tiny.engine, gates, ids, valid, config, budget, T.global_threshold(prev, budget))
        tol = 1 / valid.sum() if allocation == "branch" else 0.05  # global: threshold of the previous batch
        assert abs(stats.skipped - budget) <= tol + 1e-6, (step, stats)


def test_resume_and_interrupt_give_the_uninterrupted_result(tiny, tmp_path):
    docs = pattern_docs()
    whole = T.train(tiny, cfg(tmp_path / "a", steps=6, objective="distill"), documents=docs)
    # an interrupted run (Ctrl-C during step 4) resumed to the end
    orig = T.train_step
    T.train_step = interrupting(orig, at_call=4)
    try:
        with pytest.raises(KeyboardInterrupt):
            T.train(tiny, cfg(tmp_path / "b", steps=6, objective="distill"), documents=docs)
    finally:
        T.train_step = orig
    state = torch.load(tmp_path / "b" / "run" / T.CHECKPOINT_NAME, weights_only=False)
    assert state["step"] == 3
    assert specgate.load_gates(tmp_path / "b" / "run" / "gates", tiny.config) is not None  # usable
    resumed = T.train(tiny, cfg(tmp_path / "b", steps=6, objective="distill"), documents=docs)
    for (k, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("allocation", ["global", "branch"])
def test_calibrated_decode_skips_the_budget(tiny, allocation):
    gates = random_gates(tiny, std=0.3)
    g = torch.Generator().manual_seed(4)
    calib, heldout = torch.randint(0, V, (8, 72), generator=g), torch.randint(0, V, (8, 72), generator=g)
    budgets = (0.2, 0.5)
    calibrate(tiny, gates, calib, budgets, allocation, prefix=8, iterations=3)
    assert gates.thresholds[0.2].shape == (2, 3)
    for b in budgets:
        assert abs(measure(tiny, gates, heldout, b, prefix=8) - b) <= 0.05, b


def test_bad_data_files_are_refused(tmp_path):
    class Tok:
        chat_template = None

        def __call__(self, text, add_special_tokens=False):
            return type("Enc", (), {"input_ids": [ord(c) % V for c in text]})()

    tok = Tok()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        T.load_documents(tmp_path / "missing.txt", tok)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        T.load_documents(tmp_path / "empty.txt", tok)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "fine"}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        T.load_documents(tmp_path / "bad.jsonl", tok)
    (tmp_path / "keys.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ValueError, match=r'keys.jsonl:1: expected an object with a string "text"'):
        T.load_documents(tmp_path / "keys.jsonl", tok)
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match="chat template"):
        T.load_documents(tmp_path / "chat.jsonl", tok)
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="not UTF-8"):
        T.load_documents(tmp_path / "bin.txt", tok)
    (tmp_path / "ok.jsonl").write_text(json.dumps({"text": "abc"}) + "\n\n")
    assert T.load_documents(tmp_path / "ok.jsonl", tok) == [[97 % V, 98 % V, 99 % V]]


def test_cli_defaults_are_the_train_config():
    import argparse

    from specgate.train_cli import add_calibrate_parser, add_train_parser

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_train_parser(sub)
    add_calibrate_parser(sub)
    args = vars(parser.parse_args(["train"]))
    assert TrainConfig(**{k: v for k, v in args.items() if k in TrainConfig.__dataclass_fields__}) == TrainConfig()
    args = parser.parse_args(["train", "--never-skip", "0:1,1:0", "--no-scale-output", "--steps", "5"])
    assert (args.never_skip, args.scale_output, args.steps) == (((0, 1), (1, 0)), False, 5)
    assert parser.parse_args(["calibrate", "--budgets", "0.3,0.5"]).budgets == [0.3, 0.5]


def test_init_from_order_skips_branches_in_that_order(tiny):
    """Static-order init: at budget k / 2L the global threshold skips exactly the first k branches."""
    gates = specgate.GateSet(T.gate_config(tiny, TrainConfig(gate_kind="scalar")))
    order = [(2, 0), (1, 0), (0, 0), (2, 1), (1, 1), (0, 1)]
    T.init_from_order(gates, order)
    ids = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(6))
    rec = T.ForwardRecord()
    with torch.no_grad():
        gated_forward(tiny.engine, ids, gates, None, False, rec)
    imp = torch.stack(rec.importance)  # (2L, B, T) in (layer, branch) order
    for k in range(1, 6):
        skipped = (imp <= T.global_threshold(imp.flatten(), k / 6)).all(-1).all(-1)
        assert {(i // 2, i % 2) for i in skipped.nonzero().flatten().tolist()} == set(order[:k])
