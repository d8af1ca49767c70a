"""Tests of what is particular to train_tlora_sdxl.py: its defaults, the denoising loss with one rank mask per
sample, and a vanilla run with gradient checkpointing. What every training script guarantees is tested for
both scripts in test_train_scripts.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image

import pipelines.tlora as tl
import train_tlora_sdxl as train
from pipelines.tlora.families import SDXL
from training.adapter import method_name, tlora_config_from_args
from training.data import make_record
from training.errors import InputError

from tests.tlora_testing import (
    EXAMPLE_IMAGE,
    REPO_ROOT,
    fake_hub,
    generate,
    read_adapter,
    run_main,
)

PROMPT = "a photo of sks toy"
SMALL_RUN = ["--resolution", "64", "--rank", "8", "--learning_rate", "1e-2", "--seed", "0", "--report_to", "none"]


pytestmark = pytest.mark.usefixtures("cpu_accelerate")


def base_args(model_dir, output_dir, instance=None, *extra) -> list:
    instance = instance or EXAMPLE_IMAGE
    return [
        "--pretrained_model_name_or_path", model_dir, "--instance_data_dir", instance,
        "--instance_prompt", PROMPT, "--output_dir", output_dir, *SMALL_RUN, *extra,
    ]  # fmt: skip


# --------------------------------------------------------------------------- command line


MINIMAL = ["--pretrained_model_name_or_path", "m", "--instance_prompt", PROMPT]
MINIMAL += ["--instance_data_dir", str(REPO_ROOT / "examples")]


def test_defaults_follow_the_paper_and_diffusers():
    args = train.parse_args(MINIMAL)
    assert (args.rank, args.min_rank, args.rank_schedule_exponent) == (64, 32, 1.0)
    assert (args.tlora_variant, args.ortho_init, args.ortho_init_source, args.lora_alpha) == (
        "ortho",
        "last",
        "random",
        None,
    )
    assert args.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
    assert (args.learning_rate, args.adam_weight_decay, args.lr_scheduler, args.lr_warmup_steps) == (
        1e-4,
        1e-4,
        "constant",
        0,
    )
    assert (args.train_batch_size, args.resolution, args.max_train_steps, args.optimizer) == (1, 1024, 800, "adamw")
    assert (args.report_to, args.output_dir, args.cache_latents) == ("tensorboard", "tlora-dreambooth-model", None)
    config = tlora_config_from_args(args, SDXL)
    assert (config.init, config.base_model, method_name(config)) == ("random-last", "m", "T-LoRA")


def test_validation_prompts_take_several_values_and_repeat():
    args = train.parse_args([*MINIMAL, "--validation_prompt", "a", "b", "--validation_prompt", "c"])
    assert args.validation_prompt == ["a", "b", "c"]


def test_min_rank_equal_to_rank_trains_the_unmasked_baselines():
    args = train.parse_args([*MINIMAL, "--rank", "16", "--min_rank", "16", "--tlora_variant", "vanilla"])
    config = tlora_config_from_args(args, SDXL)
    assert not config.is_masked and config.init == "normal" and method_name(config) == "LoRA"


# --------------------------------------------------------------------------- per-sample masks


def _unet_with_adapter(tiny_sdxl_dir) -> torch.nn.Module:
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    unet.requires_grad_(False)
    tl.inject_tlora(unet, tl.TLoraConfig(rank=8, min_rank=2), generator=torch.Generator().manual_seed(0))
    return unet


def _batch(size: int):
    generator = torch.Generator().manual_seed(1)
    conditioning = {
        "encoder_hidden_states": torch.randn(size, 77, 64, generator=generator),
        "text_embeds": torch.randn(size, 32, generator=generator),
        "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * size),
    }
    return (
        torch.randn(size, 4, 8, 8, generator=generator),
        torch.randn(size, 4, 8, 8, generator=generator),
        conditioning,
    )


def _loss_and_gradients(unet, scheduler, latents, noise, timesteps, conditioning, num_instance=None, weight=1.0):
    unet.zero_grad(set_to_none=True)
    num_instance = len(latents) if num_instance is None else num_instance
    loss = train.diffusion_loss(unet, scheduler, latents, noise, timesteps, conditioning, num_instance, None, weight)
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in unet.named_parameters() if p.requires_grad}


def _sample(i: int, latents, noise, timesteps, conditioning) -> tuple:
    """Sample i of a batch, as a batch of one."""
    one = slice(i, i + 1)
    return latents[one], noise[one], timesteps[one], {key: value[one] for key, value in conditioning.items()}


def test_each_sample_of_a_batch_trains_with_its_own_rank_mask(tiny_sdxl_dir):
    from diffusers import DDPMScheduler

    unet, scheduler = _unet_with_adapter(tiny_sdxl_dir), DDPMScheduler(num_train_timesteps=1000)
    latents, noise, conditioning = _batch(2)
    timesteps = torch.tensor([0, 999])  # ranks 8 and 2

    _, batch = _loss_and_gradients(unet, scheduler, latents, noise, timesteps, conditioning)
    singles = [
        _loss_and_gradients(unet, scheduler, *_sample(i, latents, noise, timesteps, conditioning))[1] for i in range(2)
    ]
    for name, gradient in batch.items():
        torch.testing.assert_close(gradient, (singles[0][name] + singles[1][name]) / 2, atol=1e-6, rtol=1e-5)

    # The high-noise sample leaves components 2.. of every adapter untouched; the low-noise one trains them.
    up_gradients = [name for name in batch if name.endswith(".up") and batch[name].shape[1] == 8]
    assert up_gradients
    for name in up_gradients:
        assert torch.all(singles[1][name][:, 2:] == 0)
        assert singles[0][name][:, 2:].abs().sum() > 0

    # A batch whose samples shared the first sample's timestep would train differently.
    _, shared = _loss_and_gradients(unet, scheduler, latents, noise, timesteps[:1].expand(2), conditioning)
    assert any(not torch.allclose(batch[name], shared[name]) for name in up_gradients)


def test_prior_preservation_loss_is_instance_plus_weighted_class_loss(tiny_sdxl_dir):
    from diffusers import DDPMScheduler

    unet, scheduler = _unet_with_adapter(tiny_sdxl_dir), DDPMScheduler(num_train_timesteps=1000)
    latents, noise, conditioning = _batch(2)
    timesteps = torch.tensor([100, 800])
    with torch.no_grad():
        combined = train.diffusion_loss(unet, scheduler, latents, noise, timesteps, conditioning, 1, None, 0.5)
        parts = [
            train.diffusion_loss(unet, scheduler, *_sample(i, latents, noise, timesteps, conditioning), 1)
            for i in range(2)
        ]
    torch.testing.assert_close(combined, parts[0] + 0.5 * parts[1])


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_min_snr_weighting_matches_its_formula_up_to_the_last_timestep(tiny_sdxl_dir, zero_terminal_snr):
    from diffusers import DDPMScheduler

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    prediction_type = "v_prediction" if zero_terminal_snr else "epsilon"
    schedule = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    scheduler = DDPMScheduler(**schedule, prediction_type=prediction_type, rescale_betas_zero_snr=zero_terminal_snr)
    latents, noise, conditioning = _batch(3)
    timesteps, gamma = torch.tensor([0, 500, 999]), 5.0
    with torch.no_grad():
        loss = train.diffusion_loss(unet, scheduler, latents, noise, timesteps, conditioning, 3, gamma)

    # The schedule from its definition: SD-XL's betas, and for zero terminal SNR Lin et al.'s rescaling
    # (arXiv 2305.08891, algorithm 1) of sqrt(alpha_bar) to end at 0 and start where it started.
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    root = torch.cumprod(1 - betas, 0).sqrt()
    if zero_terminal_snr:
        root = (root - root[-1]) * root[0] / (root[0] - root[-1])
    signal, noise_level = root[timesteps].float(), (1 - root[timesteps] ** 2).sqrt().float()
    noisy = signal[:, None, None, None] * latents + noise_level[:, None, None, None] * noise
    with torch.no_grad():
        prediction = unet(
            noisy, timesteps, conditioning["encoder_hidden_states"],
            added_cond_kwargs={"text_embeds": conditioning["text_embeds"], "time_ids": conditioning["time_ids"]},
        ).sample  # fmt: skip
    if zero_terminal_snr:
        target = signal[:, None, None, None] * noise - noise_level[:, None, None, None] * latents
    else:
        target = noise
    snr = (signal / noise_level) ** 2
    # min(snr, gamma) / snr, whose limit at snr = 0 is 1; diffusers adds 1 for v-prediction
    weights = torch.tensor([min(s, gamma) / s if s > 0 else 1.0 for s in snr.tolist()])
    weights = weights + 1 if zero_terminal_snr else weights
    if zero_terminal_snr:
        assert snr[-1] == 0
    expected = (weights * ((prediction - target) ** 2).mean(dim=(1, 2, 3))).mean()
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_sdxl_dir):
    from diffusers import DDPMScheduler

    unet, scheduler = _unet_with_adapter(tiny_sdxl_dir), DDPMScheduler(num_train_timesteps=1000)
    unet.train()
    latents, noise, conditioning = _batch(2)
    timesteps = torch.tensor([30, 700])
    plain_loss, plain = _loss_and_gradients(unet, scheduler, latents, noise, timesteps, conditioning)
    unet.enable_gradient_checkpointing()
    checkpointed_loss, checkpointed = _loss_and_gradients(unet, scheduler, latents, noise, timesteps, conditioning)
    assert checkpointed_loss == pytest.approx(plain_loss, abs=1e-7)
    for name, gradient in plain.items():
        torch.testing.assert_close(checkpointed[name], gradient, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------- end-to-end runs


@pytest.mark.slow
def test_vanilla_run_with_gradient_checkpointing(tiny_sdxl_dir, tmp_path, tiny_pipe, caplog):
    output = tmp_path / "out"
    run_main(train, *base_args(
        tiny_sdxl_dir, output, None, "--tlora_variant", "vanilla", "--gradient_checkpointing",
        "--max_train_steps", "2",
        "--resume_from_checkpoint", "latest", "--validation_prompt", PROMPT, "--num_validation_images", "1",
        "--num_inference_steps", "2",
    ))  # fmt: skip
    assert "no checkpoint in" in caplog.text and "starting a new training run" in caplog.text
    state_dict, config = read_adapter(output)
    assert (config.variant, config.init, method_name(config)) == ("vanilla", "normal", "Vanilla T-LoRA")
    assert {key.rsplit(".tlora.", 1)[1] for key in state_dict} == {"down", "up"}
    assert (output / "validation" / "step-2" / "prompt-0_image-0.png").is_file()
    assert "Vanilla T-LoRA" in (output / "README.md").read_text()
    before = generate(tiny_pipe, PROMPT, steps=2)[0]
    tiny_pipe.load_tlora_weights(str(output))
    assert np.abs(generate(tiny_pipe, PROMPT, steps=2)[0] - before).max() > 1e-4


@pytest.mark.slow
def test_export_for_tools_writes_and_uploads_the_files_other_tools_load(tiny_sdxl_dir, tmp_path, monkeypatch):
    calls = fake_hub(monkeypatch)
    output = tmp_path / "my-toy"
    run_main(train, *base_args(tiny_sdxl_dir, output, None, "--max_train_steps", "1", "--push_to_hub",
                               "--hub_token", "hf_test", "--export_for_tools"))  # fmt: skip
    node, kohya = "my-toy_tlora-node_ortho_r8-min4.safetensors", "my-toy_lora-rank16.safetensors"
    assert {"README.md", tl.WEIGHT_NAME, "pipeline.py", "tlora_loader.py", node, kohya} <= set(
        calls["upload"]["files"]
    )
    card = (output / "README.md").read_text()
    assert f"| `{node}` | ComfyUI with the ComfyUI-T-LoRA custom nodes" in card
    assert f"| `{kohya}` | ComfyUI's LoraLoader" in card


def test_an_image_far_from_square_is_refused_before_resizing(tmp_path):
    Image.new("RGB", (60000, 2), "red").save(tmp_path / "strip.png")
    with pytest.raises(InputError, match=r"strip.png is 60000x2 px, more than 16 times wider than high"):
        make_record(tmp_path / "strip.png", str(tmp_path / "strip.png"), 1024, PROMPT)
