#!/usr/bin/env python
"""Build a randomly initialised, SD-XL-shaped pipeline entirely offline.

The result is a regular ``save_pretrained`` folder that
``diffusers.StableDiffusionXLPipeline.from_pretrained(OUT_DIR)`` (and the
img2img pipeline) loads with ``HF_HUB_OFFLINE=1``. Every component is created
locally: UNet, VAE, both CLIP text encoders, both CLIP tokenizers (a small
byte-level BPE vocabulary built here) and an ``EulerDiscreteScheduler``
configured like SD-XL base.

Weights are random but deterministic: the same ``--size`` and ``--seed`` give
bit-identical tensors.

Sizes
-----
``tiny`` (tests; a 64x64 px, 2-step generation takes a fraction of a second on CPU)
    UNet: down (DownBlock2D, CrossAttnDownBlock2D), up (CrossAttnUpBlock2D, UpBlock2D),
    block_out_channels (32, 64), layers_per_block 2, transformer_layers_per_block (1, 2),
    4 heads of 16 on the 64-wide attention blocks, cross_attention_dim 64 (32 + 32),
    addition_embed_type "text_time", addition_time_embed_dim 8, sample_size 8.
    VAE: four blocks (16, 16, 32, 32), so it downsamples 8x like SD-XL's:
    vae_scale_factor 8, default image size 8 * 8 = 64 px.
    Text encoders: hidden 32, 2 layers, 4 heads, intermediate 37, projection 32.

``small`` (benchmarks; SD-XL's block structure scaled down)
    UNet: down (DownBlock2D, CrossAttnDownBlock2D, CrossAttnDownBlock2D),
    up (CrossAttnUpBlock2D, CrossAttnUpBlock2D, UpBlock2D), block_out_channels (64, 128, 256),
    layers_per_block 2, transformer_layers_per_block (1, 2, 4), attention_head_dim (2, 4, 8),
    cross_attention_dim 256 (128 + 128), addition_time_embed_dim 32, sample_size 32.
    VAE: four blocks (32, 64, 64, 64), 8x downsampling: default image size 256 px.
    Text encoders: hidden 128, 4 layers, 4 heads, intermediate 512, projection 128.

Usage::

    python scripts/make_tiny_sdxl.py OUT_DIR [--size tiny|small] [--seed N] [--overwrite]

The module can also be imported (``from scripts.make_tiny_sdxl import ...``):
``build_tiny_sdxl_pipeline(size, seed)`` returns the pipeline in memory and
``save_tiny_sdxl(out_dir, size, seed)`` writes the folder and returns its path.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

SIZES = ("tiny", "small")

# Component folders written by ``save_pretrained`` (and replaced by --overwrite).
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77

# Words that get their own single token, so that typical prompts ("a photo of
# sks dog", "a watercolor painting of a toy on the beach", ...) tokenize into a
# handful of ids. Any other text still tokenizes, byte by byte.
WORDS = (
    "a an the photo photograph picture image of sks dog cat toy plush figure robot character "
    "in on at with and by from for to is wearing holding sitting standing running jumping swimming "
    "style painting drawing sketch watercolor oil pixel art anime cartoon realistic render portrait "
    "red blue green yellow orange purple pink white black brown gold silver "
    "small big cute happy little high quality detailed close up "
    "person man woman beach city snow forest park street garden kitchen room table grass "
    "background mountain river lake sky sunset night moon space astronaut hat car house tree "
    "water flowers bucket top"
).split()

# Per-size settings. Widths of text encoder 1 + text encoder 2 add up to the
# UNet's cross_attention_dim; projection_class_embeddings_input_dim is
# 6 * addition_time_embed_dim + projection_dim of text encoder 2 (SD-XL's
# pooled text embedding concatenated with six embedded size/crop numbers).
CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": {
        "unet": dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=2,
            transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4),
            cross_attention_dim=64,
            norm_num_groups=32,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
        ),
        "vae": dict(
            block_out_channels=(16, 16, 32, 32),
            layers_per_block=1,
            norm_num_groups=16,
            latent_channels=4,
            sample_size=64,
        ),
        # one size for both CLIP text encoders (SD-XL's are 768 and 1280 wide; here only their sum matters)
        "text_encoders": dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            projection_dim=32,
        ),
    },
    "small": {
        "unet": dict(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(64, 128, 256),
            layers_per_block=2,
            transformer_layers_per_block=(1, 2, 4),
            attention_head_dim=(2, 4, 8),
            cross_attention_dim=256,
            norm_num_groups=32,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=32,
            projection_class_embeddings_input_dim=6 * 32 + 128,
        ),
        "vae": dict(
            block_out_channels=(32, 64, 64, 64),
            layers_per_block=1,
            norm_num_groups=32,
            latent_channels=4,
            sample_size=256,
        ),
        # one size for both CLIP text encoders (SD-XL's are 768 and 1280 wide; here only their sum matters)
        "text_encoders": dict(
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            projection_dim=128,
        ),
    },
}

# SD-XL base's scheduler settings.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    interpolation_type="linear",
    use_karras_sigmas=False,
    timestep_spacing="leading",
    steps_offset=1,
)

# Seed offsets per component, so each component's weights depend only on the
# seed and not on the order in which components are built.
_SEED_OFFSETS = {"unet": 0, "vae": 1, "text_encoder": 2, "text_encoder_2": 3}


# --------------------------------------------------------------------------- tokenizer


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins that byte-level BPE (GPT-2/CLIP) uses for bytes, in CLIP's order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def _learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Plain BPE training on ``words`` (each counted once) until every word is one symbol.

    Words are split into characters, the last one carrying the ``</w>`` suffix,
    as CLIP's tokenizer does. Ties between equally frequent pairs are broken
    lexicographically, so the result is deterministic.
    """
    seqs = [tuple(w[:-1]) + (w[-1] + "</w>",) for w in dict.fromkeys(words)]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for seq in seqs:
            for pair in zip(seq, seq[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        new_seqs = []
        for seq in seqs:
            out: list[str] = []
            i = 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            new_seqs.append(tuple(out))
        seqs = new_seqs


def build_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-style vocabulary: bytes, bytes + ``</w>``, merge results, then the two special tokens."""
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols]
    merges = _learn_merges(list(WORDS))
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            tokens.append(a + b)
            seen.add(a + b)
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def _write_vocab_files(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def build_tokenizer(pad_token: str):
    """A ``CLIPTokenizer`` over the local vocabulary.

    It is created from ``vocab.json`` + ``merges.txt`` in a temporary folder,
    which works both with transformers 4 (slow, file-based class) and
    transformers 5 (``tokenizers``-backed class).
    """
    from transformers import CLIPTokenizer

    vocab, merges = build_vocab()
    with tempfile.TemporaryDirectory() as tmp:
        _write_vocab_files(Path(tmp), vocab, merges)
        tok = CLIPTokenizer.from_pretrained(
            tmp,
            model_max_length=MODEL_MAX_LENGTH,
            bos_token=BOS_TOKEN,
            eos_token=EOS_TOKEN,
            unk_token=EOS_TOKEN,
            pad_token=pad_token,
            local_files_only=True,
        )
    # transformers 5 records these loading arguments in init_kwargs; they are
    # about this temporary load, not about the tokenizer, so keep them out of
    # the saved tokenizer_config.json.
    for key in ("is_local", "local_files_only", "name_or_path", "_commit_hash"):
        tok.init_kwargs.pop(key, None)
    return tok


# --------------------------------------------------------------------------- models


def _text_config(size: str, which: str, tokenizer):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act="quick_gelu" if which == "text_encoder" else "gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **CONFIGS[size]["text_encoders"],
    )


def _seeded(seed: int, name: str, factory):
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 100 + _SEED_OFFSETS[name])
        module = factory()
    return module.eval()


def build_tiny_sdxl_pipeline(size: str = "tiny", seed: int = 0):
    """Return a randomly initialised ``StableDiffusionXLPipeline`` (float32, CPU).

    ``size`` is ``"tiny"`` or ``"small"`` (see the module docstring); weights
    are a deterministic function of ``(size, seed)``. The global torch RNG
    state is left untouched.
    """
    if size not in CONFIGS:
        raise ValueError(f"unknown size {size!r}; expected one of {', '.join(SIZES)}")
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cfg = CONFIGS[size]
    # SD-XL pads its first tokenizer with <|endoftext|> and its second with "!".
    tokenizer = build_tokenizer(pad_token=EOS_TOKEN)
    tokenizer_2 = build_tokenizer(pad_token="!")

    text_encoder = _seeded(seed, "text_encoder", lambda: CLIPTextModel(_text_config(size, "text_encoder", tokenizer)))
    text_encoder_2 = _seeded(
        seed,
        "text_encoder_2",
        lambda: CLIPTextModelWithProjection(_text_config(size, "text_encoder_2", tokenizer_2)),
    )
    unet = _seeded(seed, "unet", lambda: UNet2DConditionModel(**cfg["unet"]))
    n_vae_blocks = len(cfg["vae"]["block_out_channels"])
    vae = _seeded(
        seed,
        "vae",
        lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n_vae_blocks,
            up_block_types=("UpDecoderBlock2D",) * n_vae_blocks,
            scaling_factor=0.13025,  # SD-XL VAE's value
            # Random weights need no fp32 guard against fp16 overflow; False also keeps
            # the img2img pipeline from re-casting the VAE (with a warning) on every call.
            force_upcast=False,
            **cfg["vae"],
        ),
    )
    scheduler = EulerDiscreteScheduler(**SCHEDULER_CONFIG)

    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def save_tiny_sdxl(out_dir, size: str = "tiny", seed: int = 0, overwrite: bool = False) -> Path:
    """Build the pipeline and ``save_pretrained`` it to ``out_dir``; return the folder's path.

    Raises ``FileExistsError`` when ``out_dir`` exists and is not empty, unless
    ``overwrite`` is true; then the pipeline's own files (``model_index.json``
    and the component folders) are replaced and anything else is left alone.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if _is_nonempty_dir(out) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --overwrite to replace it)")

    pipe = build_tiny_sdxl_pipeline(size=size, seed=seed)

    out.mkdir(parents=True, exist_ok=True)
    for name in COMPONENTS:
        if (out / name).is_dir():
            shutil.rmtree(out / name)
    (out / "model_index.json").unlink(missing_ok=True)

    pipe.save_pretrained(out, safe_serialization=True)
    # The tokenizers-backed transformers 5 class saves only tokenizer.json;
    # also write the classic vocab.json + merges.txt pair so file-based
    # (transformers 4) CLIPTokenizer loads the folder too.
    vocab, merges = build_vocab()
    for name in ("tokenizer", "tokenizer_2"):
        _write_vocab_files(out / name, vocab, merges)
    _use_classic_text_encoder_keys(out / "text_encoder")
    return out


def _use_classic_text_encoder_keys(folder: Path) -> None:
    """Store CLIPTextModel weights under ``text_model.*`` names, as SD-XL checkpoints do.

    transformers 5 flattened ``CLIPTextModel`` (no ``text_model`` submodule) and
    saves its weights without that prefix; it still loads prefixed checkpoints,
    while transformers 4 only loads prefixed ones. Renaming keeps the folder
    loadable by both and laid out like a real SD-XL text encoder.
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
        name: sum(p.numel() for p in getattr(pipe, name).parameters())
        for name in ("unet", "vae", "text_encoder", "text_encoder_2")
    }


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write a randomly initialised, SD-XL-shaped diffusers pipeline folder (no downloads).",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write (must not exist or be empty)")
    parser.add_argument("--size", choices=SIZES, default="tiny", help="tiny: for tests (default); small: benchmarks")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default 0)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the pipeline files in a non-empty OUT_DIR instead of refusing",
    )
    args = parser.parse_args(argv)

    out = Path(args.out_dir)
    if (out.exists() and not out.is_dir()) or (_is_nonempty_dir(out) and not args.overwrite):
        print(
            f"error: {out} exists and is not an empty directory; choose another OUT_DIR or pass --overwrite",
            file=sys.stderr,
        )
        return 2

    path = save_tiny_sdxl(out, size=args.size, seed=args.seed, overwrite=args.overwrite)

    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(path)
    counts = param_counts(pipe)
    image_px = pipe.unet.config.sample_size * pipe.vae_scale_factor
    summary = ", ".join(f"{k} {v / 1e6:.3f}M" for k, v in counts.items())
    print(path.resolve())
    print(
        f"{args.size} SD-XL (seed {args.seed}): {summary}; total {sum(counts.values()) / 1e6:.3f}M params; "
        f"default image {image_px}x{image_px} px (vae_scale_factor {pipe.vae_scale_factor})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
