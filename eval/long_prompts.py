"""Speculation after long prompts: plain decoding against the settings ``generate`` chooses, greedy,
on prompts of growing length (Python's help text, cut to N words, then "Summarize the text above in a
few sentences."; two cuts per length). Per prompt the methods run in turn (order reversed every
other prompt), after a call that only prefills (one new token), so the decode phase can be timed
apart: its speed-up is what speculation changes; the end-to-end one includes the prefill both pay.

    python eval/long_prompts.py [--words 100 600 1200] [--max-new-tokens 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

import specgate
from specgate.data import pydoc_texts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--words", type=int, nargs="+", default=[100, 600, 1200])
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    m = specgate.load("smollm2-135m-instruct")
    words = " ".join(pydoc_texts()).split()
    n = args.max_new_tokens
    methods = {
        "prefill": lambda ids: m.generate(ids, max_new_tokens=1),
        "plain": lambda ids: m.generate(ids, max_new_tokens=n),
        "speculative": lambda ids: m.generate(ids, max_new_tokens=n, speculative=True, return_dict_in_generate=True),
    }
    m.generate(m.encode_chat("Hello"), max_new_tokens=4, speculative=True)  # one-time costs: the draft's copy
    for i, (length, cut) in enumerate((w, c) for w in args.words for c in range(2)):
        ids = m.encode_chat(" ".join(words[cut * 500 : cut * 500 + length]) + "\n\nSummarize the text above in a few sentences.")
        seconds, outs = {}, {}
        for name in list(methods) if i % 2 == 0 else list(methods)[::-1]:
            t0 = time.perf_counter()
            outs[name] = methods[name](ids)
            seconds[name] = time.perf_counter() - t0
        spec, stats = outs["speculative"].sequences, outs["speculative"].spec_stats
        new = outs["plain"].shape[1] - ids.shape[1]
        decode = {k: seconds[k] - seconds["prefill"] for k in ("plain", "speculative")}
        print(f"{ids.shape[1]:>5} prompt tokens, {new} new: prefill {seconds['prefill']:.2f} s; plain {new / seconds['plain']:.1f} tokens/s, "
              f"speculative {new / seconds['speculative']:.1f} ({seconds['plain'] / seconds['speculative']:.2f}x end to end, "
              f"{decode['plain'] / decode['speculative']:.2f}x decoding), same tokens: {torch.equal(spec, outs['plain'])}; "
              f"tau {stats.tau:.2f}, per round: drafts {stats.draft_s / stats.rounds * 1e3:.1f} ms, verify {stats.verify_s / stats.rounds * 1e3:.1f} ms; "
              f"plain {decode['plain'] / max(1, new - 1) * 1e3:.1f} ms a token", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
