"""The trainable T-LoRA adapter: its config from the command line, and attaching it to a frozen denoiser."""

from __future__ import annotations

from pathlib import Path

import torch

import pipelines.tlora as tl
from pipelines.tlora.families import ModelFamily, get_family

from .seeds import INIT_STREAM, derived_seed


def tlora_config_from_args(args, family: ModelFamily, num_train_timesteps: int = 1000) -> tl.TLoraConfig:
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
        model_family=family.name,
    )


def method_name(config: tl.TLoraConfig) -> str:
    """The paper's name for the trained variant."""
    if config.is_masked:
        return "T-LoRA" if config.variant == "ortho" else "Vanilla T-LoRA"
    return "Ortho-LoRA" if config.variant == "ortho" else "LoRA"


def attach_adapter(denoiser, config: tl.TLoraConfig, args, seed: int) -> list[torch.nn.Parameter]:
    """Attach the T-LoRA adapter to the frozen denoiser; returns its trainable parameters."""
    if args.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    generator = torch.Generator().manual_seed(derived_seed(seed, INIT_STREAM))
    for adapter in tl.inject_tlora(denoiser, config, generator=generator).values():
        adapter.to(torch.float32)  # the adapter trains in fp32 even when the frozen denoiser is in fp16/bf16
    return [param for param in denoiser.parameters() if param.requires_grad]


def save_adapter(directory: str | Path, denoiser, config: tl.TLoraConfig) -> Path:
    """Write the denoiser's training adapter as `directory/pytorch_tlora_weights.safetensors`."""
    attribute = get_family(config.model_family).denoiser_attribute  # "unet" or "transformer"
    layers = {f"{attribute}_tlora_layers": tl.get_tlora_state_dict(denoiser)}
    return tl.save_tlora_weights(directory, tlora_config=config, **layers)
