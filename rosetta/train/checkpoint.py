"""Checkpoints that survive anything: each is a directory written aside, then renamed into place.

RUN_DIR/checkpoints/step-00000100/ holds a model directory `rosetta.load` opens (config.json,
model.safetensors, tokenizer.json) and trainer.pt (optimiser, schedule, scaler, RNG states, data
position). RUN_DIR/checkpoints/latest.json names the newest complete one; it is written last, so a
crash at any moment leaves the previous checkpoint in charge.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rosetta.errors import RosettaError
from rosetta.files import atomic_write, write_json

STATE_FILE = "trainer.pt"


def rng_state() -> dict[str, Any]:
    state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(state[1].astype(np.int64)), "pos": state[2], "gauss": state[3:]},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], *numpy["gauss"]))


def save(run_dir: Path, step: int, model, trainer_state: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint `step` atomically and prune all but the newest `keep`."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    staging = root / f".step-{step:08d}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging)
        buffer = io.BytesIO()
        torch.save(trainer_state, buffer)
        atomic_write(staging / STATE_FILE, lambda f: f.write(buffer.getbuffer()))
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        write_json(root / "latest.json", {"step": step, "checkpoint": final.name})
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        previous = latest(run_dir)
        kept = f"the previous checkpoint ({previous.name}) is intact" if previous else "no checkpoint was written"
        raise RosettaError(f"could not write checkpoint {final}: {e.strerror or e}; {kept}") from None
    for old in sorted(root.glob("step-*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / "latest.json"
    if not pointer.exists():
        return None
    path = pointer.parent / json.loads(pointer.read_text())["checkpoint"]
    return path if path.exists() else None


def load_state(checkpoint: Path) -> dict[str, Any]:
    return torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
