"""Sampling during training: validation images and prior-preservation class images.

Both go through the family's stock diffusers pipeline (built around the training denoiser, so the model is in
memory once) and the family script's `generate(pipeline, embeddings, seeds, args, accelerator)`, which returns
one PIL image per seed. Validation loads the adapter's current weights the way users load an adapter, with
`load_tlora_weights`, so what the images show is what the saved file gives.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import numpy as np
from accelerate.logging import get_logger
from PIL import Image
from tqdm.auto import tqdm

import pipelines.tlora as tl
from pipelines.tlora.families import denoiser_of
from pipelines.tlora.file_format import write_atomically

from .data import load_class_records
from .images import image_files
from .seeds import CLASS_IMAGE_STREAM, derived_seed

logger = get_logger(__name__)

VALIDATION_ADAPTER = "validation"


@contextlib.contextmanager
def current_adapter_loaded(pipeline, config: tl.TLoraConfig):
    """Load the training adapter's current weights the way users load an adapter (`load_tlora_weights` with
    a state dict and its config) next to the training adapter, which is switched off meanwhile."""
    denoiser, _ = denoiser_of(pipeline)
    pipeline.load_tlora_weights(
        tl.get_tlora_state_dict(denoiser), tlora_config=config, adapter_name=VALIDATION_ADAPTER
    )
    pipeline.set_tlora_scale(0.0, adapter_name="default")
    try:
        yield
    finally:
        pipeline.set_tlora_scale(1.0, adapter_name="default")
        pipeline.unload_tlora_weights(VALIDATION_ADAPTER)


def run_validation(
    pipeline, validation_embeddings: list[dict], args, accelerator, step: int, seed: int, *, generate
) -> list[list[Path]]:
    """Sample every validation prompt; save under `validation/step-N/` and log to the trackers.

    The same seeds at every step, so images of different steps are comparable; one image at a time, so that
    sampling needs little memory next to training. Returns the paths, per prompt.
    """
    folder = Path(args.output_dir) / "validation" / f"step-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    seeds = [seed + j for j in range(args.num_validation_images)]
    saved = []
    for i, (prompt, embeddings) in enumerate(zip(args.validation_prompt, validation_embeddings, strict=True)):
        images = [generate(pipeline, embeddings, [one], args, accelerator)[0] for one in seeds]
        paths = [folder / f"prompt-{i}_image-{j}.png" for j in range(len(images))]
        for image, path in zip(images, paths, strict=True):
            save_image(image, path)
        log_images(accelerator, f"validation/prompt-{i}", images, step, prompt)
        saved.append(paths)
    logger.info(f"Validation images of step {step} in {folder}")
    return saved


def generate_class_images(pipeline, embeddings: dict, args, accelerator, seed: int, *, generate) -> None:
    """Fill --class_data_dir up to --num_class_images with samples of the base model (split across processes)."""
    folder = Path(args.class_data_dir)
    existing = len(image_files(folder))
    missing = list(range(existing, args.num_class_images))
    if missing:
        logger.info(f"Generating {len(missing)} class images for prior preservation in {folder}.")
        folder.mkdir(parents=True, exist_ok=True)
        mine = missing[accelerator.process_index :: accelerator.num_processes]
        batches = [mine[i : i + args.sample_batch_size] for i in range(0, len(mine), args.sample_batch_size)]
        for indices in tqdm(batches, desc="Class images", disable=not accelerator.is_local_main_process):
            seeds = [derived_seed(seed, CLASS_IMAGE_STREAM, index) for index in indices]
            images = generate(pipeline, embeddings, seeds, args, accelerator)
            for index, image in zip(indices, images, strict=True):
                digest = hashlib.sha1(image.tobytes()).hexdigest()[:12]
                save_image(image, folder / f"{index:05d}-{digest}.jpg")
    accelerator.wait_for_everyone()


def fill_class_images(pipeline, embeddings, class_records: list, args, accelerator, seed: int, *, generate) -> list:
    """The class images for prior preservation: those found, or, when fewer than --num_class_images, those
    after generating the missing ones. Without prior preservation, none."""
    if not args.with_prior_preservation or len(class_records) >= args.num_class_images:
        return class_records
    generate_class_images(pipeline, embeddings, args, accelerator, seed, generate=generate)
    return load_class_records(args)


def save_image(image: Image.Image, path: Path) -> None:
    """Save atomically: the temporary name is hidden, so an image folder never lists a partial file."""
    image_format = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    write_atomically(path, lambda temporary: image.save(temporary, format=image_format, quality=95))


def log_images(accelerator, tag: str, images: list[Image.Image], step: int, caption: str) -> None:
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(tag, np.stack([np.asarray(image) for image in images]), step, dataformats="NHWC")
            tracker.writer.add_text(f"{tag}/prompt", caption, step)
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(image, caption=caption) for image in images]}, step=step)
