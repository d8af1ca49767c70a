#!/usr/bin/env python
"""Train a T-LoRA adapter for FLUX.1 on one concept image (DreamBooth style).

    accelerate launch train_tlora_flux.py --pretrained_model_name_or_path black-forest-labs/FLUX.1-dev \\
        --instance_data_dir dog.jpg --instance_prompt "a photo of sks dog" --output_dir tlora-flux-dog \\
        --gradient_checkpointing --base_quantization nf4 --cache_latents

The result, `OUTPUT_DIR/pytorch_tlora_weights.safetensors`, loads into a stock `FluxPipeline`:

    import pipelines.tlora
    pipe.load_tlora_weights("tlora-flux-dog")

The command line follows diffusers' `examples/dreambooth/train_dreambooth_lora_flux.py` wherever it has a
name for a setting; the defaults follow the T-LoRA paper's FLUX.1 recipe (v2 §4.6, App. B.2) and the authors'
code: Vanilla T-LoRA, Prodigy at lr 1.0, flow matching with t drawn uniformly (no shift), guidance 1 in
training, a bf16 base with fp32 adapters. What does not depend on the model (data, checkpoints, validation
plumbing, model card, Hub) is in `training/`; this file holds the FLUX parts (model loading, the flow-matching
loss, sampling) and the training loop.

Flow matching: a sample's noisy latents are `(1 - sigma) x0 + sigma noise` with sigma = t / 1000, the target is
`noise - x0`, and the transformer receives `timestep = sigma` (it multiplies by 1000 itself; the adapter's rank
follows 1000 sigma = t). Every sample of a batch draws its own t, so every sample (also the class half of a
prior-preservation batch) trains with its own rank mask.

As in every training script here, a run stopped at step N and resumed from `checkpoint-N` computes exactly what
an uninterrupted run computes (every random draw is a function of `--seed` and of the position in the run), and
the exit code says how it ended: 0 done, 1 the Hub upload failed (the local output is complete), 2 bad input,
130 stopped by Ctrl-C / SIGTERM after saving a checkpoint.
"""

from __future__ import annotations

import gc
import importlib.util
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers import FluxPipeline
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from PIL import Image
from tqdm.auto import tqdm

import pipelines.tlora  # noqa: F401  (gives the stock pipelines load_tlora_weights, used in validation)
from pipelines.tlora.families import FLUX
from scripts.arguments import bounded_float, finite_float, positive_int
from training.adapter import attach_adapter, tlora_config_from_args
from training.arguments import build_parser, check_args, check_model_family
from training.checkpoints import register_checkpoint_hooks, save_checkpoint
from training.data import DreamBoothDataset, make_dataloader, training_prompts
from training.errors import InputError, loading, run_with_exit_codes
from training.latents import batch_moments, latent_cache, sample_latents
from training.model_card import CardFacts, License
from training.optim import make_lr_scheduler, make_optimizer
from training.quantization import QUANTIZATIONS, QuantizationError, check_quantization, quantize_linear_layers
from training.run import (
    check_inputs,
    finish_training,
    log_run_start,
    make_accelerator,
    mixed_precision_dtype,
    resume,
    shared_seed,
    start_tracking,
)
from training.seeds import NOISE_STREAM, derived_seed
from training.stopping import StopRequest, exit_stopped, stop_if_diverged
from training.validation import current_adapter_loaded, fill_class_images, run_validation

logger = get_logger(__name__)

# Where each default comes from: SPEC = the paper's FLUX.1 recipe as the authors' code runs it (paper v2 §4.6,
# App. B.2; the authors' README where the paper is silent); diffusers = train_dreambooth_lora_flux.py.
DEFAULTS = {
    "tlora_variant": "vanilla",  # paper v2: MM-DiT adapters come out full-rank, no orthogonal init needed
    "rank": 32,  # authors' README (the paper's B.2 runs ranks 4, 16 and 64)
    "min_rank": 1,  # authors' README
    "max_train_steps": 500,  # paper v2 App. B.2, T-LoRA
    "optimizer": "prodigy",  # authors' code
    "learning_rate": 1.0,  # authors' code (Prodigy)
    "adam_weight_decay": 1e-4,  # authors' code
    "resolution": 512,  # diffusers (the paper does not say)
    "mixed_precision": "bf16",  # authors' code: bf16 base, fp32 adapters
    "num_inference_steps": 28,  # FLUX.1-dev sampling, as the paper
}
MAX_SEQUENCE_LENGTH = 512  # T5's limit in FLUX.1
WEIGHTING_SCHEMES = ("none", "sigma_sqrt", "logit_normal", "mode", "cosmap")
# The mode density of the SD3 paper (Esser et al. 2024, eq. 20) is a density on [0, 1] only for -1 <= s <= 2/(pi-2).
MODE_SCALE = bounded_float(-1, 2 / (math.pi - 2))
TRACKER_NAME = "tlora-flux"
FLUX_DEV_LICENSE = "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md"
MODEL_CARD = CardFacts(
    model_name="FLUX.1",
    pipeline_class="FluxPipeline",
    # FLUX.1 models come under different licences; for a base model not named below the card states none
    license=License(
        None,
        note="""
## License

The adapter is a derivative of its base model and carries the base model's licence.
""",
    ),
    base_model_licenses={
        "black-forest-labs/flux.1-dev": License(
            "other",
            "flux-1-dev-non-commercial-license",
            FLUX_DEV_LICENSE,
            note=f"""
## License

The adapter is a derivative of FLUX.1 [dev] and carries its licence, the
[FLUX.1 [dev] Non-Commercial License]({FLUX_DEV_LICENSE}).
""",
        ),
        "black-forest-labs/flux.1-schnell": License(
            "apache-2.0",
            note="""
## License

The adapter is a derivative of FLUX.1 [schnell] and carries its licence, Apache 2.0.
""",
        ),
    },
    tags=("text-to-image", "diffusers", "lora", "t-lora", "flux", "flux-diffusers", "template:sd-lora"),
    torch_dtype="torch.bfloat16",
    sampling_guidance_flag="validation_guidance_scale",
)


# --------------------------------------------------------------------------- command line


def parse_args(input_args=None):
    parser, groups = build_parser("Train a T-LoRA adapter for FLUX.1 on one concept image (DreamBooth style).", FLUX)
    model = groups["model"]
    model.add_argument(
        "--base_quantization",
        choices=QUANTIZATIONS,
        default="none",
        help="Quantise the frozen transformer with bitsandbytes: nf4 (4-bit, about 9 GB for FLUX.1-dev) or int8. "
        "The adapter still trains in fp32.",
    )
    model.add_argument(
        "--max_sequence_length",
        type=positive_int,
        default=MAX_SEQUENCE_LENGTH,
        help=f"T5 tokens per prompt, at most {MAX_SEQUENCE_LENGTH} (default: %(default)s).",
    )
    validation = groups["validation"]
    validation.add_argument(
        "--validation_guidance_scale",
        type=bounded_float(0),
        default=3.5,
        help="Guidance of validation and class images (FLUX.1-dev samples with 3.5).",
    )
    optimization = groups["optimization"]
    optimization.add_argument(
        "--guidance_scale",
        type=bounded_float(0),
        default=1.0,
        help="Guidance the guidance-distilled transformer is given in training (the authors train with 1).",
    )
    optimization.add_argument(
        "--weighting_scheme",
        choices=WEIGHTING_SCHEMES,
        default="none",
        help='How t is drawn and the loss weighted (SD3 paper); "none": t uniform, weight 1, as the authors.',
    )
    optimization.add_argument("--logit_mean", type=finite_float, default=0.0, help="Mean of logit_normal.")
    optimization.add_argument(
        "--logit_std", type=bounded_float(0, low_open=True), default=1.0, help="Standard deviation of logit_normal."
    )
    optimization.add_argument(
        "--mode_scale", type=MODE_SCALE, default=1.29, help="Scale of the mode weighting scheme, from -1 to 1.75."
    )
    parser.set_defaults(**DEFAULTS)
    args = parser.parse_args(input_args)
    check_args(parser, args, FLUX)
    if args.max_sequence_length > MAX_SEQUENCE_LENGTH:
        parser.error(f"--max_sequence_length must be at most {MAX_SEQUENCE_LENGTH}, got {args.max_sequence_length}")
    if args.resolution % 16:
        parser.error(f"--resolution must be divisible by 16 (FLUX packs 2x2 latent patches), got {args.resolution}")
    if args.base_quantization != "none" and importlib.util.find_spec("bitsandbytes") is None:
        parser.error(f"--base_quantization {args.base_quantization} needs bitsandbytes (pip install bitsandbytes)")
    check_model_family(parser, args, FLUX)
    return args


# --------------------------------------------------------------------------- models


@dataclass
class Models:
    """The frozen models and everything computed once from the text encoders, which are released after."""

    pipeline: FluxPipeline  # a stock pipeline around `transformer`, for validation and class images
    transformer: torch.nn.Module
    vae: torch.nn.Module
    num_train_timesteps: int
    prompt_embeds: torch.Tensor  # T5 embeddings; row i belongs to the i-th training prompt
    pooled_prompt_embeds: torch.Tensor  # CLIP pooled embeddings
    text_ids: torch.Tensor
    validation_embeddings: list[dict]
    class_embeddings: dict | None


def encode_prompts(pipeline: FluxPipeline, prompts: list[str], args, device) -> dict:
    """T5 and pooled CLIP embeddings of the prompts (and the text position ids), as keyword arguments of the
    pipeline call."""
    prompt_embeds, pooled_prompt_embeds, text_ids = pipeline.encode_prompt(
        prompts, prompt_2=None, device=device, max_sequence_length=args.max_sequence_length
    )
    return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds, "text_ids": text_ids}


def load_models(args, accelerator: Accelerator, prompts: list[str], dtype) -> Models:
    """Load the base model on the CPU; encode every prompt with the text encoders on the accelerator, then free
    them; only then move (and quantise) the transformer, so the text encoders and the transformer never share
    the accelerator's memory."""
    device = accelerator.device
    with loading("--pretrained_model_name_or_path", args.pretrained_model_name_or_path):
        base = FluxPipeline.from_pretrained(
            args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant, torch_dtype=dtype
        )
    for component in (base.text_encoder, base.text_encoder_2, base.vae, base.transformer):
        component.requires_grad_(False)
    base.text_encoder.to(device)
    base.text_encoder_2.to(device)
    with torch.no_grad():
        training = encode_prompts(base, prompts, args, device)
        sampling = [encode_prompts(base, [prompt], args, device) for prompt in args.validation_prompt or []]
        if args.with_prior_preservation:
            sampling.append(encode_prompts(base, [args.class_prompt], args, device))
    for embeddings in sampling:
        del embeddings["text_ids"]  # the pipeline makes its own
    transformer, vae, scheduler = base.transformer, base.vae, base.scheduler
    del base  # the last reference to the text encoders
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    quantize_linear_layers(transformer, args.base_quantization, device, compute_dtype=dtype)
    vae.to(device)
    pipeline = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )
    pipeline.set_progress_bar_config(disable=True)
    return Models(
        pipeline=pipeline,
        transformer=transformer,
        vae=vae,
        num_train_timesteps=scheduler.config.num_train_timesteps,
        prompt_embeds=training["prompt_embeds"],
        pooled_prompt_embeds=training["pooled_prompt_embeds"],
        text_ids=training["text_ids"],
        validation_embeddings=sampling[: len(args.validation_prompt or [])],
        class_embeddings=sampling[-1] if args.with_prior_preservation else None,
    )


# --------------------------------------------------------------------------- loss and sampling


def flow_matching_loss(
    transformer,
    latents: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    conditioning: dict,
    num_instance: int,
    weighting_scheme: str = "none",
    prior_loss_weight: float = 1.0,
) -> torch.Tensor:
    """Flow-matching loss of one batch; `sigmas` (float32) holds one noise level per sample, so one rank mask
    per sample.

    `conditioning`: `encoder_hidden_states` (T5), `pooled_projections` (CLIP), one row per sample, `txt_ids` and
    `guidance` (None for a transformer without guidance embedding). The first `num_instance` samples are
    instance images, the rest class images (weighted by `prior_loss_weight`).
    """
    batch, channels, height, width = latents.shape

    def pack(tensor):  # (B, C, H, W) -> (B, H/2 * W/2, 4C): the transformer's 2x2 patch tokens
        return FluxPipeline._pack_latents(tensor, batch, channels, height, width)

    expanded = sigmas.view(-1, 1, 1, 1)
    noisy = ((1 - expanded) * latents + expanded * noise).to(latents.dtype)
    model_pred = transformer(
        hidden_states=pack(noisy),
        timestep=sigmas,
        guidance=conditioning["guidance"],
        pooled_projections=conditioning["pooled_projections"],
        encoder_hidden_states=conditioning["encoder_hidden_states"],
        txt_ids=conditioning["txt_ids"],
        img_ids=FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, latents.device, latents.dtype),
        return_dict=False,
    )[0]
    # The target packed like the prediction: the mean squared error over patch tokens is the one over latents.
    target = pack(noise - latents)
    weighting = compute_loss_weighting_for_sd3(weighting_scheme, sigmas).float()
    per_sample = weighting * ((model_pred.float() - target.float()) ** 2).mean(dim=(1, 2))
    instance, prior = per_sample[:num_instance], per_sample[num_instance:]
    loss = instance.mean()
    if prior.numel():
        loss = loss + prior_loss_weight * prior.mean()
    return loss


def sample_sigmas(args, count: int, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    """One noise level per sample: t from the `num_train_timesteps` training timesteps N, N-1, ..., 1 (no shift),
    drawn by --weighting_scheme (uniform for "none"); sigma = t / N, in float32."""
    u = compute_density_for_timestep_sampling(
        args.weighting_scheme, count, args.logit_mean, args.logit_std, args.mode_scale,
        device=generator.device, generator=generator,
    )  # fmt: skip
    indices = (u * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)
    return (num_train_timesteps - indices).float() / num_train_timesteps


def batch_loss(transformer, batch: dict, models: Models, moments_cache, generator: torch.Generator, args):
    """The loss of one batch; every random draw comes from `generator`, seeded for this batch by the caller."""
    vae, dtype = models.vae, models.prompt_embeds.dtype
    latents = sample_latents(batch_moments(batch, vae, moments_cache), vae, generator).to(dtype)
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=dtype)
    sigmas = sample_sigmas(args, len(latents), models.num_train_timesteps, generator).to(latents.device)
    guidance = None
    if models.transformer.config.guidance_embeds:
        guidance = torch.full((len(latents),), args.guidance_scale, device=latents.device, dtype=torch.float32)
    ids = batch["prompt_ids"]
    conditioning = {
        "encoder_hidden_states": models.prompt_embeds[ids],
        "pooled_projections": models.pooled_prompt_embeds[ids],
        "txt_ids": models.text_ids,
        "guidance": guidance,
    }
    num_instance = len(latents) // 2 if args.with_prior_preservation else len(latents)
    return flow_matching_loss(
        transformer, latents, noise, sigmas, conditioning, num_instance, args.weighting_scheme, args.prior_loss_weight
    )


@torch.no_grad()
def generate_images(pipeline, embeddings: dict, seeds: list[int], args, accelerator) -> list[Image.Image]:
    """Sample one image per seed with the stock pipeline (FLUX.1-dev's sampler: --num_inference_steps,
    --validation_guidance_scale)."""
    count = len(seeds)
    batch = {key: value.repeat_interleave(count, dim=0) for key, value in embeddings.items()}
    with accelerator.autocast():
        return pipeline(
            **batch,
            height=args.resolution,
            width=args.resolution,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.validation_guidance_scale,
            max_sequence_length=args.max_sequence_length,
            generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
        ).images


# --------------------------------------------------------------------------- main


def main(args) -> None:
    output_dir = Path(args.output_dir)
    accelerator = make_accelerator(args)
    seed = shared_seed(args.seed, accelerator)
    try:
        check_quantization(args.base_quantization, accelerator.device)
    except QuantizationError as error:
        raise InputError(f"--base_quantization {args.base_quantization}: {error}") from None
    inputs = check_inputs(args, accelerator, tlora_config_from_args(args, FLUX))  # before any model is loaded

    prompts = training_prompts(inputs.instance_records, args)
    models = load_models(args, accelerator, prompts, mixed_precision_dtype(accelerator))
    class_records = fill_class_images(
        models.pipeline, models.class_embeddings, inputs.class_records, args, accelerator, seed,
        generate=generate_images,
    )  # fmt: skip
    config = tlora_config_from_args(args, FLUX, models.num_train_timesteps)
    params = attach_adapter(models.transformer, config, args, seed)
    register_checkpoint_hooks(accelerator, models.transformer, config)

    dataset = DreamBoothDataset(inputs.instance_records, class_records, prompts, args, seed)
    moments_cache = latent_cache(args, dataset, models.vae)
    optimizer = make_optimizer(args, params)
    transformer, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        models.transformer, optimizer, make_dataloader(args, dataset, accelerator.num_processes, seed),
        make_lr_scheduler(args, optimizer, accelerator.num_processes),
    )  # fmt: skip
    global_step, batches = resume(accelerator, inputs.checkpoint, train_dataloader, args)
    start_tracking(accelerator, args, TRACKER_NAME)
    images = (len(inputs.instance_records), len(class_records))
    details = f"base {args.base_quantization}, "
    log_run_start(accelerator, args, config, images, moments_cache is not None, seed, details)

    progress = tqdm(
        range(args.max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    micro_step = global_step * args.gradient_accumulation_steps
    noise_generator = torch.Generator(accelerator.device)
    step_loss = torch.zeros((), device=accelerator.device)
    first_step, started, last_checkpoint = global_step, time.perf_counter(), inputs.checkpoint
    with StopRequest() as stop:
        for batch in batches:
            with accelerator.accumulate(transformer):
                noise_generator.manual_seed(derived_seed(seed, NOISE_STREAM, accelerator.process_index, micro_step))
                loss = batch_loss(transformer, batch, models, moments_cache, noise_generator, args)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(params, args.max_grad_norm)
                    stop_if_diverged(grad_norm, accelerator, global_step + 1, last_checkpoint, progress)
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
                    run_validation(
                        models.pipeline, models.validation_embeddings, args, accelerator, global_step, seed,
                        generate=generate_images,
                    )  # fmt: skip
            if global_step < args.max_train_steps and stop.agreed(accelerator):
                progress.close()
                exit_stopped(accelerator, args, global_step, last_checkpoint)
    progress.close()
    finish_training(
        args, accelerator, transformer, config, inputs, pipeline=models.pipeline,
        validation_embeddings=models.validation_embeddings, generate=generate_images, card=MODEL_CARD,
        card_settings={
            "guidance in training": args.guidance_scale,
            "weighting scheme": args.weighting_scheme,
            "base quantisation": args.base_quantization,
        },
        steps=(first_step, global_step), seed=seed, elapsed=time.perf_counter() - started,
    )  # fmt: skip


def cli() -> None:
    run_with_exit_codes(main, parse_args())


if __name__ == "__main__":
    cli()
