"""Helpers shared by the tests: non-trivial adapters and direct UNet inputs for the tiny SD-XL."""

from __future__ import annotations

import torch

import pipelines.tlora as tl


def perturb_adapters(adapters: dict, seed: int = 0, std: float = 0.05) -> None:
    """Move every trainable factor away from its initial value, so the update is non-zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in adapters.values():
            for parameter in adapter.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * std)


def add_random_tlora(denoiser, seed: int = 0, adapter_name: str = "default", **config_kwargs) -> tl.TLoraConfig:
    """Attach a seeded, perturbed T-LoRA adapter to a UNet or transformer; returns its config.

    SD-XL adapters are made without `model_family`, as before families existed; the others with their family's
    defaults (FLUX: vanilla, the authors' projections)."""
    family = tl.family_of_denoiser(denoiser)
    settings = {"rank": 16, "min_rank": 8, **config_kwargs}
    config = tl.TLoraConfig(**settings) if family.name == "sdxl" else tl.TLoraConfig.for_family(family.name, **settings)
    adapters = tl.inject_tlora(denoiser, config, adapter_name, generator=torch.Generator().manual_seed(seed))
    perturb_adapters(adapters, seed + 1)
    return config


def unet_inputs(unet, batch: int = 2, seed: int = 0) -> dict:
    """Random SD-XL UNet keyword inputs (everything but the timestep)."""
    generator = torch.Generator().manual_seed(seed)
    config = unet.config
    size = config.sample_size
    text_embeds_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim

    def randn(*shape):
        return torch.randn(shape, generator=generator)

    return {
        "sample": randn(batch, config.in_channels, size, size),
        "encoder_hidden_states": randn(batch, 77, config.cross_attention_dim),
        "added_cond_kwargs": {
            "text_embeds": randn(batch, text_embeds_dim),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(batch, 1),
        },
    }


def run_unet(unet, inputs: dict, timesteps) -> torch.Tensor:
    return unet(inputs["sample"], timesteps, **{k: v for k, v in inputs.items() if k != "sample"}).sample


def flux_inputs(transformer, batch: int = 2, seed: int = 0, tokens: int = 16, text_tokens: int = 8) -> dict:
    """Random FLUX transformer keyword inputs (everything but the timestep), as FluxPipeline passes them."""
    generator = torch.Generator().manual_seed(seed)
    config = transformer.config

    def randn(*shape):
        return torch.randn(shape, generator=generator)

    inputs = {
        "hidden_states": randn(batch, tokens, config.in_channels),
        "encoder_hidden_states": randn(batch, text_tokens, config.joint_attention_dim),
        "pooled_projections": randn(batch, config.pooled_projection_dim),
        "img_ids": torch.stack([torch.zeros(tokens), torch.arange(tokens) // 4, torch.arange(tokens) % 4], -1).float(),
        "txt_ids": torch.zeros(text_tokens, 3),
    }
    if config.guidance_embeds:
        inputs["guidance"] = torch.full((batch,), 3.5)
    return inputs


def generate(pipe, prompt: str = "a photo of sks dog", steps: int = 3, seed: int = 0, **kwargs):
    """Deterministic pipeline output as a numpy array."""
    return pipe(
        prompt,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        **kwargs,
    ).images
