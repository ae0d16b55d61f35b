"""The skeleton every training objective shares: seeded batches, progress, time limit, checkpoints.

An objective supplies what one step does and how its state is saved; :func:`run_steps` does the
rest. Checkpoints are written every ``checkpoint_every`` steps, at the end, and on Ctrl-C (when a
step was done since the start), atomically (:func:`save_atomic`). :func:`check_run` keeps a resumed
run from continuing one made from another model or other data.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

import torch

from .data import batch_indices, collate

RUN_NAME = "run.json"


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; ``saved`` says whether a checkpoint holds the steps done so far."""

    def __init__(self, step: int, saved: bool):
        super().__init__(step, saved)
        self.step, self.saved = step, saved


def run_steps(
    config,
    pieces: list[list[int]],
    start: int,
    accelerator,
    step: Callable[[int, torch.Tensor, torch.Tensor], dict],
    save: Callable[[int], None],
    pad_id: int = 0,
) -> int:
    """Run ``step(step_index, ids, valid) -> progress-bar fields`` for steps ``start`` ..
    ``config.steps - 1`` on this process's share of each seeded batch; returns the steps done.
    ``save(steps_done)`` checkpoints."""
    from tqdm.auto import tqdm

    world, rank = accelerator.num_processes, accelerator.process_index
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, disable=not accelerator.is_local_main_process)
    t0, done = time.perf_counter(), start
    try:
        for i in bar:
            idx = batch_indices(len(pieces), config.batch_size * world, i, config.seed)[rank::world]
            ids, valid = collate([pieces[j] for j in idx], pad_id)
            bar.set_postfix(**step(i, ids.to(accelerator.device), valid.to(accelerator.device)))
            done = i + 1
            if done % config.checkpoint_every == 0:
                save(done)
            if config.time_limit_s is not None and time.perf_counter() - t0 > config.time_limit_s:
                break
    except KeyboardInterrupt:
        bar.close()
        if done > start:  # the interrupted step did not count: a resumed run redoes it
            save(done)
        raise TrainingInterrupted(done, saved=done > start) from None
    bar.close()
    save(done)
    return done


def save_atomic(obj, path: Path) -> None:
    """torch.save through a temporary file: a kill never leaves half a checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def check_run(out: Path, made_from: dict, resume: bool) -> bool:
    """Whether to resume from the checkpoints in ``out``. ``made_from`` says what this run's
    checkpoints depend on (model, data, sequence length, ...); it is stored in ``out/run.json``.
    A resumed run made from anything else is refused; with ``resume=False`` old checkpoints are
    ignored (and overwritten), and a message says so."""
    record = out / RUN_NAME
    made_from = json.loads(json.dumps(made_from))  # compare as stored: tuples become lists
    before = json.loads(record.read_text()) if record.is_file() else None
    if before is not None and resume:
        changed = {k: (before.get(k), v) for k, v in made_from.items() if before.get(k) != v}
        if changed:
            lines = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in changed.items())
            raise ValueError(
                f"{out} holds checkpoints of another run ({lines}): pass another --output-dir, "
                "or --no-resume to start afresh there"
            )
    elif before is not None:
        print(f"--no-resume: starting afresh in {out}, its old checkpoints will be overwritten", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(made_from, indent=1) + "\n")
    return before is not None and resume
