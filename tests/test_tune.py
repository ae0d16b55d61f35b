"""`specgate tune`: the choice formula, an end-to-end run on a tiny model, and when a stored choice is reused."""

import dataclasses
import json
import logging

import pytest
import torch
from conftest import VOCAB, scalar_gates, tiny

from specgate import SpecConfig, linear, tune
from specgate.cli import main
from specgate.kernels.cpu_step import ROWS_PER_PASS

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = tune.TuneConfig(vocabs=(50,), max_draft=3, tokens=16, rounds=2)


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """Tuned choices go to tmp_path; the small-M kernel is found in (or built into) the user's cache
    first, not rebuilt there (~15 s)."""
    linear.available()
    monkeypatch.setenv("SPECGATE_CACHE", str(tmp_path))
    return tmp_path


def _model():
    m = tiny("llama", gates=True)
    m.gates.thresholds[0.3] = torch.full((2, 4), 0.5)
    m.gates.thresholds[0.5] = torch.full((2, 4), 1.0)
    m.gates.token_ranking = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(3))
    return m


def _prompts():
    return [torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(s)) for s in range(2)]


def test_the_choice_drafts_several_tokens_when_they_are_accepted_and_cheap():
    k, s = tune.best_k(0.8, 0.3, {k: 1.1 for k in range(1, 9)})
    assert (k, s) == (3, pytest.approx((1 - 0.8**4) / 0.2 / (3 * 0.3 + 1.1)))  # 2.95 tokens for 2.0 steps: 1.48x
    assert tune.expected_tokens(0.8, 1) == pytest.approx(1.8)
    assert tune.expected_tokens(1.0, 4) == 5.0
    assert tune.best_k(0.0, 0.3, {k: 1.1 for k in range(1, 9)})[1] < 1.0  # nothing accepted: plain wins
    # a cold first draft step of a round (the verify pass evicted the draft's weights) is shared by the round's drafts
    assert tune.best_k(0.8, 1.0, {k: 1.1 for k in range(1, 9)}) == (1, pytest.approx(1.8 / 2.1))
    k, s = tune.best_k(0.8, [1.0] + [0.1] * 7, {k: 1.1 for k in range(1, 9)})
    assert k > 1 and s == pytest.approx(tune.expected_tokens(0.8, k) / (1.0 + 0.1 * (k - 1) + 1.1)) and s > 1.0
    # rounds the draft's confidence cuts: measured tokens and drafts per round, verify cost interpolated
    assert tune.confident_speedup(2.5, 1.5, 0.3, {1: 1.1, 2: 1.3, 3: 1.5}) == pytest.approx(2.5 / (1.5 * 0.3 + 1.2))


def test_tune_stores_a_choice_that_generate_uses_losslessly(cache, caplog):
    m = _model()
    assert tune.load_tuned(m) is None
    result = tune.tune(m, SMALL, prompts=_prompts())
    fills = ("project", "copy_below")
    assert {(r["budget"], r["vocab"], r["kv_fill"]) for r in result["settings"]} == {
        (b, v, f) for b in (0.3, 0.5) for v in (None, 50) for f in fills
    }
    best = max(result["settings"], key=lambda r: r["speedup"])
    assert result["spec_config"]["kv_fill"] == best["kv_fill"]  # the K/V fill is chosen by measurement too
    assert all(0.0 <= r["a"] <= 1.0 and 1 <= r["k"] <= 3 for r in result["settings"])
    confident = [r for r in result["settings"] if r["min_draft_prob"] == 0.5]
    assert len(confident) == len(result["settings"]) / 2 and all(1 <= r["drafts"] <= 3 and r["tau"] >= 1 for r in confident)
    assert result["predicted_speedup"] >= 1.0 and result["costs"]["plain"] == 1.0
    drafts = [c for name, c in result["costs"].items() if name.startswith("draft ")]  # per position in a round
    assert len(drafts) == len(result["settings"]) / 2 and all(len(c) == 3 and min(c) > 0 for c in drafts)
    assert "choice:" in tune.report(result)
    path = tune.save(result, tune.tune_file(m))
    assert path.parent == cache and json.loads(path.read_text())["key"] == tune.tune_key(m)

    spec, where = tune.load_tuned(m)
    assert where == path and spec.max_draft == spec.first_draft and not spec.adaptive
    ids = _prompts()[0]
    plain = m.generate(ids, max_new_tokens=20, eos_token_id=None, pad_token_id=0)
    with caplog.at_level(logging.INFO, logger="specgate"):
        out = m.generate(ids, max_new_tokens=20, eos_token_id=None, pad_token_id=0, speculative=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, plain)
    assert out.spec_stats.settings.startswith("tuned (") and path.name in out.spec_stats.settings
    assert path.name in caplog.text
    given = m.generate(ids, max_new_tokens=5, speculative=True, draft_budget=0.5, return_dict_in_generate=True)
    assert given.spec_stats.settings == f"{out.spec_stats.settings} + draft_budget=0.5"  # on top of the tuned ones


def test_a_chosen_confidence_stop_is_stored_and_decodes_losslessly(cache, monkeypatch):
    m = _model()
    monkeypatch.setattr(tune, "confident_speedup", lambda *args: 9.0)  # make a confident row the best
    result = tune.tune(m, SMALL, prompts=_prompts())
    tune.save(result, tune.tune_file(m))
    spec, _ = tune.load_tuned(m)
    assert spec.min_draft_prob == 0.5 and spec.max_draft == 3 and "min_draft_prob=0.5" in tune.report(result)
    ids = _prompts()[1]
    plain = m.generate(ids, max_new_tokens=20, eos_token_id=None, pad_token_id=0)
    assert torch.equal(m.generate(ids, max_new_tokens=20, eos_token_id=None, pad_token_id=0, speculative=True), plain)


def test_changed_gates_or_threads_do_not_reuse_the_stored_choice(cache):
    m = _model()
    tune.save(tune.tune(m, SMALL, prompts=_prompts()), tune.tune_file(m))
    assert tune.load_tuned(m) is not None
    torch.set_num_threads(2)  # tuned with one (the one_thread fixture)
    try:
        assert tune.load_tuned(m) is None
    finally:
        torch.set_num_threads(1)
    m.gates.thresholds[0.1] = torch.full((2, 4), 0.2)  # calibrated for one more budget: the defaults' 0.1
    assert tune.load_tuned(m) is None
    out = m.generate(_prompts()[0], max_new_tokens=5, speculative=True, return_dict_in_generate=True)
    assert out.spec_stats.settings == "defaults"


def test_batches_past_spec_max_batch_decode_plainly_unless_speculation_is_asked_for(cache, caplog):
    """Tuned or default settings speculate on batches up to tune.SPEC_MAX_BATCH and decode larger
    ones plainly (no spec_stats, a logged reason); an explicit spec_config or override speculates."""
    m = _model()
    m.gates.thresholds[0.1] = torch.full((2, 4), 0.2)  # the SpecConfig defaults' budget
    ids = torch.randint(3, VOCAB, (tune.SPEC_MAX_BATCH + 1, 12), generator=torch.Generator().manual_seed(5))
    plain = m.generate(ids, max_new_tokens=12, eos_token_id=None, pad_token_id=0)
    kw = dict(max_new_tokens=12, eos_token_id=None, pad_token_id=0, speculative=True, return_dict_in_generate=True)
    for stored in (False, True):
        if stored:
            tune.save(tune.tune(m, SMALL, prompts=_prompts()), tune.tune_file(m))
        with caplog.at_level(logging.INFO, logger="specgate"):
            out = m.generate(ids, **kw)
        assert out.spec_stats is None and torch.equal(out.sequences, plain)
        assert f"a batch of {tune.SPEC_MAX_BATCH + 1} > {tune.SPEC_MAX_BATCH}" in caplog.text
        assert m.generate(ids[: tune.SPEC_MAX_BATCH], **kw).spec_stats.rounds > 0
        one, two = (tune.resolve(m, None, {}, batch=b)[0] for b in (1, 2))  # a batch of 2: its verify rows in one pass
        assert two == tune._override(one, {"max_draft": min(one.max_draft, ROWS_PER_PASS // 2 - 1)})
    for asked in (dict(spec_config=SpecConfig(0.5)), dict(draft_budget=0.5), dict(max_draft=2)):
        out = m.generate(ids, **kw, **asked)
        assert out.spec_stats.rounds > 0 and torch.equal(out.sequences, plain), asked


def test_an_unreadable_stored_choice_warns_and_falls_back_to_the_defaults(cache):
    m = _model()
    tune.tune_file(m).write_text("{not json")
    with pytest.warns(UserWarning, match="specgate tune"):
        assert tune.load_tuned(m) is None


def test_uncalibrated_budgets_are_refused_with_what_to_do():
    m = _model()
    with pytest.raises(ValueError, match="specgate calibrate"):
        tune.candidates(m, tune.TuneConfig(budgets=(0.7,)))
    m.gates.thresholds = {}
    with pytest.raises(ValueError, match="specgate calibrate"):
        tune.candidates(m, tune.TuneConfig())


def test_by_default_tune_also_tries_the_low_precision_copies_without_skipping():
    """Without ``precisions``, tune tries float32 drafts at every setting and, as drafts that skip
    nothing, the int8 and int4 copies that run here (what won on every CPU measured): a default tune
    never stores a float32 draft where an int8 one pays. Gates that scale outputs run even at budget
    0, so not over a copy."""
    if not linear.available()["smallm"]:
        pytest.skip("no C++ toolchain: no fused pass, so no low-precision copy to draft from")
    m = _model()
    m.gates.config = dataclasses.replace(m.gates.config, scale_output=False)
    config = tune.TuneConfig(vocabs=(50,), kv_fills=("project",))
    low = [(0.0, v, "project", p) for v in (None, 50) for p in ("int8", "int4")]
    assert tune.candidates(m, config) == low + [(b, v, "project", "float32") for b in (0.3, 0.5) for v in (None, 50)]
    m.gates.config = dataclasses.replace(m.gates.config, scale_output=True)
    assert {p for *_, p in tune.candidates(m, config)} == {"float32"}


def test_without_gates_tune_chooses_among_low_precision_drafts(cache):
    """A model without gates (Gemma 3 ships none) tunes the drafts that skip nothing over a low-precision
    copy (by default the int8 and int4 ones), stores the choice under its own key, and generate uses it
    losslessly; asked for float32 drafts only, it says what to pass."""
    if not linear.available()["smallm"]:
        pytest.skip("no C++ toolchain: no fused pass, so no low-precision copy to draft from")
    m = tiny("llama")
    assert tune.candidates(m, tune.TuneConfig()) == [(0.0, None, "project", "int8"), (0.0, None, "project", "int4")]
    with pytest.raises(ValueError, match="--precisions int8"):
        tune.candidates(m, tune.TuneConfig(precisions=("float32",)))
    config = tune.TuneConfig(precisions=("int8", "bfloat16"), max_draft=3, tokens=16, rounds=2)
    result = tune.tune(m, config, prompts=_prompts())
    assert {(r["budget"], r["vocab"], r["precision"]) for r in result["settings"]} == {(0.0, None, "int8"), (0.0, None, "bfloat16")}
    tune.save(result, tune.tune_file(m))
    assert tune.tune_key(m) != tune.tune_key(_model())
    ids = _prompts()[0]
    out = m.generate(ids, max_new_tokens=20, eos_token_id=None, pad_token_id=0, speculative=True, return_dict_in_generate=True)
    assert out.spec_stats.settings.startswith("tuned (")
    assert torch.equal(out.sequences, m.generate(ids, max_new_tokens=20, eos_token_id=None, pad_token_id=0))


def test_without_gates_a_models_own_ranking_adds_draft_vocabularies(cache):
    """A model without gates but with a token ranking of its own (one shipped for it, or set) tunes
    draft vocabularies too, under another key than without the ranking, and drafts with them losslessly."""
    if not linear.available()["smallm"]:
        pytest.skip("no C++ toolchain: no fused pass, so no low-precision copy to draft from")
    m = tiny("llama")
    key = tune.tune_key(m)
    m.default_ranking = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(1))
    assert tune.tune_key(m) != key
    config = tune.TuneConfig(precisions=("int8",), vocabs=(50, VOCAB), max_draft=3, tokens=16, rounds=2)
    assert tune.candidates(m, config) == [(0.0, None, "project", "int8"), (0.0, 50, "project", "int8")]
    tune.save(tune.tune(m, config, prompts=_prompts()), tune.tune_file(m))
    ids = _prompts()[0]
    spec = SpecConfig(0.0, draft_vocab=50, draft_precision="int8", max_draft=3)
    out = m.generate(ids, max_new_tokens=20, eos_token_id=None, pad_token_id=0, speculative=True, spec_config=spec)
    assert torch.equal(out, m.generate(ids, max_new_tokens=20, eos_token_id=None, pad_token_id=0))


def test_the_tune_command_takes_its_flags_and_refuses_bad_ones(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["tune", "--help"])
    assert exit.value.code == 0 and "--vocab" in capsys.readouterr().out
    for argv in (["tune", "--vocab", "many"], ["tune", "--max-draft", "0"], ["tune", "--budgets", "x"], ["tune", "--draft-probs", "1.5"]):
        with pytest.raises(SystemExit):
            main(argv)


def test_tune_refuses_an_unknown_kv_fill():
    with pytest.raises(ValueError, match="kv_fills"):
        tune.TuneConfig(kv_fills=("nearest",))


def test_untuned_speculation_drafts_from_an_int4_copy_else_an_int8_one(cache, monkeypatch):
    """Nothing tuned and nothing given: the int4 draft that skips nothing, or the int8 one where no
    int4 copy runs, gates or not, lossless and labelled; a given budget keeps the SpecConfig defaults."""
    if not linear.available()["smallm"]:
        pytest.skip("no C++ toolchain: no fused pass, so no low-precision copy to draft from")
    m = tiny("llama")
    ids = _prompts()[0]
    plain = m.generate(ids, max_new_tokens=20, eos_token_id=None, pad_token_id=0)
    runs = tune._low_drafts
    for precision in ("int4", "int8"):
        out = m.generate(ids, max_new_tokens=20, eos_token_id=None, pad_token_id=0, speculative=True, return_dict_in_generate=True)
        assert out.spec_stats.settings == f"defaults ({precision} draft)" and out.spec_stats.drafted > 0
        assert torch.equal(out.sequences, plain)
        monkeypatch.setattr(tune, "_low_drafts", lambda m, p: p != "int4" and runs(m, p))  # as where no int4 copy fits
    monkeypatch.setattr(tune, "_low_drafts", runs)
    monkeypatch.setattr(tune, "UNTUNED_VOCAB", 20)  # a vocabulary over 4x it (101 tokens): with a ranking, a draft vocabulary
    out = m.generate(ids, max_new_tokens=20, eos_token_id=None, pad_token_id=0, speculative=True, return_dict_in_generate=True)
    assert out.spec_stats.settings == "defaults (int4 draft)"  # no ranking: the full head
    m.default_ranking = torch.randperm(m.config.vocab_size, generator=torch.Generator().manual_seed(0))
    out = m.generate(ids, max_new_tokens=20, eos_token_id=None, pad_token_id=0, speculative=True, return_dict_in_generate=True)
    assert out.spec_stats.settings == "defaults (int4 draft, 20-token vocabulary)" and torch.equal(out.sequences, plain)
    monkeypatch.setattr(tune, "UNTUNED_VOCAB", 30)  # under 4x: the full head
    assert tune.resolve(m, None, {})[0].draft_vocab is None
    m.default_ranking = None
    m.gates = _model().gates
    given = m.generate(ids, max_new_tokens=5, speculative=True, draft_budget=0.5, return_dict_in_generate=True)
    assert given.spec_stats.settings == "defaults + draft_budget=0.5" and given.spec_stats.skip_fraction > 0


def test_overrides_change_the_settings_generate_chooses(cache, monkeypatch):
    """draft_budget= and max_draft= apply to the tuned settings, else the untuned ones: a fixed draft
    length follows max_draft; an int4 draft asked to skip does so for one sequence and reads the
    float32 weights in a batch (the fused pass drafts a copy that skips for one sequence only);
    lossless every way."""
    if not linear.available()["smallm"]:
        pytest.skip("no C++ toolchain: no fused pass, so no low-precision copy to draft from")
    m = tiny("llama")
    m.gates, m.gates.thresholds[0.5] = scalar_gates(m, rank=0)
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(7))
    kw = dict(max_new_tokens=16, eos_token_id=None, pad_token_id=0)
    plain = m.generate(ids, **kw)
    spec = lambda ids, **given: m.generate(ids, **kw, speculative=True, return_dict_in_generate=True, **given)  # noqa: E731
    one = spec(ids[:1], draft_budget=0.5)
    assert one.spec_stats.settings == "defaults (int4 draft) + draft_budget=0.5" and one.spec_stats.compute_skipped > 0
    two = spec(ids, draft_budget=0.5)
    assert two.spec_stats.settings.startswith("defaults (int4 draft) (at most 3 drafts a round: a batch of 2) + draft_budget=0.5 (float32 draft")
    assert two.spec_stats.compute_skipped > 0
    assert torch.equal(one.sequences, plain[:1]) and torch.equal(two.sequences, plain)
    assert tune.resolve(m, None, {"draft_budget": 0.5}, batch=2)[0].draft_precision == "float32"
    assert tune.resolve(m, None, {"max_draft": 2}, batch=2)[0].draft_precision == "int4"  # skips nothing: fused

    monkeypatch.setattr(tune, "confident_speedup", lambda *args: 0.0)  # a fixed draft length, never a stop
    tune.save(tune.tune(m, dataclasses.replace(SMALL, budgets=(0.5,)), prompts=_prompts()), tune.tune_file(m))
    tuned, label = tune.resolve(m, None, {})
    assert label.startswith("tuned (") and not tuned.adaptive
    for k in (1, tuned.max_draft + 2):
        given, given_label = tune.resolve(m, None, {"max_draft": k})
        assert given == dataclasses.replace(tuned, max_draft=k, init_draft=k) and given_label == f"{label} + max_draft={k}"
        out = spec(ids[:1], max_draft=k)
        assert torch.equal(out.sequences, plain[:1]) and out.spec_stats.drafted == k * out.spec_stats.rounds
    adaptive = SpecConfig(max_draft=6, init_draft=5)
    assert tune._override(adaptive, {"max_draft": 3}) == SpecConfig(max_draft=3, init_draft=3)  # adapting: bounded
    assert tune._override(adaptive, {"max_draft": 8}).init_draft == 5
