"""What a greedy draft's LM head costs it: the low-precision copy's own head against the screened one.

A draft over the int8 or int4 copy of the weights used to read its head in int8 (int8 under int4), so
its token was the int8 head's, not the one its float32 head would give its hidden state; a greedy
draft now screens the float32 head (exact argmax at about the int8 head's cost). Two parts:

- acceptance: the acceptance loop on held-out prompts (``specgate.prompts``), fixed rounds of k drafts
  that skip nothing, with the screened draft head and with the copy's own head (the engine's screened
  head switched off for the whole call: the verifier's tokens are the same either way);
- cost: the draft vocabulary's head product on a decode step's hidden state, the copy's own rows
  against the screened ones (and the float32 rows), interleaved, medians;
- with ``--loop N``: end to end, ``generate(speculative=True)`` at this machine's tuned (or default)
  settings on the first N MT-Bench questions, a draft vocabulary's rows screened or in the copy's
  precision, alternating per prompt (the same tokens either way, asserted): tokens/s, alpha, tau.

    python eval/draft_head.py [--model smollm2-135m-instruct] [--precision int4] [--vocab 16384] [--prompts 8] [--loop 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import specgate
from specgate import SpecConfig, layers
from specgate.bench import mtbench_prompts
from specgate.kernels.cpu_step import head_precision
from specgate.prompts import split
from specgate.vocab import DraftHead


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--gates", default="default", help="gate directory, 'default' or 'none' (the ranking then: the model's own)")
    ap.add_argument("--precision", default="int4", choices=["bfloat16", "int8", "int4"])
    ap.add_argument("--vocab", type=int, default=16384, help="draft vocabulary (0: the full head)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--k", type=int, default=6, help="drafts per round")
    ap.add_argument("--rounds", type=int, default=40, help="timing rounds of the head products")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--loop", type=int, default=0, help="MT-Bench questions for the end-to-end comparison (0: none)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    m = specgate.load(args.model, gates=None if args.gates == "none" else args.gates)
    screened = m.engine.screened
    if screened is None:
        raise SystemExit("this engine has no screened head (no CPU kernels, or SPECGATE_SCREENED_HEAD=0): nothing to compare")
    spec = SpecConfig(0.0, max_draft=args.k, init_draft=args.k, adaptive=False, draft_precision=args.precision, draft_vocab=args.vocab or None)
    prompts = [m.encode_chat(p) for p in split()[1][: args.prompts]]
    print(f"{args.model}, {args.precision} draft, vocabulary {args.vocab or 'full'}, {args.prompts} held-out prompts, k = {args.k}")
    for name, head in (("screened float32 head", screened), (f"its {head_precision(args.precision)} head", None)):
        m.engine.screened = head
        accepted = drafted = rounds = 0
        for ids in prompts:
            s = m.generate(ids, max_new_tokens=args.tokens, do_sample=False, speculative=True, spec_config=spec, return_dict_in_generate=True).spec_stats
            accepted, drafted, rounds = accepted + s.accepted, drafted + s.drafted, rounds + s.rounds
        print(f"  {name:24s} alpha {accepted / drafted:.3f}  tau {(accepted + rounds) / rounds:.2f}")
    m.engine.screened = screened

    # the head products on real hidden states (a prompt's last positions)
    draft = m.draft_head(args.vocab).with_context(prompts[0]) if args.vocab else None
    with torch.inference_mode():
        cache = m.engine.new_cache(1, prompts[0].shape[1])
        h = m.engine.hidden(prompts[0], cache)[:, -1:]
    low = head_precision(args.precision)
    if draft is not None:
        options = {f"{low} rows": lambda: draft.logits(h, low), "screened": lambda: draft.logits(h, low, screened=True), "float32 rows": lambda: draft.logits(h)}
    else:
        step = m.engine.low_precision_step(args.precision)
        w = m.engine.weights
        options = {f"{low} head": lambda: step.logits(h), "screened": lambda: layers.head(w, h, screened), "float32 head": lambda: layers.head(w, h)}
    times = {k: [] for k in options}
    with torch.inference_mode():
        for f in options.values():
            f()
        for _ in range(args.rounds):
            for k, f in options.items():
                t = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)
    print("  head product, medians: " + "  ".join(f"{k} {statistics.median(v) * 1e3:.3f} ms" for k, v in times.items()))
    if args.loop:
        loop(m, args.loop, args.tokens)
    return 0


def loop(m: specgate.SpecGateModel, prompts: int, tokens: int) -> None:
    """Tuned speculative decoding with a draft vocabulary's rows screened or not, alternating per prompt."""
    method = DraftHead.logits
    variants = {"screened": method, "unscreened": lambda self, h, precision="float32", screened=False: method(self, h, precision)}
    ids = [m.encode_chat(p) for p in mtbench_prompts(prompts)]
    m.generate(ids[0], max_new_tokens=16, do_sample=False, speculative=True)  # warm-up
    totals = {k: [0, 0.0, 0, 0, 0] for k in variants}  # tokens, seconds, accepted, drafted, rounds
    try:
        for i, x in enumerate(ids):
            outs = []
            for name in list(variants)[:: 1 if i % 2 == 0 else -1]:
                DraftHead.logits = variants[name]
                t = time.perf_counter()
                out = m.generate(x, max_new_tokens=tokens, do_sample=False, speculative=True, return_dict_in_generate=True)
                s, total = out.spec_stats, totals[name]
                for j, v in enumerate((out.sequences.shape[1] - x.shape[1], time.perf_counter() - t, s.accepted, s.drafted, s.rounds)):
                    total[j] += v
                outs.append(out.sequences)
            assert torch.equal(*outs), "a draft head changed the output"
    finally:
        DraftHead.logits = method
    print(f"end to end, {prompts} MT-Bench questions, {tokens} tokens, settings: {out.spec_stats.settings}")
    for name, (n, t, a, d, r) in totals.items():
        print(f"  {name:10s} {n / t:6.1f} tokens/s  alpha {a / d:.3f}  tau {(a + r) / r:.2f}")
    rate = {name: n / t for name, (n, t, *_) in totals.items()}
    print(f"  screened / unscreened: {rate['screened'] / rate['unscreened']:.3f}x")


if __name__ == "__main__":
    raise SystemExit(main())
