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
