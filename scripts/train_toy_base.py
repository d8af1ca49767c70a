#!/usr/bin/env python
"""Train the miniature SD-XL base model on the toy world, from scratch, on the CPU.

    python scripts/train_toy_base.py OUT_DIR [--vae_steps N] [--unet_steps N] [--zero_snr_steps N] [--threads N]

The result is a regular SD-XL pipeline folder (`StableDiffusionXLPipeline.from_pretrained(OUT_DIR)`) that draws
64 px toy-world pictures from prompts such as "a red star on the beach". It keeps SD-XL's architecture so
that the project's scripts run on it unchanged, at a size a CPU trains in minutes:

    text encoders  the two random CLIP text encoders and tokenizers of the tiny SD-XL fixture
                   (`make_tiny_pipeline.py`), frozen:
                   untrained, they still give every prompt its own deterministic embedding
    VAE            AutoencoderKL, blocks (16, 32, 32): 4x downsampling, 64 px -> 16x16x4 latents; no mid-block
                   attention, so it is fully convolutional and is trained on 32 px crops (4x cheaper)
    UNet           UNet2DConditionModel with SD-XL's blocks (DownBlock2D + CrossAttnDownBlock2D, text_time
                   conditioning), channels (32, 64), 16x16 latents
    noise schedule SD-XL's betas rescaled to zero terminal SNR, v-prediction, sampled from t = 999 ("trailing")

Why not SD-XL's schedule as it is: its last timestep keeps 7% of the picture (sqrt(alpha_bar) = 0.068), and in a
16x16x4 latent that is plenty to read the layout back. A model trained on it never learns to start a picture from
nothing: its first sampling steps read a layout off the noise. It then draws the asked context hardly more often
than chance, and a one-image adapter learns the concept's colours and details but never its layout; with no layout
learnt at high noise there is nothing there for T-LoRA's mask to keep from overfitting either. At zero terminal
SNR (Lin et al., arXiv 2305.08891) the last timestep holds no signal at all, so the layout is what the model (and
an adapter) learns to draw there.

Training runs in three phases, each checkpointed to OUT_DIR/checkpoints/ and resumed when the command is run
again: the VAE; the UNet with noise prediction on SD-XL's schedule (`--unet_steps`), whose loss weights fine
detail, so that it learns to draw shapes; then the same UNet moved to v-prediction at zero terminal SNR
(`--zero_snr_steps`), as Stable Diffusion 2's 768-v model was moved from its noise-prediction base. Trained at zero
terminal SNR from the start, the UNet learns contexts as well but draws blurred shapes. The pipeline folder is
written at the end, in float16 (a few MB). Prompts are dropped (zero embeddings, as `force_zeros_for_empty_prompt`
makes the pipeline use for the negative prompt) 10% of the time, so classifier-free guidance works.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from scripts import toy_world  # noqa: E402
from scripts.toy_training import pixels_to_tensor, train_phase, world_batch  # noqa: E402

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 32),
    layers_per_block=1,
    norm_num_groups=16,
    latent_channels=4,
    sample_size=toy_world.IMAGE_SIZE,
    mid_block_add_attention=False,
    force_upcast=False,
)
LATENT_SIZE = toy_world.IMAGE_SIZE // 4
# Text encoders of the "tiny" SD-XL fixture: 32 + 32 wide, pooled projection 32.
UNET_CONFIG = dict(
    sample_size=LATENT_SIZE,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=2,
    transformer_layers_per_block=(1, 1),
    attention_head_dim=(2, 4),
    cross_attention_dim=64,
    norm_num_groups=32,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 32,
)
CROP = 32
CAPTION_DROPOUT = 0.1
LATENT_POOL = 4096  # pictures encoded once for the UNet phase
# How the saved EulerDiscreteScheduler differs from SD-XL's (see the module docstring).
NOISE_SCHEDULE = dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")
EMA_DECAY = 0.998  # the saved UNet is the average of about its last 500 steps


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", metavar="OUT_DIR", help="pipeline folder to write (checkpoints go inside)")
    # The recipe of `make toy-base`; the shipped models/toy-sdxl had 6000 noise-prediction steps (see the README).
    parser.add_argument("--vae_steps", type=int, default=1200, help="VAE steps, batch 16 (default 1200)")
    parser.add_argument("--unet_steps", type=int, default=4000, help="UNet steps, noise prediction (default 4000)")
    parser.add_argument(
        "--zero_snr_steps", type=int, default=1500, help="UNet steps, v-prediction at zero terminal SNR (default 1500)"
    )
    parser.add_argument("--unet_batch_size", type=int, default=16, help="UNet batch size (default 16)")
    parser.add_argument("--latent_pool", type=int, default=LATENT_POOL, help="pictures encoded for the UNet phase")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the weights (default 0)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a busy machine more threads mostly wait for each other)",
    )
    args = parser.parse_args(argv)
    for name in ("vae_steps", "unet_steps", "zero_snr_steps", "unet_batch_size", "latent_pool", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    return args


def build_vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**VAE_CONFIG)


def build_unet(seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed + 1)
    return UNet2DConditionModel(**UNET_CONFIG)


def train_vae(vae, checkpoint: Path, steps: int, seed: int) -> int:
    """Reconstruction (L1 + MSE) with a light KL term, on random 32 px crops of world pictures."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)

    def loss_at_step(step: int):
        pixels, _ = world_batch(seed, step, 16)
        crop = random.Random(step).randrange(0, toy_world.IMAGE_SIZE - CROP + 1, 4)
        pixels = pixels[:, :, crop : crop + CROP, crop : crop + CROP]
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        return F.l1_loss(reconstruction, pixels) + F.mse_loss(reconstruction, pixels) + 1e-6 * posterior.kl().mean()

    return train_phase("vae", checkpoint, vae, optimizer, steps, loss_at_step)


@torch.no_grad()
def encode_pool(vae, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Latent means and standard deviations of `count` world pictures, with their captions."""
    scenes = toy_world.sample_scenes(count, seed + 7)
    means, stds = [], []
    for start in range(0, count, 64):
        pixels = pixels_to_tensor(toy_world.render_batch(scenes[start : start + 64]))
        posterior = vae.encode(pixels).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds), [toy_world.caption(scene) for scene in scenes]


@torch.no_grad()
def encode_captions(pipe, captions: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each distinct caption's (prompt_embeds, pooled_prompt_embeds), as the pipeline computes them."""
    table = {}
    for caption in sorted(set(captions)):
        embeds, _, pooled, _ = pipe.encode_prompt(caption, device="cpu", do_classifier_free_guidance=False)
        table[caption] = (embeds[0], pooled[0])
    return table


def train_unet(
    unet,
    noise_schedule,
    *,
    means,
    stds,
    captions,
    text,
    scaling: float,
    checkpoint: Path,
    steps: int,
    batch_size: int,
    seed: int,
) -> int:
    """One UNet phase on `noise_schedule` (a DDPMScheduler), predicting what its `prediction_type` says, from the
    pool's latents (times the VAE's `scaling`) and the captions' embeddings `text` (`encode_captions`); returns the
    number of steps trained (0 when its checkpoint had finished it)."""
    size = toy_world.IMAGE_SIZE
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=1e-4)

    def loss_at_step(step: int):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        index = torch.randint(0, means.shape[0], (batch_size,), generator=generator)
        latents = means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)
        flip = torch.rand(batch_size, generator=generator) < 0.5
        latents = torch.where(flip[:, None, None, None], latents.flip(-1), latents) * scaling
        embeds = torch.stack([text[captions[i]][0] for i in index.tolist()])
        pooled = torch.stack([text[captions[i]][1] for i in index.tolist()])
        keep = (torch.rand(batch_size, generator=generator) >= CAPTION_DROPOUT).float()
        embeds, pooled = embeds * keep[:, None, None], pooled * keep[:, None]
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, noise_schedule.config.num_train_timesteps, (batch_size,), generator=generator)
        noisy = noise_schedule.add_noise(latents, noise, timesteps)
        prediction = unet(
            noisy,
            timesteps,
            embeds,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.expand(batch_size, -1)},
        ).sample
        if noise_schedule.config.prediction_type == "v_prediction":
            return F.mse_loss(prediction, noise_schedule.get_velocity(latents, noise, timesteps))
        return F.mse_loss(prediction, noise)

    return train_phase(checkpoint.stem, checkpoint, unet, optimizer, steps, loss_at_step, ema_decay=EMA_DECAY)


def save_pipeline(out: Path, unet, vae, scheduler, seed: int) -> None:
    """The text encoders and tokenizers of the tiny SD-XL fixture, with the trained UNet and VAE and their
    noise schedule."""
    from scripts.make_tiny_pipeline import save_pipeline as save_fixture

    keep = out / "checkpoints"
    staging = out.parent / f".{out.name}.pipeline"
    shutil.rmtree(staging, ignore_errors=True)
    save_fixture(staging, "sdxl", "tiny", seed=seed)
    for name, model in (("unet", unet), ("vae", vae)):
        shutil.rmtree(staging / name)
        model.to(torch.float16).save_pretrained(staging / name, safe_serialization=True)
        model.to(torch.float32)
    shutil.rmtree(staging / "scheduler")
    scheduler.save_pretrained(staging / "scheduler")
    for item in staging.iterdir():
        target = out / item.name
        if target.is_dir():
            shutil.rmtree(target)
        item.replace(target)
    staging.rmdir()
    assert keep.is_dir()


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffusers import DDPMScheduler, EulerDiscreteScheduler

    from scripts.make_tiny_pipeline import build_pipeline

    out = Path(args.out_dir)
    checkpoints = out / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()

    pipe = build_pipeline("sdxl", "tiny", seed=args.seed)
    vae = build_vae(args.seed)
    unet_phases = [checkpoints / "unet.safetensors", checkpoints / "unet-zero-snr.safetensors"]
    if train_vae(vae, checkpoints / "vae.safetensors", args.vae_steps, args.seed):
        # A UNet checkpoint learnt the latents of the VAE as it was: it cannot be resumed on a changed VAE.
        for checkpoint in unet_phases:
            checkpoint.unlink(missing_ok=True)
    vae.requires_grad_(False)

    means, stds, captions = encode_pool(vae, args.latent_pool, args.seed)
    # SD-XL scales latents to about unit variance before diffusion; measure that factor on the pool.
    vae.register_to_config(scaling_factor=round(1.0 / means.std().item(), 5))
    print(f"[vae] scaling_factor {vae.config.scaling_factor}; {len(set(captions))} distinct captions", flush=True)

    unet = build_unet(args.seed)
    text = encode_captions(pipe, captions)

    def unet_phase(noise_schedule, checkpoint: Path, steps: int) -> int:
        return train_unet(
            unet, noise_schedule, means=means, stds=stds, captions=captions, text=text,
            scaling=vae.config.scaling_factor, checkpoint=checkpoint, steps=steps, batch_size=args.unet_batch_size,
            seed=args.seed,
        )  # fmt: skip

    if unet_phase(DDPMScheduler.from_config(pipe.scheduler.config), unet_phases[0], args.unet_steps):
        # the second phase continues the first one's weights: a changed first phase starts it again
        unet_phases[1].unlink(missing_ok=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, **NOISE_SCHEDULE)
    unet_phase(DDPMScheduler.from_config(pipe.scheduler.config), unet_phases[1], args.zero_snr_steps)
    save_pipeline(out, unet, vae, pipe.scheduler, args.seed)
    print(f"Saved the toy base model to {out} in {time.perf_counter() - began:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
