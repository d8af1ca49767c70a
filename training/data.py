"""Training images and the order they are seen in.

Images are decoded and resized once (`ImageRecord`); each sample crops and flips its image with a generator
seeded by its position in the run (`DreamBoothDataset`), and `ShuffledStreamSampler` makes one pass through a
data loader cover the whole run, each pass over the images in its own seeded order. Resuming at step N is
therefore `skip_first_batches`, and the samples do not depend on which process or worker loads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate.logging import get_logger
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from .errors import InputError
from .images import image_files, open_image
from .seeds import AUGMENT_STREAM, ORDER_STREAM, derived_seed

logger = get_logger(__name__)

MAX_ASPECT_RATIO = 16
DATASETS_MISSING = (
    "--dataset_name needs the `datasets` library (pip install datasets); for local images use --instance_data_dir"
)


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


def check_shape(size: tuple[int, int], name: str) -> None:
    width, height = size
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        # Resized whole, a 60000x2 image would become 30 million pixels wide; training sees one square of it.
        raise InputError(
            f"{name} is {width}x{height} px, more than {MAX_ASPECT_RATIO} times wider than high (or higher than "
            "wide); crop it to the part that shows the concept."
        )


def make_record(source: Path | Image.Image, name: str, resolution: int, prompt: str) -> ImageRecord:
    if isinstance(source, Path):
        try:
            with Image.open(source) as header:  # lazy: reads the size, decodes nothing
                check_shape(header.size, name)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            pass  # named by `open_image` below, with the reason
    image = open_image(source, name)
    check_shape(image.size, name)
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


def load_class_records(args) -> list[ImageRecord]:
    files = image_files(Path(args.class_data_dir))[: args.num_class_images]
    return [make_record(path, str(path), args.resolution, args.class_prompt) for path in files]


def training_prompts(instance_records: list[ImageRecord], args) -> list[str]:
    """Every prompt the run trains with, each once: the rows of the prompt embeddings a script computes."""
    prompts = list(dict.fromkeys(record.prompt for record in instance_records))
    return prompts + ([args.class_prompt] if args.with_prior_preservation else [])


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
        # that is what was cut off at the right of the unflipped image. Families without size conditioning
        # ignore `time_ids`.
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
