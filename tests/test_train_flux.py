"""Tests of what is particular to train_tlora_flux.py: its defaults, the flow-matching loss with one noise level
and one rank mask per sample, prompts encoded once with the text encoders freed, and training on a quantised
base. What every training script guarantees is tested for both scripts in test_train_scripts.py.
"""

from __future__ import annotations

import gc
import math
import re
import sys
import weakref

import bitsandbytes as bnb
import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from huggingface_hub import ModelCard
from safetensors.torch import load_file

import pipelines.tlora as tl
import train_tlora_flux as train
from pipelines.tlora.families import FLUX
from training.adapter import method_name, tlora_config_from_args
from training.model_card import write_model_card
from training.run import make_accelerator

from tests.tlora_testing import EXAMPLE_IMAGE, generate, read_adapter, run_main

PROMPT = "a photo of sks toy"
MINIMAL = ["--pretrained_model_name_or_path", "m", "--instance_prompt", PROMPT, "--instance_data_dir", EXAMPLE_IMAGE]
SMALL_RUN = ["--resolution", "64", "--rank", "8", "--seed", "0", "--report_to", "none", "--max_sequence_length", "32"]


pytestmark = pytest.mark.usefixtures("cpu_accelerate")


def test_defaults_follow_the_papers_flux_recipe():
    args = train.parse_args([str(part) for part in MINIMAL])
    assert (args.tlora_variant, args.rank, args.min_rank, args.max_train_steps) == ("vanilla", 32, 1, 500)
    assert (args.optimizer, args.learning_rate, args.adam_weight_decay, args.lr_scheduler) == (
        "prodigy",
        1.0,
        1e-4,
        "constant",
    )
    assert (args.prodigy_decouple, args.prodigy_use_bias_correction, args.prodigy_safeguard_warmup) == (True,) * 3
    assert (args.guidance_scale, args.weighting_scheme, args.mixed_precision) == (1.0, "none", "bf16")
    assert (args.train_batch_size, args.max_grad_norm, args.max_sequence_length) == (1, 1.0, 512)
    assert (args.num_inference_steps, args.validation_guidance_scale) == (28, 3.5)
    assert (args.base_quantization, args.resolution) == ("none", 512)
    assert args.target_modules == ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj"]
    config = tlora_config_from_args(args, FLUX)
    assert (config.init, config.model_family, method_name(config)) == ("normal", "flux", "Vanilla T-LoRA")


def test_timesteps_are_uniform_over_the_training_timesteps_without_shift():
    args = train.parse_args([str(part) for part in MINIMAL])
    sigmas = train.sample_sigmas(args, 20000, 1000, torch.Generator().manual_seed(3))
    # An independent draw with the same generator: u uniform in [0, 1), t = 1000 - floor(1000 u), sigma = t / 1000.
    u = torch.rand(20000, generator=torch.Generator().manual_seed(3))
    expected = (1000 - torch.floor(u * 1000)) / 1000
    assert sigmas.dtype == torch.float32
    torch.testing.assert_close(sigmas, expected, rtol=0, atol=0)
    assert sigmas.min() >= 0.001 and sigmas.max() <= 1.0
    assert abs(sigmas.mean().item() - 0.5005) < 0.01  # uniform, no shift towards high noise


# --------------------------------------------------------------------------- the loss


def _transformer_with_adapter(tiny_flux_dir) -> torch.nn.Module:
    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux_dir, subfolder="transformer")
    transformer.requires_grad_(False)
    config = tl.TLoraConfig.for_family("flux", rank=8, min_rank=2)
    for adapter in tl.inject_tlora(transformer, config, generator=torch.Generator().manual_seed(0)).values():
        with torch.no_grad():  # vanilla `up` starts at zero; move it so that every factor gets a gradient
            adapter.up.normal_(generator=torch.Generator().manual_seed(1))
    return transformer


def _batch(transformer, size: int):
    generator = torch.Generator().manual_seed(1)
    config = transformer.config
    conditioning = {
        "encoder_hidden_states": torch.randn(size, 8, config.joint_attention_dim, generator=generator),
        "pooled_projections": torch.randn(size, config.pooled_projection_dim, generator=generator),
        "txt_ids": torch.zeros(8, 3),
        "guidance": torch.full((size,), 1.0),
    }
    latents = torch.randn(size, 16, 8, 8, generator=generator)
    noise = torch.randn(size, 16, 8, 8, generator=generator)
    return latents, noise, conditioning


def _sample(i: int, latents, noise, sigmas, conditioning) -> tuple:
    """Sample i of a batch, as a batch of one."""
    one = slice(i, i + 1)
    rows = {key: value[one] if key in ("encoder_hidden_states", "pooled_projections", "guidance") else value
            for key, value in conditioning.items()}  # fmt: skip
    return latents[one], noise[one], sigmas[one], rows


def _loss_and_gradients(transformer, latents, noise, sigmas, conditioning, num_instance=None, weight=1.0):
    transformer.zero_grad(set_to_none=True)
    num_instance = len(latents) if num_instance is None else num_instance
    loss = train.flow_matching_loss(transformer, latents, noise, sigmas, conditioning, num_instance, "none", weight)
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in transformer.named_parameters() if p.requires_grad}


def _reference_loss(transformer, latents, noise, sigma: float, conditioning) -> torch.Tensor:
    """Flow matching for one sample written out: x_t = (1 - s) x0 + s n, target n - x0, the transformer on
    2x2 patches of the latents (channels, then the patch's row and column, as FLUX packs them)."""
    noisy = (1 - sigma) * latents + sigma * noise
    _, channels, height, width = latents.shape

    def patches(x):
        x = x.view(1, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(1, (height // 2) * (width // 2), channels * 4)

    positions = torch.zeros(height // 2, width // 2, 3)
    positions[..., 1] = torch.arange(height // 2)[:, None]
    positions[..., 2] = torch.arange(width // 2)[None, :]
    prediction = transformer(
        hidden_states=patches(noisy),
        timestep=torch.tensor([sigma]),
        guidance=conditioning["guidance"],
        pooled_projections=conditioning["pooled_projections"],
        encoder_hidden_states=conditioning["encoder_hidden_states"],
        txt_ids=conditioning["txt_ids"],
        img_ids=positions.reshape(-1, 3),
    ).sample
    return ((prediction - patches(noise - latents)) ** 2).mean()


def test_flow_matching_loss_matches_a_written_out_reference(tiny_flux_dir):
    transformer = _transformer_with_adapter(tiny_flux_dir)
    latents, noise, conditioning = _batch(transformer, 2)
    sigmas = torch.tensor([0.25, 0.9])
    with torch.no_grad():
        combined = train.flow_matching_loss(transformer, latents, noise, sigmas, conditioning, 1, "none", 0.5)
        parts = []
        for i in range(2):
            one_latents, one_noise, one_sigma, one_conditioning = _sample(i, latents, noise, sigmas, conditioning)
            parts.append(_reference_loss(transformer, one_latents, one_noise, one_sigma.item(), one_conditioning))
    # The first sample is an instance image, the second a class image weighted 0.5.
    torch.testing.assert_close(combined, parts[0] + 0.5 * parts[1], rtol=1e-5, atol=1e-6)


def test_each_sample_of_a_batch_trains_with_its_own_rank_mask(tiny_flux_dir):
    transformer = _transformer_with_adapter(tiny_flux_dir)
    latents, noise, conditioning = _batch(transformer, 2)
    sigmas = torch.tensor([0.001, 1.0])  # t = 1 (rank 8) and t = 1000 (rank 2)

    _, batch = _loss_and_gradients(transformer, latents, noise, sigmas, conditioning)
    singles = [
        _loss_and_gradients(transformer, *_sample(i, latents, noise, sigmas, conditioning))[1] for i in range(2)
    ]
    for name, gradient in batch.items():
        torch.testing.assert_close(gradient, (singles[0][name] + singles[1][name]) / 2, atol=1e-6, rtol=1e-5)

    # The pure-noise sample leaves components 2.. of every adapter untouched; the nearly clean one trains them.
    up_gradients = [name for name in batch if name.endswith(".up")]
    assert len(up_gradients) == 20  # 2 double-stream blocks x 7 projections + 2 single-stream blocks x 3
    for name in up_gradients:
        assert torch.all(singles[1][name][:, 2:] == 0)
        assert singles[0][name][:, 2:].abs().sum() > 0


def test_weighting_schemes_weight_each_sample_by_its_noise_level(tiny_flux_dir):
    transformer = _transformer_with_adapter(tiny_flux_dir)
    latents, noise, conditioning = _batch(transformer, 2)
    sigmas = torch.tensor([0.25, 0.5])
    with torch.no_grad():
        plain = [train.flow_matching_loss(transformer, *_sample(i, latents, noise, sigmas, conditioning), 1, "none")
                 for i in range(2)]  # fmt: skip
        weighted = train.flow_matching_loss(transformer, latents, noise, sigmas, conditioning, 2, "sigma_sqrt")
        cosmap = train.flow_matching_loss(transformer, latents, noise, sigmas, conditioning, 2, "cosmap")
    # sigma_sqrt weighs by sigma^-2, cosmap by 2 / (pi (1 - 2 s + 2 s^2)), as the SD3 paper.
    torch.testing.assert_close(weighted, (plain[0] / 0.25**2 + plain[1] / 0.5**2) / 2, rtol=1e-5, atol=1e-6)
    cos = [2 / (math.pi * (1 - 2 * s + 2 * s**2)) for s in (0.25, 0.5)]
    torch.testing.assert_close(cosmap, (cos[0] * plain[0] + cos[1] * plain[1]) / 2, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- models and runs


def test_prompts_are_encoded_once_and_the_text_encoders_freed(tiny_flux_dir, monkeypatch):
    encoders = []
    from_pretrained = FluxPipeline.from_pretrained

    def recording_from_pretrained(*args, **kwargs):
        pipeline = from_pretrained(*args, **kwargs)
        encoders.extend(weakref.ref(module) for module in (pipeline.text_encoder, pipeline.text_encoder_2))
        return pipeline

    monkeypatch.setattr(FluxPipeline, "from_pretrained", recording_from_pretrained)
    args = train.parse_args([str(part) for part in [
        *MINIMAL, "--pretrained_model_name_or_path", tiny_flux_dir, *SMALL_RUN, "--mixed_precision", "no",
        "--validation_prompt", "a photo of sks toy on the moon", "--with_prior_preservation",
        "--class_prompt", "a photo of a toy", "--class_data_dir", tiny_flux_dir,
    ]])  # fmt: skip
    models = train.load_models(args, make_accelerator(args), [PROMPT], torch.float32)
    gc.collect()
    assert len(encoders) == 2 and all(ref() is None for ref in encoders)
    assert models.pipeline.text_encoder is None and models.pipeline.text_encoder_2 is None
    # Sampling goes through the training transformer itself, not a copy.
    assert models.pipeline.transformer is models.transformer
    assert models.prompt_embeds.shape == (1, 32, models.transformer.config.joint_attention_dim)
    assert len(models.validation_embeddings) == 1 and set(models.class_embeddings) == {
        "prompt_embeds",
        "pooled_prompt_embeds",
    }


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_training_on_a_quantised_base(quantization, tiny_flux_dir, tmp_path, monkeypatch):
    """The command line's defaults (Prodigy, bf16 compute) on a base whose linear layers are bitsandbytes
    layers: the loss stays finite and the adapter loads into a stock, unquantised pipeline."""
    losses, layer_types = [], set()
    loss_function = train.flow_matching_loss

    def recording_loss(transformer, *args, **kwargs):
        layer_types.update(type(module) for path, module in transformer.named_modules() if path.endswith("attn.to_q"))
        loss = loss_function(transformer, *args, **kwargs)
        losses.append(loss.item())
        return loss

    monkeypatch.setattr(train, "flow_matching_loss", recording_loss)
    output = tmp_path / "out"
    run_main(train, *MINIMAL, "--pretrained_model_name_or_path", tiny_flux_dir, "--output_dir", output, *SMALL_RUN,
             "--max_train_steps", "3", "--base_quantization", quantization)  # fmt: skip
    expected_layer = bnb.nn.Linear4bit if quantization == "nf4" else bnb.nn.Linear8bitLt
    assert layer_types == {expected_layer}  # the adapted projections themselves are quantised
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    state_dict, config = read_adapter(output)
    assert config.model_family == "flux" and all(torch.isfinite(t).all() for t in state_dict.values())
    assert "| base quantisation | " + quantization + " |" in (output / "README.md").read_text()
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_tlora_weights(str(output))
    image = generate(pipe, PROMPT, steps=2, height=64, width=64, max_sequence_length=32)
    assert np.isfinite(image).all()


def test_a_quantised_base_on_an_unsupported_device_stops_before_loading(tmp_path, monkeypatch, capsys):
    from accelerate import Accelerator

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(FluxPipeline, "from_pretrained", no_loading)
    monkeypatch.setattr(Accelerator, "device", property(lambda self: torch.device("mps")))
    argv = [*MINIMAL, "--output_dir", tmp_path / "out", "--base_quantization", "nf4"]
    monkeypatch.setattr(sys, "argv", ["train_tlora_flux.py", *map(str, argv)])
    with pytest.raises(SystemExit) as exit_info:
        train.cli()
    assert exit_info.value.code == 2
    assert "error: --base_quantization nf4: bitsandbytes cannot quantise on mps" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# The licence each base model's adapter carries, as the Hub's model pages state it.
BASE_MODEL_LICENSES = {
    "black-forest-labs/FLUX.1-dev": ("other", "flux-1-dev-non-commercial-license", "FLUX.1 [dev] Non-Commercial"),
    "black-forest-labs/FLUX.1-schnell": ("apache-2.0", None, "Apache 2.0"),
    "someone/flux-finetune": (None, None, "carries the base model's licence."),
}


@pytest.mark.parametrize("base_model", list(BASE_MODEL_LICENSES))
def test_the_model_card_states_the_licence_of_the_base_model(base_model, tmp_path):
    args = train.parse_args([*map(str, MINIMAL), "--output_dir", str(tmp_path)])
    args.pretrained_model_name_or_path = base_model  # given as a Hub id: the check of a local folder is skipped
    write_model_card(args, tlora_config_from_args(args, FLUX), train.MODEL_CARD, [], None, steps=1)
    card = ModelCard.load(tmp_path / "README.md")
    license_id, license_name, text = BASE_MODEL_LICENSES[base_model]
    assert (card.data.license, card.data.get("license_name"), card.data.base_model) == (
        license_id, license_name, base_model
    )  # fmt: skip
    assert text in card.text
    assert ("Non-Commercial" in card.text) == (base_model == "black-forest-labs/FLUX.1-dev")


@pytest.mark.slow
def test_export_for_tools_writes_a_standard_lora_in_diffusers_layout(tiny_flux_dir, tiny_flux_pipe, tmp_path):
    output = tmp_path / "my-toy"
    run_main(train, *SMALL_RUN, *MINIMAL[2:], "--pretrained_model_name_or_path", tiny_flux_dir, "--output_dir", output,
             "--optimizer", "adamw", "--mixed_precision", "no", "--max_train_steps", "1",
             "--export_for_tools")  # fmt: skip
    lora = "my-toy_lora-rank8.safetensors"  # not diffusers' standard name: the folder holds the T-LoRA file
    assert sorted(path.name for path in output.glob("*.safetensors")) == [lora, tl.WEIGHT_NAME]
    assert not list(output.glob("*tlora-node*"))  # ComfyUI's T-LoRA node loads UNet adapters only
    tensors = load_file(output / lora)
    assert tensors and all(re.fullmatch(r"transformer\..+\.lora_[AB]\.weight", key) for key in tensors)
    assert f"| `{lora}` | diffusers' `load_lora_weights" in (output / "README.md").read_text()
    read_adapter(output)  # the folder still reads as one T-LoRA adapter
    before = generate(tiny_flux_pipe, PROMPT, steps=2, height=64, width=64, max_sequence_length=32)[0]
    tiny_flux_pipe.load_lora_weights(output, weight_name=lora)
    after = generate(tiny_flux_pipe, PROMPT, steps=2, height=64, width=64, max_sequence_length=32)[0]
    assert np.abs(after - before).max() > 1e-4
