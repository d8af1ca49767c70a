#!/usr/bin/env python
"""Train a T-LoRA adapter for Stable Diffusion XL on one concept image (DreamBooth style).

    accelerate launch train_tlora_sdxl.py \\
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
        --instance_data_dir dog.jpg --instance_prompt "a photo of sks dog" \\
        --validation_prompt "a photo of sks dog on the beach" --output_dir tlora-dog

The result, `OUTPUT_DIR/pytorch_tlora_weights.safetensors`, loads into a stock SD-XL pipeline:

    import pipelines.tlora
    pipe.load_tlora_weights("tlora-dog")

The command line, its defaults and the training loop follow diffusers'
`examples/dreambooth/train_dreambooth_lora_sdxl.py`; the defaults of the T-LoRA flags, the learning rate,
the batch size, the resolution and the number of steps follow the T-LoRA paper (arXiv 2507.05964).

Reproducibility: every random draw (data order, crop and flip, VAE latent sample, noise, timesteps) is a
function of `--seed` and of the position in the run, never of a running generator. A run stopped at step
N and resumed from `checkpoint-N` therefore computes exactly what an uninterrupted run computes.

Exit codes: 0 done; 1 Hub repository creation or upload failed (the local output is complete);
2 bad command line or input; 130 stopped by Ctrl-C / SIGTERM (after saving a checkpoint).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import importlib.util
import logging
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, broadcast_object_list, is_wandb_available
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.optimization import get_scheduler
from diffusers.training_utils import compute_snr
from diffusers.utils.import_utils import is_xformers_available
from huggingface_hub import ModelCard, ModelCardData, create_repo, get_token, upload_folder
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

import pipelines.tlora as tl
from scripts.arguments import non_negative_int, positive_int
from pipelines.tlora.file_format import METADATA_KEY, read_safetensors

logger = get_logger(__name__)

WEIGHT_NAME = tl.WEIGHT_NAME
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
PARTIAL_SUFFIX = ".tmp"
UPLOAD_IGNORE_PATTERNS = ["checkpoint-*/**", "checkpoint-*", "*.tmp"]
DATASETS_MISSING = (
    "--dataset_name needs the `datasets` library (pip install datasets); for local images use --instance_data_dir"
)
MODEL_CARD_TAGS = ["text-to-image", "diffusers", "lora", "t-lora", "stable-diffusion-xl", "template:sd-lora"]
TRACKER_NAME = "tlora-sdxl"
VALIDATION_ADAPTER = "validation"
INTERRUPTED_EXIT_CODE = 130

# Stream labels for `derived_seed`, so that the random streams used for different purposes never coincide.
ORDER_STREAM, AUGMENT_STREAM, NOISE_STREAM, INIT_STREAM, CLASS_IMAGE_STREAM = range(5)

HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
TRANSPARENT_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
IMAGE_EXTENSIONS = {ext for ext, kind in Image.registered_extensions().items() if kind in Image.OPEN}


class InputError(ValueError):
    """A bad training input (image, folder, checkpoint), reported before any training work."""


class HubError(RuntimeError):
    """Creating the Hub repository or uploading to it failed."""


# --------------------------------------------------------------------------- command line


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train a T-LoRA adapter for Stable Diffusion XL on one concept image (DreamBooth style).",
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        required=True,
        help="SD-XL base model: a Hub model id or a local `save_pretrained` folder.",
    )
    model.add_argument(
        "--pretrained_vae_model_name_or_path",
        type=str,
        default=None,
        help="A VAE to use instead of the model's own (e.g. one that is stable in fp16).",
    )
    model.add_argument("--revision", type=str, default=None, help="Revision of the base model on the Hub.")
    model.add_argument("--variant", type=str, default=None, help="Variant of the model files, e.g. fp16.")

    data = parser.add_argument_group("data")
    data.add_argument(
        "--instance_data_dir",
        type=str,
        default=None,
        help="A folder of concept images, or a single image file.",
    )
    data.add_argument(
        "--instance_prompt", type=str, required=True, help='Prompt naming the concept, e.g. "a photo of sks dog".'
    )
    data.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="Instead of --instance_data_dir: a dataset loaded with the `datasets` library (train split).",
    )
    data.add_argument(
        "--dataset_config_name", type=str, default=None, help="Config of --dataset_name, if it has several."
    )
    data.add_argument("--image_column", type=str, default="image", help="Image column of --dataset_name.")
    data.add_argument(
        "--caption_column",
        type=str,
        default=None,
        help="Caption column of --dataset_name; without it every image uses --instance_prompt.",
    )
    data.add_argument("--cache_dir", type=str, default=None, help="Where downloaded datasets are stored.")
    data.add_argument(
        "--resolution",
        type=positive_int,
        default=1024,
        help="Training resolution in pixels (divisible by 8): images are resized and cropped to a square of this size.",
    )
    data.add_argument(
        "--center_crop",
        action="store_true",
        help="Crop the centre of each resized image; without it the crop position is random.",
    )
    data.add_argument("--random_flip", action="store_true", help="Flip images horizontally at random.")
    data.add_argument(
        "--repeats", type=positive_int, default=1, help="How many times each instance image appears per pass."
    )

    prior = parser.add_argument_group("prior preservation")
    prior.add_argument("--with_prior_preservation", action="store_true", help="Add the prior-preservation loss.")
    prior.add_argument(
        "--class_data_dir",
        type=str,
        default=None,
        help="Folder of class images; missing ones (up to --num_class_images) are generated with the base model.",
    )
    prior.add_argument(
        "--class_prompt", type=str, default=None, help='Prompt of the class images, e.g. "a photo of a dog".'
    )
    prior.add_argument(
        "--num_class_images", type=positive_int, default=100, help="Number of class images to train with."
    )
    prior.add_argument("--prior_loss_weight", type=float, default=1.0, help="Weight of the prior-preservation loss.")
    prior.add_argument(
        "--sample_batch_size", type=positive_int, default=4, help="Batch size for generating class images."
    )

    validation = parser.add_argument_group("validation and sampling")
    validation.add_argument(
        "--validation_prompt",
        type=str,
        nargs="+",
        action="extend",
        default=None,
        help="One or more prompts to sample during training (quote each; the flag may be repeated).",
    )
    validation.add_argument(
        "--num_validation_images", type=non_negative_int, default=4, help="Images per validation prompt."
    )
    validation.add_argument(
        "--validation_steps", type=positive_int, default=100, help="Run validation every X steps (and at the end)."
    )
    validation.add_argument(
        "--num_inference_steps",
        type=positive_int,
        default=25,
        help="Denoising steps for validation and class images (the paper samples with 25).",
    )
    validation.add_argument(
        "--guidance_scale", type=float, default=5.0, help="Classifier-free guidance for validation and class images."
    )

    tlora = parser.add_argument_group("T-LoRA")
    tlora.add_argument("--rank", type=positive_int, default=64, help="Maximum rank R (the rank at timestep 0).")
    tlora.add_argument(
        "--min_rank",
        type=positive_int,
        default=None,
        help="Rank at the highest noise level (default rank // 2). Equal to --rank: unmasked LoRA / Ortho-LoRA.",
    )
    tlora.add_argument("--rank_schedule_exponent", type=float, default=1.0, help="Exponent of the rank schedule.")
    tlora.add_argument(
        "--tlora_variant",
        choices=["ortho", "vanilla"],
        default="ortho",
        help="ortho: T-LoRA with orthogonal factors (the paper's method); vanilla: plain LoRA factors, masked.",
    )
    tlora.add_argument(
        "--ortho_init",
        choices=["last", "principal", "middle"],
        default="last",
        help="Which singular vectors initialise the ortho factors (ortho only).",
    )
    tlora.add_argument(
        "--ortho_init_source",
        choices=["random", "weight"],
        default="random",
        help="SVD of a random matrix or of the layer's own weight (ortho only).",
    )
    tlora.add_argument(
        "--lora_alpha", type=float, default=None, help="Scale the update by lora_alpha / rank (default: scale 1)."
    )
    tlora.add_argument(
        "--target_modules",
        type=str,
        nargs="+",
        default=list(tl.DEFAULT_TARGET_MODULES),
        help="UNet linear layers that get an adapter (names or dotted suffixes).",
    )

    optimization = parser.add_argument_group("schedule and optimizer")
    optimization.add_argument("--train_batch_size", type=positive_int, default=1, help="Batch size per device.")
    optimization.add_argument("--max_train_steps", type=positive_int, default=800, help="Number of optimizer steps.")
    optimization.add_argument(
        "--gradient_accumulation_steps", type=positive_int, default=1, help="Batches per optimizer step."
    )
    optimization.add_argument("--learning_rate", type=float, default=1e-4, help="Learning rate (after warmup).")
    optimization.add_argument(
        "--lr_scheduler",
        type=str,
        default="constant",
        choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
        help="Learning-rate schedule.",
    )
    optimization.add_argument(
        "--lr_warmup_steps", type=non_negative_int, default=0, help="Warmup steps of the schedule."
    )
    optimization.add_argument(
        "--lr_num_cycles", type=positive_int, default=1, help="Restarts of cosine_with_restarts."
    )
    optimization.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial schedule.")
    optimization.add_argument(
        "--snr_gamma", type=float, default=None, help="Min-SNR loss weighting gamma (5.0 is common); off by default."
    )
    optimization.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
    optimization.add_argument(
        "--optimizer", type=str.lower, choices=["adamw", "prodigy"], default="adamw", help="Optimizer."
    )
    optimization.add_argument("--use_8bit_adam", action="store_true", help="8-bit AdamW from bitsandbytes.")
    optimization.add_argument("--adam_beta1", type=float, default=0.9, help="Adam / Prodigy beta1.")
    optimization.add_argument("--adam_beta2", type=float, default=0.999, help="Adam / Prodigy beta2.")
    optimization.add_argument("--adam_epsilon", type=float, default=1e-08, help="Adam / Prodigy epsilon.")
    optimization.add_argument("--adam_weight_decay", type=float, default=1e-04, help="Weight decay.")

    checkpoints = parser.add_argument_group("checkpoints")
    checkpoints.add_argument(
        "--checkpointing_steps",
        type=positive_int,
        default=500,
        help="Save a resumable checkpoint-N folder every X steps.",
    )
    checkpoints.add_argument(
        "--checkpoints_total_limit", type=positive_int, default=None, help="Keep at most this many checkpoints."
    )
    checkpoints.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help='Resume from a checkpoint-N folder, or "latest" for the newest one in --output_dir (none: start fresh).',
    )

    hub = parser.add_argument_group("Hub and logging")
    hub.add_argument(
        "--output_dir", type=str, default="tlora-dreambooth-model", help="Folder for the adapter, checkpoints and logs."
    )
    hub.add_argument("--logging_dir", type=str, default="logs", help="Log folder, relative to --output_dir.")
    hub.add_argument(
        "--report_to", choices=["tensorboard", "wandb", "none"], default="tensorboard", help="Where to log."
    )
    hub.add_argument("--push_to_hub", action="store_true", help="Upload the result (without checkpoints) to the Hub.")
    hub.add_argument(
        "--hub_model_id", type=str, default=None, help="Hub repository (default: the name of --output_dir)."
    )
    hub.add_argument("--hub_token", type=str, default=None, help="Hub token (default: the one from `hf auth login`).")

    system = parser.add_argument_group("system")
    system.add_argument(
        "--mixed_precision",
        choices=["no", "fp16", "bf16"],
        default=None,
        help="Mixed precision (default: the accelerate config). The adapter always trains in fp32.",
    )
    system.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for memory in the UNet.")
    system.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere and newer GPUs.")
    system.add_argument(
        "--enable_xformers_memory_efficient_attention", action="store_true", help="Use xformers attention."
    )
    system.add_argument("--seed", type=non_negative_int, default=None, help="Seed for a reproducible run.")
    system.add_argument(
        "--dataloader_num_workers", type=non_negative_int, default=0, help="Data loading subprocesses."
    )
    system.add_argument(
        "--cache_latents",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Encode each image with the VAE once, not every step (default: when crop and flip are not random).",
    )
    return parser


def parse_args(input_args=None) -> argparse.Namespace:
    parser = _build_parser()
    args = parser.parse_args(input_args)
    _check_args(parser, args)
    return args


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject bad combinations now, before any model is loaded; each message names the flag."""
    fail = parser.error
    if (args.instance_data_dir is None) == (args.dataset_name is None):
        fail("give exactly one of --instance_data_dir and --dataset_name")
    if args.instance_data_dir is not None:
        try:
            instance_image_files(Path(args.instance_data_dir))
        except InputError as error:
            fail(str(error))
    if args.dataset_name is not None and importlib.util.find_spec("datasets") is None:
        fail(DATASETS_MISSING)
    if args.resolution % 8:
        fail(f"--resolution must be divisible by 8 (the VAE downsamples 8x), got {args.resolution}")
    if args.min_rank is None:
        args.min_rank = max(1, args.rank // 2)
    if args.min_rank > args.rank:
        fail(f"--min_rank ({args.min_rank}) must not exceed --rank ({args.rank})")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        fail(f"--output_dir {args.output_dir} is a file, not a folder")
    if args.with_prior_preservation:
        if args.class_prompt is None:
            fail("--with_prior_preservation needs --class_prompt")
        if args.class_data_dir is None:
            fail("--with_prior_preservation needs --class_data_dir (it may be empty: class images are then generated)")
        if Path(args.class_data_dir).exists() and not Path(args.class_data_dir).is_dir():
            fail(f"--class_data_dir {args.class_data_dir} is a file, not a folder")
    elif args.class_data_dir is not None or args.class_prompt is not None:
        warnings.warn(
            "--class_data_dir and --class_prompt are ignored without --with_prior_preservation.", stacklevel=2
        )
    if args.validation_prompt and args.num_validation_images == 0:
        fail("--validation_prompt is set but --num_validation_images is 0")
    if args.use_8bit_adam:
        if args.optimizer != "adamw":
            fail("--use_8bit_adam works with --optimizer adamw only")
        if importlib.util.find_spec("bitsandbytes") is None:
            fail("--use_8bit_adam needs bitsandbytes (pip install bitsandbytes)")
    if args.optimizer == "prodigy" and importlib.util.find_spec("prodigyopt") is None:
        fail("--optimizer prodigy needs prodigyopt (pip install prodigyopt)")
    if args.enable_xformers_memory_efficient_attention and not is_xformers_available():
        fail("--enable_xformers_memory_efficient_attention needs xformers, which is not installed")
    if args.report_to == "wandb":
        if not is_wandb_available():
            fail("--report_to wandb needs wandb (pip install wandb)")
        if args.hub_token is not None:
            fail(
                "--hub_token cannot be combined with --report_to wandb (the token would be logged); use `hf auth login`"
            )
    if args.push_to_hub and not (args.hub_token or get_token()):
        fail("--push_to_hub needs a Hub token: pass --hub_token or log in with `hf auth login`")
    if args.resume_from_checkpoint not in (None, "latest"):
        try:
            explicit_checkpoint(args.resume_from_checkpoint, Path(args.output_dir))
        except InputError as error:
            fail(str(error))


# --------------------------------------------------------------------------- images


def instance_image_files(path: Path) -> list[Path]:
    """The image files named by --instance_data_dir: the file itself, or the images in the folder."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise InputError(f"--instance_data_dir {path} does not exist")
    files = image_files(path)
    if not files:
        raise InputError(f"--instance_data_dir {path} holds no image files")
    return files


def image_files(folder: Path) -> list[Path]:
    """Image files in a folder, by name; hidden files (including our own temporary files) are skipped."""
    if not folder.is_dir():
        return []
    return sorted(
        path
        for path in folder.iterdir()
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS
    )


def open_image(source: Path | Image.Image, name: str) -> Image.Image:
    """An RGB image with its EXIF orientation applied; anything unreadable is an `InputError` naming it."""
    try:
        if isinstance(source, Image.Image):
            image = ImageOps.exif_transpose(source)
        else:
            with Image.open(source) as opened:
                opened.load()
                image = ImageOps.exif_transpose(opened)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise InputError(f"{name} is not a readable image: {error}") from None
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in HIGH_BIT_DEPTH_MODES:
        # Pillow's own conversion clips 16-bit values to 255 (a white image); scale them down instead.
        values = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in TRANSPARENT_MODES:
        # Transparent pixels carry arbitrary colours; show them on white as most viewers do.
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def resize_shorter_side(image: Image.Image, resolution: int, name: str) -> Image.Image:
    width, height = image.size
    if min(width, height) < resolution:
        logger.warning(
            f"{name} is {width}x{height} px, smaller than --resolution {resolution}: it is upscaled, which softens "
            "what the adapter learns. Use a larger image or a smaller --resolution."
        )
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    return image if size == image.size else image.resize(size, Image.Resampling.LANCZOS)


@dataclass
class ImageRecord:
    """One training image, decoded and resized once; it is cropped and flipped per sample."""

    name: str
    image: Image.Image  # RGB, shorter side == resolution
    original_size: tuple[int, int]  # (height, width) before resizing: SD-XL's size conditioning
    prompt: str


def make_record(source: Path | Image.Image, name: str, resolution: int, prompt: str) -> ImageRecord:
    image = open_image(source, name)
    return ImageRecord(name, resize_shorter_side(image, resolution, name), (image.height, image.width), prompt)


def load_instance_records(args) -> list[ImageRecord]:
    if args.dataset_name is None:
        return [
            make_record(path, str(path), args.resolution, args.instance_prompt)
            for path in instance_image_files(Path(args.instance_data_dir))
        ]
    try:
        from datasets import load_dataset
    except ImportError:
        raise InputError(DATASETS_MISSING) from None
    rows = load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir)["train"]
    if len(rows) == 0:
        raise InputError(f"--dataset_name {args.dataset_name} has no images in its train split")
    for flag, column in (("--image_column", args.image_column), ("--caption_column", args.caption_column)):
        if column is not None and column not in rows.column_names:
            raise InputError(
                f"{flag} {column!r} is not a column of {args.dataset_name}: {', '.join(rows.column_names)}"
            )
    captions = rows[args.caption_column] if args.caption_column else [None] * len(rows)
    return [
        make_record(image, f"{args.dataset_name} row {i}", args.resolution, caption or args.instance_prompt)
        for i, (image, caption) in enumerate(zip(rows[args.image_column], captions, strict=True))
    ]


def load_class_records(args, limit: int) -> list[ImageRecord]:
    files = image_files(Path(args.class_data_dir))[:limit]
    return [make_record(path, str(path), args.resolution, args.class_prompt) for path in files]


# --------------------------------------------------------------------------- data


def derived_seed(seed: int, *keys: int) -> int:
    """A 64-bit seed for one random stream, a pure function of the run's seed and the stream's keys."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1, np.uint64)[0])


class DreamBoothDataset(Dataset):
    """Instance images (and class images for prior preservation), cropped and flipped per sample.

    Items are keyed by `(index, stream position)`: the position seeds the sample's crop and flip, so the
    augmentation does not depend on which process or worker loads it, nor on where a run was resumed.
    An item is a list of examples: the instance example, then the class example with prior preservation.
    """

    def __init__(self, instance_records, class_records, prompts, args, seed: int):
        self.records = list(instance_records) + list(class_records)
        prompt_ids = {prompt: i for i, prompt in enumerate(prompts)}
        self.prompt_ids = [prompt_ids[record.prompt] for record in self.records]
        self.instance_ids = [i for i in range(len(instance_records)) for _ in range(args.repeats)]
        self.class_ids = list(range(len(instance_records), len(self.records)))
        self.resolution = args.resolution
        self.center_crop = args.center_crop
        self.random_flip = args.random_flip
        self.seed = seed
        self.with_pixels = True

    def __len__(self) -> int:
        return max(len(self.instance_ids), len(self.class_ids))

    @property
    def random_augmentation(self) -> bool:
        """Whether some sample gets a random crop or flip, so its latents cannot be computed once."""
        if self.random_flip:
            return True
        square = (self.resolution, self.resolution)
        return not self.center_crop and any(record.image.size != square for record in self.records)

    def __getitem__(self, key):
        index, position = key
        rng = np.random.default_rng(derived_seed(self.seed, AUGMENT_STREAM, position))
        examples = [self.example(self.instance_ids[index % len(self.instance_ids)], rng)]
        if self.class_ids:
            examples.append(self.example(self.class_ids[index % len(self.class_ids)], rng))
        return examples

    def example(self, image_id: int, rng: np.random.Generator) -> dict:
        record = self.records[image_id]
        width, height = record.image.size
        size = self.resolution
        flip = self.random_flip and rng.random() < 0.5
        if self.center_crop:
            top, left = round((height - size) / 2), round((width - size) / 2)
        else:
            top, left = int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))
        # SD-XL is conditioned on how much was cut off at the top left of the image it sees; after a flip
        # that is what was cut off at the right of the unflipped image.
        shown_left = width - left - size if flip else left
        example = {
            "image_id": image_id,
            "prompt_id": self.prompt_ids[image_id],
            "time_ids": (*record.original_size, top, shown_left, size, size),
        }
        if self.with_pixels:
            image = record.image.crop((left, top, left + size, top + size))
            if flip:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            pixels = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
            example["pixel_values"] = np.ascontiguousarray(pixels.transpose(2, 0, 1))
        return example


def collate_examples(items: list[list[dict]]) -> dict:
    # Instance examples first, then class examples: the loss splits the batch in these two halves.
    examples = [item[0] for item in items] + [example for item in items for example in item[1:]]
    batch = {
        "image_ids": torch.tensor([e["image_id"] for e in examples]),
        "prompt_ids": torch.tensor([e["prompt_id"] for e in examples]),
        "time_ids": torch.tensor([e["time_ids"] for e in examples], dtype=torch.float32),
    }
    if "pixel_values" in examples[0]:
        batch["pixel_values"] = torch.from_numpy(np.stack([e["pixel_values"] for e in examples]))
    return batch


class ShuffledStreamSampler(Sampler):
    """Yields `(dataset index, stream position)` for `length` positions: back-to-back passes over the
    dataset, each pass in its own order. Like everything random here, the order is a function of the seed
    and the position, so one pass through a data loader covers the whole run and resuming is exact."""

    def __init__(self, dataset_size: int, length: int, seed: int):
        self.dataset_size = dataset_size
        self.length = length
        self.seed = seed

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        for start in range(0, self.length, self.dataset_size):
            order = np.random.default_rng(derived_seed(self.seed, ORDER_STREAM, start // self.dataset_size))
            for offset, index in enumerate(order.permutation(self.dataset_size)[: self.length - start]):
                yield int(index), start + offset


# --------------------------------------------------------------------------- latents and loss


def normalize_latents(latents: torch.Tensor, vae) -> torch.Tensor:
    """VAE latents -> the UNet's latent space (and `denormalize_latents` back)."""
    mean, std = _latent_statistics(latents, vae)
    return (latents - mean) * vae.config.scaling_factor / std


def denormalize_latents(latents: torch.Tensor, vae) -> torch.Tensor:
    mean, std = _latent_statistics(latents, vae)
    return latents * std / vae.config.scaling_factor + mean


def _latent_statistics(latents: torch.Tensor, vae):
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is None or std is None:
        return 0.0, 1.0
    shape = (1, -1, 1, 1)
    return torch.tensor(mean).view(shape).to(latents), torch.tensor(std).view(shape).to(latents)


@torch.no_grad()
def encode_moments(vae, pixel_values: torch.Tensor) -> torch.Tensor:
    """Mean and log-variance of the VAE's latent distribution, (B, 2C, h, w)."""
    return vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist.parameters


def sample_latents(moments: torch.Tensor, vae, generator: torch.Generator) -> torch.Tensor:
    return normalize_latents(DiagonalGaussianDistribution(moments).sample(generator=generator), vae)


def diffusion_loss(
    unet,
    noise_scheduler,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    conditioning: dict,
    num_instance: int,
    snr_gamma: float | None = None,
    prior_loss_weight: float = 1.0,
) -> torch.Tensor:
    """Denoising loss of one batch; `timesteps` holds one timestep per sample (so one rank mask per sample).

    `conditioning`: `encoder_hidden_states`, `text_embeds` and `time_ids`, one row per sample. The first
    `num_instance` samples are instance images, the rest class images (weighted by `prior_loss_weight`).
    """
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    model_pred = unet(
        noisy_latents,
        timesteps,
        encoder_hidden_states=conditioning["encoder_hidden_states"],
        added_cond_kwargs={"text_embeds": conditioning["text_embeds"], "time_ids": conditioning["time_ids"]},
        return_dict=False,
    )[0]
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"Unsupported prediction type {prediction_type!r}; expected epsilon or v_prediction.")
    per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    instance, prior = per_sample[:num_instance], per_sample[num_instance:]
    if snr_gamma is not None:
        # Min-SNR weighting (arXiv 2303.09556), on the instance loss as diffusers does.
        snr = compute_snr(noise_scheduler, timesteps[:num_instance])
        weights = torch.clamp(snr, max=snr_gamma) / snr
        instance = instance * (weights + 1 if prediction_type == "v_prediction" else weights)
    loss = instance.mean()
    if prior.numel():
        loss = loss + prior_loss_weight * prior.mean()
    return loss


# --------------------------------------------------------------------------- adapter and checkpoints


def tlora_config_from_args(args, num_train_timesteps: int = 1000) -> tl.TLoraConfig:
    ortho = args.tlora_variant == "ortho"
    return tl.TLoraConfig(
        rank=args.rank,
        min_rank=args.min_rank,
        variant=args.tlora_variant,
        schedule_exponent=args.rank_schedule_exponent,
        num_train_timesteps=num_train_timesteps,
        lora_alpha=args.lora_alpha,
        init=f"{args.ortho_init_source}-{args.ortho_init}" if ortho else "normal",
        target_modules=list(args.target_modules),
        base_model=args.pretrained_model_name_or_path,
    )


def method_name(config: tl.TLoraConfig) -> str:
    """The paper's name for the trained variant."""
    if config.is_masked:
        return "T-LoRA" if config.variant == "ortho" else "Vanilla T-LoRA"
    return "Ortho-LoRA" if config.variant == "ortho" else "LoRA"


@torch.no_grad()
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
            if checkpoint_step(candidate) is None or not (candidate / WEIGHT_NAME).is_file():
                raise InputError(
                    f"--resume_from_checkpoint {value}: {candidate} is not a checkpoint-N folder written by this script"
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
    path = checkpoint / WEIGHT_NAME
    try:
        # The header only: the tensors of a full-size adapter are large.
        saved = tl.TLoraConfig.from_json(read_safetensors(path, with_tensors=False)[1][METADATA_KEY]).to_dict()
    except (OSError, ValueError, KeyError) as error:
        raise InputError(f"{path} is not a readable T-LoRA checkpoint: {error!r}") from None
    current = config.to_dict()
    ignored = ("base_model", "num_train_timesteps")
    changed = [key for key in current if key not in ignored and saved.get(key) != current[key]]
    if changed:
        details = ", ".join(f"{key}: {saved.get(key)!r} in the checkpoint, {current[key]!r} now" for key in changed)
        raise InputError(f"Cannot resume from {checkpoint} with other T-LoRA settings ({details}).")


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, total_limit: int | None) -> Path:
    """Save the training state to `checkpoint-<step>`, written under a temporary name and renamed when
    complete, so a crash during the save never leaves a broken newest checkpoint. Main process only."""
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


def register_checkpoint_hooks(accelerator: Accelerator, unet, config: tl.TLoraConfig) -> None:
    """Checkpoints hold the adapter only (not the frozen UNet), as the same loadable file as the result."""

    def save_adapter(models, weights, output_dir):
        for _ in models:
            weights.pop()
        if accelerator.is_main_process:
            tl.save_tlora_weights(output_dir, tl.get_tlora_state_dict(accelerator.unwrap_model(unet)), config)

    def load_adapter(models, input_dir):
        models.clear()
        state_dict, _ = tl.read_tlora_file(Path(input_dir) / WEIGHT_NAME)
        tl.set_tlora_state_dict(accelerator.unwrap_model(unet), state_dict)

    accelerator.register_save_state_pre_hook(save_adapter)
    accelerator.register_load_state_pre_hook(load_adapter)


# --------------------------------------------------------------------------- sampling


def encode_for_sampling(pipeline, prompt: str, device) -> dict:
    """Prompt and negative-prompt embeddings, as keyword arguments of the pipeline call."""
    embeds, negative, pooled, negative_pooled = pipeline.encode_prompt(
        prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True
    )
    return {
        "prompt_embeds": embeds,
        "negative_prompt_embeds": negative,
        "pooled_prompt_embeds": pooled,
        "negative_pooled_prompt_embeds": negative_pooled,
    }


def sampling_pipeline(pipeline: StableDiffusionXLPipeline, unet) -> StableDiffusionXLPipeline:
    """A stock SD-XL pipeline around the training components, without text encoders: prompts are encoded
    once at the start, so the text encoders need not stay in memory."""
    sampler = StableDiffusionXLPipeline(
        vae=pipeline.vae,
        text_encoder=None,
        text_encoder_2=None,
        tokenizer=None,
        tokenizer_2=None,
        unet=unet,
        scheduler=pipeline.scheduler,
        force_zeros_for_empty_prompt=pipeline.config.force_zeros_for_empty_prompt,
        add_watermarker=False,
    )
    sampler.set_progress_bar_config(disable=True)
    return sampler


@torch.no_grad()
def generate_images(pipeline, embeddings: dict, seeds: list[int], args, accelerator) -> list[Image.Image]:
    """Sample one image per seed. The pipeline stops at latents, which are decoded in fp32: the SD-XL VAE
    overflows in fp16, and the UNet may run in mixed precision."""
    count = len(seeds)
    batch = {key: value.repeat_interleave(count, dim=0) for key, value in embeddings.items()}
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    with accelerator.autocast():
        latents = pipeline(
            **batch,
            height=args.resolution,
            width=args.resolution,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
            generator=generators,
            output_type="latent",
        ).images
    vae = pipeline.vae
    decoded = vae.decode(denormalize_latents(latents.to(vae.device, vae.dtype), vae), return_dict=False)[0]
    return pipeline.image_processor.postprocess(decoded.float(), output_type="pil")


def generate_class_images(pipeline, embeddings: dict, args, accelerator, seed: int) -> None:
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
            for index, image in zip(
                indices, generate_images(pipeline, embeddings, seeds, args, accelerator), strict=True
            ):
                digest = hashlib.sha1(image.tobytes()).hexdigest()[:12]
                save_image_atomically(image, folder / f"{index:05d}-{digest}.jpg")
    accelerator.wait_for_everyone()


def save_image_atomically(image: Image.Image, path: Path) -> None:
    partial = path.with_name(f".{path.name}{PARTIAL_SUFFIX}")
    image.save(partial, format="JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG", quality=95)
    os.replace(partial, path)


@contextlib.contextmanager
def current_adapter_loaded(pipeline, config: tl.TLoraConfig):
    """Load the training adapter's current weights the way users load an adapter (`load_tlora_weights` with
    a state dict and its config) next to the training adapter, which is switched off meanwhile."""
    pipeline.load_tlora_weights(
        tl.get_tlora_state_dict(pipeline.unet), tlora_config=config, adapter_name=VALIDATION_ADAPTER
    )
    pipeline.set_tlora_scale(0.0, adapter_name="default")
    try:
        yield
    finally:
        pipeline.set_tlora_scale(1.0, adapter_name="default")
        pipeline.unload_tlora_weights(VALIDATION_ADAPTER)


def run_validation(
    pipeline, validation_embeddings: list[dict], args, accelerator, step: int, seed: int
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
        images = [generate_images(pipeline, embeddings, [one], args, accelerator)[0] for one in seeds]
        paths = [folder / f"prompt-{i}_image-{j}.png" for j in range(len(images))]
        for image, path in zip(images, paths, strict=True):
            image.save(path)
        log_images(accelerator, f"validation/prompt-{i}", images, step, prompt)
        saved.append(paths)
    logger.info(f"Validation images of step {step} in {folder}")
    return saved


def log_images(accelerator, tag: str, images: list[Image.Image], step: int, caption: str) -> None:
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(tag, np.stack([np.asarray(image) for image in images]), step, dataformats="NHWC")
            tracker.writer.add_text(f"{tag}/prompt", caption, step)
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(image, caption=caption) for image in images]}, step=step)


# --------------------------------------------------------------------------- model card and Hub


def _is_hub_id(name: str) -> bool:
    return not Path(name).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None


def write_model_card(
    args, config: tl.TLoraConfig, validation_paths: list[list[Path]], repo_id: str | None, steps: int
) -> Path:
    output_dir = Path(args.output_dir)
    base = args.pretrained_model_name_or_path
    images = [
        (prompt, path)
        for prompt, paths in zip(args.validation_prompt or [], validation_paths, strict=True)
        for path in paths
    ]
    widget = [{"text": prompt, "output": {"url": path.relative_to(output_dir).as_posix()}} for prompt, path in images]
    # The Hub rejects a `base_model` that is not a Hub id, so a local base model is named in the text only.
    card_data = ModelCardData(
        license="openrail++",
        base_model=base if _is_hub_id(base) else None,
        tags=MODEL_CARD_TAGS,
        instance_prompt=args.instance_prompt,
        widget=widget or None,
    )
    adapter_location = repo_id or str(output_dir.resolve())
    batch = f"{args.train_batch_size} per device x {args.gradient_accumulation_steps} accumulation"
    prior = f'yes: "{args.class_prompt}", weight {args.prior_loss_weight}' if args.with_prior_preservation else "no"
    gallery = "\n".join(f"![{prompt}]({path.relative_to(output_dir).as_posix()})" for prompt, path in images)
    body = f"""
# {method_name(config)} adapter for Stable Diffusion XL: `{args.instance_prompt}`

A {method_name(config)} adapter for `{base}`, trained on one concept with DreamBooth-style fine-tuning.
T-LoRA ([Soboleva et al., 2025](https://arxiv.org/abs/2507.05964)) trains fewer rank components at high
diffusion timesteps, where fine-tuning on a single image overfits most, and keeps its components orthogonal.

## Trigger prompt

Use `{args.instance_prompt}` in your prompt.

## Usage

The adapter is a T-LoRA file (`{WEIGHT_NAME}`), not a standard LoRA: load it with the `pipelines.tlora`
package of the project that trained it, which adds `load_tlora_weights` to diffusers' SD-XL pipelines.

```python
import torch
from diffusers import StableDiffusionXLPipeline

import pipelines.tlora  # adds load_tlora_weights to the SD-XL pipelines

pipe = StableDiffusionXLPipeline.from_pretrained({base!r}, torch_dtype=torch.float16).to("cuda")
pipe.load_tlora_weights({adapter_location!r})
image = pipe({args.instance_prompt!r}, num_inference_steps=25, guidance_scale=5.0).images[0]
```

## Training settings

| setting | value |
|---|---|
| method | {method_name(config)} (variant `{config.variant}`) |
| rank / min rank | {config.rank} / {config.min_rank} |
| rank schedule exponent | {config.schedule_exponent} |
| initialisation | {config.init} |
| lora_alpha | {config.lora_alpha if config.lora_alpha is not None else "none (scale 1)"} |
| target modules | {", ".join(config.target_modules)} |
| steps | {steps} |
| optimizer, learning rate | {args.optimizer}, {args.learning_rate} ({args.lr_scheduler}) |
| batch size | {batch} |
| resolution | {args.resolution} |
| prior preservation | {prior} |
| seed | {args.seed} |

## Validation images

{gallery or "No validation prompt was given."}
"""
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")
    path = output_dir / "README.md"
    partial = output_dir / f".README.md{PARTIAL_SUFFIX}"
    card.save(partial)
    os.replace(partial, path)
    return path


def create_hub_repo(args) -> str:
    name = args.hub_model_id or Path(args.output_dir).resolve().name
    try:
        return create_repo(repo_id=name, exist_ok=True, token=args.hub_token).repo_id
    except Exception as error:  # network, authentication or naming problems all end the run the same way
        raise HubError(f"Could not create the Hub repository {name!r}: {error}") from error


def push_to_hub(args, repo_id: str) -> None:
    try:
        upload_folder(
            repo_id=repo_id,
            folder_path=args.output_dir,
            commit_message="End of training",
            ignore_patterns=UPLOAD_IGNORE_PATTERNS,
            token=args.hub_token,
        )
    except Exception as error:
        raise HubError(
            f"Upload to the Hub repository {repo_id} failed: {error}. The trained adapter is complete in "
            f"{args.output_dir}; upload it later with: hf upload {repo_id} {args.output_dir} --exclude 'checkpoint-*'"
        ) from error
    logger.info(f"Uploaded {args.output_dir} to https://huggingface.co/{repo_id}")


# --------------------------------------------------------------------------- stopping


class StopRequest:
    """Turns the first Ctrl-C (SIGINT) or SIGTERM into a request to stop after the current step, so that a
    consistent checkpoint can be saved; a second Ctrl-C interrupts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nStopping after this step and saving a checkpoint (Ctrl-C again to abort now).", file=sys.stderr)

    def agreed(self, accelerator: Accelerator) -> bool:
        """Whether any process was asked to stop: all processes must stop at the same step."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


# --------------------------------------------------------------------------- main


def _setup_logging(accelerator: Accelerator) -> None:
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_warning()
    else:
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    for library in (transformers, diffusers):
        library.utils.logging.disable_progress_bar()


def _shared_seed(seed: int | None, accelerator: Accelerator) -> int:
    """--seed, or one drawn at random and shared by all processes (they must agree on the data order)."""
    if seed is not None:
        return seed
    drawn = [random.SystemRandom().randrange(2**32)]
    broadcast_object_list(drawn)
    logger.info(f"No --seed given: using {drawn[0]} (pass --seed {drawn[0]} to repeat this run).")
    return drawn[0]


def _tracker_config(args) -> dict:
    # TensorBoard hyperparameters must be scalars; the token must never be logged.
    return {
        key: value if isinstance(value, (int, float, str, bool)) else str(value)
        for key, value in vars(args).items()
        if key != "hub_token"
    }


def _load_base_pipeline(args, device, weight_dtype) -> StableDiffusionXLPipeline:
    extra = {}
    if args.pretrained_vae_model_name_or_path is not None:
        extra["vae"] = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path)
    pipeline = StableDiffusionXLPipeline.from_pretrained(
        args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant, **extra
    )
    # The frozen models run in the mixed-precision dtype, except the VAE: the SD-XL VAE overflows in fp16.
    cast = {} if weight_dtype == torch.float32 else {"dtype": weight_dtype}
    for component in (pipeline.unet, pipeline.text_encoder, pipeline.text_encoder_2, pipeline.vae):
        component.requires_grad_(False)
        component.to(device, **(cast if component is not pipeline.vae else {}))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@dataclass
class Models:
    """The frozen models and everything computed once from the text encoders, which are released after."""

    pipeline: StableDiffusionXLPipeline  # a stock pipeline around `unet`, for validation and class images
    unet: torch.nn.Module
    vae: AutoencoderKL
    noise_scheduler: DDPMScheduler
    prompts: list[str]  # the training prompts; row i of the embeddings below belongs to prompt i
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    validation_embeddings: list[dict]
    class_embeddings: dict | None


def load_models(args, accelerator: Accelerator, prompts: list[str], weight_dtype) -> Models:
    device = accelerator.device
    base = _load_base_pipeline(args, device, weight_dtype)
    prompt_embeds, _, pooled_prompt_embeds, _ = base.encode_prompt(
        prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    validation_embeddings = [encode_for_sampling(base, prompt, device) for prompt in args.validation_prompt or []]
    class_embeddings = encode_for_sampling(base, args.class_prompt, device) if args.with_prior_preservation else None
    pipeline = sampling_pipeline(base, base.unet)
    del base  # the last reference to the text encoders
    gc.collect()
    return Models(
        pipeline=pipeline,
        unet=pipeline.unet,
        vae=pipeline.vae,
        noise_scheduler=DDPMScheduler.from_config(pipeline.scheduler.config),
        prompts=prompts,
        prompt_embeds=prompt_embeds.to(weight_dtype),
        pooled_prompt_embeds=pooled_prompt_embeds.to(weight_dtype),
        validation_embeddings=validation_embeddings,
        class_embeddings=class_embeddings,
    )


def attach_adapter(args, unet, num_train_timesteps: int, seed: int) -> tuple[tl.TLoraConfig, list[torch.nn.Parameter]]:
    """Attach the T-LoRA adapter to the frozen UNet; returns its config and its trainable parameters."""
    config = tlora_config_from_args(args, num_train_timesteps)
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    adapters = tl.inject_tlora(unet, config, generator=torch.Generator().manual_seed(derived_seed(seed, INIT_STREAM)))
    for adapter in adapters.values():
        adapter.to(torch.float32)  # the adapter trains in fp32 even when the frozen UNet is in fp16/bf16
    return config, [param for param in unet.parameters() if param.requires_grad]


def latent_cache(args, dataset: DreamBoothDataset, vae) -> torch.Tensor | None:
    """The VAE moments of every image, encoded once, when no sample needs a fresh crop or flip."""
    cache = args.cache_latents is not False and not dataset.random_augmentation
    if args.cache_latents and not cache:
        logger.warning("--cache_latents is ignored: random crops or flips need fresh latents every step.")
    if not cache:
        return None
    static = np.random.default_rng(0)  # the example API takes a generator; a static crop draws nothing from it
    pixels = [torch.from_numpy(dataset.example(i, static)["pixel_values"])[None] for i in range(len(dataset.records))]
    dataset.with_pixels = False
    return torch.cat([encode_moments(vae, image) for image in pixels])


def make_dataloader(args, dataset: DreamBoothDataset, num_processes: int, seed: int) -> DataLoader:
    """One pass over this loader is the whole run (see `ShuffledStreamSampler`)."""
    samples = args.max_train_steps * args.gradient_accumulation_steps * args.train_batch_size * num_processes
    return DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        sampler=ShuffledStreamSampler(len(dataset), samples, seed),
        collate_fn=collate_examples,
        num_workers=args.dataloader_num_workers,
    )


def make_optimizer(args, params):
    if args.optimizer == "prodigy":
        import prodigyopt

        if args.learning_rate <= 0.1:
            logger.warning("Prodigy usually works best with --learning_rate around 1.0.")
        optimizer_class = prodigyopt.Prodigy
    elif args.use_8bit_adam:
        import bitsandbytes

        optimizer_class = bitsandbytes.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(
        params,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )


def make_lr_scheduler(args, optimizer, num_processes: int):
    # The prepared scheduler steps once per process at every optimizer step, as in diffusers' scripts.
    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * num_processes,
        num_training_steps=args.max_train_steps * num_processes,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )


def batch_loss(unet, batch: dict, models: Models, moments_cache, generator: torch.Generator, args) -> torch.Tensor:
    """The loss of one batch; every random draw comes from `generator`, seeded for this batch by the caller."""
    vae, dtype = models.vae, models.prompt_embeds.dtype
    moments = (
        moments_cache[batch["image_ids"]] if moments_cache is not None else encode_moments(vae, batch["pixel_values"])
    )
    latents = sample_latents(moments, vae, generator).to(dtype)
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=dtype)
    num_train_timesteps = models.noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, num_train_timesteps, (len(latents),), generator=generator, device=latents.device)
    ids = batch["prompt_ids"]
    conditioning = {
        "encoder_hidden_states": models.prompt_embeds[ids],
        "text_embeds": models.pooled_prompt_embeds[ids],
        "time_ids": batch["time_ids"].to(dtype),
    }
    num_instance = len(latents) // 2 if args.with_prior_preservation else len(latents)
    return diffusion_loss(
        unet, models.noise_scheduler, latents, noise, timesteps, conditioning, num_instance,
        args.snr_gamma, args.prior_loss_weight,
    )  # fmt: skip


def finish(args, accelerator, unet, models: Models, config, repo_id, step: int, seed: int) -> dict[str, Path]:
    """Save the adapter, sample it from the saved file, write the model card. Main process only."""
    output_dir = Path(args.output_dir)
    unet = accelerator.unwrap_model(unet)
    written = {"Adapter": tl.save_tlora_weights(output_dir, tl.get_tlora_state_dict(unet), config)}
    validation_paths = []
    if args.validation_prompt:
        # The final images come from the saved file, loaded the way users load it.
        tl.remove_tlora(unet)
        models.pipeline.load_tlora_weights(str(output_dir))
        validation_paths = run_validation(models.pipeline, models.validation_embeddings, args, accelerator, step, seed)
        written["Validation images"] = output_dir / "validation"
    written["Model card"] = write_model_card(args, config, validation_paths, repo_id, step)
    return written


def main(args) -> None:
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
    )
    _setup_logging(accelerator)
    logger.info(accelerator.state, main_process_only=False)
    seed = _shared_seed(args.seed, accelerator)

    # Everything the user gave is checked before any model is loaded.
    checkpoint = resume_checkpoint(args)
    if checkpoint is not None:
        check_checkpoint_config(checkpoint, tlora_config_from_args(args))
    instance_records = load_instance_records(args)
    class_records = load_class_records(args, args.num_class_images) if args.with_prior_preservation else []
    repo_id = None
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        remove_partial_checkpoints(output_dir)
        if args.push_to_hub:
            repo_id = create_hub_repo(args)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    prompts = list(dict.fromkeys(record.prompt for record in instance_records))
    prompts += [args.class_prompt] if args.with_prior_preservation else []
    models = load_models(args, accelerator, prompts, weight_dtype)
    if args.with_prior_preservation and len(class_records) < args.num_class_images:
        generate_class_images(models.pipeline, models.class_embeddings, args, accelerator, seed)
        class_records = load_class_records(args, args.num_class_images)
    config, params = attach_adapter(args, models.unet, models.noise_scheduler.config.num_train_timesteps, seed)
    register_checkpoint_hooks(accelerator, models.unet, config)

    dataset = DreamBoothDataset(instance_records, class_records, prompts, args, seed)
    moments_cache = latent_cache(args, dataset, models.vae)
    optimizer = make_optimizer(args, params)
    unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        models.unet, optimizer, make_dataloader(args, dataset, accelerator.num_processes, seed),
        make_lr_scheduler(args, optimizer, accelerator.num_processes),
    )  # fmt: skip

    global_step = 0
    if checkpoint is not None:
        logger.info(f"Resuming from {checkpoint}")
        accelerator.load_state(str(checkpoint))
        global_step = checkpoint_step(checkpoint)
    micro_step = global_step * args.gradient_accumulation_steps
    batches = accelerator.skip_first_batches(train_dataloader, micro_step) if micro_step else train_dataloader
    if accelerator.is_main_process:
        accelerator.init_trackers(TRACKER_NAME, config=_tracker_config(args))
    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"Training {method_name(config)} (rank {config.rank}, min rank {config.min_rank}) on {len(instance_records)} "
        f"instance and {len(class_records)} class images: {args.max_train_steps} steps of {total_batch} samples, "
        f"latents {'cached' if moments_cache is not None else 'encoded every step'}, seed {seed}."
    )

    progress = tqdm(
        range(args.max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    noise_generator = torch.Generator(accelerator.device)
    step_loss = torch.zeros((), device=accelerator.device)
    first_step, started, last_checkpoint, stopped = global_step, time.perf_counter(), checkpoint, False
    with StopRequest() as stop:
        for batch in batches:
            with accelerator.accumulate(unet):
                noise_generator.manual_seed(derived_seed(seed, NOISE_STREAM, accelerator.process_index, micro_step))
                loss = batch_loss(unet, batch, models, moments_cache, noise_generator, args)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
                step_loss += loss.detach() / args.gradient_accumulation_steps
            micro_step += 1
            if not accelerator.sync_gradients:
                continue

            global_step += 1
            logs = {"loss": step_loss.item(), "lr": lr_scheduler.get_last_lr()[0]}
            step_loss.zero_()
            progress.update(1)
            progress.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
            accelerator.log(logs, step=global_step)
            if accelerator.is_main_process and global_step % args.checkpointing_steps == 0:
                last_checkpoint = save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)
            validate = args.validation_prompt and global_step % args.validation_steps == 0
            if accelerator.is_main_process and validate and global_step < args.max_train_steps:
                with current_adapter_loaded(models.pipeline, config):
                    run_validation(models.pipeline, models.validation_embeddings, args, accelerator, global_step, seed)
            if global_step < args.max_train_steps and stop.agreed(accelerator):
                stopped = True
                break
    progress.close()
    elapsed = time.perf_counter() - started

    if stopped:
        saved = last_checkpoint is not None and checkpoint_step(last_checkpoint) == global_step
        if accelerator.is_main_process and not saved:
            last_checkpoint = save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)
        accelerator.end_training()
        accelerator.print(
            f"Stopped at step {global_step}; saved {last_checkpoint}. Continue with the same command and "
            "--resume_from_checkpoint latest."
        )
        raise SystemExit(INTERRUPTED_EXIT_CODE)

    accelerator.wait_for_everyone()
    written = (
        finish(args, accelerator, unet, models, config, repo_id, global_step, seed)
        if accelerator.is_main_process
        else {}
    )
    accelerator.end_training()
    if accelerator.is_main_process:
        if repo_id is not None:
            push_to_hub(args, repo_id)
            written["Hub"] = f"https://huggingface.co/{repo_id}"
        steps = global_step - first_step
        pace = f"{elapsed / steps:.2f} s/step" if steps else "no steps run"
        where = " ".join(f"{name}: {path}." for name, path in written.items())
        accelerator.print(
            f"Trained steps {first_step + 1}-{global_step} ({steps} steps) in {elapsed:.1f} s, {pace}. {where}"
        )


def cli() -> None:
    args = parse_args()
    try:
        main(args)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except HubError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    cli()
