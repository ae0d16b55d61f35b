"""specgate: lossless self-speculative decoding with GateSkip residual gates."""

from .cache import StaticKVCache
from .engine import Engine, SkipCounter
from .gates import Gate, GateConfig, GateSet, SkipPolicy, load_gates, save_gates
from .generation import Sampling
from .model import SpecGateModel, load

__all__ = [
    "Engine", "Gate", "GateConfig", "GateSet", "Sampling", "SkipCounter", "SkipPolicy", "SpecGateModel",
    "StaticKVCache", "load", "load_gates", "save_gates",
]  # fmt: skip
__version__ = "0.1.0"
