"""Builds and loads specgate's CPU kernels: the small-M linear kernel (``cpu_linear.cpp``,
``torch.ops.specgate.small_linear``) and the fused pass (``cpu_step.cpp``, ``torch.classes.specgate.CpuStep``,
see :mod:`.cpu_step`), one extension sharing ``cpu_linear.h``.

The kernels are compiled on the user's machine at first use (``-O3 -march=native``, ~15 s once on a 2-core EPYC), so
it uses the widest vector unit there is. It is built with OpenMP (``-fopenmp``, where the platform's
compiler has it): without it ``at::parallel_for`` in an extension runs on one thread, and the kernel
read the weights at half the machine's bandwidth on 2 cores. The build lands in ``<cache>/torch_extensions/`` under a key
made of the sources, the CPU model and flags and the torch version: another CPU, a new torch or an
edited kernel gets its own build instead of a stale binary. Without a compiler, ninja or torch's
headers the build fails, ``load()`` returns None after one warning, and the engine keeps using the
torch / oneDNN products.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
import warnings
from pathlib import Path

import torch

SOURCES = [Path(__file__).with_name(f) for f in ("cpu_linear.cpp", "cpu_step.cpp")]
HEADER = Path(__file__).with_name("cpu_linear.h")
OPENMP = ["-fopenmp"] if sys.platform.startswith("linux") else []  # macOS clang has no -fopenmp
# SPECGATE_CPU_CFLAGS adds flags, e.g. "-mno-avx512f" to build (and test) the AVX2 code on an AVX-512 machine
CFLAGS = ["-O3", "-march=native", *OPENMP, *os.environ.get("SPECGATE_CPU_CFLAGS", "").split()]


def cache_dir() -> Path:
    """Where specgate keeps per-machine builds and measurements: ``$SPECGATE_CACHE`` or ``~/.cache/specgate``."""
    return Path(os.environ.get("SPECGATE_CACHE") or Path.home() / ".cache" / "specgate")


@functools.cache
def cpu_signature() -> str:
    """The CPU model and feature flags (Linux: from /proc/cpuinfo), what a -march=native build depends on."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    info = {}
    for line in lines:
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    model = info.get("model name") or platform.processor() or platform.machine()
    flags = info.get("flags") or info.get("Features") or ""
    return f"{model} | {flags}"


@functools.cache
def build_key() -> str:
    """Hash of everything the compiled binary depends on."""
    text = "\n".join([*(f.read_text() for f in (*SOURCES, HEADER)), cpu_signature(), torch.__version__, " ".join(CFLAGS)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _register_fake() -> None:
    """Shape-only implementation, so torch.compile / export can trace through the op."""

    @torch.library.register_fake("specgate::small_linear")
    def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.register_fake("specgate::screened_linear")
    def _(x, weight, q, scale, err, norm, max_exact: int) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], weight.shape[0]))


@functools.cache
def load():
    """``torch.ops.specgate.small_linear(x, weight, bias)`` (and the module docstring's others), built on first
    call; None if it cannot be built."""
    from torch.utils import cpp_extension

    key = build_key()
    build_dir = cache_dir() / "torch_extensions" / f"cpu_linear-{key}"
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(
            name=f"specgate_cpu_linear_{key}", sources=[str(f) for f in SOURCES], extra_cflags=CFLAGS, extra_ldflags=OPENMP,
            build_directory=str(build_dir), is_python_module=False, verbose=False,
        )  # fmt: skip
        op = torch.ops.specgate.small_linear
    except Exception as e:  # noqa: BLE001 - compiler, ninja, headers, linker: any failure means "not available"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        warnings.warn(
            f"specgate: the small-M CPU linear kernel could not be built ({reason}); linear products use "
            "torch/oneDNN instead. It needs a C++ compiler, ninja and torch's C++ headers.",
            RuntimeWarning, stacklevel=2,
        )  # fmt: skip
        return None
    _register_fake()
    return op
