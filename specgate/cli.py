"""The ``specgate`` command: generate, bench, train, calibrate, tune.

Every ``train`` flag is a :class:`specgate.train.TrainConfig` field and the speculation flags are
:class:`specgate.speculative.SpecConfig` fields, with their defaults read from there, so the
library and the command line cannot disagree.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import typing
from pathlib import Path

from .loading import DEFAULT_MODEL
from .kernels.cpu_step import PRECISIONS
from .speculative import SpecConfig
from .train import TrainConfig


# -- flag types ------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 (greedy) or more, got {value}")
    return value


def _budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a budget is a share in [0, 1], got {value}")
    return value


def _budgets(text: str) -> list[float]:
    return [] if text == "none" else [_budget(b) for b in text.split(",") if b]


def _context_budget(text: str) -> float | tuple[float, ...]:
    values = _budgets(text)
    if not values:
        raise argparse.ArgumentTypeError("expected a budget, or budgets such as 0.5,0.7")
    return values[0] if len(values) == 1 else tuple(values)


def _pairs(text: str) -> tuple[tuple[int, int], ...]:
    try:
        pairs = tuple((int(a), int(b)) for a, b in (item.split(":") for item in text.split(",") if item))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LAYER:BRANCH pairs such as 0:1,1:0, got {text!r}") from None
    if any(b not in (0, 1) for _, b in pairs):
        raise argparse.ArgumentTypeError("branch must be 0 (attention) or 1 (MLP)")
    return pairs


def _output_file(text: str) -> str:
    """A file to write at the end of a long run: checked now, so the results are not lost then."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder: pass a file name such as {path / 'bench.json'}")
    if path.parent.exists() and not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{path.parent} is not a folder")
    return text


# -- shared flags ----------------------------------------------------------------------------------


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model id, directory, .gguf file or alias (default {DEFAULT_MODEL})")
    p.add_argument("--gates", default="default", help="gate directory, 'default' (shipped gates) or 'none'")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's choice)")


def _sampling_args(p: argparse.ArgumentParser, seed: int | None) -> None:
    p.add_argument("--temperature", type=_temperature, default=0.0, help="sample at this temperature (default 0: greedy)")
    p.add_argument("--top-k", type=int, default=None, help="when sampling (default: the model's generation config, 50 in transformers)")
    p.add_argument("--top-p", type=float, default=1.0, help="when sampling (default 1: off)")
    p.add_argument("--seed", type=int, default=seed, help=f"when sampling (default {seed})")


def _sampling(args) -> dict:
    """generate()'s sampling flags from _sampling_args' (a bad value is refused by generate)."""
    flags = {"temperature": args.temperature, "top_p": args.top_p}
    return flags if args.top_k is None else {**flags, "top_k": args.top_k}


def _spec_args(p: argparse.ArgumentParser) -> None:
    """The speculation flags (see :func:`_spec_call`)."""
    d = SpecConfig()
    p.add_argument("--draft-budget", type=_budget, default=None,
                   help="share of the draft's layer compute to skip (default: what generate() chooses: the tuned or untuned settings)")  # fmt: skip
    p.add_argument("--max-draft", type=_positive_int, default=None, help="most tokens drafted per round (default: as --draft-budget)")
    p.add_argument("--draft-vocab", type=_positive_int, default=None, help="draft LM head over the N tokens the model writes most (default: full head)")
    p.add_argument("--draft-vocab-context", action=argparse.BooleanOptionalAction, default=None,
                   help="the draft vocabulary also covers the prompt's tokens and those generated so far (default: yes)")  # fmt: skip
    p.add_argument("--verifier", choices=["original", "gated"], default=None, help="original: output equals the model's own (default)")
    p.add_argument("--kv-fill", choices=["project", "copy_below"], default=None, help=f"K/V of tokens that skip attention in the draft (default {d.kv_fill})")
    p.add_argument("--draft-precision", choices=PRECISIONS, default=None,
                   help=f"the draft's weight matrices; bfloat16 / int8 / int4 read a copy (extra memory, CPU only) (default {d.draft_precision})")  # fmt: skip
    p.add_argument("--sparse-inputs", type=_budget, default=None,
                   help="share of the compute the draft skips by zeroing each projection's small inputs (thresholds calibrated "
                        "with the gates; alone with --draft-budget 0; the PyTorch path) (default 0: off)")  # fmt: skip


SPEC_FLAGS = ("draft_budget", "max_draft", "draft_vocab", "draft_vocab_context", "verifier", "kv_fill", "draft_precision", "sparse_inputs")


def _spec_call(args) -> dict:
    """generate()'s speculation arguments from the flags: --draft-budget and --max-draft alone change
    the settings generate() chooses (tuned, else untuned), as its draft_budget= and max_draft= do;
    with any other flag, the flags given make a SpecConfig over its defaults."""
    given = {k: getattr(args, k) for k in SPEC_FLAGS if getattr(args, k) is not None}
    return given if given.keys() <= {"draft_budget", "max_draft"} else {"spec_config": SpecConfig(**given)}


def _load(args, gates: str | None = None, remeasure: bool = False):
    """The model the flags name, at their thread count; ``remeasure``: the machine's backend choices
    (:mod:`specgate.linear`) measured anew, not read from its cache file."""
    import specgate

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if remeasure:
        from . import linear

        print(f"measuring this machine's linear-product backends again (dropped {linear.forget_choices()})")
    gates = gates or args.gates
    return specgate.load(args.model, gates=None if gates == "none" else gates, dtype=args.dtype, device=args.device)


# -- generate and bench ----------------------------------------------------------------------------


def cmd_generate(args) -> int:
    import torch
    from transformers import TextStreamer

    m = _load(args)
    ids = m.encode_chat(args.prompt) if not args.raw else m.tokenizer(args.prompt, return_tensors="pt").input_ids
    sampling = {"do_sample": True, **_sampling(args)} if args.temperature > 0 else {}
    speculative = {"speculative": True, **_spec_call(args), "return_dict_in_generate": True}
    speculative = speculative if args.speculative else {}

    def run(streamer=None, **flags):
        generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
        start = time.perf_counter()
        out = m.generate(ids, max_new_tokens=args.max_new_tokens, streamer=streamer, generator=generator, **sampling, **flags)
        seconds = time.perf_counter() - start
        tokens = getattr(out, "sequences", out)
        return tokens, tokens.shape[1] - ids.shape[1], seconds, getattr(out, "spec_stats", None)

    if args.compare:  # the one-time costs (kernel probes, a draft's weight copy) out of the timings
        m.generate(ids, max_new_tokens=2, **speculative)
        plain, new, seconds, _ = run()
        plain_rate = new / seconds
        print(f"[plain decoding: {new} tokens in {seconds:.2f} s, {plain_rate:.1f} tokens/s]", file=sys.stderr)
    out, new, seconds, stats = run(TextStreamer(m.tokenizer, skip_prompt=True, skip_special_tokens=True), **speculative)
    print(f"[{new} tokens in {seconds:.2f} s, {new / seconds:.1f} tokens/s]", file=sys.stderr)
    if stats:
        print(f"[tau {stats.tau:.2f}, alpha {stats.alpha:.2f}, draft skipped {stats.compute_skipped:.0%} of its compute; "
              f"settings: {stats.settings}]", file=sys.stderr)  # fmt: skip
    if args.compare and stats:
        same = "the same tokens" if torch.equal(out, plain) else "other tokens (sampled)"
        print(f"[speculative {new / seconds / plain_rate:.2f}x plain decoding, {same}]", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    import torch

    from . import bench

    if args.threads:
        torch.set_num_threads(args.threads)
    bench.mtbench_prompts(args.prompts)  # a bad count fails now, not after loading two models
    call = _spec_call(args)
    if args.no_speculative:
        speculative = []
    elif args.budgets or args.precisions:
        base = call.get("spec_config") or SpecConfig(**call)
        speculative = [dataclasses.replace(base, draft_budget=b, draft_precision=q)
                       for b in args.budgets or [base.draft_budget] for q in args.precisions or [base.draft_precision]]  # fmt: skip
    else:
        speculative = [call.get("spec_config", call)]  # or generate()'s overrides ({}: the settings it chooses)
    gates = None if args.gates == "none" else args.gates
    sampling = _sampling(args) if args.temperature > 0 else None
    results = bench.bench_decode(args.model, args.prompts, args.max_new_tokens, speculative, getattr(torch, args.dtype), gates,
                                 sampling, args.seed)  # fmt: skip
    print(bench.report(results, sampled=sampling is not None))
    if args.out:
        bench.save(results, args.out, model=args.model, prompts=args.prompts, max_new_tokens=args.max_new_tokens,
                   sampling=sampling, seed=args.seed if sampling else None)  # fmt: skip
        print(f"saved {args.out}")
    return 0


# -- train and calibrate ---------------------------------------------------------------------------

_HELP = {
    "objective": "paper: CE + lambda*L2 with budget warm-up; distill: KL to the original model; "
    "damage: fit scalar gates to the measured cost of each skip; standins: train the stand-ins (and adapters) of the "
    "--context-gates draft by KL to the original model",
    "data": "training text: .txt, or .jsonl with {'text': ...} or {'messages': [...]} per line "
    "(default: the model's own answers to specgate.prompts + pydoc topics)",
    "output_dir": "checkpoints and the gates (OUTPUT_DIR/gates) go here (default: runs/<model>-<objective>)",
    "optimizer": "None: sgd for gates (see specgate.gradient.make_optimizer), adamw for stand-ins",
    "lr": "None: 0.5 with sgd, 1e-3 with adamw",
    "sparsity": "lambda of the L2 sparsity term mean(g^2)",
    "budget_max": "skip budget the warm-up reaches (paper) / top of the sampled budgets (distill)",
    "allocation": "global: one importance threshold for all branches; branch: per-branch quantile",
    "scale_output": "gates scale branch outputs (the GateSkip model) instead of only deciding skips",
    "never_skip": "branches that always run, as LAYER:BRANCH pairs (branch 0 attention, 1 MLP), e.g. 0:1,1:0",
    "ridge": "damage: L2 penalty on the standardized gate weights of the Poisson fit",
    "standin_rank": "fit stand-ins for skipped branches of this rank (0: each branch's mean output) and train "
    "the gates with them in place",
    "adapter_rank": "standins: also train draft-only adapters of this rank, added where the draft runs a branch "
    "(a draft that has adapters keeps them, widened to this rank)",
    "context_gates": "a calibrated gate directory: damage prices each skip in the context of the draft it makes "
    "(a second round; its stand-ins are kept); standins trains its stand-ins and adapters",
    "context_budget": "the budget of that draft (standins: several, such as 0.5,0.7, train it at each in turn)",
    "draft_round": "standins: 0 trains the draft on its own K/V at every earlier position; R on rounds of R draft "
    "tokens, each after a prefix whose K/V are the original model's, as when decoding",
    "train_gates": "standins: train the gates jointly with the stand-ins and adapters (each budget's threshold is "
    "steered to keep skipping its share of the compute; calibrate afterwards)",
    "gate_lr": "standins with --train-gates: the gates' learning rate",
    "top1_weight": "standins: add this times the cross-entropy of the draft against the original model's top-1 "
    "token to the KL (greedy acceptance asks only that the top-1 tokens agree)",
    "lr_schedule": "constant, or cosine: the learning rate decays to 0 over --steps",
    "time_limit_s": "stop with a checkpoint after this many seconds",
    "resume": "continue from the checkpoints in OUTPUT_DIR (refused if they were made from another model, data or settings)",
}


def _add_config_flags(p: argparse.ArgumentParser, config_class, help_: dict[str, str]) -> None:
    """One flag per dataclass field, its type and default read from the field (``--threads`` is
    one of the model flags already)."""
    hints = typing.get_type_hints(config_class)
    special = {"never_skip": _pairs, "context_budget": _context_budget}
    for f in dataclasses.fields(config_class):
        if f.name == "threads":
            continue
        flag, kind = "--" + f.name.replace("_", "-"), hints[f.name]
        text = help_.get(f.name, "") + f" (default {f.default})"
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=text)
        elif literal := next((a for a in (kind, *typing.get_args(kind)) if typing.get_origin(a) is typing.Literal), None):
            p.add_argument(flag, choices=typing.get_args(literal), default=f.default, help=text)
        elif f.name in special:
            p.add_argument(flag, type=special[f.name], default=f.default, help=text)
        else:
            base = next((a for a in typing.get_args(kind) if a is not type(None)), kind)  # X | None -> X
            p.add_argument(flag, type=base, default=f.default, help=text)


def cmd_train(args) -> int:
    from .calibrate import CalibrateConfig, calibrate_default
    from .gates import save_gates
    from .loop import TrainingInterrupted
    from .train import output_dir, train

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    m = _load(args, gates="none")
    out = output_dir(m, config)
    start = time.perf_counter()
    try:
        gates = train(m, config)
    except TrainingInterrupted as e:
        where = f"checkpoint of {e.step} steps and gates in {out} (run again to resume)" if e.saved else "nothing saved"
        print(f"\ninterrupted: {where}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\ninterrupted before the first step: nothing saved", file=sys.stderr)
        return 130
    print(f"trained in {time.perf_counter() - start:.0f} s; gates in {out / 'gates'}", file=sys.stderr)
    if args.calibrate:
        calibrate_default(m, gates, CalibrateConfig(budgets=tuple(args.calibrate)))
        save_gates(gates, out / "gates")
        print(f"calibrated for budgets {args.calibrate}", file=sys.stderr)
    elif gates.thresholds:  # the standins objective keeps (or steers) the thresholds of its draft
        what = (f"the gates trained, their thresholds at {list(config.context_budgets)} steered on the training text"
                if config.train_gates else "the stand-ins and adapters move the gates' inputs")  # fmt: skip
        print(f"thresholds taken from {config.context_gates} (budgets {sorted(gates.thresholds)}); {what}: "
              f"`specgate calibrate --gates {out / 'gates'}` makes the budgets exact again", file=sys.stderr)  # fmt: skip
    else:
        print(f"not calibrated: run `specgate calibrate --gates {out / 'gates'}` before speculative decoding", file=sys.stderr)
    return 0


def cmd_calibrate(args) -> int:
    import copy

    from .calibrate import CalibrateConfig, calibrate_default
    from .gates import save_gates

    if args.gates in ("none", "default") and args.out is None:
        raise ValueError("pass --out DIR (and --gates DIR): the gates shipped inside the package are never overwritten")
    m = _load(args)
    if m.gates is None:
        raise ValueError(f"no gates found for {args.model}: pass --gates DIR")
    config = CalibrateConfig(
        budgets=tuple(args.budgets), allocation=args.allocation, samples=args.samples, tokens=args.tokens,
        iterations=args.iterations, data=args.data, sparse_inputs=tuple(args.sparse_inputs),
    )  # fmt: skip
    if args.half:  # calibrate what will be stored
        for p in m.gates.parameters():
            p.data = p.data.half().to(p.dtype)
    start = time.perf_counter()
    report = calibrate_default(m, m.gates, config)
    for budget in config.budgets:
        print(f"budget {budget:.2f}: decode skips {report[budget]:.3f} on held-out text")
    print(f"calibrated in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    gates = m.gates
    if args.half:
        gates = copy.deepcopy(m.gates).half()
        gates.thresholds, gates.input_cuts = dict(m.gates.thresholds), dict(m.gates.input_cuts)
    out = args.out or args.gates
    save_gates(gates, out)
    print(f"saved to {out}", file=sys.stderr)
    return 0


# -- tune ------------------------------------------------------------------------------------------


def _sizes(text: str) -> list[int]:
    """Draft vocabulary sizes, comma-separated; "none" for the full head only."""
    return [] if text.strip().lower() == "none" else [_positive_int(n) for n in text.split(",") if n]


def _probs(text: str) -> list[float]:
    """Top-1 probabilities in (0, 1), comma-separated; "none" for none."""
    if text.strip().lower() == "none":
        return []
    try:
        probs = [float(p) for p in text.split(",") if p]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected probabilities such as 0.3,0.5, or 'none', got {text!r}") from None
    if not all(0 < p < 1 for p in probs):
        raise argparse.ArgumentTypeError(f"probabilities must be in (0, 1), got {text!r}")
    return probs


def cmd_tune(args) -> int:
    from . import tune

    config = tune.TuneConfig(
        budgets=tuple(args.budgets) if args.budgets else None, vocabs=tuple(args.vocab) if args.vocab is not None else None,
        max_draft=args.max_draft, prompts=args.prompts, tokens=args.tokens, rounds=args.rounds, kv_fills=tuple(args.kv_fills),
        precisions=tuple(args.precisions) if args.precisions else None, draft_probs=tuple(args.draft_probs),
    )  # fmt: skip
    m = _load(args, remeasure=True)  # tune is this machine's measuring step: no backend choice from a busy moment
    start = time.perf_counter()
    result = tune.tune(m, config)
    print(tune.report(result))
    path = tune.save(result, tune.tune_file(m))
    print(f"stored in {path} (used by generate(speculative=True) without explicit settings); "
          f"tuned in {time.perf_counter() - start:.0f} s")  # fmt: skip
    if args.out:
        print(f"saved a copy to {tune.save(result, Path(args.out))}")
    return 0


# -- the parser ------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    from .calibrate import CalibrateConfig
    from .engine import KV_FILLS
    from .tune import DEFAULT_VOCABS, TuneConfig

    top = argparse.ArgumentParser(prog="specgate", description="Lossless self-speculative decoding with GateSkip gates")
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate an answer to one prompt")
    p.add_argument("prompt")
    _model_args(p)
    p.add_argument("--max-new-tokens", type=_positive_int, default=128)
    _sampling_args(p, seed=None)
    p.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    p.add_argument("--speculative", action="store_true", help="self-speculative decoding")
    p.add_argument("--compare", action="store_true", help="decode plainly first and print both speeds (after a warm-up)")
    _spec_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="transformers vs plain vs speculative decoding, side by side")
    _model_args(p)
    p.add_argument("--prompts", type=_positive_int, default=8, help="number of MT-Bench prompts, first turns (1-80)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=128)
    p.add_argument("--budgets", type=_budget, nargs="+", default=None, help="draft skip budgets to compare (default: --draft-budget)")
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=None,
                   help="draft weight precisions to compare, each at every budget (default: --draft-precision)")  # fmt: skip
    _spec_args(p)
    _sampling_args(p, seed=0)
    p.add_argument("--no-speculative", action="store_true", help="time transformers and plain decode only")
    p.add_argument("--out", type=_output_file, default=None, help="write the results as JSON to this file")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("train", help="train gates (gates only, frozen backbone)")
    _model_args(p)
    _add_config_flags(p, TrainConfig, _HELP)
    p.add_argument("--calibrate", type=_budgets, default=None, metavar="B1,B2", help="calibrate these budgets after training")
    p.set_defaults(func=cmd_train)

    d = CalibrateConfig()
    p = sub.add_parser("calibrate", help="per-branch single-token skip thresholds for a list of budgets")
    _model_args(p)
    p.add_argument("--budgets", type=_budgets, default=list(d.budgets),
                   help=f"comma-separated, or 'none' to keep the gates' thresholds (default {d.budgets})")  # fmt: skip
    p.add_argument("--sparse-inputs", type=_budgets, default=[], metavar="S1,S2",
                   help="also calibrate sparse-inputs drafts that skip these compute shares (specgate.sparse_inputs)")
    p.add_argument("--allocation", choices=["global", "branch"], default=d.allocation,
                   help="global: one threshold over all branches; branch: each branch skips the budget")  # fmt: skip
    p.add_argument("--data", default=None, help="calibration text (.txt/.jsonl); default: the model's answers to held-in prompts")
    p.add_argument("--samples", type=_positive_int, default=d.samples, help=f"sequences (default {d.samples})")
    p.add_argument("--tokens", type=_positive_int, default=d.tokens, help=f"draft steps per sequence (default {d.tokens})")
    p.add_argument("--iterations", type=_positive_int, default=d.iterations, help=f"(default {d.iterations})")
    p.add_argument("--out", default=None, help="where to save the calibrated gates (default: back into --gates DIR)")
    p.add_argument("--half", action=argparse.BooleanOptionalAction, default=True,
                   help="store gate weights as float16 (half the file; calibrated on the rounded weights)")  # fmt: skip
    p.set_defaults(func=cmd_calibrate)

    t = TuneConfig()
    p = sub.add_parser("tune", help="measure this machine's step costs and acceptance; store the fastest speculation settings")
    _model_args(p)
    p.add_argument("--budgets", type=_budgets, default=None, metavar="B1,B2", help="draft budgets to try (default: every calibrated one)")
    p.add_argument("--max-draft", type=_positive_int, default=t.max_draft, help=f"try draft lengths 1..this (default {t.max_draft})")
    p.add_argument("--vocab", type=_sizes, default=None, metavar="N1,N2",
                   help=f"draft vocabulary sizes to try besides the full head, or 'none' (default {','.join(map(str, DEFAULT_VOCABS))} "
                        "when the gates rank tokens)")  # fmt: skip
    p.add_argument("--prompts", type=_positive_int, default=t.prompts, help=f"calibration prompts for the acceptance runs (default {t.prompts})")
    p.add_argument("--tokens", type=_positive_int, default=t.tokens, help=f"new tokens per acceptance run (default {t.tokens})")
    p.add_argument("--rounds", type=_positive_int, default=t.rounds, help=f"timed repetitions of each step (default {t.rounds})")
    p.add_argument("--kv-fills", nargs="+", choices=KV_FILLS, default=list(t.kv_fills),
                   help=f"K/V fills of the draft to try (default {' '.join(t.kv_fills)})")  # fmt: skip
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=None,
                   help="draft weight precisions to try at every setting; others than float32 cost a copy of the weights in "
                        "memory (default: float32, and the int8 and int4 copies that run here as drafts that skip nothing)")  # fmt: skip
    p.add_argument("--draft-probs", type=_probs, default=list(t.draft_probs), metavar="P1,P2",
                   help="also try rounds of up to --max-draft drafts that stop below each top-1 probability, or 'none' "
                        f"(default {','.join(map(str, t.draft_probs))})")  # fmt: skip
    p.add_argument("--out", type=_output_file, default=None, help="also write the result as JSON to this file")
    p.set_defaults(func=cmd_tune)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # GGUF de-quantisation bars would bury the output
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ModuleNotFoundError, NotImplementedError) as e:
        print(f"specgate {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
