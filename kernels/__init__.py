"""Triton kernels for the sparse draft passes (installed as ``specgate.kernels``).

specgate never imports Triton itself, and the CPU path never needs it: each kernel module
(``route``, ``projection``, ``residual``, ``kv_fill``, ``draft_head``, ``accept``) imports cleanly
without Triton and holds, beside its kernels and launchers, the PyTorch reference the kernels are
tested against. Kernels are handed to ``triton.jit`` on their first launch (:func:`jit`).

On the CPU the kernels run in Triton's interpreter, which needs ``TRITON_INTERPRET=1`` set before
Triton is first imported: Triton reads it when it decorates a function, and it decorates its own
language library (``tl.max``, ``tl.sigmoid``, ...) on import. torch imports Triton when torch is
imported, so in practice the variable must be set before ``import torch``.

Launchers take and return torch tensors and never synchronise with the host: the number of active
rows of a pass stays on the device as a one-element int32 tensor ``count``, next to ``order``, a
permutation of the pass's rows that lists the active rows first (see :mod:`.route`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any, Callable


def _yield_the_name() -> None:
    """Imported as the top-level ``kernels`` (Python run with the repo root on sys.path: ``python -c``,
    a REPL or notebook there), this folder would shadow Hugging Face's ``kernels`` package, which
    transformers imports: hand the name to that package when it is installed."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != root]
    this = sys.modules.pop(__name__)
    try:
        sys.modules[__name__] = importlib.import_module(__name__)  # what `import kernels` then returns
    except ImportError:
        sys.modules[__name__] = this  # not installed: nothing to shadow
    finally:
        sys.path[:] = saved


if __name__ == "kernels":
    _yield_the_name()

import torch  # noqa: E402

INTERPRET_HINT = "set TRITON_INTERPRET=1 to run Triton kernels on the CPU (slow, for tests), or use kernels='torch'"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _interpreter_ready() -> bool:
    """TRITON_INTERPRET is set, and was when Triton's language library was decorated (if yet)."""
    if not _interpreting():
        return False
    standard = sys.modules.get("triton.language.standard")
    return standard is None or type(standard.max).__name__ == "InterpretedFunction"


def triton_installed() -> bool:
    """Whether Triton can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # blocked, or a broken entry in sys.modules
        return False


def triton_available(device: torch.device | str | torch.Tensor) -> bool:
    """Whether the Triton kernels can run on ``device`` (a device or a tensor on it): on CUDA when
    Triton is installed; on the CPU only under ``TRITON_INTERPRET=1`` (the interpreter), set
    before Triton was imported."""
    if isinstance(device, torch.Tensor):
        device = device.device
    kind = torch.device(device).type
    if not triton_installed():
        return False
    return kind == "cuda" or (kind == "cpu" and _interpreter_ready())


def require_triton(device: torch.device | str | torch.Tensor) -> None:
    """Raise a clear error when ``kernels="triton"`` was asked for where the kernels cannot run."""
    if triton_available(device):
        return
    if not triton_installed():
        raise RuntimeError("kernels='triton' needs the triton package (pip install triton), or use kernels='torch'")
    kind = (device.device if isinstance(device, torch.Tensor) else torch.device(device)).type
    if kind == "cpu" and _interpreting():
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set after Triton was imported (torch imports it): set it before "
            "the process imports torch, or use kernels='torch'"
        )
    if kind == "cpu":
        raise RuntimeError(INTERPRET_HINT)
    raise RuntimeError(f"the Triton kernels do not run on {kind!r} devices: use kernels='torch'")


class LazyKernel:
    """A kernel function decorated with ``triton.jit`` on its first launch, not at import.

    The kernel modules then import without Triton, and importing them costs no decoration.
    Kernels wrapped this way must not call each other (the Triton frontend needs real JIT
    functions for that); each of ours is self-contained."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self._jitted: Any = None

    @property
    def jitted(self) -> Any:
        if self._jitted is None:
            import triton

            self._jitted = triton.jit(self.fn)
        return self._jitted

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        return self.jitted[grid]


def jit(fn: Callable[..., Any]) -> LazyKernel:
    """Decorator for our kernels: ``triton.jit`` deferred to the first launch (see LazyKernel)."""
    return LazyKernel(fn)


def cdiv(a: int, b: int) -> int:
    """Number of blocks of size b that cover a (the launch grid along one axis)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Block sizes must be powers of two; hidden sizes like 576 or 72 are padded up and masked."""
    return 1 << max(0, int(n) - 1).bit_length()
