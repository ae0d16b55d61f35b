"""The ``specgate`` command: generate, bench, train, calibrate."""

from __future__ import annotations

import argparse
import sys
import time

from .loading import DEFAULT_MODEL


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model id, directory, .gguf file or alias (default {DEFAULT_MODEL})")
    p.add_argument("--gates", default="default", help="gate directory, 'default' (shipped gates) or 'none'")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")


def _load(args):
    import specgate

    _set_threads(args)
    gates = None if args.gates == "none" else args.gates
    return specgate.load(args.model, gates=gates, dtype=args.dtype, device=args.device)


def cmd_generate(args) -> int:
    import torch
    from transformers import TextStreamer

    m = _load(args)
    ids = m.encode_chat(args.prompt) if not args.raw else m.tokenizer(args.prompt, return_tensors="pt").input_ids
    streamer = TextStreamer(m.tokenizer, skip_prompt=True, skip_special_tokens=True)
    generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    start = time.perf_counter()
    out = m.generate(
        ids,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.temperature > 0,
        temperature=args.temperature or None,
        top_p=args.top_p,
        streamer=streamer,
        generator=generator,
        **_spec_kwargs(args),
    )
    seconds = time.perf_counter() - start
    stats = getattr(out, "spec_stats", None)
    new = (out.sequences if stats else out).shape[1] - ids.shape[1]
    print(f"[{new} tokens in {seconds:.2f} s, {new / seconds:.1f} tokens/s]", file=sys.stderr)
    if stats:
        print(f"[tau {stats.tau:.2f}, alpha {stats.alpha:.2f}, draft skipped {stats.skip_fraction:.0%}]", file=sys.stderr)
    return 0


def _spec_args(p: argparse.ArgumentParser) -> None:
    from .speculative import SpecConfig

    d = SpecConfig()
    p.add_argument("--draft-budget", type=float, default=d.draft_budget, help=f"share of the draft's branch evaluations to skip (default {d.draft_budget})")
    p.add_argument("--max-draft", type=int, default=d.max_draft, help=f"most tokens drafted per round (default {d.max_draft})")
    p.add_argument("--verifier", choices=["original", "gated"], default=d.verifier, help="original: output equals the model's own (default)")
    p.add_argument("--kv-fill", choices=["project", "copy_below"], default=d.kv_fill, help="K/V of tokens that skip attention in the draft")


def _spec_config(args):
    from .speculative import SpecConfig

    return SpecConfig(draft_budget=args.draft_budget, max_draft=args.max_draft, init_draft=min(SpecConfig.init_draft, args.max_draft), verifier=args.verifier, kv_fill=args.kv_fill)


def _spec_kwargs(args) -> dict:
    if not args.speculative:
        return {}
    return {"speculative": True, "spec_config": _spec_config(args), "return_dict_in_generate": True}


def _set_threads(args) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def cmd_bench(args) -> int:
    import torch

    _set_threads(args)
    from . import bench

    from dataclasses import replace

    budgets = [] if args.no_speculative else args.budgets or [args.draft_budget]
    base = _spec_config(args)
    speculative = [replace(base, draft_budget=b) for b in budgets]
    gates = None if args.gates == "none" else args.gates
    results = bench.bench_decode(
        args.model, args.prompts, args.max_new_tokens, speculative, getattr(torch, args.dtype), gates
    )
    print(bench.report(results))
    if args.out:
        bench.save(results, args.out, model=args.model, prompts=args.prompts, max_new_tokens=args.max_new_tokens)
        print(f"saved {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specgate", description="Lossless self-speculative decoding with GateSkip gates")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate an answer to one prompt")
    p.add_argument("prompt")
    _model_args(p)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--speculative", action="store_true", help="self-speculative decoding (needs gates)")
    _spec_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="transformers vs plain vs speculative decoding, side by side")
    _model_args(p)
    p.add_argument("--prompts", type=int, default=8, help="number of MT-Bench prompts (first turns)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--budgets", type=float, nargs="+", default=None, help="draft skip budgets to compare (default: --draft-budget)")
    _spec_args(p)
    p.add_argument("--no-speculative", action="store_true", help="time transformers and plain decode only")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.set_defaults(func=cmd_bench)

    from .train_cli import add_calibrate_parser, add_train_parser

    add_train_parser(sub)
    add_calibrate_parser(sub)

    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # GGUF de-quantisation bars would bury the output
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ModuleNotFoundError, NotImplementedError) as e:
        print(f"specgate {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
