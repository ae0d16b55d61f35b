"""The ``specgate train`` and ``specgate calibrate`` subcommands (added to :mod:`specgate.cli`).

Every ``train`` flag is a :class:`specgate.train.TrainConfig` field with its default read from
there, so the library and the command line cannot disagree.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import typing

from .train import TrainConfig

_HELP = {
    "objective": "paper: CE + lambda*L2 with budget warm-up; distill: KL to the original model; "
    "damage: fit scalar gates to the measured cost of each skip",
    "data": "training text: .txt, or .jsonl with {'text': ...} or {'messages': [...]} per line "
    "(default: the model's own answers to specgate.prompts + pydoc topics)",
    "output_dir": "checkpoints and the gates (OUTPUT_DIR/gates) go here",
    "sparsity": "lambda of the L2 sparsity term mean(g^2)",
    "budget_max": "skip budget the warm-up reaches (paper) / top of the sampled budgets (distill)",
    "allocation": "global: one importance threshold for all branches; branch: per-branch quantile",
    "scale_output": "gates scale branch outputs (the GateSkip model) instead of only deciding skips",
    "never_skip": "branches that always run, as LAYER:BRANCH pairs (branch 0 attention, 1 MLP), e.g. 0:1,1:0",
    "ridge": "damage: L2 penalty on the standardized gate weights of the Poisson fit",
    "time_limit_s": "stop with a checkpoint after this many seconds",
    "resume": "continue from OUTPUT_DIR/checkpoint.pt if it exists",
}


def _pairs(text: str) -> tuple[tuple[int, int], ...]:
    try:
        pairs = tuple((int(a), int(b)) for a, b in (item.split(":") for item in text.split(",") if item))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LAYER:BRANCH pairs such as 0:1,1:0, got {text!r}") from None
    if any(b not in (0, 1) for _, b in pairs):
        raise argparse.ArgumentTypeError("branch must be 0 (attention) or 1 (MLP)")
    return pairs


def _budgets(text: str) -> list[float]:
    try:
        return [float(b) for b in text.split(",") if b]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated budgets such as 0.3,0.5, got {text!r}") from None


def add_train_parser(sub) -> argparse.ArgumentParser:
    from .cli import _model_args

    p = sub.add_parser("train", help="train gates (gates only, frozen backbone)")
    _model_args(p)
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag, kind = "--" + f.name.replace("_", "-"), hints[f.name]
        help_ = _HELP.get(f.name, "") + f" (default {f.default})"
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
        elif f.name == "never_skip":
            p.add_argument(flag, type=_pairs, default=f.default, help=help_)
        else:
            args = typing.get_args(kind)
            if typing.get_origin(kind) is typing.Literal:
                p.add_argument(flag, choices=args, default=f.default, help=help_)
                continue
            base = next((a for a in args if a is not type(None)), kind)  # X | None -> X
            p.add_argument(flag, type=base, default=f.default, help=help_)
    p.add_argument("--calibrate", type=_budgets, default=None, metavar="B1,B2", help="calibrate these budgets after training")
    p.set_defaults(func=cmd_train)
    return p


def add_calibrate_parser(sub) -> argparse.ArgumentParser:
    from .calibrate import CalibrateConfig
    from .cli import _model_args

    d = CalibrateConfig()
    p = sub.add_parser("calibrate", help="per-branch single-token skip thresholds for a list of budgets")
    _model_args(p)
    p.add_argument("--budgets", type=_budgets, default=list(d.budgets), help=f"comma-separated (default {d.budgets})")
    p.add_argument("--allocation", choices=["global", "branch"], default=d.allocation,
                   help="global: one threshold over all branches; branch: each branch skips the budget")  # fmt: skip
    p.add_argument("--data", default=None, help="calibration text (.txt/.jsonl); default: the model's answers to held-in prompts")
    p.add_argument("--samples", type=int, default=d.samples, help=f"sequences (default {d.samples})")
    p.add_argument("--tokens", type=int, default=d.tokens, help=f"draft steps per sequence (default {d.tokens})")
    p.add_argument("--iterations", type=int, default=d.iterations, help=f"(default {d.iterations})")
    p.add_argument("--out", default=None, help="where to save the calibrated gates (default: back into --gates)")
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's)")
    p.add_argument("--half", action=argparse.BooleanOptionalAction, default=True,
                   help="store gate weights as float16 (half the file; calibrated on the rounded weights)")  # fmt: skip
    p.set_defaults(func=cmd_calibrate)
    return p


def cmd_train(args) -> int:
    from .cli import _load
    from .train import train

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    args.gates = "none"
    m = _load(args)
    start = time.perf_counter()
    try:
        gates = train(m, config)
    except KeyboardInterrupt:
        print(f"\ninterrupted: checkpoint and gates in {config.output_dir} (run again to resume)", file=sys.stderr)
        return 130
    print(f"trained in {time.perf_counter() - start:.0f} s; gates in {config.output_dir}/gates", file=sys.stderr)
    if args.calibrate:
        from .calibrate import CalibrateConfig, calibrate_default
        from .gates import save_gates

        calibrate_default(m, gates, CalibrateConfig(budgets=tuple(args.calibrate)))
        save_gates(gates, f"{config.output_dir}/gates")
    return 0


def cmd_calibrate(args) -> int:
    from .calibrate import CalibrateConfig, calibrate_default
    from .cli import _load
    from .gates import save_gates

    if args.gates == "none":
        raise ValueError("calibrate needs gates: pass --gates DIR")
    m = _load(args)
    if m.gates is None:
        raise ValueError(f"no gates found for {args.model}: pass --gates DIR")
    config = CalibrateConfig(
        budgets=tuple(args.budgets), allocation=args.allocation, samples=args.samples, tokens=args.tokens,
        iterations=args.iterations, data=args.data,
    )  # fmt: skip
    if args.half:  # calibrate what will be stored
        for p in m.gates.parameters():
            p.data = p.data.half().to(p.dtype)
    start = time.perf_counter()
    report = calibrate_default(m, m.gates, config)
    for budget, fraction in report.items():
        print(f"budget {budget:.2f}: decode skips {fraction:.3f} on held-out text")
    print(f"calibrated in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    out = args.out or (args.gates if args.gates != "default" else None)
    if out is None:
        from .loading import default_gates

        out = default_gates(args.model)
    gates = m.gates
    if args.half:
        import copy

        gates = copy.deepcopy(m.gates).half()
        gates.thresholds = dict(m.gates.thresholds)
    save_gates(gates, out)
    print(f"saved to {out}", file=sys.stderr)
    return 0
