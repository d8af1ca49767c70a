"""Checkpoints: `OUTPUT_DIR/checkpoint-N`, written atomically and rotated; resuming from one.

A checkpoint holds accelerate's training state (optimizer, LR schedule, random states) and the adapter only,
as the same loadable `pytorch_tlora_weights.safetensors` file as the final result, never the frozen model.
It is written as `checkpoint-N.tmp` and renamed when complete, and old checkpoints are pruned only afterwards,
so a crash during a save never leaves a broken newest checkpoint.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from accelerate import Accelerator
from accelerate.logging import get_logger

import pipelines.tlora as tl
from pipelines.tlora.file_format import METADATA_KEY, read_safetensors

from .adapter import save_adapter
from .errors import InputError

logger = get_logger(__name__)

CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
PARTIAL_SUFFIX = ".tmp"


def checkpoint_step(path: Path) -> int | None:
    match = CHECKPOINT_NAME.fullmatch(path.name)
    return int(match.group(1)) if match else None


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """`checkpoint-N` folders, oldest first. Partial saves (`checkpoint-N.tmp`) do not match the name."""
    if not output_dir.is_dir():
        return []
    found = [path for path in output_dir.iterdir() if path.is_dir() and checkpoint_step(path) is not None]
    return sorted(found, key=checkpoint_step)


def explicit_checkpoint(value: str, output_dir: Path) -> Path:
    """--resume_from_checkpoint PATH: a checkpoint folder, as given or inside --output_dir."""
    for candidate in (Path(value), output_dir / value):
        if candidate.is_dir():
            if checkpoint_step(candidate) is None or not (candidate / tl.WEIGHT_NAME).is_file():
                raise InputError(
                    f"--resume_from_checkpoint {value}: {candidate} is not a checkpoint-N folder written by a "
                    "T-LoRA training script"
                )
            return candidate
    raise InputError(f"--resume_from_checkpoint {value} does not exist (nor does {output_dir / value})")


def resume_checkpoint(args) -> Path | None:
    if args.resume_from_checkpoint is None:
        return None
    output_dir = Path(args.output_dir)
    if args.resume_from_checkpoint != "latest":
        return explicit_checkpoint(args.resume_from_checkpoint, output_dir)
    checkpoints = complete_checkpoints(output_dir)
    if not checkpoints:
        logger.warning(f"--resume_from_checkpoint latest: no checkpoint in {output_dir}; starting a new training run.")
        return None
    return checkpoints[-1]


def check_checkpoint_config(checkpoint: Path, config: tl.TLoraConfig) -> None:
    """Refuse to resume with other T-LoRA settings than the checkpoint was trained with."""
    path = checkpoint / tl.WEIGHT_NAME
    try:
        # The header only: the tensors of a full-size adapter are large.
        saved = tl.TLoraConfig.from_json(read_safetensors(path, with_tensors=False)[1][METADATA_KEY]).to_dict()
    except (OSError, ValueError, KeyError) as error:
        raise InputError(f"{path} is not a readable T-LoRA checkpoint: {error!r}") from None
    current = config.to_dict()
    ignored = {"base_model", "num_train_timesteps"}
    if saved.get("model_family") is None:  # written before adapters named their family
        ignored.add("model_family")
    changed = [key for key in current if key not in ignored and saved.get(key) != current[key]]
    if changed:
        details = ", ".join(f"{key}: {saved.get(key)!r} in the checkpoint, {current[key]!r} now" for key in changed)
        raise InputError(f"Cannot resume from {checkpoint} with other T-LoRA settings ({details}).")


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, total_limit: int | None) -> Path:
    """Save the training state to `checkpoint-<step>` (see the module docstring). Main process only."""
    final = output_dir / f"checkpoint-{step}"
    partial = output_dir / f"checkpoint-{step}{PARTIAL_SUFFIX}"
    shutil.rmtree(partial, ignore_errors=True)
    accelerator.save_state(str(partial))
    if final.exists():  # saved before, in a run that was resumed from an earlier checkpoint
        shutil.rmtree(final)
    os.replace(partial, final)
    if total_limit is not None:
        for old in complete_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old)
    logger.info(f"Saved {final}")
    return final


def remove_partial_checkpoints(output_dir: Path) -> None:
    for partial in output_dir.glob(f"checkpoint-*{PARTIAL_SUFFIX}"):
        logger.warning(f"Removing {partial}, an incomplete checkpoint of an interrupted save.")
        shutil.rmtree(partial, ignore_errors=True)


def register_checkpoint_hooks(accelerator: Accelerator, denoiser, config: tl.TLoraConfig) -> None:
    """Make accelerate's `save_state` / `load_state` store the adapter (not the frozen denoiser), as the same
    loadable file as the result."""

    def save_hook(models, weights, output_dir):
        for _ in models:
            weights.pop()
        if accelerator.is_main_process:
            save_adapter(output_dir, accelerator.unwrap_model(denoiser), config)

    def load_hook(models, input_dir):
        models.clear()
        state_dict, _ = tl.read_tlora_file(Path(input_dir) / tl.WEIGHT_NAME)
        tl.set_tlora_state_dict(accelerator.unwrap_model(denoiser), state_dict)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
