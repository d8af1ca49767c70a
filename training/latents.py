"""VAE latents for training: the moments of each image's latent distribution, a sample from them, and the
shift and scale into the denoiser's latent space.

What is cached is the moments, not a sample: each step still draws its own latent sample (seeded like every
other draw), so a run with cached latents computes what a run without computes.
"""

from __future__ import annotations

import numpy as np
import torch
from accelerate.logging import get_logger
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

logger = get_logger(__name__)


def normalize_latents(latents: torch.Tensor, vae) -> torch.Tensor:
    """VAE latents -> the denoiser's latent space (and `denormalize_latents` back)."""
    mean, std = _latent_statistics(latents, vae)
    return (latents - mean) * vae.config.scaling_factor / std


def denormalize_latents(latents: torch.Tensor, vae) -> torch.Tensor:
    mean, std = _latent_statistics(latents, vae)
    return latents * std / vae.config.scaling_factor + mean


def _latent_statistics(latents: torch.Tensor, vae):
    """Per-channel statistics where the VAE has them (some SD-XL VAEs), else its shift (FLUX), else none."""
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, -1, 1, 1)
        return torch.tensor(mean).view(shape).to(latents), torch.tensor(std).view(shape).to(latents)
    return getattr(vae.config, "shift_factor", None) or 0.0, 1.0


@torch.no_grad()
def encode_moments(vae, pixel_values: torch.Tensor) -> torch.Tensor:
    """Mean and log-variance of the VAE's latent distribution, (B, 2C, h, w)."""
    return vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist.parameters


def sample_latents(moments: torch.Tensor, vae, generator: torch.Generator) -> torch.Tensor:
    return normalize_latents(DiagonalGaussianDistribution(moments).sample(generator=generator), vae)


def batch_moments(batch: dict, vae, moments_cache: torch.Tensor | None) -> torch.Tensor:
    """The latent moments of a batch: from the cache, or encoded now."""
    if moments_cache is not None:
        return moments_cache[batch["image_ids"]]
    return encode_moments(vae, batch["pixel_values"])


def latent_cache(args, dataset, vae) -> torch.Tensor | None:
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
