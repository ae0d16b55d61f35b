"""specgate: lossless self-speculative decoding with GateSkip residual gates."""

from .cache import StaticKVCache
from .engine import Engine, SkipCounter
from .gates import Gate, GateConfig, GateSet, load_gates, save_gates
from .generation import Sampling
from .hf import attach, custom_generate
from .model import SpecGateModel, SpecGenerateOutput, load
from .policy import BudgetPolicy, SkipPolicy
from .speculative import SpecConfig, SpecStats

__all__ = [
    "BudgetPolicy", "Engine", "Gate", "GateConfig", "GateSet", "Sampling", "SkipCounter", "SkipPolicy", "SpecConfig",
    "SpecGateModel", "SpecGenerateOutput", "SpecStats", "StaticKVCache", "attach", "custom_generate", "load",
    "load_gates", "save_gates",
]  # fmt: skip
__version__ = "0.1.0"
