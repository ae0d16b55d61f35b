"""The engine's linear products on CPU, each routed to the backend measured fastest on this machine.

Which product is fastest depends on the CPU, not on its vendor: on one Intel Xeon F.linear (MKL)
beat oneDNN and our small-M kernel beat both; on an AMD EPYC oneDNN was ~2x F.linear for one row.
So for every (weight shape, dtypes, token-row bucket 1..8 or "many") the first product times the
available backends on that very weight, interleaved, and keeps the fastest for the process and on
disk (``<cache>/linear-<machine hash>.json``, cache dir ``$SPECGATE_CACHE`` or ``~/.cache/specgate``).

Backends: ``torch`` (F.linear), ``onednn`` (``torch.ops.mkldnn._linear_pointwise``, where the probe
works), ``smallm`` (``specgate.kernels.cpu_linear``, fp32 and at most 8 rows, where it builds).
``SPECGATE_LINEAR=torch|onednn|smallm`` forces one wherever it applies (F.linear elsewhere);
``auto`` (the default) measures. Autograd and non-CPU tensors always take F.linear.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from .kernels import cpu_linear

BACKENDS = ("torch", "onednn", "smallm")
SMALL_M = 8  # the small-M kernel's row limit; larger products are bucketed as "many"
COLD_BYTES = 48 << 20  # a decode step streams its weights from DRAM: time on copies that overflow the L3
MAX_COPIES = 64
REPS = 3  # interleaved timed passes per backend, after one warm-up pass

Bucket = int | str

_choice: dict[tuple, str] = {}  # (threads, n, d, x dtype, w dtype, bucket) -> backend, for this process
_report: dict[str, dict] = {}  # what choices() shows: "<shape> <dtype> M=<bucket> threads=<t>" -> details
_disk: dict[str, dict] = {}  # machine key -> that machine's cache file contents (loaded on first use)


def probe_onednn() -> bool:
    """Whether oneDNN's linear runs in this torch build (it is missing on some platforms)."""
    try:
        x, w = torch.ones(1, 4), torch.ones(3, 4)
        return bool(torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "").sum() == 12)
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def available() -> dict[str, bool]:
    """Which backends work here; builds the small-M kernel on first call (once per machine, cached on disk)."""
    return {"torch": True, "onednn": probe_onednn(), "smallm": cpu_linear.load() is not None}


def _run_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def _run_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")


def _run_smallm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if weight.stride(1) != 1:  # the kernel walks weight rows as contiguous memory
        return F.linear(x, weight, bias)
    return torch.ops.specgate.small_linear(x, weight, bias)


RUN: dict[str, Callable] = {"torch": _run_torch, "onednn": _run_onednn, "smallm": _run_smallm}


def _applies(backend: str, x: torch.Tensor, weight: torch.Tensor, bucket: Bucket) -> bool:
    """Whether a backend can compute this product at all (dtype, row count)."""
    if backend == "onednn":
        return x.dtype == weight.dtype and x.dtype in (torch.float32, torch.bfloat16)
    if backend == "smallm":
        return x.dtype == weight.dtype == torch.float32 and bucket != "many"
    return True


def forced_backend() -> str:
    """The backend SPECGATE_LINEAR forces, or "auto"; an unusable value is an error that says what to do."""
    name = os.environ.get("SPECGATE_LINEAR", "auto").strip().lower() or "auto"
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"SPECGATE_LINEAR={name!r}: use one of auto, {', '.join(BACKENDS)}")
    if name != "auto" and not available()[name]:
        why = {"onednn": "this torch build has no working oneDNN linear",
               "smallm": "the small-M kernel did not build (see the warning above; it needs a C++ compiler, ninja "
                         "and torch's headers)"}[name]  # fmt: skip
        raise RuntimeError(f"SPECGATE_LINEAR={name} but {why}; unset it or set SPECGATE_LINEAR=auto")
    return name


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed by the fastest backend for this shape and row count on this CPU."""
    if x.device.type != "cpu" or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return F.linear(x, weight, bias)
    if x.numel() == 0:
        return F.linear(x, weight, bias)
    return RUN[_backend(x, weight, bias)](x, weight, bias)


def backend_for(weight: torch.Tensor, rows: int = 1) -> str:
    """The backend :func:`linear` takes for ``rows`` token rows times ``weight`` here (measured now if
    it has not been yet)."""
    with torch.no_grad():
        return _backend(torch.zeros(rows, weight.shape[1], dtype=weight.dtype), weight.detach(), None)


def _backend(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str:
    rows = x.numel() // x.shape[-1]
    bucket: Bucket = rows if rows <= SMALL_M else "many"
    forced = forced_backend()
    if forced != "auto":
        return forced if _applies(forced, x, weight, bucket) else "torch"
    key = (torch.get_num_threads(), weight.shape[0], weight.shape[1], x.dtype, weight.dtype, bucket)
    return _choice.get(key) or _choose(key, x, weight, bias)


def machine_key(threads: int | None = None) -> str:
    """Hash of what the measured choices depend on: CPU model and flags, torch version, thread count, and the
    small-M kernel's source and build flags (a rebuilt kernel is measured again)."""
    threads = torch.get_num_threads() if threads is None else threads
    text = f"{cpu_linear.cpu_signature()}\n{torch.__version__}\n{threads}\n{cpu_linear.build_key()}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_file(threads: int | None = None) -> Path:
    return cpu_linear.cache_dir() / f"linear-{machine_key(threads)}.json"


def _disk_table(threads: int) -> dict:
    """This machine's cache file contents ({"choices": {...}}), read once per process; empty if unreadable."""
    mkey = machine_key(threads)
    if mkey not in _disk:
        try:
            _disk[mkey] = json.loads(cache_file(threads).read_text())
        except (OSError, ValueError):
            _disk[mkey] = {}
        _disk[mkey].setdefault("choices", {})
    return _disk[mkey]


def forget_choices() -> Path:
    """Drop this machine's kept choices at the current thread count, on disk and in this process, so the
    next products, and the engine's next load, measure again (``specgate tune`` starts with it: a choice
    measured during a busy moment would otherwise stay). Returns the cache file it removed."""
    threads = torch.get_num_threads()
    path = cache_file(threads)
    path.unlink(missing_ok=True)
    _disk.pop(machine_key(threads), None)
    for key in [k for k in _choice if k[0] == threads]:
        del _choice[key]
    for name in [n for n in _report if n.endswith(f" threads={threads}")]:
        del _report[name]
    return path


def _save(threads: int, name: str, entry: dict) -> None:
    """Add one choice to the cache file, merging with what other processes wrote; atomic replace."""
    path = cache_file(threads)
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    table.update(cpu=cpu_linear.cpu_signature().split(" | ")[0], torch=torch.__version__, threads=threads)
    table.setdefault("choices", {})[name] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: the choice still holds for this process
    _disk_table(threads)["choices"][name] = entry


def _entry_name(key: tuple) -> str:
    threads, n, d, xdt, wdt, bucket = key
    dtypes = str(xdt).removeprefix("torch.") + ("" if xdt == wdt else "/" + str(wdt).removeprefix("torch."))
    return f"{n}x{d} {dtypes} M={bucket}"


def _choose(key: tuple, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str:
    """The backend for this key: from the disk cache if it holds a usable one, else measured now."""
    candidates = [b for b in BACKENDS if available()[b] and _applies(b, x, weight, key[-1])]
    name = _entry_name(key)
    backend = remembered(name, candidates)
    if backend is None:
        weights = cold_copies(weight)  # made only to measure

        def products(b: str) -> None:
            for w in weights:
                RUN[b](x, w, bias)

        backend = fastest(name, {b: functools.partial(products, b) for b in candidates}, per_call=len(weights))
    _choice[key] = backend
    return backend


def remembered(name: str, labels) -> str | None:
    """The choice kept on disk under ``name`` for this machine and thread count, if it is one of
    ``labels`` (else None: measure with :func:`fastest`). :func:`choices` reports it."""
    threads = torch.get_num_threads()
    entry = _disk_table(threads)["choices"].get(name)
    if not entry or entry.get("backend") not in labels:
        return None
    _report[f"{name} threads={threads}"] = {**entry, "source": "disk"}
    return entry["backend"]


def fastest(name: str, options: dict[str, Callable[[], object]], per_call: int = 1, reps: int = REPS) -> str:
    """The fastest of ``options`` (label -> a callable doing the work) on this machine at this thread count,
    timed now by :func:`measure` and kept on disk under ``name`` (microseconds per ``1 / per_call`` of a
    call) for :func:`remembered`. :func:`choices` reports it."""
    threads = torch.get_num_threads()
    entry = {"backend": next(iter(options)), "us": {}}
    if len(options) > 1:
        times = measure(options, reps)
        entry = {"backend": min(times, key=times.get), "us": {b: round(t / per_call, 1) for b, t in times.items()}}
        _save(threads, name, entry)
    _report[f"{name} threads={threads}"] = {**entry, "source": "measured"}
    return entry["backend"]


def cold_copies(weight: torch.Tensor) -> list[torch.Tensor]:
    """Copies of weight that together overflow the last-level cache, so timing them reads DRAM as decoding does."""
    with torch.no_grad():
        count = max(1, min(MAX_COPIES, math.ceil(COLD_BYTES / max(1, weight.numel() * weight.element_size()))))
        return [weight] + [weight.clone() for _ in range(count - 1)]


def measure(options: dict[str, Callable[[], object]], reps: int = REPS) -> dict[str, float]:
    """Median microseconds per call of each option: one warm-up call each (not counted: first calls pay for
    lazy set-up, and a burst of other work can land on any one call), then reps rounds interleaved across
    options, so a busy neighbour slows them all alike. (Options were once dropped on a slow warm-up alone: a
    busy moment then kept the float32 LM head over the screened one, 2x faster, on disk for good.)"""

    def timed(fn: Callable[[], object]) -> float:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e6

    with torch.no_grad():
        for fn in options.values():
            fn()
        times = {b: [] for b in options}
        for _ in range(reps):
            for b, fn in options.items():
                times[b].append(timed(fn))
    return {b: statistics.median(ts) for b, ts in times.items()}


def choices() -> dict:
    """What this process chose so far and why (timings in microseconds), for benchmark output."""
    return {
        "cpu": cpu_linear.cpu_signature().split(" | ")[0],
        "forced": os.environ.get("SPECGATE_LINEAR", "auto"),
        "available": dict(available()),
        "cache_file": str(cache_file()),
        "choices": dict(_report),
    }


def probe_threads(counts: tuple[int, ...] = (1, 2), shape: tuple[int, int] = (3072, 576), reps: int = 5) -> int:
    """The thread count (of counts) at which a representative decode product (one row, fp32) runs fastest.

    A sibling core busy with other work makes 2 threads slower than 1: every product waits for the slow thread.
    Leaves torch's thread count as it was."""
    before = torch.get_num_threads()
    weights = cold_copies(torch.randn(shape))
    x = torch.randn(1, shape[1])
    times: dict[int, list[float]] = {c: [] for c in counts}
    try:
        with torch.no_grad():
            for rep in range(reps + 1):  # the first pass warms up (and lets linear() pick its backend per count)
                for c in counts:
                    torch.set_num_threads(c)
                    t = time.perf_counter()
                    for w in weights:
                        linear(x, w)
                    if rep:
                        times[c].append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(before)
    return min(counts, key=lambda c: statistics.median(times[c]))
