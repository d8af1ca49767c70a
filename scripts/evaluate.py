#!/usr/bin/env python
"""Measure concept fidelity and text alignment of adapters on one concept, side by side (SD-XL, FLUX.1, ...).

For every adapter (T-LoRA, standard LoRA, or the base model itself) the script generates the paper's
evaluation images with the same seeds, scores them and writes:

    OUTPUT_DIR/metrics.json                  all scores, counts and settings
    OUTPUT_DIR/metrics.md                    one table row per adapter
    OUTPUT_DIR/<adapter>/contact_sheet.png   real images, then one row of generated images per prompt
    OUTPUT_DIR/<adapter>/<NN-prompt-slug>/<i>.png   the generated images (kept; reruns skip them)
    OUTPUT_DIR/<adapter>/generation.json     the settings the images were generated with

Metrics (higher is better; cosine similarities in [-1, 1]):
    IS       CLIP image embeddings: mean cosine similarity over all pairs of (image generated for the base
             prompt "a photo of {concept}", real image); real-image backgrounds greyed out with --masks.
    DINO-IS  the same with the CLS token of a DINO ViT.
    TS       CLIP text-image cosine similarity of each prompt image with its prompt, the concept phrase
             replaced by the class word ("a red sks dog" is scored against "a red dog"); mean over images.
             TS_contextual and TS_complex restrict it to the contextual and the complex prompts.

The base model's family (see `pipelines/tlora/families.py`) comes from its `model_index.json`: the pipeline class
diffusers builds from it is the one that generates. Sampling settings not given default to the family's usual ones:
the T-LoRA authors' 25 steps, guidance 5.0 for SD-XL and 28 steps, guidance 3.5 (the guidance embedding) for
FLUX.1-dev, at 1024 px.

Example:

    python scripts/evaluate.py --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
        --adapter tlora=outputs/dog-tlora --adapter lora=outputs/dog-lora --adapter none \
        --real_images data/dog --concept "sks dog" --prompts live --output_dir outputs/eval-dog
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import re
import sys
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as `python scripts/evaluate.py`
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import pipelines.tlora as tl  # noqa: E402  (also gives the supported pipelines load_tlora_weights)
from pipelines.tlora.convert import refuse_both_layouts  # noqa: E402
from pipelines.tlora.file_format import METADATA_KEY, read_safetensors, write_atomically  # noqa: E402
from pipelines.tlora.limits import load_json, quote  # noqa: E402
from scripts.arguments import finite_float, output_folder, path_text, positive_int  # noqa: E402
from scripts.eval_metrics import (  # noqa: E402
    MASK_FILL,
    ClipEmbedder,
    DinoEmbedder,
    apply_mask,
    image_similarity,
    text_similarity,
)
from training.errors import InputError  # noqa: E402
from training.images import image_files, open_image  # noqa: E402

PAPER_PROMPTS = Path(__file__).resolve().parent / "data" / "paper_prompts.json"
PLACEHOLDER = "{}"
DEFAULT_BASE_PROMPT = "a photo of {}"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default standard-LoRA file name
BASE_MODEL = "none"  # --adapter value that evaluates the base model without an adapter
LOADED_ADAPTER = "evaluated"  # adapter name inside the pipeline; one adapter is loaded at a time
ADAPTER_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
SHEET_THUMBNAIL = 128
SHEET_MIN_WIDTH = 320
SETTINGS_FILE = "generation.json"
METRIC_KEYS = ("IS", "DINO_IS", "TS", "TS_contextual", "TS_complex")
METRIC_HEADERS = ("IS", "DINO-IS", "TS", "TS contextual", "TS complex")


# (steps, guidance, resolution) per model family when the user gives none: the T-LoRA authors' sampling for SD-XL
# and FLUX.1-dev, the diffusers pipelines' defaults for SD 1.x and SD3.
SAMPLING_DEFAULTS = {"sdxl": (25, 5.0, 1024), "flux": (28, 3.5, 1024), "sd": (50, 7.5, 512), "sd3": (28, 7.0, 1024)}
# FLUX packs 2x2 patches of the VAE's 8x-downsampled latents into one token
RESOLUTION_MULTIPLE = {"flux": 16}


class EvaluationError(Exception):
    """A problem with the user's inputs, reported as `error: ...` without a traceback."""


# --------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class PromptSet:
    name: str
    source: Path
    base: str
    contextual: tuple[str, ...]
    complex: tuple[str, ...]


@dataclass(frozen=True)
class EvalPrompt:
    """One prompt template to generate `num_images` images for; `group` is base, contextual or complex."""

    template: str
    group: str
    folder: str
    num_images: int


def read_json(path: Path, what: str):
    """A JSON file of this script's inputs or outputs, size and nesting bounded; `EvaluationError` naming it."""
    try:
        return load_json(path.read_text(encoding="utf-8"), f"{what} {path}")
    except (OSError, UnicodeDecodeError) as error:
        raise EvaluationError(f"cannot read {what} {path}: {error}") from None
    except ValueError as error:
        raise EvaluationError(str(error)) from None


def write_json(path: Path, data) -> None:
    try:
        text = json.dumps(data, indent=2, allow_nan=False)  # a bare NaN is not JSON: other readers reject it
    except ValueError:
        raise EvaluationError(f"{path}: a value to write is NaN or infinite; nothing was written") from None
    write_text(path, text + "\n")


def _check_template(template, where: str) -> None:
    if not isinstance(template, str) or template.count(PLACEHOLDER) != 1:
        raise EvaluationError(f"{where}: {quote(template)} must be a string with exactly one '{{}}' for the concept")


def _prompt_lists(data: dict) -> dict[str, list]:
    return {key: value for key, value in data.items() if isinstance(value, list)}


def read_prompt_file(path: Path, list_name: str | None) -> PromptSet:
    """Read `{"base_prompt": ..., "num_complex": N, "<list name>": [templates], ...}`.

    The last `num_complex` templates of a list (default 0) are the complex prompts, the rest contextual.
    """
    data = read_json(path, "the prompt file")
    lists = _prompt_lists(data) if isinstance(data, dict) else {}
    if not lists:
        raise EvaluationError(f"{path} holds no prompt list (expected a JSON object with lists of prompts)")
    if list_name is None:
        if len(lists) > 1:
            raise EvaluationError(
                f"{path} holds several prompt lists ({', '.join(map(quote, lists))}); pick one with --prompt_list"
            )
        list_name = next(iter(lists))
    if list_name not in lists:
        raise EvaluationError(f"{path} has no prompt list {quote(list_name)}; it has: {', '.join(map(quote, lists))}")
    templates = lists[list_name]
    if not templates:
        raise EvaluationError(f"{path}: the prompt list {list_name!r} is empty")
    for template in templates:
        _check_template(template, f"{path}, list {list_name!r}")
    if len(set(templates)) != len(templates):
        raise EvaluationError(f"{path}: the prompt list {list_name!r} repeats a prompt")
    base = data.get("base_prompt", DEFAULT_BASE_PROMPT)
    _check_template(base, f"{path}, base_prompt")
    num_complex = data.get("num_complex", 0)
    if not isinstance(num_complex, int) or isinstance(num_complex, bool) or not 0 <= num_complex <= len(templates):
        raise EvaluationError(
            f"{path}: num_complex must be an integer from 0 to {len(templates)}, got {quote(num_complex)}"
        )
    split = len(templates) - num_complex
    return PromptSet(list_name, path, base, tuple(templates[:split]), tuple(templates[split:]))


def paper_prompt_lists() -> list[str]:
    return list(_prompt_lists(json.loads(PAPER_PROMPTS.read_text(encoding="utf-8"))))


def load_prompt_set(spec: str, list_name: str | None) -> PromptSet:
    """`spec` is a list of the paper's prompt file (live, object) or the path of a prompt file."""
    path = Path(spec).expanduser()
    if path.is_file():
        return read_prompt_file(path, list_name)
    paper_lists = paper_prompt_lists()
    if spec in paper_lists:
        if list_name is not None:
            raise EvaluationError(f"--prompt_list picks a list of a prompt file; --prompts {spec} is a list already")
        return read_prompt_file(PAPER_PROMPTS, spec)
    raise EvaluationError(
        f"unknown prompt set {spec!r}: use {', '.join(paper_lists)} or the path of a JSON prompt file"
    )


def slugify(text: str, max_length: int = 48) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    if len(slug) > max_length:  # cut at a word boundary when there is one
        slug = slug[: max_length + 1].rsplit("-", 1)[0] if "-" in slug[:max_length] else slug[:max_length]
    return slug


def plan_prompts(
    prompts: PromptSet, images_per_prompt: int, base_prompt_images: int, max_prompts: int | None
) -> list[EvalPrompt]:
    """The base prompt, then the contextual and complex prompts (at most `max_prompts` of each group).

    Folders are numbered by the prompt's place in its file (base prompt 00), so they do not move when
    `max_prompts` changes.
    """

    def folder(index: int, template: str) -> str:
        return f"{index:02d}-{slugify(template.replace(PLACEHOLDER, 'concept'))}"

    plan = [EvalPrompt(prompts.base, "base", folder(0, prompts.base), base_prompt_images)]
    index = 0
    for group, templates in (("contextual", prompts.contextual), ("complex", prompts.complex)):
        for position, template in enumerate(templates):
            index += 1
            if max_prompts is None or position < max_prompts:
                plan.append(EvalPrompt(template, group, folder(index, template), images_per_prompt))
    return plan


def fill_in(template: str, phrase: str) -> str:
    return template.replace(PLACEHOLDER, phrase)


# --------------------------------------------------------------------------- real images and masks


def find_real_images(specs: list[str]) -> list[Path]:
    files: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = image_files(path)
            if not found:
                raise EvaluationError(f"--real_images: no image files in {path}")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise EvaluationError(f"--real_images: {path} does not exist")
    return files


def open_rgb(path: Path, what: str) -> Image.Image:
    """The image as the trainer sees it (EXIF orientation applied: a phone photo is not scored rotated)."""
    try:
        return open_image(path, f"{what}: {path}")
    except InputError as error:
        raise EvaluationError(str(error)) from None


def load_real_images(specs: list[str], masks: str | None) -> list[tuple[Path, Image.Image]]:
    """The real images, backgrounds greyed out when a mask folder is given (mask = same file stem)."""
    images = [(path, open_rgb(path, "--real_images")) for path in find_real_images(specs)]
    if masks is None:
        return images
    mask_dir = Path(masks)
    if not mask_dir.is_dir():
        raise EvaluationError(f"--masks: {mask_dir} is not a folder")
    masks_by_stem = {p.stem: p for p in image_files(mask_dir)}
    masked = []
    for path, image in images:
        if path.stem not in masks_by_stem:
            raise EvaluationError(
                f"--masks: no mask for {path.name} in {mask_dir} (expected {path.stem}.png or similar)"
            )
        mask_path = masks_by_stem[path.stem]
        try:
            masked.append((path, apply_mask(image, open_rgb(mask_path, "--masks"))))
        except ValueError as error:
            raise EvaluationError(f"--masks: {mask_path}: {error}") from None
    return masked


# --------------------------------------------------------------------------- adapters


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    kind: str  # "base", "tlora" or "lora"
    path: Path | None  # the weight file; None for the base model
    tlora_config: dict | None = None


def find_weight_file(path: Path) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        try:
            refuse_both_layouts(path)
        except ValueError as error:
            raise EvaluationError(f"--adapter: {error}") from None
        for name in (tl.WEIGHT_NAME, LORA_WEIGHT_NAME):
            if (path / name).is_file():
                return path / name
        candidates = sorted(path.glob("*.safetensors"))
        if len(candidates) == 1:
            return candidates[0]
        raise EvaluationError(
            f"--adapter: {path} holds {len(candidates) or 'no'} .safetensors files and no {tl.WEIGHT_NAME} or "
            f"{LORA_WEIGHT_NAME}; pass the weight file itself"
        )
    raise EvaluationError(f"--adapter: {path} does not exist")


def read_adapter_kind(path: Path) -> tuple[str, dict | None]:
    """("tlora", its config) for files with `tlora_config` metadata, ("lora", None) for any other safetensors."""
    try:
        _, metadata = read_safetensors(path, with_tensors=False)
        if METADATA_KEY not in metadata:
            return "lora", None
        return "tlora", tl.TLoraConfig.from_json(metadata[METADATA_KEY]).to_dict()
    except (OSError, ValueError) as error:
        raise EvaluationError(f"--adapter: {path} is not a usable safetensors adapter: {error}") from None


def parse_adapter(value: str) -> AdapterSpec:
    """`PATH`, `NAME=PATH`, `none` or `NAME=none` (a path containing '=' is taken whole if it exists)."""
    name, source = None, value
    if "=" in value and not Path(value).expanduser().exists():
        name, source = value.split("=", 1)
        if not ADAPTER_NAME_PATTERN.fullmatch(name):
            raise EvaluationError(
                f"--adapter {value}: the name {name!r} may use letters, digits, '.', '_' and '-' only "
                "(it names the output folder)"
            )
    if not source.strip():  # never read as the current folder
        raise EvaluationError(f"--adapter {value!r}: no path given (an unset shell variable?)")
    if source.lower() == BASE_MODEL:
        return AdapterSpec(name or "base", "base", None)
    weight_file = find_weight_file(Path(source).expanduser())
    if name is None:
        standard_name = weight_file.name in (tl.WEIGHT_NAME, LORA_WEIGHT_NAME)
        name = slugify(weight_file.parent.name if standard_name else weight_file.stem) or "adapter"
    kind, config = read_adapter_kind(weight_file)
    return AdapterSpec(name, kind, weight_file, config)


def parse_adapters(values: list[str]) -> list[AdapterSpec]:
    adapters = [parse_adapter(value) for value in values]
    names = [adapter.name for adapter in adapters]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise EvaluationError(f"--adapter: several adapters are named {', '.join(repeated)}; name them with NAME=PATH")
    return adapters


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def quiet_diffusers():
    """Silence diffusers' own logging while probing an adapter: its errors reach the user as one message."""
    diffusers_logger = logging.getLogger("diffusers")
    level = diffusers_logger.level
    diffusers_logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        diffusers_logger.setLevel(level)


def load_adapter(pipe, adapter: AdapterSpec) -> None:
    if adapter.kind == "tlora":
        pipe.load_tlora_weights(adapter.path, adapter_name=LOADED_ADAPTER)
    elif adapter.kind == "lora":
        pipe.load_lora_weights(str(adapter.path), adapter_name=LOADED_ADAPTER)


def unload_adapter(pipe, adapter: AdapterSpec) -> None:
    if adapter.kind == "tlora":
        pipe.unload_tlora_weights()
    elif adapter.kind == "lora":
        pipe.unload_lora_weights()


def _first_lines(error: Exception, count: int = 3) -> str:
    lines = str(error).strip().splitlines() or [type(error).__name__]
    more = f" [... {len(lines) - count} more lines]" if len(lines) > count else ""
    return " ".join(line.strip() for line in lines[:count]) + more


def check_adapters_load(pipe, adapters: list[AdapterSpec], base_model: str) -> None:
    """Load and unload every adapter once, so a file made for another model stops the run before any
    image is generated."""
    for adapter in adapters:
        try:
            with quiet_diffusers():
                load_adapter(pipe, adapter)
        except (ValueError, RuntimeError, OSError, KeyError) as error:
            raise EvaluationError(
                f"adapter {adapter.name!r} ({adapter.path}) cannot be loaded into {base_model}: {_first_lines(error)}"
            ) from None
        unload_adapter(pipe, adapter)


# --------------------------------------------------------------------------- output files


def write_text(path: Path, text: str) -> None:
    write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def save_png(image: Image.Image, path: Path) -> None:
    write_atomically(path, lambda temporary: image.save(temporary, format="PNG"))


def is_readable_png(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.load()
            return image.format == "PNG"
    except (OSError, UnidentifiedImageError, SyntaxError):
        return False


# --------------------------------------------------------------------------- generation


def image_seed(seed: int, template: str, index: int) -> int:
    """Seed of image `index` of a prompt: the same for every adapter, so rows of the table are comparable,
    and independent of the prompt's position in its file."""
    digest = hashlib.sha256(f"{seed}\0{template}\0{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: a valid torch seed


def image_path(adapter_dir: Path, prompt: EvalPrompt, index: int) -> Path:
    return adapter_dir / prompt.folder / f"{index}.png"


def missing_images(adapter_dir: Path, plan: list[EvalPrompt]) -> list[tuple[EvalPrompt, list[int]]]:
    """(prompt, image indices) still to generate: absent, or not a readable PNG (an interrupted write)."""
    missing = []
    for prompt in plan:
        indices = [i for i in range(prompt.num_images) if not is_readable_png(image_path(adapter_dir, prompt, i))]
        if indices:
            missing.append((prompt, indices))
    return missing


def generation_settings(args, adapter: AdapterSpec) -> dict:
    """Everything that changes a generated image; images on disk are reused only if these match."""
    return {
        "pretrained_model_name_or_path": args.pretrained_model_name_or_path,
        "adapter_sha256": None if adapter.path is None else file_sha256(adapter.path),
        "concept": args.concept,
        "seed": args.seed,
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "resolution": args.resolution,
        "dtype": args.dtype,
    }


def check_settings_match(adapter_dir: Path, settings: dict) -> None:
    path = adapter_dir / SETTINGS_FILE
    if not path.is_file():
        return
    previous = read_json(path, "the generation settings")
    if not isinstance(previous, dict):
        raise EvaluationError(
            f"{path} is not a settings file of this script; move it away or use another --output_dir"
        )
    changed = [key for key in settings if previous.get(key) != settings[key]]
    if changed:
        details = "; ".join(f"{key}: {previous.get(key)!r} then, {settings[key]!r} now" for key in changed)
        raise EvaluationError(
            f"{adapter_dir} holds images generated with other settings ({details}). Use another --output_dir, "
            f"or delete {path} to reuse those images anyway."
        )


def generate_missing(pipe, adapter_dir: Path, missing, args) -> None:
    count = sum(len(indices) for _, indices in missing)
    with tqdm(total=count, desc=adapter_dir.name, unit="image") as progress:
        for prompt, indices in missing:
            for start in range(0, len(indices), args.batch_size):
                batch = indices[start : start + args.batch_size]
                # CPU generators give the same starting noise on every device.
                generators = [
                    torch.Generator("cpu").manual_seed(image_seed(args.seed, prompt.template, i)) for i in batch
                ]
                images = pipe(
                    prompt=[fill_in(prompt.template, args.concept)] * len(batch),
                    generator=generators,
                    num_inference_steps=args.num_inference_steps,
                    guidance_scale=args.guidance_scale,
                    height=args.resolution,
                    width=args.resolution,
                ).images
                for index, image in zip(batch, images):
                    save_png(image, image_path(adapter_dir, prompt, index))
                progress.update(len(batch))


def base_model_family(name: str) -> tl.ModelFamily:
    """The model family of a base model, from the pipeline class its `model_index.json` names."""
    from diffusers import DiffusionPipeline

    try:
        class_name = DiffusionPipeline.load_config(name).get("_class_name")
    except (OSError, ValueError) as error:
        raise EvaluationError(
            f"cannot load the base model {name!r} (--pretrained_model_name_or_path): {_first_lines(error, 1)}"
        ) from None
    for family in tl.FAMILIES.values():
        if class_name in family.pipeline_classes:
            return family
    supported = ", ".join(f"{family.display_name} ({family.pipeline_classes[0]})" for family in tl.FAMILIES.values())
    raise EvaluationError(
        f"the base model {name!r} is a {class_name}, which T-LoRA does not adapt; supported: {supported}"
    )


def resolve_sampling(args) -> None:
    """The base model's family and the sampling settings the user left to it."""
    family = base_model_family(args.pretrained_model_name_or_path)
    steps, guidance, resolution = SAMPLING_DEFAULTS[family.name]
    args.model_family = family.name
    args.num_inference_steps = args.num_inference_steps or steps
    args.guidance_scale = guidance if args.guidance_scale is None else args.guidance_scale
    args.resolution = args.resolution or resolution
    multiple = RESOLUTION_MULTIPLE.get(family.name, 8)
    if args.resolution % multiple:
        raise EvaluationError(
            f"--resolution must be a multiple of {multiple} for {family.display_name}, got {args.resolution}"
        )


def load_pipeline(args):
    from diffusers import DiffusionPipeline

    try:
        with warnings.catch_warnings():
            # Newer diffusers renamed torch_dtype to dtype; the old name works in every supported version.
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            # the class named in model_index.json: StableDiffusionXLPipeline, FluxPipeline, ...
            pipe = DiffusionPipeline.from_pretrained(
                args.pretrained_model_name_or_path, torch_dtype=getattr(torch, args.dtype)
            )
    except (OSError, ValueError) as error:
        raise EvaluationError(
            f"cannot load the base model {args.pretrained_model_name_or_path!r} (--pretrained_model_name_or_path): "
            f"{_first_lines(error, 1)}"
        ) from None
    pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate_all(args, adapters: list[AdapterSpec], plan: list[EvalPrompt], output_dir: Path) -> None:
    """Generate what is missing for every adapter; the pipeline is loaded only if something is."""
    work = []
    for adapter in adapters:
        adapter_dir = output_dir / adapter.name
        settings = generation_settings(args, adapter)
        check_settings_match(adapter_dir, settings)
        missing = missing_images(adapter_dir, plan)
        total = sum(prompt.num_images for prompt in plan)
        pending = sum(len(indices) for _, indices in missing)
        print(f"{adapter.name}: {pending} of {total} images to generate")
        if missing:
            work.append((adapter, adapter_dir, settings, missing))
    if not work:
        return
    pipe = load_pipeline(args)
    check_adapters_load(pipe, [adapter for adapter, *_ in work], args.pretrained_model_name_or_path)
    for adapter, adapter_dir, settings, missing in work:
        write_json(adapter_dir / SETTINGS_FILE, settings)
        load_adapter(pipe, adapter)
        try:
            generate_missing(pipe, adapter_dir, missing, args)
        finally:
            unload_adapter(pipe, adapter)
    del pipe
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- scoring


def load_embedders(args) -> tuple[ClipEmbedder, DinoEmbedder]:
    embedders = []
    for loader, name, flag, what in (
        (ClipEmbedder.load, args.clip_model, "--clip_model", "CLIP"),
        (DinoEmbedder.load, args.dino_model, "--dino_model", "DINO"),
    ):
        try:
            embedders.append(loader(name))
        except (OSError, ValueError) as error:
            raise EvaluationError(
                f"cannot load the {what} model {name!r} given by {flag}: {_first_lines(error, 1)} Pass a local "
                "folder, or a Hub model id that is in the local cache (or download it with network access)."
            ) from None
    return embedders[0], embedders[1]


def load_generated(adapter_dir: Path, plan: list[EvalPrompt]) -> dict[EvalPrompt, list[Image.Image]]:
    return {
        prompt: [open_rgb(image_path(adapter_dir, prompt, i), "generated image") for i in range(prompt.num_images)]
        for prompt in plan
    }


def score_adapter(
    plan: list[EvalPrompt],
    generated: dict[EvalPrompt, list[Image.Image]],
    clip: ClipEmbedder,
    dino: DinoEmbedder,
    real: dict[str, torch.Tensor],
    class_word: str,
) -> dict:
    """IS and DINO-IS of the base-prompt images against the `real` embeddings; TS of the other prompts."""
    base, prompts = plan[0], plan[1:]
    scores = {
        "IS": image_similarity(clip.image_embeddings(generated[base]), real["clip"]),
        "DINO_IS": image_similarity(dino.image_embeddings(generated[base]), real["dino"]),
    }
    owners = [prompt for prompt in prompts for _ in generated[prompt]]
    image_embeds = clip.image_embeddings([image for prompt in prompts for image in generated[prompt]])
    text_embeds = clip.text_embeddings([fill_in(prompt.template, class_word) for prompt in prompts])
    per_image_text = text_embeds.repeat_interleave(torch.tensor([len(generated[p]) for p in prompts]), dim=0)

    def ts(selected: Callable[[EvalPrompt], bool]) -> float | None:
        rows = [i for i, owner in enumerate(owners) if selected(owner)]
        return text_similarity(image_embeds[rows], per_image_text[rows]) if rows else None

    scores["TS"] = ts(lambda prompt: True)
    for group in ("contextual", "complex"):
        scores[f"TS_{group}"] = ts(lambda prompt, group=group: prompt.group == group)
    scores["TS_per_prompt"] = {p.template: ts(lambda prompt, p=p: prompt is p) for p in prompts}
    scores["counts"] = {"real_images": int(real["clip"].shape[0]), "base_prompt_images": len(generated[base])}
    for group in ("contextual", "complex"):
        in_group = [p for p in prompts if p.group == group]
        scores["counts"][f"{group}_prompts"] = len(in_group)
        scores["counts"][f"{group}_images"] = sum(len(generated[p]) for p in in_group)
    return scores


# --------------------------------------------------------------------------- reports


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (OSError, TypeError):  # Pillow without FreeType, or older than 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels (a word longer than a line gets a line of its own)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def contact_sheet(rows: list[tuple[str, list[Image.Image]]], thumbnail: int) -> Image.Image:
    """A grid with one row of thumbnails per (label, images), each row under its label."""
    pad, font = 4, _font(12)
    line_height = font.getbbox("Ag")[3] + 2
    columns = max(len(images) for _, images in rows)
    width = max(columns * (thumbnail + pad) + pad, SHEET_MIN_WIDTH)  # room for the prompt text
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    labels = [_wrap(measure, label, font, width - 2 * pad) for label, _ in rows]
    height = pad + sum(len(lines) * line_height + thumbnail + 2 * pad for lines in labels)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    y = pad
    for lines, (_, images) in zip(labels, rows):
        for line in lines:
            draw.text((pad, y), line, fill="black", font=font)
            y += line_height
        y += pad
        for column, image in enumerate(images):
            thumb = image.copy()
            thumb.thumbnail((thumbnail, thumbnail))
            x = pad + column * (thumbnail + pad)
            sheet.paste(thumb, (x + (thumbnail - thumb.width) // 2, y + (thumbnail - thumb.height) // 2))
        y += thumbnail + pad
    return sheet


def write_contact_sheet(
    path: Path, plan: list[EvalPrompt], generated, real_images, masked: bool, concept: str, thumbnail: int
) -> Path:
    rows = [("real images" + (", backgrounds masked" if masked else ""), [image for _, image in real_images])]
    rows += [(f"[{prompt.group}] {fill_in(prompt.template, concept)}", generated[prompt]) for prompt in plan]
    save_png(contact_sheet(rows, thumbnail), path)
    return path


def _format(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def metrics_markdown(metrics: dict) -> str:
    settings = metrics["settings"]
    counts = next(iter(metrics["adapters"].values()))["counts"]
    lines = [
        f'# Evaluation of "{settings["concept"]}"',
        "",
        f"Base model `{settings['pretrained_model_name_or_path']}`; prompts `{settings['prompts']}` "
        f"({counts['contextual_prompts']} contextual, {counts['complex_prompts']} complex, "
        f"{settings['images_per_prompt']} images each); {counts['base_prompt_images']} images of "
        f'"{fill_in(settings["base_prompt"], settings["concept"])}" against {counts["real_images"]} real image(s)'
        f"{' (backgrounds masked)' if settings['masks'] else ''}; seed {settings['seed']}, "
        f"{settings['num_inference_steps']} steps, guidance {settings['guidance_scale']}, "
        f"{settings['resolution']} px.",
        "",
        "| adapter | kind | " + " | ".join(METRIC_HEADERS) + " |",
        "|---|---|" + "---:|" * len(METRIC_HEADERS),
    ]
    for name, row in metrics["adapters"].items():
        lines.append(f"| {name} | {row['kind']} | " + " | ".join(_format(row[key]) for key in METRIC_KEYS) + " |")
    lines += [
        "",
        f"IS / DINO-IS: mean cosine similarity of CLIP (`{settings['clip_model']}`) / DINO "
        f"(`{settings['dino_model']}`) image embeddings, base-prompt images vs real images. TS: mean CLIP "
        f'cosine similarity of each image with its prompt, "{settings["concept"]}" replaced by '
        f'"{settings["class_word"]}". Higher is better.',
        "",
        "Contact sheets: " + ", ".join(f"[{name}]({name}/contact_sheet.png)" for name in metrics["adapters"]),
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Generate evaluation images for SD-XL adapters and score concept fidelity (IS, DINO-IS) "
        "and text alignment (TS) as in the T-LoRA paper.",
    )
    parser.add_argument(
        "--pretrained_model_name_or_path",
        type=path_text,
        required=True,
        help="base model, SD-XL or FLUX.1 (Hub id or folder)",
    )
    parser.add_argument(
        "--adapter",
        action="append",
        required=True,
        metavar="[NAME=]PATH",
        help="adapter file or folder, repeatable: T-LoRA (tlora_config metadata) or standard LoRA; "
        f"'{BASE_MODEL}' evaluates the base model. NAME (default: the folder or file name) names the row "
        "and the output folder",
    )
    parser.add_argument(
        "--real_images", type=path_text, nargs="+", required=True, help="the concept's real images: files or folders"
    )
    parser.add_argument(
        "--masks",
        type=path_text,
        help="folder with one mask per real image (same file stem): white = concept, kept; black = background, "
        f"painted grey {MASK_FILL} before the real images are embedded",
    )
    parser.add_argument("--concept", required=True, help='the concept phrase used in prompts, e.g. "sks dog"')
    parser.add_argument("--class_word", help="replaces the concept phrase in TS prompts (default: its last word)")
    parser.add_argument(
        "--prompts",
        default="live",
        help="prompt set: 'live' (default) or 'object', the paper's lists, or a JSON file of the same structure",
    )
    parser.add_argument("--prompt_list", help="which list of a --prompts file holding several")
    parser.add_argument(
        "--max_prompts", type=positive_int, help="use only the first N contextual and N complex prompts"
    )
    parser.add_argument(
        "--images_per_prompt", type=positive_int, default=5, help="images per prompt (default and paper: 5)"
    )
    parser.add_argument(
        "--base_prompt_images",
        type=positive_int,
        default=15,
        help="images of the base prompt, scored by IS and DINO-IS (default and paper: 15)",
    )
    parser.add_argument("--seed", type=int, default=0, help="base seed; each image's seed derives from it (default 0)")
    parser.add_argument(
        "--num_inference_steps", type=positive_int, help="denoising steps (default: SD-XL 25, FLUX.1 28)"
    )
    parser.add_argument(
        "--guidance_scale",
        type=finite_float,
        help="classifier-free guidance; FLUX.1-dev: the guidance embedding (default: SD-XL 5.0, FLUX.1 3.5)",
    )
    parser.add_argument("--resolution", type=positive_int, help="image width and height (default 1024)")
    parser.add_argument("--batch_size", type=positive_int, default=1, help="images per pipeline call (default 1)")
    parser.add_argument(
        "--output_dir", type=output_folder, required=True, help="where images, metrics and contact sheets go"
    )
    parser.add_argument(
        "--clip_model",
        type=path_text,
        default="openai/clip-vit-base-patch32",
        help="CLIP model for IS and TS (default %(default)s)",
    )
    parser.add_argument(
        "--dino_model",
        type=path_text,
        default="facebook/dino-vits16",
        help="ViT model for DINO-IS, CLS token (default %(default)s)",
    )
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "float16", "bfloat16"),
        default="auto",
        help="generation dtype; auto (default) = float16 on CUDA, float32 otherwise; scoring always runs in float32",
    )
    return parser


def resolve_args(args) -> None:
    """Fill in defaults that depend on other arguments, and check what argparse cannot."""
    if not args.concept.strip() or PLACEHOLDER in args.concept:
        raise EvaluationError(f"--concept must be a non-empty phrase without '{{}}', got {args.concept!r}")
    if args.class_word is None:
        words = args.concept.split()
        if len(words) < 2:
            raise EvaluationError(f"--concept {args.concept!r} is one word; give the class word with --class_word")
        args.class_word = words[-1]
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        raise EvaluationError(f"--device {args.device!r}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvaluationError(f"--device {args.device!r}: CUDA is not available on this machine")
    if args.dtype == "auto":
        args.dtype = "float16" if device.type == "cuda" else "float32"


def table_settings(args, prompt_set: PromptSet, real_images) -> dict:
    """Everything that makes the scores of two rows comparable."""
    settings = {
        key: getattr(args, key)
        for key in (
            "pretrained_model_name_or_path", "model_family", "concept", "class_word", "images_per_prompt",
            "base_prompt_images", "max_prompts", "seed", "num_inference_steps", "guidance_scale", "resolution",
            "dtype", "device", "clip_model", "dino_model", "masks",
        )
    }  # fmt: skip
    settings |= {
        "prompts": prompt_set.name,
        "prompt_file": str(prompt_set.source),
        "base_prompt": prompt_set.base,
        "real_images": [str(path) for path, _ in real_images],
        "mask_fill": list(MASK_FILL) if args.masks else None,
    }
    return settings


def _is_metrics_file(data) -> bool:
    def is_row(row):
        if not isinstance(row, dict) or "kind" not in row or not isinstance(row.get("counts"), dict):
            return False
        return all(row.get(key) is None or isinstance(row[key], (int, float)) for key in METRIC_KEYS)

    if not isinstance(data, dict) or not isinstance(data.get("settings"), dict):
        return False
    return isinstance(data.get("adapters"), dict) and all(is_row(row) for row in data["adapters"].values())


def rows_to_keep(path: Path, settings: dict, evaluated: list[str]) -> dict:
    """The rows of an earlier metrics.json for adapters not evaluated now, so that a rerun with fewer adapters
    adds to the table instead of dropping rows. Rows scored with other settings would not compare with the new
    ones: that is refused, before anything is generated."""
    if not path.is_file():
        return {}
    earlier = read_json(path, "the earlier results")
    if not _is_metrics_file(earlier):
        raise EvaluationError(f"{path} is not a metrics file of this script; move it away or use another --output_dir")
    kept = {name: row for name, row in earlier["adapters"].items() if name not in evaluated}
    then = earlier["settings"]
    changed = [key for key in settings if then.get(key) != settings[key]]
    if kept and changed:
        details = "; ".join(f"{key}: {quote(then.get(key))} then, {quote(settings[key])} now" for key in changed)
        raise EvaluationError(
            f"{path} holds results for {', '.join(kept)} scored with other settings ({details}). Evaluate them "
            "again with the new settings (add their --adapter), use another --output_dir, or delete the file."
        )
    return kept


def run(args) -> dict:
    """Generate what is missing, score every adapter and write the reports; returns the metrics."""
    resolve_args(args)
    prompt_set = load_prompt_set(args.prompts, args.prompt_list)
    plan = plan_prompts(prompt_set, args.images_per_prompt, args.base_prompt_images, args.max_prompts)
    real_images = load_real_images(args.real_images, args.masks)
    adapters = parse_adapters(args.adapter)
    resolve_sampling(args)
    # Loaded before generating, so a wrong --clip_model / --dino_model fails in seconds, not hours.
    clip, dino = load_embedders(args)
    output_dir = Path(args.output_dir)
    settings = table_settings(args, prompt_set, real_images)
    earlier_rows = rows_to_keep(output_dir / "metrics.json", settings, [adapter.name for adapter in adapters])

    generate_all(args, adapters, plan, output_dir)

    clip.to(args.device)
    dino.to(args.device)
    real = {
        "clip": clip.image_embeddings([image for _, image in real_images]),
        "dino": dino.image_embeddings([image for _, image in real_images]),
    }
    thumbnail = min(SHEET_THUMBNAIL, args.resolution)
    results = {}
    for adapter in tqdm(adapters, desc="scoring", unit="adapter"):
        adapter_dir = output_dir / adapter.name
        generated = load_generated(adapter_dir, plan)
        scores = score_adapter(plan, generated, clip, dino, real, args.class_word)
        sheet = write_contact_sheet(
            adapter_dir / "contact_sheet.png", plan, generated, real_images, bool(args.masks), args.concept, thumbnail
        )
        results[adapter.name] = {
            "kind": adapter.kind,
            "file": None if adapter.path is None else str(adapter.path),
            "tlora_config": adapter.tlora_config,
            **scores,
            "images": str(adapter_dir),
            "contact_sheet": str(sheet),
        }

    metrics = {"settings": settings, "adapters": {**results, **earlier_rows}}
    write_json(output_dir / "metrics.json", metrics)
    markdown = metrics_markdown(metrics)
    write_text(output_dir / "metrics.md", markdown)
    print(markdown)
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except EvaluationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
