"""The command line: errors a user meets say what to do."""

import pytest

from specgate.cli import main


def test_unknown_model_is_a_clear_error(capsys):
    assert main(["generate", "hi", "--model", "no-such-model"]) == 2
    assert "aliases" in capsys.readouterr().err


def test_missing_gate_directory_is_a_clear_error(capsys, tmp_path):
    assert main(["generate", "hi", "--gates", str(tmp_path)]) == 2
    assert "not a gate directory" in capsys.readouterr().err


def test_bad_flags_are_refused():
    with pytest.raises(SystemExit):
        main(["generate", "hi", "--verifier", "draft"])
    with pytest.raises(SystemExit):
        main(["bench", "--max-draft", "many"])


def test_every_subcommand_builds_its_parser(capsys):
    for command in ("generate", "bench", "train", "calibrate"):
        with pytest.raises(SystemExit) as exit:
            main([command, "--help"])
        assert exit.value.code == 0
        assert "--model" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["bench", "--threads", "-1"], "must be 1 or more"),
        (["bench", "--prompts", "0"], "must be 1 or more"),
        (["bench", "--draft-budget", "1.5"], "share in [0, 1]"),
        (["bench", "--temperature", "-0.5"], "must be 0 (greedy) or more"),
        (["generate", "hi", "--temperature", "warm"], "expected a number"),
        (["generate", "hi", "--max-new-tokens", "2.5"], "whole number"),
        (["train", "--context-budget", "0.5,x"], "expected a number in [0, 1]"),
        (["train", "--context-budget", ","], "such as 0.5,0.7"),
    ],
)
def test_bad_numbers_are_refused_before_anything_loads(capsys, argv, message):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_bench_out_must_be_a_file_before_the_run(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["bench", "--out", str(tmp_path)])
    assert "is a folder" in capsys.readouterr().err


def test_bench_refuses_more_prompts_than_mt_bench_has(capsys):
    assert main(["bench", "--prompts", "10000"]) == 2
    assert "80" in capsys.readouterr().err


def test_calibrate_never_writes_into_the_shipped_gates(capsys):
    assert main(["calibrate"]) == 2
    assert "never overwritten" in capsys.readouterr().err


@pytest.mark.parametrize("saved,message", [(True, "checkpoint of 3 steps"), (False, "nothing saved")])
def test_ctrl_c_says_whether_a_checkpoint_was_saved(capsys, monkeypatch, tmp_path, saved, message):
    import specgate.train
    from conftest import tiny

    from specgate import cli
    from specgate.loop import TrainingInterrupted

    def interrupted(model, config):
        raise TrainingInterrupted(3 if saved else 0, saved)

    monkeypatch.setattr(cli, "_load", lambda args, gates=None: tiny("llama"))
    monkeypatch.setattr(specgate.train, "train", interrupted)
    assert main(["train", "--output-dir", str(tmp_path)]) == 130
    assert message in capsys.readouterr().err


def test_budget_and_length_flags_change_the_chosen_settings_other_flags_make_a_spec_config():
    from argparse import Namespace

    from specgate import SpecConfig
    from specgate.cli import SPEC_FLAGS, _spec_call

    flags = lambda **given: Namespace(**{**dict.fromkeys(SPEC_FLAGS), **given})  # noqa: E731
    assert _spec_call(flags()) == {}
    assert _spec_call(flags(max_draft=3, draft_budget=0.5)) == {"max_draft": 3, "draft_budget": 0.5}
    assert _spec_call(flags(max_draft=3, kv_fill="copy_below")) == {"spec_config": SpecConfig(max_draft=3, kv_fill="copy_below")}
