"""Checkpoints: `OUTPUT_DIR/checkpoint-N`, written atomically and rotated; resuming from one.

A checkpoint holds accelerate's training state (optimizer, LR schedule, random states) and the adapter only,
as the same loadable `pytorch_tlora_weights.safetensors` file as the final result, never the frozen model.
It is written as `checkpoint-N.tmp` and renamed when complete, and old checkpoints are pruned only afterwards,
so a crash during a save never leaves a broken newest checkpoint.

Runs have an identity: a new run writes `OUTPUT_DIR/training_run.json` (a random id and the optimizer settings),
and every checkpoint carries a copy. So `--resume_from_checkpoint latest` continues this folder's run only, the
rotation prunes this run's checkpoints only, and a resume that would silently keep the checkpoint's optimizer
settings instead of new flags is refused. A new run into a folder holding files is refused unless `--overwrite`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path

from accelerate import Accelerator
from accelerate.logging import get_logger

import pipelines.tlora as tl
from pipelines.tlora.file_format import METADATA_KEY, read_safetensors, write_atomically
from pipelines.tlora.limits import load_json

from .adapter import save_adapter
from .errors import InputError

logger = get_logger(__name__)

CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
PARTIAL_SUFFIX = ".tmp"
RUN_FILE = "training_run.json"
# accelerate's save_state writes the optimizer state here; a resume without it would restart the optimizer
OPTIMIZER_FILE = "optimizer.bin"
# Restored from the checkpoint's optimizer state on resume, so a new value on the command line would be ignored.
RESTORED_SETTINGS = (
    "optimizer", "use_8bit_adam", "learning_rate", "adam_beta1", "adam_beta2", "adam_epsilon", "adam_weight_decay",
    "prodigy_beta3", "prodigy_decouple", "prodigy_use_bias_correction", "prodigy_safeguard_warmup",
)  # fmt: skip


def read_run_record(folder: Path) -> dict | None:
    """The run identity stored in an output folder or a checkpoint; None for folders from before identities."""
    path = folder / RUN_FILE
    if not path.is_file():
        return None
    try:
        record = load_json(path.read_text(encoding="utf-8"), str(path))
    except (OSError, ValueError) as error:
        raise InputError(f"{path} is not readable: {error}") from None
    if not isinstance(record, dict) or not isinstance(record.get("run_id"), str):
        raise InputError(f"{path} is not a training-run record; move it away or use another --output_dir")
    return record


def run_id_of(folder: Path) -> str | None:
    record = read_run_record(folder)
    return None if record is None else record["run_id"]


def write_run_record(folder: Path, record: dict) -> None:
    write_atomically(folder / RUN_FILE, lambda path: path.write_text(json.dumps(record, indent=2), encoding="utf-8"))


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
            if not (candidate / OPTIMIZER_FILE).is_file():
                raise InputError(
                    f"--resume_from_checkpoint {value}: {candidate} has no {OPTIMIZER_FILE} (the optimizer state), "
                    "so the run cannot continue where it stopped; it was copied incompletely"
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
    own = run_id_of(output_dir)
    if own is not None:  # a folder written before run identities has none: all its checkpoints are its own
        others = [path.name for path in checkpoints if run_id_of(path) != own]
        if others:
            logger.warning(f"--resume_from_checkpoint latest: skipping {', '.join(others)}, of another run.")
        checkpoints = [path for path in checkpoints if run_id_of(path) == own]
    if not checkpoints:
        logger.warning(f"--resume_from_checkpoint latest: no checkpoint in {output_dir}; starting a new training run.")
        return None
    return explicit_checkpoint(str(checkpoints[-1]), output_dir)


def plan_run(args, checkpoint: Path | None) -> dict:
    """The identity of the run about to start (see the module docstring): the checkpoint's when resuming, a new
    one otherwise. Refuses what would mix two runs in one folder or silently ignore a flag. Reads only."""
    output_dir = Path(args.output_dir)
    folder_run = run_id_of(output_dir)
    settings = {key: getattr(args, key, None) for key in RESTORED_SETTINGS}
    record = None if checkpoint is None else read_run_record(checkpoint)
    if checkpoint is not None and record is not None:
        changed = [key for key in RESTORED_SETTINGS if key in record and record[key] != settings[key]]
        if changed:
            details = ", ".join(f"--{key} {record[key]!r} in the checkpoint, {settings[key]!r} now" for key in changed)
            raise InputError(
                f"Cannot resume from {checkpoint} with other optimizer settings ({details}): the checkpoint's "
                "optimizer state would keep the old values. Resume with the same settings, or start a new run."
            )
        later = [
            path.name
            for path in complete_checkpoints(output_dir)
            if checkpoint_step(path) > checkpoint_step(checkpoint) and run_id_of(path) == record["run_id"]
        ]
        if later and not args.overwrite:
            raise InputError(
                f"{output_dir} holds later checkpoints of this run ({', '.join(later)}); resuming from "
                f"{checkpoint.name} would replace them. Resume from the newest, or pass --overwrite."
            )
    run = record or {"run_id": uuid.uuid4().hex, **settings}
    leftovers = sorted(path.name for path in output_dir.iterdir()) if output_dir.is_dir() else []
    if leftovers and folder_run != run["run_id"] and not args.overwrite and (checkpoint is None or folder_run):
        continuing = (
            "It holds no checkpoint of its own run to resume from"
            if args.resume_from_checkpoint == "latest"
            else "Continue that run with --resume_from_checkpoint latest"
        )
        raise InputError(
            f"--output_dir {output_dir} already holds files of another training run ({', '.join(leftovers[:4])}"
            f"{', ...' if len(leftovers) > 4 else ''}). {continuing}; replace it with --overwrite, or choose "
            "another --output_dir."
        )
    return run


def start_run(output_dir: Path, run: dict, checkpoint: Path | None, overwrite: bool) -> None:
    """Record the run in its output folder; with --overwrite, remove the checkpoints that are not part of it
    (another run's, or this run's beyond the one resumed from). Main process only."""
    if overwrite:
        start = 0 if checkpoint is None else checkpoint_step(checkpoint)
        for path in complete_checkpoints(output_dir):
            if path != checkpoint and (run_id_of(path) != run["run_id"] or checkpoint_step(path) > start):
                logger.warning(f"--overwrite: removing {path}, which is not part of this run.")
                shutil.rmtree(path)
    write_run_record(output_dir, run)


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
    run = read_run_record(output_dir)
    if run is not None:
        write_run_record(partial, run)
    if final.exists():  # saved before, in a run that was resumed from an earlier checkpoint
        shutil.rmtree(final)
    os.replace(partial, final)
    if total_limit is not None:
        # This run's checkpoints up to this step: never another run's, nor the one just written.
        own = [
            path
            for path in complete_checkpoints(output_dir)
            if checkpoint_step(path) <= step and (run is None or run_id_of(path) == run["run_id"])
        ]
        for old in own[:-total_limit]:
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
