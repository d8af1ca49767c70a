"""The frame of a training run around the loop a script writes out: the accelerator and logging, one seed for
all processes, every user input checked before any model loads, resuming, and the closing upload and summary.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, broadcast_object_list

import pipelines.tlora as tl

from .adapter import method_name, save_adapter
from .card_assets import LOSS_HISTORY, LossHistory, write_card_extras
from .checkpoints import (
    check_checkpoint_config,
    checkpoint_step,
    plan_run,
    remove_partial_checkpoints,
    resume_checkpoint,
    start_run,
)
from .data import ImageRecord, load_class_records, load_instance_records
from .hub import create_hub_repo, push_to_hub
from .model_card import CardFacts, write_model_card
from .validation import run_validation

logger = get_logger(__name__)


def make_accelerator(args) -> Accelerator:
    """The accelerator, logging set up for it, and the torch settings the flags ask for."""
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        # the loss history feeds the model card's loss curve, whatever --report_to says
        log_with=[LossHistory(output_dir / args.logging_dir / LOSS_HISTORY)]
        + ([] if args.report_to == "none" else [args.report_to]),
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    verbosity = logging.WARNING if accelerator.is_local_main_process else logging.ERROR
    for library in (transformers, diffusers):
        library.utils.logging.set_verbosity(verbosity)
        library.utils.logging.disable_progress_bar()
    logger.info(accelerator.state, main_process_only=False)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator


def mixed_precision_dtype(accelerator: Accelerator) -> torch.dtype:
    """The dtype of the frozen models: the mixed-precision one (the adapter trains in fp32 regardless)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def shared_seed(seed: int | None, accelerator: Accelerator) -> int:
    """--seed, or one drawn at random and shared by all processes (they must agree on the data order)."""
    if seed is not None:
        return seed
    drawn = [random.SystemRandom().randrange(2**32)]
    broadcast_object_list(drawn)
    logger.info(f"No --seed given: using {drawn[0]} (pass --seed {drawn[0]} to repeat this run).")
    return drawn[0]


@dataclass
class RunInputs:
    """Everything the user gave, read and checked."""

    checkpoint: Path | None  # to resume from
    instance_records: list[ImageRecord]
    class_records: list[ImageRecord]  # the class images there already are; missing ones are generated later
    repo_id: str | None  # the Hub repository, created up front


def check_inputs(args, accelerator: Accelerator, config: tl.TLoraConfig) -> RunInputs:
    """Read and check every input before any model is loaded: a bad image, checkpoint or Hub name costs
    seconds, not a model load. Creates the output folder and the Hub repository."""
    checkpoint = resume_checkpoint(args)
    if checkpoint is not None:
        check_checkpoint_config(checkpoint, config)
    run = plan_run(args, checkpoint)
    instance_records = load_instance_records(args)
    class_records = load_class_records(args) if args.with_prior_preservation else []
    repo_id = None
    accelerator.wait_for_everyone()  # every process has read the folder before the main one writes to it
    if accelerator.is_main_process:
        output_dir = Path(args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        remove_partial_checkpoints(output_dir)
        start_run(output_dir, run, checkpoint, args.overwrite)
        if args.push_to_hub:
            repo_id = create_hub_repo(args)
    return RunInputs(checkpoint, instance_records, class_records, repo_id)


def start_tracking(accelerator: Accelerator, args, tracker_name: str) -> None:
    if accelerator.is_main_process:
        # TensorBoard hyperparameters must be scalars; the token must never be logged.
        config = {
            key: value if isinstance(value, (int, float, str, bool)) else str(value)
            for key, value in vars(args).items()
            if key != "hub_token"
        }
        accelerator.init_trackers(tracker_name, config=config)


def log_run_start(accelerator: Accelerator, args, config: tl.TLoraConfig, images: tuple[int, int], cached: bool,
                  seed: int, details: str = "") -> None:  # fmt: skip
    """One line on what is about to be trained: the method, the images (instance, class), the batch, the seed."""
    batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"Training {method_name(config)} (rank {config.rank}, min rank {config.min_rank}) on {images[0]} instance "
        f"and {images[1]} class images: {args.max_train_steps} steps of {batch} samples, {details}"
        f"latents {'cached' if cached else 'encoded every step'}, seed {seed}."
    )


def resume(accelerator: Accelerator, checkpoint: Path | None, dataloader, args):
    """Restore the training state of `checkpoint` (if any); returns the step reached and the batches still to
    come (the data loader covers the whole run, see `training.data`)."""
    if checkpoint is None:
        return 0, dataloader
    logger.info(f"Resuming from {checkpoint}")
    accelerator.load_state(str(checkpoint))
    step = checkpoint_step(checkpoint)
    return step, accelerator.skip_first_batches(dataloader, step * args.gradient_accumulation_steps)


def finish_training(
    args,
    accelerator: Accelerator,
    denoiser,
    config: tl.TLoraConfig,
    inputs: RunInputs,
    *,
    pipeline,
    validation_embeddings: list[dict],
    generate,
    card: CardFacts,
    card_settings: dict[str, str] | None = None,
    steps: tuple[int, int],
    seed: int,
    elapsed: float,
) -> None:
    """After the last step: save the adapter, sample the validation prompts from the saved file, write the model
    card (main process), upload (if asked) and print one line on what was trained and where it is.
    `steps` is (first step, last step) of this run; `generate` is the family's sampler (see `validation`)."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        output_dir = Path(args.output_dir)
        denoiser = accelerator.unwrap_model(denoiser)
        written = {"Adapter": save_adapter(output_dir, denoiser, config)}
        validation_paths = []
        if args.validation_prompt:
            # The final images come from the saved file, loaded the way users load it.
            tl.remove_tlora(denoiser)
            pipeline.load_tlora_weights(str(output_dir))
            validation_paths = run_validation(
                pipeline, validation_embeddings, args, accelerator, steps[1], seed, generate=generate
            )
            written["Validation images"] = output_dir / "validation"
        extras = write_card_extras(
            args, config, pipeline, validation_embeddings, validation_paths, accelerator, seed, generate=generate
        )
        written["Model card"] = write_model_card(
            args, config, card, validation_paths, inputs.repo_id, steps[1], card_settings, extras=extras
        )
    accelerator.end_training()
    if accelerator.is_main_process:
        if inputs.repo_id is not None:
            push_to_hub(args, inputs.repo_id)
            written["Hub"] = f"https://huggingface.co/{inputs.repo_id}"
        first, last = steps
        count = last - first
        pace = f"{elapsed / count:.2f} s/step" if count else "no steps run"
        where = " ".join(f"{name}: {path}." for name, path in written.items())
        accelerator.print(f"Trained steps {first + 1}-{last} ({count} steps) in {elapsed:.1f} s, {pace}. {where}")
