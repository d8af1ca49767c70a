#!/usr/bin/env python
"""Build randomly initialised diffusers pipelines of every model family T-LoRA adapts, entirely offline.

Tests, the demo and the benchmarks need real pipeline folders (`save_pretrained` layout, loadable with the
stock class's `from_pretrained` under `HF_HUB_OFFLINE=1`) but no downloads. Every component is created here:
the denoiser, the VAE, the text encoders, their tokenizers (`scripts/tiny_tokenizers.py`) and the scheduler,
configured like the family's reference checkpoint.

    family  pipeline class               denoiser                 text encoders (tokenizers)         scheduler
    sd      StableDiffusionPipeline      UNet2DConditionModel     CLIP (BPE)                         PNDM, as SD 1.5
    sdxl    StableDiffusionXLPipeline    UNet2DConditionModel     CLIP + CLIP with projection (BPE)  Euler, as SD-XL
    flux    FluxPipeline                 FluxTransformer2DModel   CLIP (BPE) + T5 encoder (Unigram)  flow-match Euler,
                                                                                                     as FLUX.1-dev

Sizes
-----
``tiny`` (tests) 64 px; a 2-step generation takes a fraction of a second on a CPU.
``small`` (benchmarks) 256 px; the family's block structure, scaled down.
``full`` the reference checkpoint's denoiser architecture (SD 1.5, SD-XL base, FLUX.1-dev) with random
    weights, built by `build_denoiser` only: on the meta device for parameter and FLOP counts, or on a GPU.

Weights are random but deterministic: the same family, size and seed give bit-identical tensors, and each
component's weights depend only on the seed, not on what else is built. The SD-XL folders are the ones the
project has always used for its tests and benchmarks.

Usage::

    python scripts/make_tiny_pipeline.py OUT_DIR [--family sd|sdxl|flux] [--size tiny|small] [--seed N]
        [--overwrite]

Importable API: `build_pipeline(family, size, seed=)`, `save_pipeline(out_dir, family, size, seed=,
overwrite=)`, `build_denoiser(family, size, device, dtype, seed=)`, `denoiser_config(family, size)`,
`build_scheduler(family)` and `default_resolution(family, size)`.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from scripts.tiny_tokenizers import (  # noqa: E402
    CLIP_EOS_TOKEN,
    CLIP_MAX_LENGTH,
    build_clip_tokenizer,
    build_t5_tokenizer,
    write_clip_vocab_files,
)

FAMILIES = ("sd", "sdxl", "flux")
SIZES = ("tiny", "small", "full")
SAVED_SIZES = ("tiny", "small")  # `full` exists as a denoiser only

PIPELINE_CLASSES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "flux": "FluxPipeline"}
DENOISER_CLASSES = {"sd": "UNet2DConditionModel", "sdxl": "UNet2DConditionModel", "flux": "FluxTransformer2DModel"}

# Folders that a pipeline of any family writes; --overwrite replaces exactly these and model_index.json.
PIPELINE_FOLDERS = (
    "unet",
    "transformer",
    "vae",
    "text_encoder",
    "text_encoder_2",
    "tokenizer",
    "tokenizer_2",
    "scheduler",
    "safety_checker",
    "feature_extractor",
    "image_encoder",
)

# Image side in px per size; `full` is the reference checkpoint's native resolution.
RESOLUTIONS = {"tiny": 64, "small": 256, "full": {"sd": 512, "sdxl": 1024, "flux": 1024}}

# --------------------------------------------------------------------------- architectures

# Text encoders of one width per fixture: only the sum of SD-XL's two (768 + 1280 in the real model) matters.
_TINY_CLIP = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
_SMALL_CLIP = dict(
    hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, projection_dim=128
)
# VAEs downsample 8x as the real ones do (four blocks); only the latent channels differ between families.
_TINY_VAE = dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=16, sample_size=64)
_SMALL_VAE = dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=32, sample_size=256)
# T5 v1.1 encoders (FLUX.1's second text encoder is T5-XXL: 4096 wide, 24 layers)
_TINY_T5 = dict(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)
_SMALL_T5 = dict(d_model=128, d_kv=32, d_ff=512, num_layers=4, num_heads=4)

# stable-diffusion-v1-5/stable-diffusion-v1-5, unet/config.json (its other settings are diffusers' defaults):
# 0.86 B parameters. Its attention_head_dim is, by an old diffusers naming, the number of heads.
SD15_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=768,
)

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json: 2.57 B parameters, 140 attention modules.
SDXL_BASE_UNET_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
    downsample_padding=1,
    mid_block_scale_factor=1,
    use_linear_projection=True,
    upcast_attention=False,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 * 256 (size and crop ids) + 1280 (pooled text embedding)
)

# black-forest-labs/FLUX.1-dev, transformer/config.json: 11.9 B parameters, 19 double-stream and 38
# single-stream blocks. The rotary axes (16 + 56 + 56) span one 128-wide attention head.
FLUX_DEV_TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=64,  # 16 latent channels, packed 2x2
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,  # T5-XXL width
    pooled_projection_dim=768,  # CLIP ViT-L/14 text width
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)


def _fixture_unet(**config) -> dict[str, Any]:
    """A fixture UNet's settings: SD's latent channels, two layers per block, 32 normalisation groups."""
    return dict(in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32, **config)


def _sdxl_fixture_unet(time_embed_dim: int, pooled_width: int, **config) -> dict[str, Any]:
    """SD-XL's additions: linear attention projections and the size/crop conditioning, whose input is six
    embedded numbers and the pooled text embedding of the second encoder."""
    return _fixture_unet(
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + pooled_width,
        **config,
    )


def _fixture_flux_transformer(
    double_blocks: int, single_blocks: int, heads: int, axes_dims_rope: tuple[int, int, int], t5: dict, clip: dict
) -> dict[str, Any]:
    """FLUX.1-dev's transformer with fewer blocks and heads; the rotary axes span one head, as in FLUX.1, and the
    text streams come from the fixture's T5 (per token) and CLIP (pooled) encoders."""
    return dict(
        FLUX_DEV_TRANSFORMER_CONFIG,
        num_layers=double_blocks,
        num_single_layers=single_blocks,
        num_attention_heads=heads,
        attention_head_dim=sum(axes_dims_rope),
        axes_dims_rope=axes_dims_rope,
        joint_attention_dim=t5["d_model"],
        pooled_projection_dim=clip["hidden_size"],
    )


# Per family and size: the denoiser, the VAE, the CLIP text encoder(s) and (FLUX) the T5 encoder. A UNet's
# cross_attention_dim is its text encoders' width (SD-XL: both, concatenated). FLUX's joint_attention_dim is
# the T5 width and pooled_projection_dim the CLIP width.
CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "sd": {
        "tiny": {
            "denoiser": _fixture_unet(
                sample_size=8,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                block_out_channels=(32, 64),
                attention_head_dim=(2, 4),
                cross_attention_dim=32,
            ),
            "vae": _TINY_VAE,
            "clip": _TINY_CLIP,
        },
        "small": {
            "denoiser": _fixture_unet(
                sample_size=32,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                block_out_channels=(64, 128, 256),
                attention_head_dim=8,
                cross_attention_dim=128,
            ),
            "vae": _SMALL_VAE,
            "clip": _SMALL_CLIP,
        },
        "full": {"denoiser": SD15_UNET_CONFIG},
    },
    "sdxl": {
        "tiny": {
            "denoiser": _sdxl_fixture_unet(
                time_embed_dim=8,
                pooled_width=_TINY_CLIP["projection_dim"],
                sample_size=8,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                block_out_channels=(32, 64),
                transformer_layers_per_block=(1, 2),
                attention_head_dim=(2, 4),
                cross_attention_dim=2 * _TINY_CLIP["hidden_size"],
            ),
            "vae": _TINY_VAE,
            "clip": _TINY_CLIP,
        },
        "small": {
            "denoiser": _sdxl_fixture_unet(
                time_embed_dim=32,
                pooled_width=_SMALL_CLIP["projection_dim"],
                sample_size=32,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                block_out_channels=(64, 128, 256),
                transformer_layers_per_block=(1, 2, 4),
                attention_head_dim=(2, 4, 8),
                cross_attention_dim=2 * _SMALL_CLIP["hidden_size"],
            ),
            "vae": _SMALL_VAE,
            "clip": _SMALL_CLIP,
        },
        "full": {"denoiser": SDXL_BASE_UNET_CONFIG},
    },
    "flux": {
        "tiny": {
            "denoiser": _fixture_flux_transformer(
                double_blocks=2, single_blocks=2, heads=2, axes_dims_rope=(4, 6, 6), t5=_TINY_T5, clip=_TINY_CLIP
            ),
            "vae": _TINY_VAE,
            "clip": _TINY_CLIP,
            "t5": _TINY_T5,
        },
        "small": {
            "denoiser": _fixture_flux_transformer(
                double_blocks=3, single_blocks=6, heads=4, axes_dims_rope=(8, 28, 28), t5=_SMALL_T5, clip=_SMALL_CLIP
            ),
            "vae": _SMALL_VAE,
            "clip": _SMALL_CLIP,
            "t5": _SMALL_T5,
        },
        "full": {"denoiser": FLUX_DEV_TRANSFORMER_CONFIG},
    },
}

# What the families' VAEs differ in besides their size: the latent scaling (and FLUX.1's shift, latent
# channels and missing quant convs).
VAE_SETTINGS = {
    "sd": dict(latent_channels=4, scaling_factor=0.18215),
    "sdxl": dict(latent_channels=4, scaling_factor=0.13025),
    "flux": dict(
        latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False
    ),
}

# SD 1.x's and SD-XL's shared noise schedule, sampled at "leading" timesteps.
_SD_NOISE_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    timestep_spacing="leading",
    steps_offset=1,
)

# The reference checkpoints' scheduler_config.json (class name, settings).
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "sd": ("PNDMScheduler", dict(_SD_NOISE_SCHEDULE, set_alpha_to_one=False, skip_prk_steps=True)),
    "sdxl": (
        "EulerDiscreteScheduler",
        dict(_SD_NOISE_SCHEDULE, interpolation_type="linear", use_karras_sigmas=False),
    ),
    "flux": (
        "FlowMatchEulerDiscreteScheduler",
        dict(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
    ),
}

# Seed offsets per component, so each component's weights depend only on the seed and not on the order in
# which components are built.
_SEED_OFFSETS = {"unet": 0, "transformer": 0, "vae": 1, "text_encoder": 2, "text_encoder_2": 3}


# --------------------------------------------------------------------------- lookups


def _check_family(family: str) -> None:
    if family not in CONFIGS:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")


def _check(family: str, size: str, sizes: tuple[str, ...] = SIZES) -> None:
    _check_family(family)
    if size not in sizes:
        hint = " (full-size models are built as a denoiser only: use build_denoiser)" if size == "full" else ""
        raise ValueError(f"unknown size {size!r} here; expected one of {', '.join(sizes)}{hint}")


def denoiser_config(family: str, size: str) -> dict[str, Any]:
    """The keyword arguments of the family's denoiser class at `size` (a copy)."""
    _check(family, size)
    return dict(CONFIGS[family][size]["denoiser"])


def default_resolution(family: str, size: str) -> int:
    """Image side in px that the fixture (or, for `full`, the reference checkpoint) generates by default."""
    _check(family, size)
    return RESOLUTIONS[size][family] if size == "full" else RESOLUTIONS[size]


def build_scheduler(family: str):
    """A fresh scheduler configured like the family's reference checkpoint."""
    _check_family(family)
    import diffusers

    class_name, config = SCHEDULERS[family]
    return getattr(diffusers, class_name)(**config)


# --------------------------------------------------------------------------- components


@contextlib.contextmanager
def _seeded(seed: int, component: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Create modules under a seed of their own and `dtype` as the default dtype, leaving the caller's RNG and
    default dtype untouched. Creating in the target dtype keeps a full-size model's peak memory at its own size."""
    device = torch.device(device)
    accelerators = [] if device.type in ("cpu", "meta") else [device.index or 0]
    previous_dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=accelerators, device_type=device.type if accelerators else "cuda"):
        torch.manual_seed(seed * 100 + _SEED_OFFSETS[component])
        torch.set_default_dtype(dtype)
        try:
            with device:
                yield
        finally:
            torch.set_default_dtype(previous_dtype)


def build_denoiser(
    family: str, size: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0
):
    """The family's denoiser at `size` on `device` in `dtype`, in eval mode.

    On the meta device (any size) it holds shapes only: for parameter and FLOP counts. Tiny and small ones
    are created on the CPU in float32, so that on any device their weights are those of
    `build_pipeline(family, size, seed=seed)`'s denoiser, then moved and cast. Full-size ones are created
    directly on `device` in `dtype`: random init of billions of parameters on a CPU takes minutes, and creating
    them in float32 first would need twice the memory.
    """
    import diffusers

    _check(family, size)
    denoiser_class = getattr(diffusers, DENOISER_CLASSES[family])
    component = "transformer" if family == "flux" else "unet"
    direct = size == "full" or torch.device(device).type == "meta"
    with _seeded(seed, component, device if direct else "cpu", dtype if direct else torch.float32):
        denoiser = denoiser_class(**denoiser_config(family, size))
    if denoiser.device != torch.device(device) or denoiser.dtype != dtype:
        denoiser.to(device, dtype)
    return denoiser.eval()


def _build_vae(family: str, size: str, seed: int):
    from diffusers import AutoencoderKL

    config = CONFIGS[family][size]["vae"]
    n_blocks = len(config["block_out_channels"])
    with _seeded(seed, "vae"):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n_blocks,
            up_block_types=("UpDecoderBlock2D",) * n_blocks,
            # Random weights need no fp32 guard against fp16 overflow; False also keeps
            # the img2img pipeline from re-casting the VAE (with a warning) on every call.
            force_upcast=False,
            **config,
            **VAE_SETTINGS[family],
        )
    return vae.eval()


def _build_clip_encoder(family: str, size: str, seed: int, component: str, tokenizer, with_projection: bool = False):
    """A CLIP text encoder: `quick_gelu` as OpenAI's CLIP ViT-L/14 (every family's first encoder), `gelu` as
    OpenCLIP ViT-bigG (SD-XL's second, with its projection)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="gelu" if with_projection else "quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **CONFIGS[family][size]["clip"],
    )
    with _seeded(seed, component):
        encoder = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
    return encoder.eval()


def _build_t5_encoder(family: str, size: str, seed: int, tokenizer):
    """A T5 v1.1 encoder (gated GELU feed-forward, as FLUX.1's T5-XXL)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        **CONFIGS[family][size]["t5"],
    )
    with _seeded(seed, "text_encoder_2"):
        encoder = T5EncoderModel(config)
    return encoder.eval()


def build_pipeline(family: str, size: str = "tiny", seed: int = 0):
    """A randomly initialised pipeline of `family` (float32, CPU): `StableDiffusionPipeline`,
    `StableDiffusionXLPipeline` or `FluxPipeline`. Weights are a deterministic function of (family, size, seed);
    the global torch RNG state is left untouched."""
    import diffusers

    _check(family, size, SAVED_SIZES)
    components = dict(
        vae=_build_vae(family, size, seed),
        scheduler=build_scheduler(family),
        tokenizer=build_clip_tokenizer(pad_token=CLIP_EOS_TOKEN),
    )
    components["text_encoder"] = _build_clip_encoder(family, size, seed, "text_encoder", components["tokenizer"])
    denoiser = build_denoiser(family, size, seed=seed)
    pipeline_class = getattr(diffusers, PIPELINE_CLASSES[family])
    if family == "sd":
        return pipeline_class(
            unet=denoiser, safety_checker=None, feature_extractor=None, requires_safety_checker=False, **components
        )
    if family == "sdxl":
        # SD-XL pads its second tokenizer with "!".
        tokenizer_2 = build_clip_tokenizer(pad_token="!")
        text_encoder_2 = _build_clip_encoder(family, size, seed, "text_encoder_2", tokenizer_2, with_projection=True)
        return pipeline_class(
            unet=denoiser,
            tokenizer_2=tokenizer_2,
            text_encoder_2=text_encoder_2,
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
            **components,
        )
    tokenizer_2 = build_t5_tokenizer()
    text_encoder_2 = _build_t5_encoder(family, size, seed, tokenizer_2)
    return pipeline_class(transformer=denoiser, tokenizer_2=tokenizer_2, text_encoder_2=text_encoder_2, **components)


# --------------------------------------------------------------------------- saving


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def save_pipeline(out_dir, family: str, size: str = "tiny", seed: int = 0, overwrite: bool = False) -> Path:
    """Build the pipeline and ``save_pretrained`` it to ``out_dir``; return the folder's path.

    Raises ``FileExistsError`` when ``out_dir`` exists and is not empty, unless
    ``overwrite`` is true; then the pipeline files (``model_index.json`` and the
    component folders of any family) are replaced and anything else is left alone.
    """
    _check(family, size, SAVED_SIZES)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if _is_nonempty_dir(out) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --overwrite to replace it)")

    pipe = build_pipeline(family, size, seed=seed)

    out.mkdir(parents=True, exist_ok=True)
    for name in PIPELINE_FOLDERS:
        if (out / name).is_dir():
            shutil.rmtree(out / name)
    (out / "model_index.json").unlink(missing_ok=True)

    pipe.save_pretrained(out, safe_serialization=True)
    # The tokenizers-backed transformers 5 class saves only tokenizer.json;
    # also write the classic vocab.json + merges.txt pair so file-based
    # (transformers 4) CLIPTokenizer loads the folder too.
    for name, component in pipe.components.items():
        if type(component).__name__.startswith("CLIPTokenizer"):
            write_clip_vocab_files(out / name)
    _use_classic_text_encoder_keys(out / "text_encoder")
    return out


def _use_classic_text_encoder_keys(folder: Path) -> None:
    """Store CLIPTextModel weights under ``text_model.*`` names, as the reference checkpoints do.

    transformers 5 flattened ``CLIPTextModel`` (no ``text_model`` submodule) and
    saves its weights without that prefix; it still loads prefixed checkpoints,
    while transformers 4 only loads prefixed ones. Renaming keeps the folder
    loadable by both and laid out like a real text encoder.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = folder / "model.safetensors"
    if not path.is_file():  # sharded or non-safetensors save: leave as is
        return
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {"format": "pt"}
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    if all(key.startswith("text_model.") for key in tensors):
        return
    renamed = {key if key.startswith("text_model.") else f"text_model.{key}": t for key, t in tensors.items()}
    save_file(renamed, str(path), metadata=metadata)


def param_counts(pipe) -> dict[str, int]:
    return {
        name: sum(p.numel() for p in component.parameters())
        for name, component in pipe.components.items()
        if isinstance(component, torch.nn.Module)
    }


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write a randomly initialised diffusers pipeline folder of one model family (no downloads).",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write (must not exist or be empty)")
    parser.add_argument("--family", choices=FAMILIES, default="sdxl", help="model family (default sdxl)")
    parser.add_argument("--size", choices=SIZES, default="tiny", help="tiny: for tests (default); small: benchmarks")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default 0)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the pipeline files in a non-empty OUT_DIR instead of refusing",
    )
    args = parser.parse_args(argv)
    if args.size not in SAVED_SIZES:
        parser.error(
            f"--size {args.size}: full-size models are not written to disk (billions of random weights); "
            "build one with build_denoiser() on the meta device or a GPU, or choose --size tiny or small"
        )

    out = Path(args.out_dir)
    if (out.exists() and not out.is_dir()) or (_is_nonempty_dir(out) and not args.overwrite):
        print(
            f"error: {out} exists and is not an empty directory; choose another OUT_DIR or pass --overwrite",
            file=sys.stderr,
        )
        return 2

    path = save_pipeline(out, args.family, args.size, seed=args.seed, overwrite=args.overwrite)

    import diffusers

    pipe = getattr(diffusers, PIPELINE_CLASSES[args.family]).from_pretrained(path)
    counts = param_counts(pipe)
    summary = ", ".join(f"{k} {v / 1e6:.3f}M" for k, v in counts.items())
    px = default_resolution(args.family, args.size)
    print(path.resolve())
    print(
        f"{args.size} {PIPELINE_CLASSES[args.family]} (seed {args.seed}): {summary}; "
        f"total {sum(counts.values()) / 1e6:.3f}M params; generates {px}x{px} px "
        f"(vae_scale_factor {pipe.vae_scale_factor})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
