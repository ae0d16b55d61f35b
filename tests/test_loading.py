"""Loading models by name, and the errors a user meets."""

from pathlib import Path

import pytest

import specgate
from specgate.adapters import read_weights
from specgate.loading import resolve


def test_unknown_alias_names_the_choices():
    with pytest.raises(ValueError, match="smollm2-135m-instruct"):
        resolve("no-such-model")


def test_missing_files_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve(str(tmp_path / "x.gguf"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve(str(tmp_path))


def test_unsupported_architecture_lists_the_families():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(NotImplementedError, match="Llama family"):
        read_weights(model)


def test_default_alias_resolves_to_the_installed_gguf():
    folder, gguf = resolve(specgate.loading.DEFAULT_MODEL)
    path = Path(folder) / gguf
    assert path.is_file() and path.suffix == ".gguf"
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"  # the GGUF magic number
