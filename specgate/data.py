"""Training and calibration text: user files, the model's own answers, and how they are batched.

Documents are lists of token ids. A user file is plain text (one document) or JSONL; the default
corpus is the model's own answers to :mod:`specgate.prompts` plus Python's help topics. Training
cuts documents into pieces (:func:`chunk`), draws seeded batches of them (:func:`batch_indices`, a
pure function of the step, so a resumed run sees the same batches) and pads them (:func:`collate`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .prompts import split


def load_documents(path: str | Path, tokenizer) -> list[list[int]]:
    """Token ids of each document of a user file: plain text (one document), or JSONL with one
    ``{"text": ...}`` or ``{"messages": [{"role", "content"}, ...]}`` object per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training data {path} does not exist")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"training data {path} is not UTF-8 text: {e}") from e
    if not raw.strip():
        raise ValueError(f"training data {path} is empty")
    if path.suffix not in (".jsonl", ".json"):
        return [tokenizer(raw, add_special_tokens=False).input_ids]
    docs = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg}); expected one JSON object per line") from e
        docs.append(_record_ids(record, tokenizer, f"{path}:{n}"))
    if not docs:
        raise ValueError(f"training data {path} has no records")
    return docs


def _record_ids(record, tokenizer, where: str) -> list[int]:
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return tokenizer(record["text"], add_special_tokens=False).input_ids
    if isinstance(record, dict) and isinstance(record.get("messages"), list):
        msgs = record["messages"]
        if not all(isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m for m in msgs):
            raise ValueError(f"{where}: every message needs 'role' and a string 'content'")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{where}: 'messages' records need a tokenizer with a chat template")
        return tokenizer(tokenizer.apply_chat_template(msgs, tokenize=False), add_special_tokens=False).input_ids
    raise ValueError(f'{where}: expected an object with a string "text" or a "messages" list, got {str(record)[:80]!r}')


@torch.inference_mode()
def self_answers(
    model, prompts: list[str], max_new_tokens: int = 256, batch_size: int = 8, temperature: float = 0.0, seed: int = 0
) -> list[str]:
    """The model's own answers to chat prompts (a base model's continuations of them), decoded with our
    engine in left-padded batches."""
    tok = model.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    generator = torch.Generator().manual_seed(seed)
    answers = []
    try:
        for i in range(0, len(prompts), batch_size):
            texts = [model.chat_text(p) for p in prompts[i : i + batch_size]]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=not tok.chat_template)
            sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0} if temperature > 0 else {"do_sample": False}
            out = model.generate(enc.input_ids, enc.attention_mask, max_new_tokens=max_new_tokens, generator=generator, **sampling)
            answers += tok.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
    finally:
        tok.padding_side = side
    return [a.strip() for a in answers]


def chat_ids(tokenizer, prompt: str, answer: str) -> list[int]:
    """One conversation (user prompt, assistant answer) through the chat template."""
    msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return tokenizer(tokenizer.apply_chat_template(msgs, tokenize=False), add_special_tokens=False).input_ids


def default_corpus(
    model,
    cache_file: str | Path | None = None,
    *,
    answers_per_prompt: int = 2,
    answer_tokens: int = 256,
    pydoc_share: float = 0.3,
    max_doc_tokens: int = 1024,
    seed: int = 0,
) -> list[list[int]]:
    """The model's own answers to the train split of :mod:`specgate.prompts` (cached as JSONL in
    ``cache_file``; the first answer to each prompt greedy, the others sampled at temperature
    0.8), plus ``pydoc_data.topics`` texts (cut to ``max_doc_tokens``) for ``pydoc_share`` of the
    tokens."""
    train_prompts, _ = split()
    cache_file = Path(cache_file) if cache_file else None
    if cache_file is not None and cache_file.is_file():
        records = [json.loads(line) for line in cache_file.read_text().splitlines() if line.strip()]
    else:
        records = []
        for k in range(answers_per_prompt):
            temp = 0.0 if k == 0 else 0.8
            answers = self_answers(model, train_prompts, answer_tokens, temperature=temp, seed=seed + k)
            records += [{"prompt": p, "answer": a} for p, a in zip(train_prompts, answers)]
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            cache_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    docs = [chat_ids(model.tokenizer, r["prompt"], r["answer"]) for r in records]
    n_answer = sum(map(len, docs))
    budget = int(n_answer * pydoc_share / max(1e-9, 1 - pydoc_share))
    for text in pydoc_texts():
        if budget <= 0:
            break
        ids = model.tokenizer(text, add_special_tokens=False).input_ids[:max_doc_tokens]
        docs.append(ids)
        budget -= len(ids)
    return docs


def pydoc_texts() -> list[str]:
    """Python's own help topics (installed with every Python), in a fixed order."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def chunk(docs: list[list[int]], seq_len: int, min_len: int = 16) -> list[list[int]]:
    """Split documents into pieces of at most seq_len tokens (shorter tails of < min_len dropped)."""
    out = []
    for ids in docs:
        for i in range(0, len(ids), seq_len):
            piece = ids[i : i + seq_len]
            if len(piece) >= min(min_len, len(ids)) and len(piece) >= 2:
                out.append(piece)
    if not out:
        raise ValueError("the training data has no sequence of 2 or more tokens")
    return out


def collate(pieces: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T) and valid mask (B, T)."""
    T = max(map(len, pieces))
    ids = torch.full((len(pieces), T), pad_id, dtype=torch.long)
    valid = torch.zeros(len(pieces), T, dtype=torch.bool)
    for b, p in enumerate(pieces):
        ids[b, : len(p)] = torch.tensor(p)
        valid[b, : len(p)] = True
    return ids, valid


def batched(pieces: list[list[int]], size: int) -> list[list[list[int]]]:
    """Consecutive groups of ``size`` pieces (the last one shorter)."""
    return [pieces[i : i + size] for i in range(0, len(pieces), size)]


def padding_id(tokenizer) -> int:
    """The id that pads batches (0 when the tokenizer has none: padding is masked anyway)."""
    return getattr(tokenizer, "pad_token_id", None) or 0


def batch_indices(n: int, batch: int, step: int, seed: int) -> list[int]:
    """The sequences of one step: epochs of seeded permutations, a pure function of the step."""
    start = step * batch
    out = []
    while len(out) < batch:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out += perm[offset : offset + batch - len(out)].tolist()
    return out
