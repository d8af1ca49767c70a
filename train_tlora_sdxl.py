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
What does not depend on the model (data, checkpoints, validation plumbing, model card, Hub) is in `training/`;
this file holds the SD-XL parts (model loading, the denoising loss, sampling) and the training loop.

Reproducibility: every random draw (data order, crop and flip, VAE latent sample, noise, timesteps) is a
function of `--seed` and of the position in the run, never of a running generator. A run stopped at step
N and resumed from `checkpoint-N` therefore computes exactly what an uninterrupted run computes.

Exit codes: 0 done; 1 Hub repository creation or upload failed (the local output is complete);
2 bad command line or input; 130 stopped by Ctrl-C / SIGTERM (after saving a checkpoint).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline
from diffusers.training_utils import compute_snr
from diffusers.utils.import_utils import is_xformers_available
from PIL import Image
from tqdm.auto import tqdm

import pipelines.tlora  # noqa: F401  (gives the stock pipelines load_tlora_weights, used in validation)
from pipelines.tlora.families import SDXL
from scripts.arguments import bounded_float, path_text
from training.adapter import attach_adapter, tlora_config_from_args
from training.arguments import build_parser, check_args, check_model_family, check_resolution
from training.checkpoints import register_checkpoint_hooks, save_checkpoint
from training.data import DreamBoothDataset, make_dataloader, training_prompts
from training.errors import loading, run_with_exit_codes
from training.latents import batch_moments, denormalize_latents, latent_cache, sample_latents
from training.model_card import CardFacts, License
from training.optim import make_lr_scheduler, make_optimizer
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

# The T-LoRA paper's SD-XL settings (arXiv 2507.05964, §5 and App. B); diffusers' SD-XL DreamBooth script for
# the rest (see `training.arguments`).
DEFAULTS = {
    "rank": 64,
    "min_rank": None,  # rank // 2
    "tlora_variant": "ortho",
    "resolution": 1024,
    "max_train_steps": 800,
    "learning_rate": 1e-4,
    "optimizer": "adamw",
    "num_inference_steps": 25,
}
TRACKER_NAME = "tlora-sdxl"
MODEL_CARD = CardFacts(
    model_name="Stable Diffusion XL",
    pipeline_class="StableDiffusionXLPipeline",
    license=License("openrail++"),
    tags=("text-to-image", "diffusers", "lora", "t-lora", "stable-diffusion-xl", "template:sd-lora"),
    torch_dtype="torch.float16",
)


# --------------------------------------------------------------------------- command line


def parse_args(input_args=None):
    parser, groups = build_parser(
        "Train a T-LoRA adapter for Stable Diffusion XL on one concept image (DreamBooth style).", SDXL
    )
    groups["model"].add_argument(
        "--pretrained_vae_model_name_or_path",
        type=path_text,
        default=None,
        help="A VAE to use instead of the model's own (e.g. one that is stable in fp16).",
    )
    groups["validation"].add_argument(
        "--guidance_scale",
        type=bounded_float(0),
        default=5.0,
        help="Classifier-free guidance for validation and class images.",
    )
    groups["optimization"].add_argument(
        "--snr_gamma",
        type=bounded_float(0, low_open=True),
        default=None,
        help="Min-SNR loss weighting gamma (5.0 is common); off by default.",
    )
    groups["system"].add_argument(
        "--enable_xformers_memory_efficient_attention", action="store_true", help="Use xformers attention."
    )
    parser.set_defaults(**DEFAULTS)
    args = parser.parse_args(input_args)
    check_args(parser, args, SDXL)
    if args.enable_xformers_memory_efficient_attention and not is_xformers_available():
        parser.error("--enable_xformers_memory_efficient_attention needs xformers, which is not installed")
    check_model_family(parser, args, SDXL)
    return args


# --------------------------------------------------------------------------- models


def _load_base_pipeline(args, device, dtype) -> StableDiffusionXLPipeline:
    extra = {}
    if args.pretrained_vae_model_name_or_path is not None:
        with loading("--pretrained_vae_model_name_or_path", args.pretrained_vae_model_name_or_path):
            extra["vae"] = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path)
    with loading("--pretrained_model_name_or_path", args.pretrained_model_name_or_path):
        pipeline = StableDiffusionXLPipeline.from_pretrained(
            args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant, **extra
        )
    check_resolution(args.resolution, pipeline.unet, pipeline.vae)
    # The frozen models run in the mixed-precision dtype, except the VAE: the SD-XL VAE overflows in fp16.
    cast = {} if dtype == torch.float32 else {"dtype": dtype}
    for component in (pipeline.unet, pipeline.text_encoder, pipeline.text_encoder_2, pipeline.vae):
        component.requires_grad_(False)
        component.to(device, **(cast if component is not pipeline.vae else {}))
    if args.enable_xformers_memory_efficient_attention:
        pipeline.unet.enable_xformers_memory_efficient_attention()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


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


@dataclass
class Models:
    """The frozen models and everything computed once from the text encoders, which are released after."""

    pipeline: StableDiffusionXLPipeline  # a stock pipeline around `unet`, for validation and class images
    unet: torch.nn.Module
    vae: AutoencoderKL
    noise_scheduler: DDPMScheduler
    prompt_embeds: torch.Tensor  # row i belongs to the i-th training prompt
    pooled_prompt_embeds: torch.Tensor
    validation_embeddings: list[dict]
    class_embeddings: dict | None


def load_models(args, accelerator: Accelerator, prompts: list[str], dtype) -> Models:
    device = accelerator.device
    base = _load_base_pipeline(args, device, dtype)
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
        prompt_embeds=prompt_embeds.to(dtype),
        pooled_prompt_embeds=pooled_prompt_embeds.to(dtype),
        validation_embeddings=validation_embeddings,
        class_embeddings=class_embeddings,
    )


# --------------------------------------------------------------------------- loss and sampling


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
        # Min-SNR weighting (arXiv 2303.09556), on the instance loss as diffusers does: min(snr, gamma) / snr,
        # written as min(1, gamma / snr) so that it takes its limit, 1, at the zero SNR of the last timestep of a
        # zero-terminal-SNR schedule instead of 0 / 0.
        snr = compute_snr(noise_scheduler, timesteps[:num_instance])
        weights = torch.clamp(snr_gamma / snr, max=1.0)
        instance = instance * (weights + 1 if prediction_type == "v_prediction" else weights)
    loss = instance.mean()
    if prior.numel():
        loss = loss + prior_loss_weight * prior.mean()
    return loss


def batch_loss(unet, batch: dict, models: Models, moments_cache, generator: torch.Generator, args) -> torch.Tensor:
    """The loss of one batch; every random draw comes from `generator`, seeded for this batch by the caller."""
    vae, dtype = models.vae, models.prompt_embeds.dtype
    latents = sample_latents(batch_moments(batch, vae, moments_cache), vae, generator).to(dtype)
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


# --------------------------------------------------------------------------- main


def main(args) -> None:
    output_dir = Path(args.output_dir)
    accelerator = make_accelerator(args)
    seed = shared_seed(args.seed, accelerator)
    inputs = check_inputs(args, accelerator, tlora_config_from_args(args, SDXL))  # before any model is loaded

    prompts = training_prompts(inputs.instance_records, args)
    models = load_models(args, accelerator, prompts, mixed_precision_dtype(accelerator))
    class_records = fill_class_images(
        models.pipeline, models.class_embeddings, inputs.class_records, args, accelerator, seed,
        generate=generate_images,
    )  # fmt: skip
    config = tlora_config_from_args(args, SDXL, models.noise_scheduler.config.num_train_timesteps)
    params = attach_adapter(models.unet, config, args, seed)
    register_checkpoint_hooks(accelerator, models.unet, config)

    dataset = DreamBoothDataset(inputs.instance_records, class_records, prompts, args, seed)
    moments_cache = latent_cache(args, dataset, models.vae)
    optimizer = make_optimizer(args, params)
    unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        models.unet, optimizer, make_dataloader(args, dataset, accelerator.num_processes, seed),
        make_lr_scheduler(args, optimizer, accelerator.num_processes),
    )  # fmt: skip
    global_step, batches = resume(accelerator, inputs.checkpoint, train_dataloader, args)
    start_tracking(accelerator, args, TRACKER_NAME)
    images = (len(inputs.instance_records), len(class_records))
    log_run_start(accelerator, args, config, images, moments_cache is not None, seed)

    progress = tqdm(
        range(args.max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    micro_step = global_step * args.gradient_accumulation_steps
    noise_generator = torch.Generator(accelerator.device)
    step_loss = torch.zeros((), device=accelerator.device)
    first_step, started, last_checkpoint = global_step, time.perf_counter(), inputs.checkpoint
    with StopRequest() as stop:
        for batch in batches:
            with accelerator.accumulate(unet):
                noise_generator.manual_seed(derived_seed(seed, NOISE_STREAM, accelerator.process_index, micro_step))
                loss = batch_loss(unet, batch, models, moments_cache, noise_generator, args)
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
        args, accelerator, unet, config, inputs, pipeline=models.pipeline,
        validation_embeddings=models.validation_embeddings, generate=generate_images, card=MODEL_CARD,
        steps=(first_step, global_step), seed=seed, elapsed=time.perf_counter() - started,
    )  # fmt: skip


def cli() -> None:
    run_with_exit_codes(main, parse_args())


if __name__ == "__main__":
    cli()
