"""``SpecGateModel``: a Hugging Face model, its tokenizer, our engine and the gates, together."""

from __future__ import annotations

import copy
import numbers
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .dispatch import resolve as resolve_kernels
from .engine import Engine
from .gates import GateConfig, GateSet, check_fits, load_gates
from .generation import Sampling, plain_generate, warp
from .output import Emitter
from .speculative import SpecConfig, SpecStats, speculative_generate
from .tune import resolve as resolve_settings
from .vocab import DraftHead, shipped_ranking
from .loading import DEFAULT_MODEL, default_gates, load_hf

# GenerationConfig features we do not implement, with the value that means "off". A call that
# turns one on is refused rather than silently decoded without it.
_UNSUPPORTED = {
    "num_beams": 1, "num_beam_groups": 1, "penalty_alpha": None, "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None,
    "force_words_ids": None, "min_length": 0, "min_new_tokens": None, "typical_p": 1.0,
    "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "min_p": None, "top_h": None, "diversity_penalty": 0.0,
    "suppress_tokens": None, "begin_suppress_tokens": None, "sequence_bias": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "guidance_scale": None,
    "exponential_decay_length_penalty": None, "watermarking_config": None,
    "prompt_lookup_num_tokens": None, "output_attentions": False, "output_hidden_states": False,
    "renormalize_logits": False, "num_return_sequences": 1, "constraints": None,
}  # fmt: skip
# What transformers samples with when a setting is unset (GenerationConfig._get_default_generation_params).
_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}


class SpecGateModel:
    """What :func:`load` returns. ``hf_model`` shares its weights with ``engine`` (never copied)."""

    def __init__(
        self, hf_model: nn.Module, tokenizer=None, gates: GateSet | None = None, name: str = "", kernels: str = "auto"
    ):
        self.hf_model = hf_model
        self.tokenizer = tokenizer
        self.engine = Engine(hf_model, kernels=kernels)
        self.name = name
        self.gates = gates.to(self.engine.dtype).to(self.engine.device) if gates is not None else None
        self._draft_heads: dict[tuple[int, int], DraftHead] = {}
        # the draft vocabulary's ranking where the gates bring none (see token_ranking)
        self.default_ranking = shipped_ranking(name, hf_model.config.vocab_size)

    @property
    def config(self):
        return self.hf_model.config

    def new_gates(self, kind: str = "lowrank", rank: int = 64) -> GateSet:
        """Fresh (untrained) gates that fit this model, not attached."""
        c = self.config
        config = GateConfig(c.hidden_size, c.num_hidden_layers, kind, rank, model_type=c.model_type, model_name=self.name)
        return GateSet(config).to(self.engine.dtype).to(self.engine.device)

    @property
    def token_ranking(self) -> torch.Tensor | None:
        """The draft vocabulary's order (most written first): the gates' (``specgate train`` stores
        one), else :attr:`default_ranking`: the one shipped for this model (specgate/rankings/), or
        one you set (``specgate.vocab.load_ranking`` of a file ``eval/draft_vocab.py --gates none`` wrote)."""
        if self.gates is not None and self.gates.token_ranking is not None:
            return self.gates.token_ranking
        return self.default_ranking

    def draft_head(self, n: int) -> DraftHead:
        """The LM head over the n tokens the ranking (:attr:`token_ranking`) puts first (built once per n)."""
        ranking = self.token_ranking
        if ranking is None:
            raise ValueError(
                "a draft vocabulary needs a token ranking: gates saved with one (`specgate train` stores one; "
                "eval/draft_vocab.py adds one to existing gates, or with --gates none writes one for a model "
                "without gates, to set as model.default_ranking): pass draft_vocab=None for the full head"
            )
        key = (n, ranking.data_ptr())  # another ranking: another head
        if key not in self._draft_heads:
            self._draft_heads[key] = DraftHead(self.engine.weights, ranking[:n])
        return self._draft_heads[key]

    def chat_text(self, prompt: str) -> str:
        """One user turn through the chat template, or the prompt itself where the tokenizer has none
        (a base model): tokenize it with ``add_special_tokens=not tokenizer.chat_template``."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        return prompt

    def encode_chat(self, prompt: str) -> torch.Tensor:
        """(1, T) ids of one user turn, through the chat template when the tokenizer has one."""
        tok = self.tokenizer
        return tok(self.chat_text(prompt), return_tensors="pt", add_special_tokens=not tok.chat_template).input_ids.to(self.engine.device)

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        generation_config=None,
        *,
        speculative: bool = False,
        draft_budget: float | None = None,
        max_draft: int | None = None,
        spec_config: SpecConfig | None = None,
        generator: torch.Generator | None = None,
        streamer=None,
        tokenizer=None,
        **kwargs,
    ) -> torch.Tensor | SpecGenerateOutput:
        """A drop-in for ``transformers`` ``generate()`` on the engine.

        input_ids (B, T), left-padded with ``attention_mask`` when B > 1. Returns (B, T + new)
        token ids, or with ``return_dict_in_generate=True`` a ``GenerateDecoderOnlyOutput``
        whose ``spec_stats`` holds :class:`SpecStats` for speculative calls (None where the call decoded
        plainly: a batch past ``tune.SPEC_MAX_BATCH`` with tuned or default settings).
        speculative: draft with the gates at ``draft_budget``, verify with the full model.
        ``spec_config`` holds every speculation setting (without it: the tuned ones, else the
        untuned ones, see :func:`specgate.tune.resolve`); ``draft_budget`` and ``max_draft``
        override them for this call. generator: a seeded ``torch.Generator`` for reproducible sampling.
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}: for one prompt pass ids[None]")
        if input_ids.shape[1] == 0:
            raise ValueError("the prompt is empty: pass at least one token (e.g. the tokenizer's bos_token_id)")
        config = _merge_config(self.hf_model.generation_config, generation_config, kwargs)
        if streamer is not None and input_ids.shape[0] > 1:
            raise ValueError("streamers take one sequence: pass a batch of 1 with streamer=")
        unset = lambda key: _SAMPLING_DEFAULTS[key] if getattr(config, key) is None else getattr(config, key)  # noqa: E731
        sampling = Sampling(bool(config.do_sample), unset("temperature"), unset("top_k"), unset("top_p"))
        eos = _token_ids(config.eos_token_id)
        pad = int(config.pad_token_id) if config.pad_token_id is not None else (eos[0] if eos else 0)
        out = Emitter(
            input_ids,
            _max_new_tokens(config, input_ids.shape[1], getattr(self.config, "max_position_embeddings", None)),
            eos,
            pad,
            stop=self._stop_criteria(config.stop_strings, tokenizer),
            streamer=streamer,
            keep_scores=bool(config.output_scores or config.output_logits),
        )
        stats = spec = None
        if speculative:
            # spec_config, else what `specgate tune` stored for this machine, else the defaults;
            # None: plain decoding, which pays more at this batch size
            overrides = {"draft_budget": draft_budget, "max_draft": max_draft}
            spec, settings = resolve_settings(self, spec_config, overrides, batch=input_ids.shape[0])
        if spec is not None:
            if self.gates is None and not (spec.draft_budget == 0 and spec.draft_precision != "float32" and spec.verifier == "original"):
                raise ValueError(
                    "speculative decoding needs gates (load trained gates with gates=PATH, or `specgate train`), or a "
                    "draft that skips nothing and reads a low-precision copy of the weights: "
                    "spec_config=SpecConfig(draft_budget=0, draft_precision='int8')"
                )
            head = self.draft_head(spec.draft_vocab) if spec.draft_vocab else None
            stats = speculative_generate(
                self.engine, self.gates, input_ids, attention_mask, out, sampling, spec, generator, head
            )
            stats = replace(stats, settings=settings)
        else:
            plain_generate(self.engine, input_ids, attention_mask, out, sampling, generator)
        out.close()
        if not config.return_dict_in_generate:
            return out.sequences()
        raw = out.step_scores()
        return SpecGenerateOutput(
            sequences=out.sequences(),
            scores=tuple(warp(s, sampling) for s in raw) if config.output_scores else None,
            logits=raw if config.output_logits else None,
            spec_stats=stats,
        )

    def _stop_criteria(self, stop_strings, tokenizer):
        if not stop_strings:
            return None
        from transformers import StopStringCriteria

        tokenizer = tokenizer or self.tokenizer
        if tokenizer is None:
            raise ValueError("stop_strings need a tokenizer: pass tokenizer= to generate()")
        return StopStringCriteria(tokenizer, stop_strings)


@dataclass
class SpecGenerateOutput(GenerateDecoderOnlyOutput):
    """``transformers``' output of decoder-only ``generate()``, plus what speculation bought."""

    spec_stats: SpecStats | None = None


def _merge_config(base, given, kwargs):
    """The generation config of one call: the model's, then ``generation_config``, then kwargs.
    Anything we cannot honour raises instead of being ignored."""
    config = copy.deepcopy(given if given is not None else base)
    unused = config.update(**kwargs)
    if unused:
        raise TypeError(f"generate() got arguments it does not know: {sorted(unused)}")
    for key, off in _UNSUPPORTED.items():
        value = getattr(config, key, None)
        if value is not None and value != off and value != []:
            raise NotImplementedError(f"generate(): {key}={value!r} is not supported by specgate")
    return config


def _token_ids(value) -> tuple[int, ...]:
    """eos_token_id as transformers takes it: None, an int, a list or tuple, or a tensor."""
    if value is None:
        return ()
    if isinstance(value, torch.Tensor):
        return tuple(value.flatten().tolist())
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


def _max_new_tokens(config, prompt_len: int, context: int | None) -> int:
    """How many tokens to generate: max_new_tokens, else max_length - prompt, else transformers'
    default of 20; never past the model's context length (with a warning)."""
    for key in ("max_new_tokens", "max_length"):
        value = getattr(config, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0):
            raise ValueError(f"{key} must be a whole number >= 0, got {value!r}")
    if config.max_new_tokens is not None:
        n = int(config.max_new_tokens)
    elif config.max_length is not None:
        if config.max_length < prompt_len:
            raise ValueError(
                f"max_length={config.max_length} is shorter than the prompt ({prompt_len} tokens): pass max_new_tokens instead"
            )
        n = int(config.max_length) - prompt_len
    else:
        warnings.warn("neither max_new_tokens nor max_length is set: generating up to 20 tokens, as transformers does", stacklevel=3)
        n = 20
    if context is not None and prompt_len + n > context:
        if prompt_len > context:
            raise ValueError(f"the prompt ({prompt_len} tokens) is longer than the model's context ({context}): shorten it")
        warnings.warn(
            f"the prompt ({prompt_len} tokens) + max_new_tokens ({n}) exceed the model's context length "
            f"({context}): generation stops at {context} tokens",
            stacklevel=3,
        )
        n = context - prompt_len
    return n


def _check_device(device: str | torch.device) -> None:
    """Refuse a device torch cannot use here before anything loads, saying what to pass instead."""
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"{device!r} is not a device: pass 'cpu', 'cuda' or 'cuda:N' ({e})") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={str(device)!r}, but torch finds no GPU (torch.cuda.is_available() is False): "
            "pass device='cpu', or install a CUDA build of torch on a machine with a GPU"
        )
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, NotImplementedError) as e:
        raise ValueError(f"device {str(device)!r} is not usable here ({e}): pass device='cpu'") from e


def load(
    name_or_path: str = DEFAULT_MODEL,
    gates: str | Path | GateSet | None = "default",
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    kernels: str = "auto",
) -> SpecGateModel:
    """Load a model for speculative decoding.

    name_or_path: a Hugging Face model id or directory, a ``.gguf`` file, or an alias
        (``smollm2-135m-instruct``, ``gemma-3-270m``).
    gates: ``"default"`` (the gates shipped for an alias, if any), a gate directory, a
        :class:`GateSet`, or None.
    kernels: what runs the draft's sparse work: ``"auto"`` (the Triton kernels on CUDA when Triton
        imports, else PyTorch), ``"torch"``, or ``"triton"`` (on the CPU only under
        ``TRITON_INTERPRET=1``, set before Python imports torch; slow, for tests).
    """
    _check_device(device)
    resolve_kernels(kernels, device)  # a path that cannot run here fails before the model loads
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if isinstance(gates, str) and gates == "default":
        gates = default_gates(name_or_path)
    if isinstance(gates, (str, Path)):
        gates = load_gates(gates)  # a bad path fails before the model loads
    hf_model, tokenizer = load_hf(name_or_path, dtype, device)
    if gates is not None:
        check_fits(gates.config, hf_model.config)
    return SpecGateModel(hf_model, tokenizer, gates, name=name_or_path, kernels=kernels)
