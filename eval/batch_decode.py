"""Batched greedy decoding: `transformers` ``generate()``, the engine's plain decoding and its
speculation (the settings ``generate`` chooses), at batch sizes B, on the first MT-Bench questions
left-padded into batches of B. Per batch the methods run in turn (the order reversed on odd batches);
tokens/s counts the new tokens of every row, and each row's tokens are compared with
``transformers``' (up to its first end of sequence). ``--max-draft K ...`` adds speculation forced
at every batch size with the batch-1 settings and K drafts a round (``generate(max_draft=K)``; where
the settings adapt the length, at most K).

    python eval/batch_decode.py [--batch-sizes 1 2 4 8] [--max-draft 1 2 3 6] [--prompts 8] [--max-new-tokens 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

import specgate
from specgate import tune
from specgate.bench import mtbench_prompts


def rows(out: torch.Tensor, prompt_len: int, eos: int) -> list[list[int]]:
    """Each row's new tokens up to and including its first end of sequence."""
    new = out[:, prompt_len:].tolist()
    return [r[: r.index(eos) + 1] if eos in r else r for r in new]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--max-draft", type=int, nargs="*", default=[], help="also speculate at every batch size with at most K drafts")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    m = specgate.load("smollm2-135m-instruct")
    tok, eos = m.tokenizer, m.hf_model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    tok.padding_side = "left"
    texts = [m.chat_text(p) for p in mtbench_prompts(args.prompts)]
    methods = {
        "transformers": lambda ids, mask: m.hf_model.generate(ids, attention_mask=mask, max_new_tokens=args.max_new_tokens, do_sample=False),
        "plain": lambda ids, mask: m.generate(ids, mask, max_new_tokens=args.max_new_tokens),
        "speculative": lambda ids, mask: m.generate(ids, mask, max_new_tokens=args.max_new_tokens, speculative=True),
    }  # fmt: skip
    base, label = tune.resolve(m, None, {})  # the batch-1 settings: tuned, else the defaults
    print(f"speculation at batch 1: {label}: {base}", flush=True)
    for k in args.max_draft:  # an override speculates at any batch size
        methods[f"k={k}"] = lambda ids, mask, k=k: m.generate(ids, mask, max_new_tokens=args.max_new_tokens, speculative=True, max_draft=k)
    for B in args.batch_sizes:
        batches = [texts[i : i + B] for i in range(0, len(texts), B)]
        seconds, tokens, outs = {k: 0.0 for k in methods}, {k: 0 for k in methods}, {k: [] for k in methods}
        enc0 = tok(batches[0], return_tensors="pt", padding=True, add_special_tokens=False)
        for fn in methods.values():  # warm-up: first calls, kernels' choices for this row count
            fn(enc0.input_ids, enc0.attention_mask)
        for i, batch in enumerate(batches):
            enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=False)
            order = list(methods) if i % 2 == 0 else list(methods)[::-1]
            for name in order:
                t0 = time.perf_counter()
                out = methods[name](enc.input_ids, enc.attention_mask)
                seconds[name] += time.perf_counter() - t0
                got = rows(out, enc.input_ids.shape[1], eos)
                tokens[name] += sum(map(len, got))
                outs[name] += got
        rate = {k: tokens[k] / seconds[k] for k in methods}
        same = lambda k: sum(a == b for a, b in zip(outs[k], outs["transformers"])) / len(texts)  # noqa: E731
        print(f"batch {B}: transformers {rate['transformers']:.1f} tokens/s, plain {rate['plain']:.1f} "
              f"({rate['plain'] / rate['transformers']:.2f}x, {same('plain'):.0%} exact), speculative "
              f"{rate['speculative']:.1f} ({rate['speculative'] / rate['transformers']:.2f}x, "
              f"{rate['speculative'] / rate['plain']:.2f}x plain, {same('speculative'):.0%} exact)"
              + "".join(f", k={k} {rate[f'k={k}'] / rate['plain']:.2f}x plain ({same(f'k={k}'):.0%} exact)" for k in args.max_draft),
              flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
