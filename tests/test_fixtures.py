"""Checks for the locally built random pipelines of every model family, their builder script and the example image."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.tlora_testing import REPO_ROOT, generate, run_script

PROMPT = "a photo of sks dog"
FAMILIES = ("sd", "sdxl", "flux")
PIPELINES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "flux": "FluxPipeline"}
DENOISERS = {"sd": "unet", "sdxl": "unet", "flux": "transformer"}
# SD 1.5's and SD-XL base's noise schedule: (num_train_timesteps, beta_schedule, beta_start, beta_end)
SCALED_LINEAR_BETAS = (1000, "scaled_linear", 0.00085, 0.012)


def _betas(scheduler_config) -> tuple:
    c = scheduler_config
    return (c.num_train_timesteps, c.beta_schedule, c.beta_start, c.beta_end)


def _image_module():
    spec = importlib.util.spec_from_file_location(
        "make_example_image", REPO_ROOT / "examples" / "make_example_image.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    assert _betas(sched) == SCALED_LINEAR_BETAS
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
    for tokenizer, encoder in (
        (tiny_pipe.tokenizer, tiny_pipe.text_encoder),
        (tiny_pipe.tokenizer_2, tiny_pipe.text_encoder_2),
    ):
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


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_loads_offline_and_generates(family, request):
    import diffusers
    import huggingface_hub

    assert huggingface_hub.constants.HF_HUB_OFFLINE
    folder = request.getfixturevalue(f"tiny_{family}_dir")
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == PIPELINES[family]
    pipe = getattr(diffusers, PIPELINES[family]).from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)

    first = generate(pipe, steps=2, seed=0, height=64, width=64)
    second = generate(pipe, steps=2, seed=0, height=64, width=64)
    other = generate(pipe, steps=2, seed=1, height=64, width=64)
    assert first.shape == (1, 64, 64, 3)
    assert first.dtype == np.float32
    assert np.isfinite(first).all() and first.min() >= 0.0 and first.max() <= 1.0
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other)
    if family != "flux":  # FluxPipeline defaults to 1024 px whatever the model
        # Default size comes from unet.config.sample_size * vae_scale_factor.
        assert generate(pipe, steps=2, seed=0).shape == (1, 64, 64, 3)


def test_sd_fixture_is_shaped_like_sd15(tiny_sd_pipe):
    from diffusers import PNDMScheduler

    pipe = tiny_sd_pipe
    assert (pipe.safety_checker, pipe.feature_extractor) == (None, None)
    assert pipe.config.requires_safety_checker is False
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert pipe.text_encoder.config.hidden_act == "quick_gelu"
    assert pipe.tokenizer.pad_token == "<|endoftext|>" and pipe.tokenizer.model_max_length == 77
    unet = pipe.unet.config
    assert unet.addition_embed_type is None  # no SD-XL size/crop conditioning
    assert unet.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert "CrossAttnDownBlock2D" in unet.down_block_types and "CrossAttnUpBlock2D" in unet.up_block_types
    assert pipe.vae.config.scaling_factor == 0.18215 and pipe.vae_scale_factor == 8
    # stable-diffusion-v1-5's scheduler_config.json
    assert isinstance(pipe.scheduler, PNDMScheduler)
    sched = pipe.scheduler.config
    assert _betas(sched) == SCALED_LINEAR_BETAS
    assert (sched.skip_prk_steps, sched.set_alpha_to_one, sched.steps_offset) == (True, False, 1)
    assert sched.prediction_type == "epsilon"


def test_flux_fixture_is_shaped_like_flux1_dev(tiny_flux_pipe):
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = tiny_flux_pipe
    transformer = pipe.transformer.config
    assert transformer.attention_head_dim == sum(transformer.axes_dims_rope)  # rotary axes span one head
    assert transformer.num_layers >= 2 and transformer.num_single_layers >= 2
    assert transformer.in_channels == 4 * pipe.vae.config.latent_channels == 64  # 16 channels packed 2x2
    assert transformer.joint_attention_dim == pipe.text_encoder_2.config.d_model
    assert transformer.pooled_projection_dim == pipe.text_encoder.config.hidden_size
    assert transformer.guidance_embeds is True
    for name, module in pipe.transformer.named_modules():
        if name.endswith(("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj")):
            assert isinstance(module, torch.nn.Linear) and module.in_features >= 32 and module.out_features >= 32

    vae = pipe.vae.config
    assert (vae.latent_channels, vae.scaling_factor, vae.shift_factor) == (16, 0.3611, 0.1159)
    assert (vae.use_quant_conv, vae.use_post_quant_conv) == (False, False)
    assert pipe.vae.quant_conv is None and pipe.vae.post_quant_conv is None
    assert pipe.vae_scale_factor == 8

    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(pipe.text_encoder_2).__name__ == "T5EncoderModel"
    assert pipe.tokenizer.model_max_length == 77
    assert type(pipe.tokenizer_2).__name__ in ("T5Tokenizer", "T5TokenizerFast")
    assert pipe.tokenizer_2.model_max_length == 512
    assert len(pipe.tokenizer_2) == pipe.text_encoder_2.config.vocab_size

    # black-forest-labs/FLUX.1-dev's scheduler_config.json
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    sched = pipe.scheduler.config
    assert (sched.shift, sched.use_dynamic_shifting, sched.base_shift, sched.max_shift) == (3.0, True, 0.5, 1.15)
    assert (sched.num_train_timesteps, sched.base_image_seq_len, sched.max_image_seq_len) == (1000, 256, 4096)


@pytest.mark.parametrize("max_sequence_length", [32, 512])
def test_flux_prompt_lengths(tiny_flux_pipe, max_sequence_length):
    pipe = tiny_flux_pipe
    prompt_embeds, pooled, text_ids = pipe.encode_prompt(PROMPT, None, max_sequence_length=max_sequence_length)
    assert prompt_embeds.shape == (1, max_sequence_length, pipe.transformer.config.joint_attention_dim)
    assert pooled.shape == (1, pipe.transformer.config.pooled_projection_dim)
    assert text_ids.shape == (max_sequence_length, 3)
    image = generate(pipe, steps=2, seed=0, height=64, width=64, max_sequence_length=max_sequence_length)
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


T5_PROMPTS = [
    PROMPT,
    "a photo of sks cat",
    "a watercolor painting of a toy on the beach",
    "Zebra, 42 cafés!",  # not in the word list: spelled out, é unknown
    "",
]


def test_t5_tokenizer_round_trips(tmp_path, tiny_flux_pipe):
    from transformers import AutoTokenizer, T5TokenizerFast

    from scripts.tiny_tokenizers import build_t5_tokenizer

    tokenizer = build_t5_tokenizer()
    ids = [tokenizer(prompt).input_ids for prompt in T5_PROMPTS]
    # one piece per known word, then </s>; T5's ids for the special tokens
    assert tokenizer.convert_ids_to_tokens(ids[0]) == ["\u2581" + word for word in PROMPT.split()] + ["</s>"]
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert ids[-1] == [1]
    assert tokenizer.unk_token_id in ids[3] and len(ids[3]) > 5
    assert len({tuple(i) for i in ids}) == len(T5_PROMPTS)  # distinct prompts, distinct ids
    assert tokenizer.decode(ids[2], skip_special_tokens=True) == T5_PROMPTS[2]
    padded = tokenizer(PROMPT, padding="max_length", max_length=512, truncation=True).input_ids
    assert padded == ids[0] + [0] * (512 - len(ids[0]))
    assert tokenizer.model_max_length == 512

    tokenizer.save_pretrained(tmp_path)
    for loaded in (
        T5TokenizerFast.from_pretrained(tmp_path),
        AutoTokenizer.from_pretrained(tmp_path),
        tiny_flux_pipe.tokenizer_2,
    ):
        assert [loaded(prompt).input_ids for prompt in T5_PROMPTS] == ids
        assert loaded.model_max_length == 512 and len(loaded) == len(tokenizer)
        assert loaded.decode(ids[0], skip_special_tokens=True) == PROMPT


def test_full_flux_has_the_247_target_projections():
    """FLUX.1-dev's transformer on the meta device: the T-LoRA authors' FLUX projections, counted here from
    diffusers' module names."""
    import re

    from scripts.make_tiny_pipeline import build_denoiser

    transformer = build_denoiser("flux", "full", "meta")
    config = transformer.config
    assert (config.num_layers, config.num_single_layers) == (19, 38)
    assert (config.num_attention_heads, config.attention_head_dim) == (24, 128)
    assert (config.joint_attention_dim, config.pooled_projection_dim) == (4096, 768)
    assert config.guidance_embeds is True and tuple(config.axes_dims_rope) == (16, 56, 56)
    assert sum(p.numel() for p in transformer.parameters()) == 11_901_408_320
    assert all(p.device.type == "meta" for p in transformer.parameters())

    double = re.compile(r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj)")
    single = re.compile(r"single_transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v)")
    targets = {
        name: module
        for name, module in transformer.named_modules()
        if double.fullmatch(name) or single.fullmatch(name)
    }
    assert len(targets) == 19 * 7 + 38 * 3 == 247
    assert all(isinstance(module, torch.nn.Linear) for module in targets.values())
    assert all(module.in_features == 3072 for module in targets.values())


@pytest.mark.parametrize(
    "family, parameters",
    # the published parameter counts of SD 1.5's UNet and SD-XL base's UNet
    [("sd", 859_520_964), ("sdxl", 2_567_463_684)],
)
def test_full_unets_on_the_meta_device(family, parameters):
    from scripts.make_tiny_pipeline import build_denoiser

    unet = build_denoiser(family, "full", "meta", torch.float16)
    assert sum(p.numel() for p in unet.parameters()) == parameters
    assert {(p.device.type, p.dtype) for p in unet.parameters()} == {("meta", torch.float16)}
    assert torch.get_default_dtype() == torch.float32


def test_img2img_runs(tiny_sdxl_dir, example_image_path):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    image = Image.open(example_image_path).convert("RGB").resize((64, 64))
    out = generate(pipe, steps=4, seed=0, image=image, strength=0.5)
    assert out.shape == (1, 64, 64, 3)


@pytest.mark.parametrize("family", FAMILIES)
def test_weights_depend_only_on_seed(family, request):
    from scripts.make_tiny_pipeline import build_denoiser, build_pipeline

    saved_pipe = request.getfixturevalue(f"tiny_{family}_pipe" if family != "sdxl" else "tiny_pipe")
    rng_before = torch.get_rng_state()
    rebuilt = build_pipeline(family, "tiny", seed=0)
    other = build_pipeline(family, "tiny", seed=1)
    denoiser = build_denoiser(family, "tiny", seed=0)
    assert torch.equal(rng_before, torch.get_rng_state())
    modules = [name for name, c in saved_pipe.components.items() if isinstance(c, torch.nn.Module)]
    assert len(modules) == {"sd": 3, "sdxl": 4, "flux": 4}[family]
    for name in modules:
        saved = getattr(saved_pipe, name).state_dict()
        same = getattr(rebuilt, name).state_dict()
        diff = getattr(other, name).state_dict()
        assert saved.keys() == same.keys()
        assert all(torch.equal(saved[k], same[k]) for k in saved), name
        assert not all(torch.equal(saved[k], diff[k]) for k in saved), name
    # the denoiser built alone is the pipeline's
    saved = getattr(saved_pipe, DENOISERS[family]).state_dict()
    alone = denoiser.state_dict()
    assert saved.keys() == alone.keys() and all(torch.equal(saved[k], alone[k]) for k in saved)


def test_cli_refuses_non_empty_out_dir(tmp_path):
    (tmp_path / "keep.txt").write_text("do not touch")
    result = run_script("scripts/make_tiny_pipeline.py", tmp_path, "--family", "flux")
    assert result.returncode == 2, result.stderr
    assert "not an empty directory" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    assert (tmp_path / "keep.txt").read_text() == "do not touch"

    from scripts.make_tiny_pipeline import save_pipeline

    with pytest.raises(FileExistsError):
        save_pipeline(tmp_path, "sdxl")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--family", "sd3"], "argument --family: invalid choice: 'sd3'"),
        (["--size", "huge"], "argument --size: invalid choice: 'huge'"),
        (["--family", "flux", "--size", "full"], "--size full: full-size models are not written to disk"),
        (["--family", "sd"], "exists and is not an empty directory; choose another OUT_DIR or pass --overwrite"),
    ],
)
def test_cli_refuses_bad_input(argv, message, tmp_path, capsys):
    from scripts.make_tiny_pipeline import main

    (tmp_path / "keep.txt").write_text("do not touch")
    try:
        code = main([str(tmp_path), *argv])
    except SystemExit as exit_info:
        code = exit_info.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_overwrite_replaces_pipeline_files_only(tmp_path):
    from scripts.make_tiny_pipeline import save_pipeline

    (tmp_path / "notes.txt").write_text("unrelated")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "stale.bin").write_bytes(b"old")
    out = save_pipeline(tmp_path, "sd", overwrite=True)
    assert out == tmp_path
    assert (tmp_path / "notes.txt").read_text() == "unrelated"
    assert not (tmp_path / "unet" / "stale.bin").exists()
    assert (tmp_path / "model_index.json").is_file()
    # an SD-XL folder overwritten with a FLUX.1 one keeps no SD-XL component
    save_pipeline(tmp_path, "flux", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["model_index.json", "notes.txt", "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"]
        + ["transformer", "vae"]
    )


def test_small_size_config():
    from scripts.make_tiny_pipeline import build_pipeline

    pipe = build_pipeline("sdxl", "small", seed=0)
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


def test_unknown_family_or_size_is_rejected():
    from scripts.make_tiny_pipeline import build_denoiser, build_pipeline

    with pytest.raises(ValueError, match="unknown size 'huge'"):
        build_pipeline("sdxl", "huge")
    with pytest.raises(ValueError, match="unknown model family 'sd3'; expected one of sd, sdxl, flux"):
        build_denoiser("sd3", "tiny")
    with pytest.raises(ValueError, match="full-size models are built as a denoiser only"):
        build_pipeline("flux", "full")


def test_example_image(example_image_path):
    image = Image.open(example_image_path)
    assert image.mode == "RGB" and image.size == (512, 512)
    assert example_image_path.stat().st_size < 200 * 1024
    pixels = np.asarray(image)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 16  # a picture, not a flat fill
    redrawn = np.asarray(_image_module().draw_concept(512))
    np.testing.assert_array_equal(pixels, redrawn)
