"""The command line every training script shares, and the checks that run before any model is loaded.

Flag names follow diffusers' DreamBooth-LoRA scripts. Each script adds its family's own flags to these groups
and sets its family's defaults with `parser.set_defaults`, so `--help` shows the defaults in force; each check
names the flag it refuses.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import warnings
from pathlib import Path

from accelerate.utils import is_wandb_available
from huggingface_hub import get_token, hf_hub_download

from pipelines.tlora.families import FAMILIES, ModelFamily
from pipelines.tlora.limits import MAX_RANK
from scripts.arguments import bounded_float, bounded_int, non_negative_int, output_folder, path_text, positive_int

from .checkpoints import explicit_checkpoint
from .data import DATASETS_MISSING, instance_image_files
from .errors import BAD_INPUT_EXIT_CODE, InputError, is_main_process
from .tool_exports import UNET_FAMILIES

# The script that trains each family, for the message when a model is given to the wrong one.
TRAINING_SCRIPTS = {"sdxl": "train_tlora_sdxl.py", "flux": "train_tlora_flux.py"}


TARGET_MODULE = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
# Each image appears `repeats` times in every pass over the data, whose order is a permutation of that length.
MAX_REPEATS = 10_000
BETA = bounded_float(0, 1, high_open=True)  # Adam's moment decay rates: 1 would never forget, above 1 diverges


class TrainingArgumentParser(argparse.ArgumentParser):
    """argparse whose refusals, like the scripts' other `error:` lines, are printed by the main process only of a
    multi-process launch; every process still exits with 2."""

    def error(self, message: str):
        if is_main_process():
            super().error(message)
        self.exit(BAD_INPUT_EXIT_CODE)


def build_parser(description: str, family: ModelFamily) -> tuple[argparse.ArgumentParser, dict]:
    """The shared flags, in argument groups (returned by name, for the script to add its own flags to)."""
    parser = TrainingArgumentParser(description=description)
    groups = {
        name: parser.add_argument_group(title)
        for name, title in (
            ("model", "model"),
            ("data", "data"),
            ("prior", "prior preservation"),
            ("validation", "validation and sampling"),
            ("tlora", "T-LoRA"),
            ("optimization", "schedule and optimizer"),
            ("checkpoints", "checkpoints"),
            ("hub", "Hub and logging"),
            ("system", "system"),
        )
    }
    _add_model_arguments(groups["model"], family)
    _add_data_arguments(groups["data"])
    _add_prior_arguments(groups["prior"])
    _add_validation_arguments(groups["validation"])
    _add_tlora_arguments(groups["tlora"], family)
    _add_optimization_arguments(groups["optimization"])
    _add_checkpoint_arguments(groups["checkpoints"])
    _add_hub_arguments(groups["hub"], family)
    _add_system_arguments(groups["system"], family)
    return parser, groups


def _add_model_arguments(model, family: ModelFamily) -> None:
    model.add_argument(
        "--pretrained_model_name_or_path",
        type=path_text,
        required=True,
        help=f"{family.display_name} base model: a Hub model id (e.g. {family.base_model}) or a local "
        "`save_pretrained` folder.",
    )
    model.add_argument("--revision", type=str, default=None, help="Revision of the base model on the Hub.")
    model.add_argument("--variant", type=str, default=None, help="Variant of the model files, e.g. fp16.")


def _add_data_arguments(data) -> None:
    data.add_argument(
        "--instance_data_dir", type=path_text, default=None, help="A folder of concept images, or a single image file."
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
    data.add_argument("--cache_dir", type=path_text, default=None, help="Where downloaded datasets are stored.")
    data.add_argument(
        "--resolution",
        type=positive_int,
        default=1024,
        help="Training resolution in pixels: images are resized and cropped to a square of this size "
        "(default: %(default)s).",
    )
    data.add_argument(
        "--center_crop",
        action="store_true",
        help="Crop the centre of each resized image; without it the crop position is random.",
    )
    data.add_argument("--random_flip", action="store_true", help="Flip images horizontally at random.")
    data.add_argument(
        "--repeats",
        type=bounded_int(1, MAX_REPEATS),
        default=1,
        help="How many times each instance image appears per pass.",
    )


def _add_prior_arguments(prior) -> None:
    prior.add_argument("--with_prior_preservation", action="store_true", help="Add the prior-preservation loss.")
    prior.add_argument(
        "--class_data_dir",
        type=path_text,
        default=None,
        help="Folder of class images; missing ones (up to --num_class_images) are generated with the base model.",
    )
    prior.add_argument(
        "--class_prompt", type=str, default=None, help='Prompt of the class images, e.g. "a photo of a dog".'
    )
    prior.add_argument(
        "--num_class_images", type=positive_int, default=100, help="Number of class images to train with."
    )
    prior.add_argument(
        "--prior_loss_weight", type=bounded_float(0), default=1.0, help="Weight of the prior-preservation loss."
    )
    prior.add_argument(
        "--sample_batch_size", type=positive_int, default=4, help="Batch size for generating class images."
    )


def _add_validation_arguments(validation) -> None:
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
        help="Denoising steps for validation and class images (default: %(default)s).",
    )


def _add_tlora_arguments(tlora, family: ModelFamily) -> None:
    tlora.add_argument(
        "--rank",
        type=bounded_int(1, MAX_RANK),
        default=64,
        help="Maximum rank R, the rank at timestep 0 (default: %(default)s).",
    )
    tlora.add_argument(
        "--min_rank",
        type=bounded_int(1, MAX_RANK),
        default=None,
        help="Rank at the highest noise level (default: %(default)s; None: rank // 2). Equal to --rank: unmasked "
        "LoRA / Ortho-LoRA.",
    )
    tlora.add_argument(
        "--rank_schedule_exponent", type=bounded_float(0), default=1.0, help="Exponent of the rank schedule."
    )
    tlora.add_argument(
        "--tlora_variant",
        choices=["ortho", "vanilla"],
        default=family.default_variant,
        help="ortho: T-LoRA with orthogonal factors; vanilla: plain LoRA factors, masked (default: %(default)s).",
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
        "--lora_alpha",
        type=bounded_float(0, low_open=True),
        default=None,
        help="Scale the update by lora_alpha / rank (default: scale 1).",
    )
    tlora.add_argument(
        "--target_modules",
        type=str,
        nargs="+",
        default=list(family.default_target_modules),
        help=f"{family.denoiser_class} linear layers that get an adapter, names or dotted suffixes "
        "(default: %(default)s).",
    )


def _add_optimization_arguments(optimization) -> None:
    optimization.add_argument("--train_batch_size", type=positive_int, default=1, help="Batch size per device.")
    optimization.add_argument(
        "--max_train_steps", type=positive_int, default=800, help="Number of optimizer steps (default: %(default)s)."
    )
    optimization.add_argument(
        "--gradient_accumulation_steps", type=positive_int, default=1, help="Batches per optimizer step."
    )
    optimization.add_argument(
        "--learning_rate",
        type=bounded_float(0, low_open=True),
        default=1e-4,
        help="Learning rate after warmup (default: %(default)s).",
    )
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
    optimization.add_argument(
        "--lr_power", type=bounded_float(0, low_open=True), default=1.0, help="Power of the polynomial schedule."
    )
    optimization.add_argument(
        "--max_grad_norm", type=bounded_float(0, low_open=True), default=1.0, help="Gradient clipping norm."
    )
    optimization.add_argument(
        "--optimizer",
        type=str.lower,
        choices=["adamw", "prodigy"],
        default="adamw",
        help="Optimizer (default: %(default)s).",
    )
    optimization.add_argument("--use_8bit_adam", action="store_true", help="8-bit AdamW from bitsandbytes.")
    optimization.add_argument("--adam_beta1", type=BETA, default=0.9, help="Adam / Prodigy beta1.")
    optimization.add_argument("--adam_beta2", type=BETA, default=0.999, help="Adam / Prodigy beta2.")
    optimization.add_argument(
        # 0 would divide 0 by 0 for the rank components a mask keeps at zero gradient
        "--adam_epsilon",
        type=bounded_float(0, low_open=True),
        default=1e-08,
        help="Adam / Prodigy epsilon.",
    )
    optimization.add_argument("--adam_weight_decay", type=bounded_float(0), default=1e-04, help="Weight decay.")
    optimization.add_argument(
        "--prodigy_beta3",
        type=BETA,
        default=None,
        help="Prodigy's coefficient for the step size estimate (default: the square root of beta2).",
    )
    optimization.add_argument(
        "--prodigy_decouple",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Prodigy: AdamW-style decoupled weight decay.",
    )
    optimization.add_argument(
        "--prodigy_use_bias_correction",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Prodigy: Adam's bias correction.",
    )
    optimization.add_argument(
        "--prodigy_safeguard_warmup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Prodigy: keep the step size estimate from growing too fast during warmup.",
    )


def _add_checkpoint_arguments(checkpoints) -> None:
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
        type=path_text,
        default=None,
        help='Resume from a checkpoint-N folder, or "latest" for the newest one in --output_dir (none: start fresh).',
    )
    checkpoints.add_argument(
        "--overwrite",
        action="store_true",
        help="Train into an --output_dir that holds another run (its checkpoints are removed, its adapter and card "
        "replaced at the end), or resume from a checkpoint that has later ones (they are removed).",
    )


def _add_hub_arguments(hub, family: ModelFamily) -> None:
    hub.add_argument(
        "--output_dir",
        type=output_folder,
        default="tlora-dreambooth-model",
        help="Folder for the adapter, checkpoints and logs.",
    )
    hub.add_argument("--logging_dir", type=path_text, default="logs", help="Log folder, relative to --output_dir.")
    hub.add_argument(
        "--report_to", choices=["tensorboard", "wandb", "none"], default="tensorboard", help="Where to log."
    )
    hub.add_argument("--push_to_hub", action="store_true", help="Upload the result (without checkpoints) to the Hub.")
    hub.add_argument(
        "--hub_model_id", type=str, default=None, help="Hub repository (default: the name of --output_dir)."
    )
    hub.add_argument("--hub_token", type=str, default=None, help="Hub token (default: the one from `hf auth login`).")
    hub.add_argument(
        "--export_for_tools",
        action="store_true",
        help="Also write, next to the adapter (and upload with --push_to_hub), "
        + (
            "the file ComfyUI's 'Load T-LoRA (Bypass)' node loads and a standard LoRA at full rank in kohya's layout "
            "(ComfyUI LoraLoader, A1111, kohya)."
            if family.name in UNET_FAMILIES
            else "a standard LoRA at full rank in diffusers' layout (`load_lora_weights`)."
        ),
    )


def _add_system_arguments(system, family: ModelFamily) -> None:
    system.add_argument(
        "--mixed_precision",
        choices=["no", "fp16", "bf16"],
        default=None,
        help="Mixed precision (default: the accelerate config). The adapter always trains in fp32.",
    )
    system.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help=f"Trade compute for memory in the {family.denoiser_class}.",
    )
    system.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere and newer GPUs.")
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


def model_folder_problem(source: str, family: ModelFamily) -> str | None:
    """What is wrong with a base model given as a local folder, or None (a Hub id is checked when loaded)."""
    path = Path(source)
    if not path.exists():
        # A Hub id is `name` or `owner/name`; anything else can only be a local path, which does not exist.
        looks_local = source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source
        return "no such folder" if looks_local else None
    index = path / "model_index.json"
    try:
        class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return f"not a diffusers pipeline folder (no readable {index.name}; give the folder `save_pretrained` wrote)"
    if class_name not in family.pipeline_classes:
        if any(class_name in other.pipeline_classes for other in FAMILIES.values()):
            return None  # another family's model: check_model_family names the script that trains it
        examples = ", ".join(family.pipeline_classes[:2])
        return f"holds a {class_name}, not a {family.display_name} pipeline ({examples}, ...)"
    return None


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace, family: ModelFamily) -> None:
    """Reject bad combinations of the shared flags now, before any model is loaded; each message names the flag.
    Fills in the defaults that depend on other flags (--min_rank)."""
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
    logging_dir = Path(args.output_dir) / args.logging_dir
    below_a_file = next((p for p in (logging_dir, *logging_dir.parents) if p.exists() and not p.is_dir()), None)
    if below_a_file is not None:
        fail(f"--logging_dir {args.logging_dir}: {below_a_file} is a file, so {logging_dir} cannot be a folder")
    malformed = [name for name in args.target_modules if not TARGET_MODULE.fullmatch(name)]
    if malformed:
        fail(
            f"--target_modules {' '.join(map(repr, malformed))}: give module names or dotted suffixes of module "
            "paths, one per argument (e.g. --target_modules to_q to_k)"
        )
    problem = model_folder_problem(args.pretrained_model_name_or_path, family)
    if problem:
        fail(f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path}: {problem}")
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
    if args.report_to == "wandb":
        if not is_wandb_available():
            fail("--report_to wandb needs wandb (pip install wandb)")
        if args.hub_token is not None:
            fail(
                "--hub_token cannot be combined with --report_to wandb (the token would be logged); "
                "use `hf auth login`"
            )
    if args.push_to_hub and not (args.hub_token or get_token()):
        fail("--push_to_hub needs a Hub token: pass --hub_token or log in with `hf auth login`")
    if args.resume_from_checkpoint not in (None, "latest"):
        try:
            explicit_checkpoint(args.resume_from_checkpoint, Path(args.output_dir))
        except InputError as error:
            fail(str(error))


def _pipeline_class(args) -> str | None:
    """`_class_name` of the base model's model_index.json: read from a local folder, or fetched from the Hub
    (one small file); None where it cannot be had, and then loading the model reports the problem."""
    path = Path(args.pretrained_model_name_or_path)
    try:
        if path.is_dir():
            index = path / "model_index.json"
        else:
            index = hf_hub_download(args.pretrained_model_name_or_path, "model_index.json", revision=args.revision)
        return json.loads(Path(index).read_text()).get("_class_name")
    except Exception:  # offline, not on the Hub, not a pipeline folder: all left to the model loading
        return None


def check_model_family(parser: argparse.ArgumentParser, args: argparse.Namespace, family: ModelFamily) -> None:
    """Refuse a base model of another family, naming the script that trains it."""
    pipeline_class = _pipeline_class(args)
    found = next((f for f in FAMILIES.values() if pipeline_class in f.pipeline_classes), None)
    if found is None or found.name == family.name:
        return
    script = TRAINING_SCRIPTS.get(found.name)
    advice = f"train it with {script}" if script else f"no script here trains {found.display_name} yet"
    parser.error(
        f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path} is a {found.display_name} model "
        f"({pipeline_class}), not {family.display_name}: {advice}"
    )


def check_resolution(resolution: int, denoiser, vae) -> None:
    """After loading, the one size check that needs the models: the latent must survive the denoiser's
    downsampling (a UNet halves it once per down block but the last)."""
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    blocks = getattr(denoiser.config, "block_out_channels", None)
    smallest = vae_factor * 2 ** (len(blocks) - 1) if blocks else vae_factor
    if resolution < smallest:
        raise InputError(f"--resolution {resolution} is too small for this model: it needs at least {smallest}")
