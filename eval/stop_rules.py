"""When should a round stop drafting? Stop rules of the acceptance loop against the best possible one.

At every position t of the full model's greedy answer to each held-out prompt, the draft (the
gates at ``--budget``, the ``--draft-vocab`` head grown by the text, as in the loop) writes a chain
of up to ``--max-draft`` tokens from the answer's token t, against a cache holding the full model's
K/V of everything before t (as after a verify pass) and its own K/V within the chain. Per step we
keep its top-1 and top-2 probabilities, entropy, final normed state, and whether the token is the
answer's. Greedy rounds start where the last round's accepted tokens end, so alpha and tau under
any rule of when to stop drafting follow from the chains without running the loop:

- ``default``: the loop's default draft lengths (``SpecConfig``: adaptive, at most 4);
- ``top1<p``: up to ``--max-draft`` drafts a round, stopped after a draft whose top-1 probability
  is below p (``SpecConfig.min_draft_prob``);
- ``probe<p``, ``probe+state<p``: the same with a logistic model of P(the verifier accepts a
  draft | it accepted the ones before), fitted on chains of train prompts, from the log top-1 and
  top-2 probabilities, entropy and position (and the draft's final normed state, ridge-penalised);
- ``oracle``: stop exactly at the first draft the verifier rejects: the most a stop rule can reach.

    python eval/stop_rules.py --budget 0.5 --max-draft 16 [--prompts 16] [--train-prompts 60]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import specgate
from specgate import layers
from specgate.prompts import split
from specgate.speculative import SpecConfig, draft_gates, draft_policy

ROOT = Path(__file__).resolve().parents[1]


@torch.inference_mode()
def chains(m, prompts: list[str], budget: float, k: int, tokens: int, vocab: int, cut_at_miss: bool) -> list[dict]:
    """Per prompt: n (answer tokens the loop emits) and one chain per position t < n, each
    (features (s, 3): top-1, top-2, entropy; accepted (s,); states (s, d) float16). With
    ``cut_at_miss`` a chain ends at its first rejected draft (all a fit needs)."""
    config = SpecConfig(draft_budget=budget, draft_vocab=vocab, max_draft=k)
    gates = draft_gates(m.gates, config)
    policy, eng, w = draft_policy(gates, config), m.engine, m.engine.weights
    out = []
    for prompt in prompts:
        ids = m.encode_chat(prompt)
        answer = m.generate(ids, max_new_tokens=tokens + k, do_sample=False)[0, ids.shape[1] :].tolist()
        n = min(tokens, len(answer))
        if m.tokenizer.eos_token_id in answer[:n]:
            n = answer.index(m.tokenizer.eos_token_id) + 1
        L = ids.shape[1]
        cache = eng.new_cache(1, L + len(answer) + 1)
        cache.reset()
        eng(torch.cat([ids[0], torch.tensor(answer)])[None], cache, logits_to_keep=1)
        exact = [(kk.clone(), vv.clone()) for kk, vv in zip(cache.k, cache.v)]
        head = m.draft_head(vocab).with_context(ids)
        rows = []
        for t in range(n):
            head.add(torch.tensor([answer[t]]))
            cache.rewind([L + t])
            token, feats, hits, states = answer[t], [], [], []
            for j in range(1, min(k, len(answer) - 1 - t) + 1):
                h = eng.hidden(torch.tensor([[token]]), cache, gates, policy, kv_fill=config.kv_fill)[:, -1]
                probs = head.logits(h, screened=eng.screened is not None)[0].float().softmax(-1)
                top = probs.topk(2)
                token = int(top.indices[0])
                feats.append([*top.values.tolist(), float(-torch.special.xlogy(probs, probs).sum())])
                hits.append(token == answer[t + j])
                states.append(layers.rms_norm(h, w.final_norm, w.eps)[0].half())
                if cut_at_miss and not hits[-1]:
                    break
            states = torch.stack(states) if states else torch.empty(0, w.final_norm.shape[0], dtype=torch.half)
            rows.append((torch.tensor(feats).reshape(-1, 3), torch.tensor(hits, dtype=torch.bool), states))
            for (kk, vv), (ek, ev) in zip(zip(cache.k, cache.v), exact):  # the exact K/V back
                kk[:, :, L + t : L + t + k + 1] = ek[:, :, L + t : L + t + k + 1]
                vv[:, :, L + t : L + t + k + 1] = ev[:, :, L + t : L + t + k + 1]
        out.append({"n": n, "chains": rows})
    return out


def to_first_miss(chain: tuple) -> tuple:
    """A chain cut after its first rejected draft: the drafts a probe of P(accepted | the ones
    before were) learns from."""
    s = int(chain[1].long().cumprod(0).sum()) + 1
    return tuple(x[:s] for x in chain)


def inputs(feats: torch.Tensor, states: torch.Tensor, state: bool) -> torch.Tensor:
    """A chain's probe inputs (s, 4 [+ d]): log top-1, log top-2, entropy, position / 16."""
    s = len(feats)
    small = torch.stack([feats[:, 0].clamp(min=1e-9).log(), feats[:, 1].clamp(min=1e-9).log(), feats[:, 2],
                         torch.arange(s) / 16], 1)  # fmt: skip
    return torch.cat([small, states.float()], 1) if state else small


def fit_probe(data: list[dict], state: bool, ridge: float):
    """Logistic regression of 'accepted' on the probe inputs of every draft whose predecessors were
    accepted; returns a function of (features, states) -> P (s,)."""
    x, y = [], []
    for prompt in data:
        for feats, hits, states in map(to_first_miss, prompt["chains"]):
            x.append(inputs(feats, states, state))
            y.append(hits.double())
    x, y = torch.cat(x).double(), torch.cat(y)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = (x - mu) / sd
    w = torch.zeros(z.shape[1] + 1, dtype=torch.double, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z @ w[1:] + w[0], y) + ridge * (w[1:] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w = w.detach()
    return lambda feats, states: torch.sigmoid(((inputs(feats, states, state).double() - mu) / sd) @ w[1:] + w[0])


def simulate(data: list[dict], k: int, stop=None, adaptive: bool = False) -> tuple[float, float]:
    """alpha, tau (means over prompts, as SpecStats per generate call) of greedy rounds of up to k
    drafts, stopped after the first draft where ``stop(features, states, hits)`` (s,) is True;
    ``adaptive``: the loop's default lengths instead (from 3, +1 after a full accept, -1 else)."""
    alphas, taus = [], []
    for prompt in data:
        n, t, size = prompt["n"], 0, min(3, k) if adaptive else k
        drafted = accepted = rounds = emitted = 0
        while t < n:
            feats, hits, states = prompt["chains"][t]
            d = min(size, len(hits))
            if stop is not None and d:
                flags = stop(feats[:d], states[:d], hits[:d])
                d = int(flags.nonzero()[0]) + 1 if flags.any() else d
            a = int(hits[:d].long().cumprod(0).sum())
            drafted, accepted, rounds, emitted = drafted + d, accepted + a, rounds + 1, emitted + min(a + 1, n - t)
            if adaptive:
                size = min(k, size + 1) if a == d else max(1, size - 1)
            t += a + 1
        alphas.append(accepted / max(drafted, 1))
        taus.append(emitted / rounds)
    return sum(alphas) / len(alphas), sum(taus) / len(taus)


def auc(score: torch.Tensor, label: torch.Tensor) -> float:
    """Probability that a random accepted draft scores above a random rejected one."""
    rank = score.argsort().argsort().double()
    pos = label.bool()
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((rank[pos].sum() - n_pos * (n_pos - 1) / 2) / (n_pos * n_neg))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gates", default="default")
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--max-draft", type=int, default=16, help="most drafts a round (chain length)")
    ap.add_argument("--prompts", type=int, default=16, help="held-out prompts")
    ap.add_argument("--train-prompts", type=int, default=60, help="train prompts the probes are fitted on (0: no probes)")
    ap.add_argument("--tokens", type=int, default=64, help="answer tokens per prompt (the acceptance loop of eval/gate_quality.py: 64)")
    ap.add_argument("--draft-vocab", type=int, default=8192)
    ap.add_argument("--ridge", type=float, default=0.01, help="the state probe's penalty")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    m = specgate.load("smollm2-135m-instruct", gates=args.gates)
    train, held = split()
    t0 = time.perf_counter()
    k = args.max_draft
    test = chains(m, held[: args.prompts], args.budget, k, args.tokens, args.draft_vocab, cut_at_miss=False)
    print(f"[held-out chains: {time.perf_counter() - t0:.0f} s]")
    rules = {"default": simulate(test, 4, adaptive=True)}
    for n in sorted({min(8, k), k}):  # a chain's first 8 drafts are a round of up to 8
        rules[f"oracle, k<={n}"] = simulate(test, n, lambda f, s, hits: ~hits)
        for p in (0.3, 0.4, 0.5, 0.6, 0.7):
            rules[f"top1<{p}, k<={n}"] = simulate(test, n, lambda f, s, hits, p=p: f[:, 0] < p)
    if args.train_prompts:
        fit = chains(m, train[1::2][: args.train_prompts], args.budget, k, args.tokens, args.draft_vocab, cut_at_miss=True)
        print(f"[train chains: {time.perf_counter() - t0:.0f} s]")
        scored = [to_first_miss(c) for prompt in test for c in prompt["chains"] if len(c[1])]
        label = torch.cat([hits for _, hits, _ in scored])
        rules["auc top1"] = auc(torch.cat([feats[:, 0] for feats, _, _ in scored]), label)
        for name, state in (("probe", False), ("probe+state", True)):
            probe = fit_probe(fit, state, args.ridge if state else 1e-3)
            rules[f"auc {name}"] = auc(torch.cat([probe(feats, states) for feats, _, states in scored]), label)
            for p in (0.3, 0.4, 0.5, 0.6, 0.7):
                rules[f"{name}<{p}, k<={k}"] = simulate(test, k, lambda f, s, hits, p=p, probe=probe: probe(f, s) < p)
    print(f"budget {args.budget}, up to {k} drafts a round, {args.prompts} held-out prompts, {args.tokens} tokens each")
    for name, r in rules.items():
        print(f"  {name:>24}: " + (f"alpha {r[0]:.3f}  tau {r[1]:.2f}" if isinstance(r, tuple) else f"{r:.3f}"))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rules": rules}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
