"""Speculative decoding from an unmodified ``transformers`` model, through its ``custom_generate`` hook.

    model = AutoModelForCausalLM.from_pretrained(...)
    specgate.attach(model, gates="path/to/gates")
    out = model.generate(input_ids, custom_generate=specgate.custom_generate, max_new_tokens=64)

``transformers`` prepares the inputs and the generation config, then hands decoding to us.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .gates import GateSet, check_fits, load_gates
from .model import SpecGateModel

_ATTR = "_specgate"
# What transformers builds from a generation config we honour; anything else (a user's own
# processor or stopping criterion) would be silently dropped, so it is refused.
_KNOWN_PROCESSORS = {"TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper"}
_KNOWN_CRITERIA = {"MaxLengthCriteria", "EosTokenCriteria", "StopStringCriteria"}


def attach(model: nn.Module, gates: str | Path | GateSet, tokenizer=None) -> SpecGateModel:
    """Give a ``transformers`` causal LM its gates, for ``custom_generate``. Shares the weights."""
    if isinstance(gates, (str, Path)):
        gates = load_gates(gates, model.config)
    else:
        check_fits(gates.config, model.config, "the given GateSet")
    sg = SpecGateModel(model, tokenizer, gates)
    model.__dict__[_ATTR] = sg  # a plain attribute, not a submodule: state_dict stays unchanged
    return sg


def custom_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    logits_processor=None,
    stopping_criteria=None,
    generation_config=None,
    synced_gpus: bool = False,
    streamer=None,
    draft_budget: float | None = None,
    max_draft: int | None = None,
    **model_kwargs,
):
    """The decoding loop ``model.generate(custom_generate=...)`` calls: self-speculative decoding."""
    sg = model.__dict__.get(_ATTR)
    if sg is None:
        raise ValueError("no gates on this model: call specgate.attach(model, gates=...) first")
    for kind, items, known in (("logits processor", logits_processor, _KNOWN_PROCESSORS), ("stopping criterion", stopping_criteria, _KNOWN_CRITERIA)):
        for item in items or []:
            if type(item).__name__ not in known:
                raise NotImplementedError(f"specgate cannot apply the {kind} {type(item).__name__}")
    return sg.generate(
        input_ids,
        model_kwargs.get("attention_mask"),
        generation_config,
        speculative=True,
        draft_budget=draft_budget,
        max_draft=max_draft,
        streamer=streamer,
        tokenizer=model_kwargs.get("tokenizer"),
    )
