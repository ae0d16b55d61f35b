"""Stand-ins for skipped branches: the closed-form fit, what the engine adds, gate files."""

import copy
import dataclasses

import pytest
import torch
from conftest import FAMILIES, fixed_budget_loss, interrupting, own_docs, tiny, train_config

import specgate
from specgate import layers
from specgate import gradient as G
from specgate import train as T
from specgate.damage import removal_damage
from specgate.gradient import ForwardRecord, gated_forward
from specgate.policy import BudgetPolicy
from specgate.standin import Moments, StandIns, branch_moments, explained, fit_standins

pytestmark = pytest.mark.usefixtures("one_thread")


def _moments(x: torch.Tensor, o: torch.Tensor) -> Moments:
    m = Moments(2, x.shape[1])
    for k in range(2):
        m.add(k, x, o[k])
    return m


def test_fit_recovers_a_low_rank_map_and_explained_is_exact():
    g = torch.Generator().manual_seed(0)
    d, n = 24, 4000
    x = torch.randn(n, d, generator=g) * torch.linspace(0.2, 2.0, d) + 1.0  # uneven scales, nonzero mean
    maps = [torch.randn(d, 3, generator=g) @ torch.randn(3, d, generator=g) for _ in range(2)]  # rank 3
    o = torch.stack([x @ M + 0.5 for M in maps]) + 0.05 * torch.randn(2, n, d, generator=g)
    train, test = _moments(x[:3000], o[:, :3000]), _moments(x[3000:], o[:, 3000:])
    r2 = {rank: explained(test, fit_standins(train, rank, ridge=1e-6)) for rank in (0, 1, 3, 8)}
    assert float(r2[0].abs().max()) < 0.02  # the mean explains no variance about the mean
    assert float(r2[1].max()) < 0.9 < float(r2[3].min())
    assert float(r2[8].min()) >= float(r2[3].min()) - 1e-3
    s = fit_standins(train, 3, ridge=1e-6)  # explained() from moments equals the direct computation
    for k in range(2):
        err = (o[k, 3000:] - s(x[3000:], 0, k)).double().pow(2).sum()
        var = (o[k, 3000:].double() - o[k, 3000:].double().mean(0)).pow(2).sum()
        assert float(r2[3][k]) == pytest.approx(float(1 - err / var), abs=1e-6)
    assert torch.allclose(fit_standins(train, 0).bias[1], o[1, :3000].mean(0), atol=1e-5)


def _standins(m, rank: int = 4, seed: int = 0) -> StandIns:
    torch.manual_seed(seed)
    s = StandIns(m.engine.num_layers, m.config.hidden_size, rank)
    for p in s.parameters():
        p.data.normal_(0, 0.3)
    return s


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_a_skipped_branch_adds_its_stand_in(family):
    """Every branch skipped: the residual stream is the embedding plus one stand-in per branch, in
    single-token steps (thresholds) and in multi-token passes (budget 1), with left padding too."""
    m = tiny(family, gates=True)
    m.gates.config = dataclasses.replace(m.gates.config, scale_output=False)
    m.gates.standins = s = _standins(m)
    w, eng, L = m.engine.weights, m.engine, m.engine.num_layers
    ids = torch.randint(3, 101, (2, 6), generator=torch.Generator().manual_seed(1))
    h = layers.embed(w, ids)
    for i, lw in enumerate(w.layers):
        h = h + s(layers.norm(w, h, lw.attn_norm), i, 0)
        h = h + s(layers.norm(w, h, lw.mlp_norm), i, 1)
    expected = layers.head(w, h)
    everything = BudgetPolicy(budget=1.0, thresholds=torch.full((2, L), 2.0))
    got = eng(ids, eng.new_cache(2, 8), m.gates, everything)
    assert torch.allclose(got, expected, atol=1e-4)
    cache = eng.new_cache(2, 8)
    for t in range(6):
        step = eng(ids[:, t : t + 1], cache, m.gates, everything)
        assert torch.allclose(step[:, 0], expected[:, t], atol=1e-4)
    half = BudgetPolicy(budget=0.5)  # mixed: the stand-in only where a token skips
    m.gates.standins = None
    plain = eng(ids, eng.new_cache(2, 8), m.gates, half)
    m.gates.standins = StandIns(L, m.config.hidden_size, 0)  # zero stand-ins change nothing
    assert torch.allclose(eng(ids, eng.new_cache(2, 8), m.gates, half), plain, atol=1e-5)


@torch.no_grad()
def test_damage_labels_price_skips_with_the_stand_in():
    """With stand-ins, label (k, t) is the KL of the engine's draft step that skips branch k and
    adds its stand-in."""
    m = tiny("llama")
    m.gates = m.new_gates(kind="scalar")
    m.gates.config = dataclasses.replace(m.gates.config, scale_output=False)
    m.gates.standins = s = _standins(m, rank=2)
    eng, T_, L = m.engine, 7, m.engine.num_layers
    ids = torch.randint(3, 101, (1, T_), generator=torch.Generator().manual_seed(2))
    _, damage = removal_damage(eng, ids, torch.ones_like(ids, dtype=torch.bool), s)
    cache = eng.new_cache(1, T_)
    eng(ids[:, :4], cache)
    ref = eng(ids[:, 4:5], cache)[0, 0].float().log_softmax(-1)
    for k in range(2 * L):
        thresholds = torch.full((2, L), -1.0)
        thresholds[k % 2, k // 2] = 2.0
        cache.rewind(torch.tensor([4]))
        logp = eng(ids[:, 4:5], cache, m.gates, BudgetPolicy(thresholds=thresholds))[0, 0].float().log_softmax(-1)
        assert float(damage[k, 4]) == pytest.approx(float((ref.exp() * (ref - logp)).sum()), rel=1e-3, abs=1e-5)


def test_gate_files_keep_stand_ins_and_refuse_a_mismatch(tmp_path):
    m = tiny("llama", gates=True)
    m.gates.standins = _standins(m, rank=3)
    specgate.save_gates(m.gates, tmp_path / "g")
    back = specgate.load_gates(tmp_path / "g", m.config)
    assert back.standins.rank == 3 and torch.equal(back.standins.down, m.gates.standins.down)
    wrong = tiny("llama", gates=True)
    wrong.gates.standins = StandIns(3, m.config.hidden_size, 2)  # 3 layers' worth, not 4
    specgate.save_gates(wrong.gates, tmp_path / "bad")
    with pytest.raises(ValueError, match="does not match its config"):
        specgate.load_gates(tmp_path / "bad", m.config)


def test_gate_files_keep_adapters_and_refuse_another_models(tmp_path):
    m = tiny("llama", gates=True)
    m.gates.adapters = _standins(m, rank=2)
    specgate.save_gates(m.gates, tmp_path / "g")
    back = specgate.load_gates(tmp_path / "g", m.config)
    assert back.standins is None and torch.equal(back.adapters.up, m.gates.adapters.up)
    wrong = tiny("llama", gates=True)
    wrong.gates.adapters = StandIns(m.engine.num_layers, m.config.hidden_size + 8, 2)  # another hidden size
    specgate.save_gates(wrong.gates, tmp_path / "bad")
    with pytest.raises(ValueError, match="does not match its config"):
        specgate.load_gates(tmp_path / "bad", m.config)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_draft_rounds_train_on_what_decoding_sees(family):
    """With the original model's K/V as ``history`` and rounds of R tokens, the dense forward gives
    at every position the logits of the engine's draft step there, when the cache holds the
    original model's K/V before the round and the draft's own within it (stand-ins and adapters
    in place)."""
    m = tiny(family, gates=True)
    m.gates.config = dataclasses.replace(m.gates.config, scale_output=False)
    L, eng, T_, R = m.engine.num_layers, m.engine, 10, 3
    m.gates.thresholds[0.5] = torch.full((2, L), 0.5)
    m.gates.standins, m.gates.adapters = _standins(m, rank=2), _standins(m, rank=3, seed=1)
    ids = torch.randint(3, 101, (1, T_), generator=torch.Generator().manual_seed(3))
    kvs = []
    layers.dense_forward(eng.weights, ids, kvs=kvs)
    runs = m.gates.draft_runs(0.5)
    got = gated_forward(eng, ids, m.gates, runs, history=kvs, round_len=R)[0]
    own = gated_forward(eng, ids, m.gates, runs)[0]  # the draft's own K/V everywhere: another model
    policy, want = m.gates.policy(0.5), []
    for start in range(0, T_, R):
        cache = eng.new_cache(1, T_)
        if start:
            eng(ids[:, :start], cache)  # the verified prefix
        want += [eng(ids[:, t : t + 1], cache, m.gates, policy)[0, 0] for t in range(start, min(start + R, T_))]
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(own[R:], got[R:], atol=1e-3)


def test_draft_rounds_are_for_the_standins_objective():
    with pytest.raises(ValueError, match="draft_round, train_gates and top1_weight are for the standins objective"):
        T.TrainConfig(objective="damage", draft_round=2)
    with pytest.raises(ValueError, match="draft_round, train_gates and top1_weight are for the standins objective"):
        T.TrainConfig(objective="damage", train_gates=True)
    with pytest.raises(ValueError, match="draft_round, train_gates and top1_weight are for the standins objective"):
        T.TrainConfig(objective="distill", top1_weight=1.0)
    with pytest.raises(ValueError, match="top1_weight must be >= 0"):
        T.TrainConfig(objective="standins", context_gates="x", top1_weight=-1.0)
    with pytest.raises(ValueError, match="draft_round must be >= 0"):
        T.TrainConfig(objective="standins", context_gates="x", draft_round=-1)


@torch.no_grad()
def test_top1_weight_adds_the_cross_entropy_of_the_full_models_top_token():
    """The standins loss is KL(full || draft) plus top1_weight times the draft's cross-entropy
    against the original model's top-1 token, computed here from the two models' logits."""
    m = tiny("llama", gates=True)
    L = m.engine.num_layers
    m.gates.thresholds[0.5] = torch.full((2, L), 0.5)
    m.gates.standins = _standins(m, rank=2)
    ids = torch.randint(3, 101, (2, 12), generator=torch.Generator().manual_seed(0))
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[1, -3:] = False  # padding
    loss = {w: G.train_step(m.engine, m.gates, ids, valid, T.TrainConfig(objective="standins", context_gates="x", top1_weight=w), 0.5, None)[0]
            for w in (0.0, 2.0)}  # fmt: skip
    full = layers.dense_forward(m.engine.weights, ids).float()[valid]
    runs = m.gates.draft_runs(0.5)
    draft = gated_forward(m.engine, ids, m.gates, lambda imp, i, b: runs(imp, i, b) | ~valid).float()[valid].log_softmax(-1)
    ce = -draft.gather(-1, full.argmax(-1, keepdim=True)).mean()
    assert ce > 0
    torch.testing.assert_close(loss[2.0] - loss[0.0], 2.0 * ce, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_several_context_budgets_train_the_draft_at_each_in_turn():
    """``context_budget=(0.3, 0.7)``: step i distils into the draft at budget i % 2's, as it skips."""
    m = tiny("llama", gates=True)
    L = m.engine.num_layers
    m.gates.thresholds[0.3] = torch.full((2, L), 0.3)
    m.gates.thresholds[0.7] = torch.full((2, L), 0.7)
    m.gates.standins = _standins(m, rank=2)
    config = T.TrainConfig(objective="standins", context_gates="x", context_budget=(0.3, 0.7), draft_round=2)
    assert [G.step_budget(config, i) for i in range(4)] == [0.3, 0.7, 0.3, 0.7]
    ids = torch.randint(3, 101, (2, 12), generator=torch.Generator().manual_seed(0))
    valid = torch.ones_like(ids, dtype=torch.bool)
    low, high = (G.train_step(m.engine, m.gates, ids, valid, config, b, None)[1] for b in (0.3, 0.7))
    assert (low.budget, high.budget) == (0.3, 0.7) and low.skipped < high.skipped
    assert T.TrainConfig(objective="standins", context_gates="x", context_budget=(0.5,)).context_budget == 0.5
    with pytest.raises(ValueError, match="several context budgets"):
        T.TrainConfig(objective="damage", context_budget=(0.5, 0.7))
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        T.TrainConfig(objective="standins", context_gates="x", context_budget=(0.5, 1.5))
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        T.TrainConfig(objective="standins", context_gates="x", context_budget=())


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@torch.no_grad()
def test_adapters_act_only_in_passes_that_skip(family):
    """The verifier's logits (no gates, or gates at budget 0) are bit-identical with and without
    adapters; draft steps and skipping passes change with them; untrained adapters change nothing;
    greedy speculation with them gives plain decoding's tokens."""
    m = tiny(family, gates=True)
    m.gates.config = dataclasses.replace(m.gates.config, scale_output=False)
    L, eng = m.engine.num_layers, m.engine
    m.gates.thresholds[0.5] = torch.full((2, L), 0.5)
    ids = torch.randint(3, 101, (1, 9), generator=torch.Generator().manual_seed(2))

    def passes():
        out = [eng(ids, eng.new_cache(1, 10)), eng(ids, eng.new_cache(1, 10), m.gates, m.gates.policy(0))]
        cache = eng.new_cache(1, 10)
        eng(ids[:, :8], cache)
        out.append(eng(ids[:, 8:], cache, m.gates, m.gates.policy(0.5)))  # a draft step
        return out + [eng(ids, eng.new_cache(1, 10), m.gates, BudgetPolicy(budget=0.5))]  # a skipping pass

    without = passes()
    m.gates.adapters = StandIns.adapters(L, m.config.hidden_size, 3)
    for a, b in zip(passes(), without):
        torch.testing.assert_close(a, b)  # untrained: zero maps
    m.gates.adapters = _standins(m, rank=3)
    verify, gated_verify, draft, skipping = passes()
    assert torch.equal(verify, without[0]) and torch.equal(gated_verify, without[1])
    assert not torch.allclose(draft, without[2], atol=1e-3) and not torch.allclose(skipping, without[3], atol=1e-3)
    plain = m.generate(ids, max_new_tokens=30, eos_token_id=None, pad_token_id=0)
    out = m.generate(ids, max_new_tokens=30, eos_token_id=None, pad_token_id=0, speculative=True, draft_budget=0.5,
                     return_dict_in_generate=True)  # fmt: skip
    assert torch.equal(out.sequences, plain) and out.spec_stats.drafted > 0


def test_the_standins_objective_trains_adapters_alone(trainee, tmp_path, monkeypatch):
    """Adapters on a draft without stand-ins: trained, they bring it closer to the full model; the
    gates stay; the saved gates carry them; an interrupted run resumes to the same adapters."""
    docs = own_docs(trainee)
    first = T.train(trainee, train_config(tmp_path, objective="damage", steps=2), documents=docs)
    ids = torch.tensor([d[:32] for d in own_docs(trainee, n=8)])
    record = ForwardRecord()
    with torch.no_grad():
        gated_forward(trainee.engine, ids, first, None, record)
    median = torch.stack(record.importance).flatten(1).median(1).values  # each branch skips half the tokens
    first.thresholds[0.5] = median.view(3, 2).T.contiguous()
    specgate.save_gates(first, tmp_path / "first")
    config = train_config(tmp_path, objective="standins", steps=24, context_gates=str(tmp_path / "first"),
                          adapter_rank=4, output_dir=str(tmp_path / "adapted"))  # fmt: skip
    tuned = T.train(trainee, config, documents=docs)
    assert tuned.standins is None and tuned.adapters.rank == 4
    assert _draft_kl(trainee, tuned, ids) < 0.8 * _draft_kl(trainee, first, ids)
    assert torch.equal(tuned.gate(2, 1).proj.weight, first.gate(2, 1).proj.weight)
    saved = specgate.load_gates(tmp_path / "adapted" / "gates", trainee.config)
    assert torch.equal(saved.adapters.up, tuned.adapters.up)
    # --adapter-rank on a draft with adapters widens them: the draft is unchanged, training starts there (lr 0: stays)
    assert _draft_kl(trainee, tuned, ids) == pytest.approx(_draft_kl(trainee, _widened(tuned, 6), ids), rel=1e-4)
    wide = T.train(trainee, dataclasses.replace(config, steps=1, lr=0.0, adapter_rank=6, output_dir=str(tmp_path / "wide"),
                                                context_gates=str(tmp_path / "adapted" / "gates")), documents=docs)  # fmt: skip
    assert wide.adapters.rank == 6 and torch.equal(wide.adapters.up[:, :4], tuned.adapters.up)
    assert _draft_kl(trainee, wide, ids) == pytest.approx(_draft_kl(trainee, tuned, ids), rel=1e-4)
    with pytest.raises(ValueError, match="cannot narrow"):
        tuned.adapters.widen(2)
    with pytest.raises(ValueError, match="adapter_rank"):
        T.TrainConfig(adapter_rank=4)  # the damage objective trains no adapters
    # Ctrl-C during step 4, resumed: the adapters of an uninterrupted run
    whole, resumed = _whole_and_resumed(trainee, config, docs, tmp_path, monkeypatch)
    assert torch.equal(resumed.adapters.up, whole.adapters.up) and torch.equal(resumed.adapters.down, whole.adapters.down)
    with pytest.raises(ValueError, match="second-round damage labels do not model"):
        T.train(trainee, train_config(tmp_path, objective="damage", context_gates=str(tmp_path / "adapted" / "gates"),
                                      output_dir=str(tmp_path / "round2")), documents=docs)  # fmt: skip
    with pytest.raises(ValueError, match="--adapter-rank"):
        T.train(trainee, dataclasses.replace(config, adapter_rank=None, output_dir=str(tmp_path / "none")), documents=docs)


def test_training_fits_stand_ins_and_they_cut_the_drafts_loss(trainee, tmp_path):
    """``standin_rank``: the damage objective labels skips with the stand-ins in place, saves them
    with the gates, and at a fixed skip pattern they bring the draft closer to the full model."""
    docs = own_docs(trainee)
    config = train_config(tmp_path, objective="damage", steps=3, standin_rank=4)
    gates = T.train(trainee, config, documents=docs)
    saved = specgate.load_gates(tmp_path / "run" / "gates", trainee.config)
    assert saved.standins.rank == 4 and torch.equal(saved.standins.up, gates.standins.up)
    ids = torch.tensor([d[:32] for d in own_docs(trainee, n=8)])
    evalcfg = T.TrainConfig(objective="distill")
    for budget in (0.3, 0.6):
        with_standins = fixed_budget_loss(trainee, gates, evalcfg, ids, budget)
        gates.standins, standins = None, gates.standins
        without = fixed_budget_loss(trainee, gates, evalcfg, ids, budget)
        gates.standins = standins
        assert with_standins < 0.8 * without, budget
    with pytest.raises(ValueError, match="standin_rank"):
        T.TrainConfig(standin_rank=-1)


@torch.no_grad()
def test_second_round_labels_are_measured_in_the_drafts_context():
    """With ``decide``, label (k, t) is KL(full || draft that skips k) - KL(full || draft that runs
    k) (clamped at 0) for the engine's draft step at t, every other branch as the draft decides."""
    m = tiny("llama")
    m.gates = m.new_gates(kind="scalar")
    for p in m.gates.parameters():
        p.data.normal_(0, 1.0)
    m.gates.config = dataclasses.replace(m.gates.config, scale_output=False)
    m.gates.standins = s = _standins(m, rank=2)
    eng, T_, L = m.engine, 7, m.engine.num_layers
    thresholds = torch.full((2, L), 0.5)
    decide = lambda x, i, b: m.gates.gate(i, b)(x).mean(-1) > thresholds[b, i]  # noqa: E731
    ids = torch.randint(3, 101, (1, T_), generator=torch.Generator().manual_seed(3))
    _, damage = removal_damage(eng, ids, torch.ones_like(ids, dtype=torch.bool), s, decide)
    cache = eng.new_cache(1, T_)
    eng(ids[:, :5], cache)
    ref = eng(ids[:, 5:6], cache)[0, 0].float().log_softmax(-1)

    def kl(forced: float, k: int) -> float:
        t = thresholds.clone()
        t[k % 2, k // 2] = forced  # 2.0: skip k, -1.0: run k (importance is in (0, 1))
        cache.rewind(torch.tensor([5]))
        logp = eng(ids[:, 5:6], cache, m.gates, BudgetPolicy(thresholds=t))[0, 0].float().log_softmax(-1)
        return float((ref.exp() * (ref - logp)).sum())

    assert 0 < float((damage[:, 5] > 0).float().mean()) < 1
    for k in range(2 * L):
        assert float(damage[k, 5]) == pytest.approx(max(0.0, kl(2.0, k) - kl(-1.0, k)), rel=1e-3, abs=1e-5), k


def test_a_second_round_keeps_the_drafts_stand_ins(trainee, tmp_path):
    docs = own_docs(trainee)
    first = T.train(trainee, train_config(tmp_path, objective="damage", steps=2, standin_rank=2), documents=docs)
    first.thresholds[0.5] = torch.full((2, 3), 0.5)  # as calibration would store them
    specgate.save_gates(first, tmp_path / "first")
    config = train_config(tmp_path, objective="damage", steps=2, context_gates=str(tmp_path / "first"), output_dir=str(tmp_path / "second"))
    second = T.train(trainee, config, documents=docs)
    assert torch.equal(second.standins.up, first.standins.up)
    assert not torch.equal(second.gate(1, 1).proj.weight, first.gate(1, 1).proj.weight)
    first.thresholds = {}
    specgate.save_gates(first, tmp_path / "uncalibrated")
    with pytest.raises(ValueError, match="calibrate"):
        T.train(trainee, dataclasses.replace(config, context_gates=str(tmp_path / "uncalibrated"), output_dir=str(tmp_path / "third")), documents=docs)
    refit = T.train(trainee, dataclasses.replace(config, standin_rank=1, output_dir=str(tmp_path / "refit")), documents=docs)
    assert refit.standins.rank == 1  # new stand-ins, fitted where that draft skips


def _whole_and_resumed(m, config, docs, tmp_path, monkeypatch):
    """Gates of a 6-step run, and of the same run interrupted (Ctrl-C) during step 4 and resumed."""
    short = lambda name: dataclasses.replace(config, steps=6, output_dir=str(tmp_path / name))  # noqa: E731
    whole = T.train(m, short("whole"), documents=docs)
    with monkeypatch.context() as patch:
        patch.setattr(G, "train_step", interrupting(G.train_step, at_call=4))
        with pytest.raises(KeyboardInterrupt):
            T.train(m, short("cut"), documents=docs)
    return whole, T.train(m, short("cut"), documents=docs)


def _widened(gates, rank: int):
    wide = copy.deepcopy(gates)
    wide.adapters = gates.adapters.widen(rank, seed=5)
    return wide


def _draft_kl(m, gates, ids, budget=0.5) -> float:
    runs = gates.draft_runs(budget)
    with torch.no_grad():
        full = layers.dense_forward(m.engine.weights, ids).float().log_softmax(-1)
        draft = gated_forward(m.engine, ids, gates, runs).float().log_softmax(-1)
    return float((full.exp() * (full - draft)).sum(-1).mean())


def test_the_standins_objective_distils_the_stand_ins_of_a_fixed_draft(trainee, tmp_path):
    docs = own_docs(trainee)
    first = T.train(trainee, train_config(tmp_path, objective="damage", steps=2, standin_rank=2), documents=docs)
    first.thresholds[0.5] = torch.full((2, 3), 0.5)
    first = first.half().float()  # stored in float16, as `specgate calibrate` stores gates
    specgate.save_gates(copy.deepcopy(first).half(), tmp_path / "first")
    config = train_config(tmp_path, objective="standins", steps=24, context_gates=str(tmp_path / "first"), lr=3e-4,
                          output_dir=str(tmp_path / "distilled"))  # fmt: skip
    tuned = T.train(trainee, config, documents=docs)
    ids = torch.tensor([d[:32] for d in own_docs(trainee, n=8)])
    assert _draft_kl(trainee, tuned, ids) < 0.8 * _draft_kl(trainee, first, ids)
    assert torch.equal(tuned.gate(2, 1).proj.weight, first.gate(2, 1).proj.weight)  # the gates stay
    saved = specgate.load_gates(tmp_path / "distilled" / "gates", trainee.config)
    assert torch.equal(saved.thresholds[0.5], first.thresholds[0.5]) and torch.equal(saved.standins.up, tuned.standins.up)
    with pytest.raises(ValueError, match="context-gates"):
        T.TrainConfig(objective="standins")


def test_moments_count_only_the_tokens_a_draft_would_skip():
    m = tiny("llama")
    w = m.engine.weights
    ids = torch.randint(3, 101, (2, 9), generator=torch.Generator().manual_seed(4))
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[1, 6:] = False
    every = branch_moments(w, [(ids, valid)])
    assert every.n.tolist() == [15.0] * 8
    where = lambda x, i, b: (x[..., 0] > 0) if (i, b) != (1, 1) else torch.zeros_like(x[..., 0], dtype=torch.bool)  # noqa: E731
    some = branch_moments(w, [(ids, valid)], where)
    assert 0 < some.n[0] < 15 and some.n[3] == 0
    s = fit_standins(some, rank=2)
    assert torch.equal(s.bias[3], torch.zeros_like(s.bias[3]))  # no token: the stand-in adds nothing
    x = layers.norm(w, layers.embed(w, ids), w.layers[0].attn_norm)
    assert some.n[0] == int((valid & (x[..., 0] > 0)).sum())


def test_a_skip_saves_its_branch_less_its_stand_in_plus_its_adapter():
    m = tiny("llama", gates=True)
    eng = m.engine
    standin = _standins(m, rank=4).weights_read()
    assert standin == 64 * (1 + 2 * 4)
    (cost, saved), (_, less) = eng.branch_costs(), eng.branch_costs(standin=standin)
    assert sum(map(sum, cost)) == pytest.approx(1.0)
    weights = sum(lw.qkv_w.numel() + lw.o_w.numel() + lw.gate_up_w.numel() + lw.down_w.numel() for lw in eng.weights.layers)
    for b in (0, 1):
        for i in range(eng.num_layers):
            assert saved[b][i] - less[b][i] == pytest.approx(standin / weights)
    (more_cost, more_saved) = eng.branch_costs(adapter=standin)  # an adapter is read where the branch runs
    for b in (0, 1):
        for i in range(eng.num_layers):
            assert more_cost[b][i] - cost[b][i] == pytest.approx(standin / weights)
            assert more_saved[b][i] - saved[b][i] == pytest.approx(standin / weights)


def test_a_skipped_tokens_gate_learns_what_running_its_branch_would_gain(trainee, monkeypatch):
    """With stand-ins and adapters in place, the gradient a decide-only gate gets at a skipped token
    is <d loss / d h, o + a - s>: the first-order gain of running the branch (output o, adapter a)
    instead of its stand-in s, read here from the residual stream's own gradient."""
    m = trainee
    gates = specgate.GateSet(specgate.gates.GateConfig(m.config.hidden_size, 3, kind="scalar", scale_output=False))
    gates.standins, gates.adapters = _standins(m, rank=2), _standins(m, rank=3, seed=1)
    ids = torch.tensor(own_docs(m, n=2, length=12))
    t, seen = 7, {}  # the one (token, branch) skipped: layer 1's MLP at position 7 of sequence 0

    def decide(imp, layer, branch):
        run = torch.ones_like(imp, dtype=torch.bool)
        run[0, t] = (layer, branch) != (1, 1)
        return run

    def recording(weights, input_ids, add, **kw):  # keeps that branch's input, output and the residual after it
        def watched(h, x, o, i, branch):
            out = add(h, x, o, i, branch)
            if (i, branch) == (1, 1):
                out.retain_grad()
                seen.update(x=x, o=o, h=out, g=gates.gate(1, 1)(x)[0, t, 0].detach())
            return out

        return layers.dense_forward(weights, input_ids, watched, **kw)

    monkeypatch.setattr(G, "dense_forward", recording)
    probe = torch.randn(m.config.vocab_size, generator=torch.Generator().manual_seed(3))
    gates.gate(1, 1).proj.bias.requires_grad_(True)
    (gated_forward(m.engine, ids, gates, decide).float().log_softmax(-1) * probe).sum().backward()
    g = float(seen["g"])
    analytic = float(gates.gate(1, 1).proj.bias.grad) / (g * (1 - g))  # d loss / d g at the one skipped token
    with torch.no_grad():
        x, o = seen["x"][0, t], seen["o"][0, t]
        gain = o + gates.adapters(x, 1, 1) - gates.standins(x, 1, 1)
    expected = float(seen["h"].grad[0, t] @ gain)
    assert abs(expected) > 1e-3 and analytic == pytest.approx(expected, rel=1e-4)


def test_joint_training_moves_the_gates_and_keeps_the_budget(trainee, tmp_path, monkeypatch):
    """``train_gates``: the gates train with the adapters; the budget's threshold is steered so that
    the draft skips that share of its compute (from one that skipped far less); the steered
    thresholds are saved, and an interrupted run resumes to the uninterrupted one's gates and thresholds."""
    docs = own_docs(trainee)
    first = T.train(trainee, train_config(tmp_path, objective="damage", steps=2), documents=docs)
    ids = torch.tensor([d[:32] for d in own_docs(trainee, n=8)])
    valid = torch.ones_like(ids, dtype=torch.bool)
    record = ForwardRecord()
    with torch.no_grad():
        gated_forward(trainee.engine, ids, first, None, record)
    low = torch.stack(record.importance).flatten(1).quantile(0.15, dim=1)  # each branch skips ~15% of tokens
    first.thresholds[0.5] = low.view(3, 2).T.contiguous()
    specgate.save_gates(first, tmp_path / "first")
    config = train_config(tmp_path, objective="standins", steps=16, context_gates=str(tmp_path / "first"),
                          adapter_rank=4, train_gates=True, gate_lr=1e-2, output_dir=str(tmp_path / "joint"))  # fmt: skip

    def compute_skipped(gates) -> float:
        with torch.no_grad():
            return G.train_step(trainee.engine, gates, ids, valid, config, 0.5, None)[1].compute_skipped

    joint = T.train(trainee, config, documents=docs)
    assert compute_skipped(first) < 0.3 and compute_skipped(joint) == pytest.approx(0.5, abs=0.1)
    assert not torch.equal(joint.gate(2, 1).proj.weight, first.gate(2, 1).proj.weight)
    saved = specgate.load_gates(tmp_path / "joint" / "gates", trainee.config)
    assert torch.equal(saved.thresholds[0.5], joint.thresholds[0.5])
    whole, resumed = _whole_and_resumed(trainee, config, docs, tmp_path, monkeypatch)
    assert torch.equal(resumed.thresholds[0.5], whole.thresholds[0.5])
    assert torch.equal(resumed.gate(1, 0).proj.weight, whole.gate(1, 0).proj.weight)
