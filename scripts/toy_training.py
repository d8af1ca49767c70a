"""What the toy-world training scripts share: batches of the world, and resumable checkpoints.

The miniature base model (`train_toy_base.py`) and the toy CLIP (`train_toy_clip.py`) are trained on a
CPU that is often shared, so a run must survive being stopped: every phase writes its model and its AdamW
moments to one safetensors file (atomically) every few hundred steps and picks up from there when started
again. Batch `i` of a phase is drawn from a generator seeded by (seed, i), so a resumed run sees exactly
the pictures an uninterrupted one would have seen.

A phase may keep an exponential moving average of its weights (`ema_decay`), stored in the checkpoint next
to them and copied into the model when the phase ends: a few thousand CPU steps at a constant learning rate
leave weights that still jitter from batch to batch, and the average of the last few hundred draws better.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from pipelines.tlora.file_format import read_safetensors, write_atomically
from scripts import toy_world

STEP_KEY = "step"


def world_batch(seed: int, step: int, batch_size: int) -> tuple[torch.Tensor, list[toy_world.Scene]]:
    """Batch `step` of a run: pictures scaled to [-1, 1], (N, 3, 64, 64), and their scenes."""
    rng = random.Random(seed * 1_000_003 + step)
    scenes = [toy_world.sample_scene(rng) for _ in range(batch_size)]
    return pixels_to_tensor(toy_world.render_batch(scenes)), scenes


def pixels_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1], the range the VAE works in."""
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def save_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, ema: dict | None = None
) -> None:
    """Model weights (`model.*`), AdamW moments (`adam.<i>.exp_avg` ...) and the weights' moving average
    (`ema.*`, when kept) in one safetensors file."""
    tensors = {f"model.{name}": value.detach().contiguous() for name, value in model.state_dict().items()}
    tensors.update({f"ema.{name}": value.contiguous() for name, value in (ema or {}).items()})
    adam_steps = {}
    for index, parameter in enumerate(optimizer.param_groups[0]["params"]):
        state = optimizer.state.get(parameter)
        if state:
            tensors[f"adam.{index}.exp_avg"] = state["exp_avg"].contiguous()
            tensors[f"adam.{index}.exp_avg_sq"] = state["exp_avg_sq"].contiguous()
            adam_steps[index] = float(state["step"])
    metadata = {STEP_KEY: str(step), "adam_steps": json.dumps(adam_steps)}
    write_atomically(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: dict | None = None
) -> int:
    """Restore what `save_checkpoint` wrote; returns the step to continue from (0 when there is no file).

    `ema` (name -> tensor) is filled in place from the file's `ema.*`; a checkpoint written without them
    starts the average at its weights."""
    if not path.is_file():
        return 0
    tensors, metadata = read_safetensors(path)
    model.load_state_dict({name.removeprefix("model."): t for name, t in tensors.items() if name.startswith("model.")})
    if ema is not None:
        weights = model.state_dict()
        for name, value in ema.items():
            value.copy_(tensors.get(f"ema.{name}", weights[name]))
    parameters = optimizer.param_groups[0]["params"]
    for index, adam_step in json.loads(metadata["adam_steps"]).items():
        index = int(index)
        optimizer.state[parameters[index]] = {
            "step": torch.tensor(adam_step),
            "exp_avg": tensors[f"adam.{index}.exp_avg"],
            "exp_avg_sq": tensors[f"adam.{index}.exp_avg_sq"],
        }
    return int(metadata[STEP_KEY])


def train_phase(
    name: str,
    checkpoint: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: int,
    loss_at_step,
    checkpoint_every: int = 200,
    log_every: int = 50,
    ema_decay: float | None = None,
) -> int:
    """The loop every phase runs: resume, `loss_at_step(step)` -> backward -> AdamW, checkpoint, log.

    With `ema_decay`, the model ends holding the moving average of its weights instead of the last ones.
    Returns the number of steps this call trained (0 when the checkpoint had finished the phase already).
    """
    import time

    ema = None if ema_decay is None else {k: v.detach().clone() for k, v in model.state_dict().items()}
    start = load_checkpoint(checkpoint, model, optimizer, ema)
    if start >= steps:
        print(f"[{name}] done already ({start} steps, {checkpoint})", flush=True)
        _use_average(model, ema)
        return 0
    if start:
        print(f"[{name}] resuming at step {start} from {checkpoint}", flush=True)
    model.train()
    began, running = time.perf_counter(), 0.0
    for step in range(start, steps):
        loss = loss_at_step(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if ema is not None:
            with torch.no_grad():
                for key, value in model.state_dict().items():
                    if value.is_floating_point():
                        ema[key].lerp_(value, 1.0 - ema_decay)
                    else:
                        ema[key].copy_(value)
        running += loss.item()
        done = step + 1
        if done % log_every == 0 or done == steps:
            seconds = time.perf_counter() - began
            count = log_every if done % log_every == 0 else done % log_every
            print(f"[{name}] step {done}/{steps} loss {running / count:.4f} ({seconds:.0f} s)", flush=True)
            running = 0.0
        if done % checkpoint_every == 0 or done == steps:
            save_checkpoint(checkpoint, model, optimizer, done, ema)
    model.eval()
    _use_average(model, ema)
    return steps - start


def _use_average(model: torch.nn.Module, ema: dict | None) -> None:
    if ema is not None:
        model.load_state_dict(ema)
