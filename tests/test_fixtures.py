"""Checks for the locally built tiny SD-XL pipeline, its generator script and the example image."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent

PROMPT = "a photo of sks dog"


def _image_module():
    spec = importlib.util.spec_from_file_location("make_example_image", REPO_ROOT / "examples" / "make_example_image.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _generate(pipe, seed, **kwargs):
    kwargs.setdefault("num_inference_steps", 2)
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(PROMPT, generator=generator, output_type="np", **kwargs).images


def test_folder_loads_offline(tiny_sdxl_dir):
    import huggingface_hub
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    assert huggingface_hub.constants.HF_HUB_OFFLINE
    index = json.loads((tiny_sdxl_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    for name in ("tokenizer", "tokenizer_2"):
        assert (tiny_sdxl_dir / name / "vocab.json").is_file()
        assert (tiny_sdxl_dir / name / "merges.txt").is_file()

    # Text encoder weights use SD-XL's "text_model.*" names (loadable by transformers 4 and 5).
    from safetensors import safe_open

    for name in ("text_encoder", "text_encoder_2"):
        with safe_open(str(tiny_sdxl_dir / name / "model.safetensors"), framework="pt") as f:
            keys = set(f.keys())
        assert "text_model.embeddings.token_embedding.weight" in keys, name
        assert "text_model.final_layer_norm.weight" in keys, name

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, local_files_only=True)
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    sched = pipe.scheduler.config
    assert (sched.num_train_timesteps, sched.beta_schedule, sched.beta_start, sched.beta_end) == (
        1000,
        "scaled_linear",
        0.00085,
        0.012,
    )
    assert (sched.timestep_spacing, sched.steps_offset) == ("leading", 1)

    img2img = StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_sdxl_dir)
    assert img2img.unet.config.addition_embed_type == "text_time"


def test_tiny_config_and_attention_width(tiny_pipe):
    unet = tiny_pipe.unet
    assert tuple(unet.config.down_block_types) == ("DownBlock2D", "CrossAttnDownBlock2D")
    assert tuple(unet.config.up_block_types) == ("CrossAttnUpBlock2D", "UpBlock2D")
    assert tuple(unet.config.block_out_channels) == (32, 64)
    te1, te2 = tiny_pipe.text_encoder.config, tiny_pipe.text_encoder_2.config
    assert unet.config.cross_attention_dim == te1.hidden_size + te2.hidden_size
    assert (
        unet.config.projection_class_embeddings_input_dim
        == 6 * unet.config.addition_time_embed_dim + te2.projection_dim
    )
    assert tiny_pipe.vae_scale_factor == 8
    assert tiny_pipe.default_sample_size * tiny_pipe.vae_scale_factor == 64

    projections = {
        name: module
        for name, module in unet.named_modules()
        if name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or name.endswith("to_out.0")
    }
    assert len(projections) >= 4 * 2 * 2  # q, k, v, out x (self, cross) x at least two blocks
    for name, module in projections.items():
        assert isinstance(module, torch.nn.Linear), name
        assert module.out_features >= 32, (name, module)
        if not name.endswith(("attn2.to_k", "attn2.to_v")):
            assert module.in_features >= 32, (name, module)


def test_tokenizers_match_text_encoders(tiny_pipe):
    for tokenizer, encoder in ((tiny_pipe.tokenizer, tiny_pipe.text_encoder), (tiny_pipe.tokenizer_2, tiny_pipe.text_encoder_2)):
        assert len(tokenizer) == encoder.config.vocab_size
        assert tokenizer.model_max_length == 77
        assert encoder.config.eos_token_id == tokenizer.eos_token_id
        ids = tokenizer(PROMPT).input_ids
        # <|startoftext|>, one token per word, <|endoftext|>
        assert len(ids) == len(PROMPT.split()) + 2
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == PROMPT
        # Unknown words still tokenize (byte-level fallback).
        assert tokenizer.decode(tokenizer("zebra, Café").input_ids, skip_special_tokens=True) == "zebra , café"
    assert tiny_pipe.tokenizer.pad_token == "<|endoftext|>"
    assert tiny_pipe.tokenizer_2.pad_token == "!"


def test_generation_is_deterministic(tiny_pipe):
    first = _generate(tiny_pipe, seed=0, height=64, width=64)
    second = _generate(tiny_pipe, seed=0, height=64, width=64)
    other = _generate(tiny_pipe, seed=1, height=64, width=64)
    assert first.shape == (1, 64, 64, 3)
    assert first.dtype == np.float32
    assert np.isfinite(first).all() and first.min() >= 0.0 and first.max() <= 1.0
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other)
    # Default size comes from unet.config.sample_size * vae_scale_factor.
    assert _generate(tiny_pipe, seed=0).shape == (1, 64, 64, 3)


def test_img2img_runs(tiny_sdxl_dir, example_image_path):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    image = Image.open(example_image_path).convert("RGB").resize((64, 64))
    out = _generate(pipe, seed=0, image=image, strength=0.5, num_inference_steps=4)
    assert out.shape == (1, 64, 64, 3)


def test_weights_depend_only_on_seed(tiny_pipe):
    from scripts.make_tiny_sdxl import build_tiny_sdxl_pipeline

    rng_before = torch.get_rng_state()
    rebuilt = build_tiny_sdxl_pipeline("tiny", seed=0)
    other = build_tiny_sdxl_pipeline("tiny", seed=1)
    assert torch.equal(rng_before, torch.get_rng_state())
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        saved = getattr(tiny_pipe, name).state_dict()
        same = getattr(rebuilt, name).state_dict()
        diff = getattr(other, name).state_dict()
        assert saved.keys() == same.keys()
        assert all(torch.equal(saved[k], same[k]) for k in saved), name
        assert not all(torch.equal(saved[k], diff[k]) for k in saved), name


def test_cli_refuses_non_empty_out_dir(tmp_path):
    (tmp_path / "keep.txt").write_text("do not touch")
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "make_tiny_sdxl.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "not an empty directory" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    assert (tmp_path / "keep.txt").read_text() == "do not touch"

    from scripts.make_tiny_sdxl import save_tiny_sdxl

    with pytest.raises(FileExistsError):
        save_tiny_sdxl(tmp_path)


def test_overwrite_replaces_pipeline_files_only(tmp_path):
    from scripts.make_tiny_sdxl import save_tiny_sdxl

    (tmp_path / "notes.txt").write_text("unrelated")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "stale.bin").write_bytes(b"old")
    out = save_tiny_sdxl(tmp_path, overwrite=True)
    assert out == tmp_path
    assert (tmp_path / "notes.txt").read_text() == "unrelated"
    assert not (tmp_path / "unet" / "stale.bin").exists()
    assert (tmp_path / "model_index.json").is_file()


def test_small_size_config():
    from scripts.make_tiny_sdxl import build_tiny_sdxl_pipeline

    pipe = build_tiny_sdxl_pipeline("small", seed=0)
    cfg = pipe.unet.config
    assert tuple(cfg.down_block_types) == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    assert tuple(cfg.up_block_types) == ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    assert tuple(cfg.block_out_channels) == (64, 128, 256)
    assert tuple(cfg.transformer_layers_per_block) == (1, 2, 4)
    assert tuple(cfg.attention_head_dim) == (2, 4, 8)
    assert cfg.cross_attention_dim == 256
    assert cfg.addition_embed_type == "text_time"
    assert cfg.addition_time_embed_dim == 32
    assert cfg.projection_class_embeddings_input_dim == 6 * 32 + 128
    assert cfg.layers_per_block == 2
    assert cfg.sample_size == 32
    assert pipe.text_encoder.config.hidden_size == 128
    assert pipe.text_encoder_2.config.hidden_size == 128
    assert pipe.text_encoder_2.config.projection_dim == 128
    vae = pipe.vae.config
    assert tuple(vae.block_out_channels) == (32, 64, 64, 64)
    assert (vae.layers_per_block, vae.latent_channels) == (1, 4)
    assert pipe.vae_scale_factor == 8
    assert cfg.sample_size * pipe.vae_scale_factor == 256


def test_unknown_size_is_rejected():
    from scripts.make_tiny_sdxl import build_tiny_sdxl_pipeline

    with pytest.raises(ValueError, match="unknown size"):
        build_tiny_sdxl_pipeline("huge")


def test_example_image(example_image_path):
    image = Image.open(example_image_path)
    assert image.mode == "RGB" and image.size == (512, 512)
    assert example_image_path.stat().st_size < 200 * 1024
    pixels = np.asarray(image)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 16  # a picture, not a flat fill
    redrawn = np.asarray(_image_module().draw_concept(512))
    np.testing.assert_array_equal(pixels, redrawn)
