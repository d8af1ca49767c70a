#!/usr/bin/env python
"""Speed and memory of T-LoRA next to standard PEFT LoRA on an SD-XL UNet or a FLUX.1 transformer.

    python scripts/benchmark.py infer [--family sdxl|flux] [--size tiny|small|full] [--resolution PX] [--rank R]
        [--min-rank r] [--repeats N] [--steps S] [--device cpu|cuda] [--dtype fp32|fp16|bf16] [--threads T]
        [--json OUT] [--dry-run]
    python scripts/benchmark.py train [the same options] [--gradient_checkpointing] [--use_8bit_adam]
        [--cli] [--cli-steps N] [--cli-repeats K]

`infer` times a denoising step of the stock `StableDiffusionXLPipeline` (Euler, classifier-free guidance, so
the UNet batch is 2) with precomputed prompt embeddings and `output_type="latent"`, so neither the text
encoders nor the VAE are in the time. Configurations: no adapter, Vanilla T-LoRA and T-LoRA (ortho) of rank
R (min rank R/2), loaded with `pipe.load_tlora_weights`, and standard LoRAs of rank R and 2R on the same
projections, loaded with `pipe.load_lora_weights`.

`infer --family flux` does the same with the stock `FluxPipeline` (FlowMatch Euler with FLUX.1-dev's scheduler
settings, guidance 3.5 as the guidance embedding, so one transformer call of batch 1 per step) for no adapter,
Vanilla T-LoRA of rank R (the variant used for FLUX) and a standard LoRA of rank R, all on the authors' 247
projections. Sizes: the FLUX fixtures of `scripts/make_tiny_pipeline.py` (`tiny`, `small`) and FLUX.1-dev's
transformer (`full`, 11.9 B parameters; with `--dry-run` for FLOP counts).

`train` times an optimizer step as the training script does it (noise a cached latent, one random timestep
per sample, denoiser forward, MSE loss, backward, AdamW step) for PEFT LoRA, Vanilla T-LoRA and T-LoRA of rank R
on the same projections, and measures each one's peak memory in a child process of its own. `--family flux`
does this with the FLUX.1 transformer and its flow-matching step (the projections the T-LoRA authors adapt,
as many text tokens as `infer`, guidance 1). `--cli` also times the family's training script
(`train_tlora_sdxl.py`, `train_tlora_flux.py`) in its steady state, against the bare step of the variant it
trains by default (SD-XL: T-LoRA; FLUX.1: Vanilla T-LoRA).

Sizes: `tiny` and `small` are the random SD-XL fixtures of `scripts/make_tiny_pipeline.py` (64 and 256 px); `full`
is the SD-XL base UNet architecture with random weights (1024 px), for a GPU. `--dry-run` builds the chosen UNet
on the meta device and counts parameters and FLOPs per step without running anything.

All configurations are held in memory at once, each on its own copy of the UNet, and every repeat visits each
of them once (in a rotating order), so a slow moment of a shared machine slows them alike. The tables show
medians and ratios; targets are printed as PASS/FAIL lines, where a ratio within the round-to-round spread of
its limit passes. The exit status is 0 either way: timings are evidence, not a test. On a CPU shared with
other work, `--threads 1` gives far steadier numbers: multi-threaded kernels stall whenever a core is taken.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import importlib.util
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import diffusers  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402

import pipelines.tlora as tl  # noqa: E402
from pipelines.tlora.families import get_family  # noqa: E402
from pipelines.tlora.file_format import write_atomically  # noqa: E402
from scripts.arguments import positive_int  # noqa: E402
from scripts.make_tiny_pipeline import build_denoiser, build_scheduler, default_resolution, save_pipeline  # noqa: E402

SIZES = ("tiny", "small", "full")
FAMILIES = ("sdxl", "flux")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TARGET_MODULES = list(tl.DEFAULT_TARGET_MODULES)
TRAIN_SCRIPTS = {"sdxl": REPO_ROOT / "train_tlora_sdxl.py", "flux": REPO_ROOT / "train_tlora_flux.py"}
# the variant each training script trains by default, which its steady state is compared with
SCRIPT_VARIANTS = {"sdxl": "ortho", "flux": "vanilla"}
EXAMPLE_IMAGE = REPO_ROOT / "examples" / "concept.png"
GUIDANCE_SCALE = 5.0
PROMPT_TOKENS = 77
SEED = 0
PERTURBATION = 0.01  # scale of the random values that make loaded adapters non-zero
MEMORY_TARGET_GB = 16.0
MEGABYTE = 2**20

# FLUX prompt length per size: FLUX.1-dev's 512 T5 tokens at full size, proportionally fewer for the smaller
# transformers' fewer image tokens
FLUX_TEXT_TOKENS = {"tiny": 8, "small": 64, "full": 512}
FLUX_GUIDANCE = 3.5
FLUX_VAE_SCALE = 8  # FLUX's VAE downsamples by 8; the transformer packs 2x2 latent patches into one token


@dataclass(frozen=True)
class Adapter:
    """One benchmarked configuration: no adapter, a T-LoRA variant, or a standard LoRA."""

    name: str  # key in the JSON output
    label: str
    kind: str  # "none", "tlora" or "lora"
    rank: int = 0
    variant: str | None = None


def infer_adapters(rank: int, family: str = "sdxl") -> list[Adapter]:
    if family == "flux":
        return [
            Adapter("none", "no adapter", "none"),
            Adapter("vanilla", f"Vanilla T-LoRA R={rank}", "tlora", rank, "vanilla"),
            Adapter(f"lora{rank}", f"LoRA r={rank}", "lora", rank),
        ]
    return [
        Adapter("none", "no adapter", "none"),
        Adapter("vanilla", f"Vanilla T-LoRA R={rank}", "tlora", rank, "vanilla"),
        Adapter("ortho", f"T-LoRA (ortho) R={rank}", "tlora", rank, "ortho"),
        Adapter(f"lora{rank}", f"LoRA r={rank}", "lora", rank),
        Adapter(f"lora{2 * rank}", f"LoRA r={2 * rank}", "lora", 2 * rank),
    ]


def train_adapters(rank: int) -> list[Adapter]:
    return [
        Adapter(f"lora{rank}", f"LoRA r={rank}", "lora", rank),
        Adapter("vanilla", f"Vanilla T-LoRA R={rank}", "tlora", rank, "vanilla"),
        Adapter("ortho", f"T-LoRA (ortho) R={rank}", "tlora", rank, "ortho"),
    ]


# --------------------------------------------------------------------------- models and adapters


def build_base_unet(size: str, device: str, dtype: torch.dtype, family: str = "sdxl"):
    """The frozen denoiser (an SD-XL UNet unless `family` says otherwise) and scheduler of `size`, on `device` in
    `dtype`: the fixture's weights for tiny and small; for full, random weights created on the device (random
    init of 2.6 B parameters on a CPU takes minutes)."""
    unet = build_denoiser(family, size, device, dtype, seed=SEED)
    return unet.requires_grad_(False), build_scheduler(family)


def build_base_flux(size: str, device: str, dtype: torch.dtype):
    """The frozen FLUX transformer of `size` and FLUX.1-dev's scheduler, on `device` in `dtype`."""
    transformer = build_denoiser("flux", size, device, dtype, seed=SEED)
    return transformer.requires_grad_(False), build_scheduler("flux")


def target_modules(family: str) -> list[str]:
    """The projections both kinds of adapter go on: the family's T-LoRA defaults."""
    return list(get_family(family).default_target_modules)


def tlora_config(adapter: Adapter, min_rank: int, family: str = "sdxl") -> tl.TLoraConfig:
    init = "normal" if adapter.variant == "vanilla" else "random-last"
    settings = dict(rank=adapter.rank, min_rank=min_rank, variant=adapter.variant, init=init)
    return tl.TLoraConfig(**settings) if family == "sdxl" else tl.TLoraConfig.for_family(family, **settings)


def lora_config(rank: int, family: str = "sdxl"):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=target_modules(family))


def _random_like(tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return (torch.randn(tensor.shape, generator=generator) * PERTURBATION).to(tensor.device, tensor.dtype)


def load_trained_tlora(pipe, adapter: Adapter, min_rank: int, folder: Path, generator: torch.Generator) -> None:
    """Give the pipeline a T-LoRA adapter whose update is non-zero, through a file and `load_tlora_weights`."""
    denoiser, family = tl.denoiser_of(pipe)
    config = tlora_config(adapter, min_rank, family.name)
    adapters = tl.inject_tlora(denoiser, config, generator=generator)
    with torch.no_grad():
        for module in adapters.values():
            for parameter in module.parameters():
                parameter.add_(_random_like(parameter, generator))
    tl.save_tlora_file(tl.get_tlora_state_dict(denoiser), config, folder / tl.WEIGHT_NAME)
    tl.remove_tlora(denoiser)
    pipe.load_tlora_weights(folder)


def load_trained_lora(pipe, rank: int, folder: Path, generator: torch.Generator) -> None:
    """Give the pipeline a standard LoRA with a non-zero update, saved and loaded as a user would."""
    from peft.utils import get_peft_model_state_dict

    denoiser, family = tl.denoiser_of(pipe)
    denoiser.add_adapter(lora_config(rank, family.name))
    metadata = denoiser.peft_config["default"].to_dict()
    state_dict = get_peft_model_state_dict(denoiser)
    # gaussian init leaves lora_B at zero, which would make the update trivially zero
    state_dict = {
        key: _random_like(value, generator) if "lora_B" in key else value for key, value in state_dict.items()
    }
    denoiser.unload_lora()
    layers = family.denoiser_attribute
    type(pipe).save_lora_weights(
        folder, **{f"{layers}_lora_layers": state_dict, f"{layers}_lora_adapter_metadata": metadata}
    )
    pipe.load_lora_weights(folder)


def attach_for_inference(pipe, adapter: Adapter, min_rank: int, folder: Path) -> None:
    generator = torch.Generator().manual_seed(SEED)
    if adapter.kind == "tlora":
        load_trained_tlora(pipe, adapter, min_rank, folder, generator)
    elif adapter.kind == "lora":
        load_trained_lora(pipe, adapter.rank, folder, generator)


def attach_for_training(unet, adapter: Adapter, min_rank: int, family: str = "sdxl") -> None:
    """Fresh trainable adapter weights, as a training script creates them."""
    if adapter.kind == "tlora":
        config = tlora_config(adapter, min_rank, family)
        tl.inject_tlora(unet, config, generator=torch.Generator().manual_seed(SEED))
    elif adapter.kind == "lora":
        unet.add_adapter(lora_config(adapter.rank, family))


def conditioning(config, batch: int, resolution: int, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random prompt embeddings of the UNet's widths (what the two text encoders would give) and SD-XL's
    size/crop ids, for a batch of `batch` samples."""
    generator = torch.Generator().manual_seed(SEED)
    pooled_width = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    embeds = {
        "prompt_embeds": torch.randn(batch, PROMPT_TOKENS, config.cross_attention_dim, generator=generator),
        "pooled_prompt_embeds": torch.randn(batch, pooled_width, generator=generator),
        "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]]).repeat(batch, 1),
    }
    return {key: value.to(device=device, dtype=dtype) for key, value in embeds.items()}


# --------------------------------------------------------------------------- timing


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_times(runners: dict[str, Callable[[], None]], repeats: int, device: str) -> dict[str, list[float]]:
    """Seconds per call of each runner: one untimed warm-up call each, then `repeats` rounds that call every
    runner once, starting one further along each round so no runner always follows the same one."""
    for run in runners.values():
        run()
    names = list(runners)
    times = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            start = time.perf_counter()
            runners[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def summarize(adapters: list[Adapter], times: dict[str, list[float]], per_call: int, baseline: str) -> list[dict]:
    """One row per adapter: median seconds per step and its ratio to `baseline`."""
    medians = {name: statistics.median(samples) / per_call for name, samples in times.items()}
    return [
        {
            "name": adapter.name,
            "label": adapter.label,
            "median_s": medians[adapter.name],
            "ratio": medians[adapter.name] / medians[baseline],
            "samples_s": [sample / per_call for sample in times[adapter.name]],
        }
        for adapter in adapters
    ]


def ratio_target(rows: list[dict], text: str, numerator: str, denominator: str, limit: float) -> dict:
    """`numerator / denominator` of the median times against `limit`. The noise is the median absolute
    deviation of the per-round ratios (both configurations of one round ran back to back)."""
    by_name = {row["name"]: row for row in rows}
    top, bottom = by_name[numerator], by_name[denominator]
    ratio = top["median_s"] / bottom["median_s"]
    per_round = [a / b for a, b in zip(top["samples_s"], bottom["samples_s"])]
    center = statistics.median(per_round)
    noise = statistics.median(abs(r - center) for r in per_round)
    return {
        "target": text,
        "measure": f"{top['label']} / {bottom['label']}",
        "value": ratio,
        "limit": limit,
        "noise": noise,
        "passed": ratio <= limit + noise,
        "within_noise_only": limit < ratio <= limit + noise,
    }


# --------------------------------------------------------------------------- output


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    rows = [list(row) + [""] * (len(headers) - len(row)) for row in rows]
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    lines = [headers, ["-" * width for width in widths], *rows]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


def format_target(target: dict) -> str:
    status = "PASS" if target["passed"] else "FAIL"
    if target.get("within_noise_only"):
        status = "PASS (within noise)"
    if "noise" in target:
        detail = (
            f"{target['measure']} = {target['value']:.3f} (limit {target['limit']:.2f}, "
            f"round-to-round spread ±{target['noise']:.3f})"
        )
    else:
        detail = f"{target['measure']} = {target['value']:.2f} (limit {target['limit']:.2f})"
    return f"{status}  {target['target']}: {detail}"


def write_json(path: Path, result: dict) -> None:
    write_atomically(path, lambda temporary: temporary.write_text(json.dumps(result, indent=2) + "\n"))


def settings(args) -> dict:
    return {key: value for key, value in vars(args).items() if key not in ("func", "json")}


def environment(device: str) -> dict:
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": device}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def report(result: dict, table: str, args) -> dict:
    print(table)
    print()
    for target in result["targets"]:
        print(format_target(target))
    if args.json is not None:
        write_json(Path(args.json), result)
        print(f"\nwrote {args.json}")
    return result


# --------------------------------------------------------------------------- dry run


def owner_module(projection_path: str, targets=TARGET_MODULES) -> str:
    """`...attn1.to_out.0` -> `...attn1`."""
    target = next(t for t in targets if projection_path.endswith("." + t))
    return projection_path[: -len(target) - 1]


def meta_unet(size: str):
    """The frozen UNet of `size` on the meta device: shapes only, no memory, no compute."""
    return build_denoiser("sdxl", size, "meta").requires_grad_(False)


def step_flops(unet, resolution: int, train: bool) -> int:
    """FLOPs (matmuls, convolutions, attention) of one UNet step, counted on the meta device: a guided
    inference step (batch 2, timestep 500 given as a host scalar, as a CPU pipeline passes it) or a training
    forward and backward (batch 1, a per-sample timestep vector)."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = 1 if train else 2
    embeds = conditioning(unet.config, batch, resolution, "meta", torch.float32)
    sample = torch.empty(batch, unet.config.in_channels, resolution // 8, resolution // 8, device="meta")
    timesteps = torch.full((batch,), 500, device="meta") if train else torch.tensor(500)
    added = {"text_embeds": embeds["pooled_prompt_embeds"], "time_ids": embeds["time_ids"]}
    with torch.set_grad_enabled(train), FlopCounterMode(display=False) as counter:
        output = unet(sample, timesteps, encoder_hidden_states=embeds["prompt_embeds"], added_cond_kwargs=added)
        if train:
            output.sample.sum().backward()
    return counter.get_total_flops()


def meta_flux(size: str):
    """The frozen FLUX transformer of `size` on the meta device."""
    return build_denoiser("flux", size, "meta").requires_grad_(False)


def flux_step_flops(transformer, size: str, resolution: int) -> int:
    """FLOPs of one FLUX denoising step (batch 1, guidance as an embedding), counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    def timestep_to_meta(module, args, kwargs):
        return args, {**kwargs, "timestep": kwargs["timestep"].to("meta")}

    inputs = flux_inputs(transformer.config, FLUX_TEXT_TOKENS[size], resolution, "meta", torch.float32)
    # The timestep starts on the host, as a CPU pipeline passes it, so that T-LoRA's router (an earlier hook) picks
    # one rank for the call and skips the inactive components; the meta transformer then needs it on meta.
    hook = transformer.register_forward_pre_hook(timestep_to_meta, with_kwargs=True)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            transformer(**inputs, timestep=torch.full((1,), 0.5))
    finally:
        hook.remove()
    return counter.get_total_flops()


def dry_run(args, adapters: list[Adapter], baseline: str) -> dict:
    """Parameters and FLOPs per step of each configuration, from the denoiser on the meta device."""
    base = meta_flux(args.size) if args.family == "flux" else meta_unet(args.size)
    targets = target_modules(args.family)
    projections = tl.injection.find_target_projections(base, targets)
    base_size = sum(t.numel() for t in (*base.parameters(), *base.buffers()))
    rows = []
    for adapter in adapters:
        unet = copy.deepcopy(base)
        with torch.device("meta"):
            if adapter.kind == "tlora":
                tl.inject_tlora(unet, tlora_config(adapter, args.min_rank, args.family), initialize=False)
            elif adapter.kind == "lora":
                unet.add_adapter(lora_config(adapter.rank, args.family))
        size = sum(t.numel() for t in (*unet.parameters(), *unet.buffers()))
        if args.family == "flux":
            flops = flux_step_flops(unet, args.size, args.resolution)
        else:
            flops = step_flops(unet, args.resolution, train=args.command == "train")
        rows.append(
            {"name": adapter.name, "label": adapter.label, "adapter_parameters": size - base_size, "flops": flops}
        )
    baseline_flops = next(row["flops"] for row in rows if row["name"] == baseline)
    for row in rows:
        row["ratio"] = row["flops"] / baseline_flops

    unet_parameters = sum(p.numel() for p in base.parameters())
    attention_modules = len({owner_module(path, targets) for path in projections})
    result = {
        "benchmark": args.command,
        "dry_run": True,
        "settings": settings(args),
        "unet_parameters": unet_parameters,
        "attention_modules": attention_modules,
        "adapted_projections": len(projections),
        "results": rows,
        "targets": [],
    }
    step = "training step (batch 1)" if args.command == "train" else "guided denoising step (batch 2)"
    if args.family == "flux":
        step = "denoising step (batch 1, guidance embedded)"
    header = (
        f"{args.size} {type(base).__name__}: {unet_parameters:,} parameters, {attention_modules} attention modules, "
        f"{len(projections)} adapted projections; FLOPs of one {step} at {args.resolution} px\n"
    )
    table = format_table(
        ["config", "adapter parameters (+ frozen copies)", "GFLOP/step", f"ratio to {baseline}"],
        [[r["label"], f"{r['adapter_parameters']:,}", f"{r['flops'] / 1e9:.2f}", f"{r['ratio']:.3f}"] for r in rows],
    )
    return report(result, header + table, args)


# --------------------------------------------------------------------------- infer


def inference_pipeline(unet, scheduler):
    """A stock SD-XL pipeline around `unet`; no text encoders or VAE, since embeddings come precomputed and the
    output stays latent."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=None,
        text_encoder=None,
        text_encoder_2=None,
        tokenizer=None,
        tokenizer_2=None,
        unet=unet,
        scheduler=type(scheduler).from_config(scheduler.config),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_inputs(config, text_tokens: int, resolution: int, device: str, dtype: torch.dtype) -> dict:
    """Random FLUX transformer inputs (all but the timestep) for one sample at `resolution` px."""
    generator = torch.Generator().manual_seed(SEED)
    side = resolution // (2 * FLUX_VAE_SCALE)
    rows, columns = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    inputs = {
        "hidden_states": torch.randn(1, side * side, config.in_channels, generator=generator),
        "encoder_hidden_states": torch.randn(1, text_tokens, config.joint_attention_dim, generator=generator),
        "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=generator),
        "img_ids": torch.stack([torch.zeros_like(rows), rows, columns], -1).reshape(-1, 3).float(),
        "txt_ids": torch.zeros(text_tokens, 3),
        "guidance": torch.full((1,), FLUX_GUIDANCE),
    }
    return {key: value.to(device=device, dtype=dtype) for key, value in inputs.items()}


def flux_inference_pipeline(transformer, scheduler):
    """A stock FluxPipeline around `transformer`; no text encoders or VAE (embeddings precomputed, latent
    output)."""
    from diffusers import FluxPipeline

    absent = dict.fromkeys(("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"))
    pipe = FluxPipeline(transformer=transformer, scheduler=type(scheduler).from_config(scheduler.config), **absent)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inference_setup(args, dtype: torch.dtype):
    """(base denoiser, a function making a stock pipeline around a copy of it, the timed call's arguments)."""
    common = dict(num_inference_steps=args.steps, height=args.resolution, width=args.resolution, output_type="latent")
    if args.family == "flux":
        base, scheduler = build_base_flux(args.size, args.device, dtype)
        inputs = flux_inputs(base.config, FLUX_TEXT_TOKENS[args.size], args.resolution, args.device, dtype)
        call = dict(
            prompt_embeds=inputs["encoder_hidden_states"],
            pooled_prompt_embeds=inputs["pooled_projections"],
            guidance_scale=FLUX_GUIDANCE,
            **common,
        )
        return base, lambda: flux_inference_pipeline(copy.deepcopy(base), scheduler), call
    base, scheduler = build_base_unet(args.size, args.device, dtype)
    embeds = conditioning(base.config, 1, args.resolution, args.device, dtype)
    call = dict(
        prompt_embeds=embeds["prompt_embeds"],
        pooled_prompt_embeds=embeds["pooled_prompt_embeds"],
        guidance_scale=GUIDANCE_SCALE,
        **common,
    )
    return base, lambda: inference_pipeline(copy.deepcopy(base), scheduler), call


def run_infer(args) -> dict:
    adapters = infer_adapters(args.rank, args.family)
    if args.dry_run:
        return dry_run(args, adapters, baseline="none")
    dtype = DTYPES[args.dtype]
    base, make_pipeline, call = inference_setup(args, dtype)
    denoiser_name = type(base).__name__

    runners = {}
    with tempfile.TemporaryDirectory() as tmp:
        for adapter in adapters:
            pipe = make_pipeline()
            attach_for_inference(pipe, adapter, args.min_rank, Path(tmp) / adapter.name)

            def run(pipe=pipe):
                pipe(**call, generator=torch.Generator(args.device).manual_seed(SEED))

            runners[adapter.name] = run
    del base
    times = interleaved_times(runners, args.repeats, args.device)

    rows = summarize(adapters, times, args.steps, baseline="none")
    rank, double = args.rank, 2 * args.rank
    targets = [
        ratio_target(rows, "Vanilla T-LoRA no slower than LoRA of the same rank", "vanilla", f"lora{rank}", 1.0),
    ]
    if args.family == "sdxl":
        targets.append(
            ratio_target(rows, "T-LoRA (ortho) no slower than LoRA of twice the rank", "ortho", f"lora{double}", 1.0)
        )
    if args.size == "full" and args.family == "sdxl":
        targets.append(ratio_target(rows, "T-LoRA (ortho) costs at most 1.10x no adapter", "ortho", "none", 1.10))
    result = {
        "benchmark": "infer",
        "settings": settings(args),
        "environment": environment(args.device),
        "unit": "seconds per denoising step "
        + (
            "(transformer batch 1, guidance embedded)"
            if args.family == "flux"
            else "(UNet batch 2: classifier-free guidance)"
        ),
        "results": rows,
        "targets": targets,
    }
    table = format_table(
        ["config", "median ms/step", "ratio to no adapter", "repeats"],
        [[r["label"], f"{1000 * r['median_s']:.1f}", f"{r['ratio']:.3f}", len(r["samples_s"])] for r in rows],
    )
    header = (
        f"infer: {args.size} {denoiser_name}, {args.resolution} px, {args.steps} Euler steps, {args.dtype} "
        f"on {args.device}, min rank {args.min_rank}\n"
    )
    return report(result, header + table, args)


# --------------------------------------------------------------------------- train


class TrainStep:
    """One configuration's training state; calling it does one optimizer step, like the training script."""

    def __init__(self, unet, scheduler, adapter: Adapter, args):
        from diffusers.training_utils import cast_training_params

        dtype = DTYPES[args.dtype]
        synchronize(args.device)
        start = time.perf_counter()
        attach_for_training(unet, adapter, args.min_rank, args.family)
        synchronize(args.device)
        self.attach_s = time.perf_counter() - start  # for T-LoRA (ortho): one SVD per adapted projection
        if dtype != torch.float32:
            cast_training_params(unet, dtype=torch.float32)
        if args.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.unet = unet.train()
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        self.optimizer = make_optimizer([p for p in unet.parameters() if p.requires_grad], args.use_8bit_adam)
        # half precision as accelerate's mixed precision runs it: frozen weights in half, fp32 adapter weights,
        # autocast around the forward (no loss scaling: it changes no amount of work worth timing)
        self.autocast = torch.autocast(torch.device(args.device).type, dtype=dtype, enabled=dtype != torch.float32)
        latent_size = args.resolution // 8
        channels = 16 if args.family == "flux" else 4
        generator = torch.Generator().manual_seed(SEED)
        self.latents = torch.randn(1, channels, latent_size, latent_size, generator=generator).to(args.device, dtype)
        if args.family == "flux":
            self.inputs = flux_inputs(unet.config, FLUX_TEXT_TOKENS[args.size], args.resolution, args.device, dtype)
            del self.inputs["hidden_states"]  # made from the latents at every step
            self.inputs["guidance"] = torch.ones(1, device=args.device)  # 1 in training, as train_tlora_flux.py
            self.loss = self.flow_matching_loss
        else:
            from diffusers import DDPMScheduler

            self.noise_scheduler = DDPMScheduler.from_config(scheduler.config)
            embeds = conditioning(unet.config, 1, args.resolution, args.device, dtype)
            self.inputs = {
                "encoder_hidden_states": embeds["prompt_embeds"],
                "added_cond_kwargs": {"text_embeds": embeds["pooled_prompt_embeds"], "time_ids": embeds["time_ids"]},
            }
            self.loss = self.denoising_loss
        # every configuration draws the same noise and timesteps
        self.generator = torch.Generator(args.device).manual_seed(SEED)

    def draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise like the latents and one training timestep index per sample."""
        latents = self.latents
        noise = torch.randn(latents.shape, generator=self.generator, device=latents.device, dtype=latents.dtype)
        timesteps = torch.randint(
            0, self.num_train_timesteps, (latents.shape[0],), generator=self.generator, device=latents.device
        )
        return noise, timesteps

    def denoising_loss(self) -> torch.Tensor:
        noise, timesteps = self.draw()
        noisy = self.noise_scheduler.add_noise(self.latents, noise, timesteps)
        with self.autocast:
            prediction = self.unet(noisy, timesteps, **self.inputs).sample
        return F.mse_loss(prediction.float(), noise.float())

    def flow_matching_loss(self) -> torch.Tensor:
        """As train_tlora_flux.py: sigma = t / 1000 for a uniform t, x_t = (1 - sigma) x0 + sigma noise, the
        transformer on 2x2 patches, target noise - x0."""
        from diffusers import FluxPipeline

        noise, timesteps = self.draw()
        latents = self.latents
        sigmas = (self.num_train_timesteps - timesteps).float() / self.num_train_timesteps
        expanded = sigmas.view(-1, 1, 1, 1)
        noisy = ((1 - expanded) * latents + expanded * noise).to(latents.dtype)
        batch, channels, height, width = latents.shape

        def pack(tensor):
            return FluxPipeline._pack_latents(tensor, batch, channels, height, width)

        with self.autocast:
            prediction = self.unet(hidden_states=pack(noisy), timestep=sigmas, **self.inputs).sample
        return F.mse_loss(prediction.float(), pack(noise - latents).float())

    def __call__(self) -> None:
        loss = self.loss()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def make_optimizer(parameters, use_8bit_adam: bool) -> torch.optim.Optimizer:
    """AdamW with the paper's settings (lr 1e-4, weight decay 1e-4)."""
    optimizer_class = torch.optim.AdamW
    if use_8bit_adam:
        import bitsandbytes

        optimizer_class = bitsandbytes.optim.AdamW8bit
    return optimizer_class(parameters, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)


def restart_peak_memory(device: str) -> int:
    """Start counting peak memory from now; returns the memory in use now, in bytes.

    On CUDA, torch's allocator statistics. On the CPU (Linux), the process's resident set: torch's CPU
    allocations are invisible to tracemalloc. Freed heap memory is handed back to the system first and the
    kernel's peak count (VmHWM) restarted, so the peak that follows belongs to what runs next rather than to
    building the model (elsewhere the count cannot be restarted and covers the whole process).
    """
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(device: str) -> int:
    """Peak memory in bytes since `restart_peak_memory`: the CUDA allocation or the resident set (VmHWM)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure_memory(args) -> dict:
    """Peak memory of training one configuration, in this (fresh) process. `above_model_mb` is the peak minus
    what the frozen UNet alone occupied, i.e. adapter weights, optimizer state, gradients and activations."""
    adapters = {adapter.name: adapter for adapter in train_adapters(args.rank)}
    if args.adapter not in adapters:
        raise SystemExit(f"error: unknown --adapter {args.adapter!r}; expected one of {', '.join(adapters)}")
    adapter = adapters[args.adapter]
    unet, scheduler = build_base_unet(args.size, args.device, DTYPES[args.dtype], args.family)
    model_bytes = restart_peak_memory(args.device)
    step = TrainStep(unet, scheduler, adapter, args)
    for _ in range(1 + args.steps):
        step()
    peak = peak_memory(args.device)
    return {"peak_mb": peak / MEGABYTE, "above_model_mb": (peak - model_bytes) / MEGABYTE}


def memory_in_child(args, adapter: Adapter) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "train-memory", "--adapter", adapter.name]
    command += [
        f"--size={args.size}",
        f"--resolution={args.resolution}",
        f"--rank={args.rank}",
        f"--min-rank={args.min_rank}",
        f"--steps={args.steps}",
        f"--device={args.device}",
        f"--dtype={args.dtype}",
        f"--family={args.family}",
    ]
    command += [f"--threads={args.threads}"] * (args.threads is not None)
    command += ["--gradient_checkpointing"] * args.gradient_checkpointing + ["--use_8bit_adam"] * args.use_8bit_adam
    child = subprocess.run(command, capture_output=True, text=True)
    if child.returncode != 0:
        raise RuntimeError(f"Memory measurement of {adapter.label} failed:\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def train_cli_command(model: Path, images: Path, output: Path, args, steps: int) -> list[str]:
    # FLUX.1's script defaults to Prodigy in bf16; the bare step it is compared with runs AdamW in fp32 on the
    # size's number of text tokens
    flux = ["--optimizer=adamw", "--learning_rate=1e-4", f"--max_sequence_length={FLUX_TEXT_TOKENS[args.size]}"]
    return [
        sys.executable,
        str(TRAIN_SCRIPTS[args.family]),
        f"--pretrained_model_name_or_path={model}",
        f"--instance_data_dir={images}",
        "--instance_prompt=a photo of sks toy",
        f"--output_dir={output}",
        f"--resolution={args.resolution}",
        "--train_batch_size=1",
        f"--max_train_steps={steps}",
        f"--rank={args.rank}",
        f"--min_rank={args.min_rank}",
        f"--tlora_variant={SCRIPT_VARIANTS[args.family]}",
        f"--seed={SEED}",
        "--report_to=none",
        "--cache_latents",
        "--mixed_precision=no",
        f"--checkpointing_steps={10 * steps}",
        *(flux if args.family == "flux" else []),
    ]


def measure_cli(args, bare_step_s: float) -> dict:
    """Steady-state seconds per step of the training script from runs of N and 2N steps: (t_2N - t_N) / N
    cancels loading, latent caching and saving. With several pairs of runs, the median. Compared with the
    bare step of the variant the script trains."""
    script = TRAIN_SCRIPTS[args.family]
    if not script.is_file():
        return {"error": f"{script.name} not found at the repository root"}
    # the script's torch must use as many threads as the bare steps it is compared with
    env = os.environ | ({"OMP_NUM_THREADS": str(args.threads)} if args.threads is not None else {})
    pairs = []
    with tempfile.TemporaryDirectory() as tmp:
        model = save_pipeline(Path(tmp) / "model", args.family, args.size, seed=SEED)
        images = Path(tmp) / "images"
        images.mkdir()
        shutil.copy(EXAMPLE_IMAGE, images)
        for pair in range(args.cli_repeats):
            durations = []
            for steps in (args.cli_steps, 2 * args.cli_steps):
                command = train_cli_command(model, images, Path(tmp) / f"out-{pair}-{steps}", args, steps)
                start = time.perf_counter()
                child = subprocess.run(command, capture_output=True, text=True, env=env)
                durations.append(time.perf_counter() - start)
                if child.returncode != 0:
                    return {"error": f"{script.name} exited with {child.returncode}:\n{child.stderr[-3000:]}"}
            pairs.append(durations)
    step_s = statistics.median((long - short) / args.cli_steps for short, long in pairs)
    return {"median_s": step_s, "ratio": step_s / bare_step_s, "runs_s": pairs}


def limit_target(text: str, measure: str, value: float, limit: float) -> dict:
    """A target measured once, without rounds to estimate noise from."""
    return {"target": text, "measure": measure, "value": value, "limit": limit, "passed": value <= limit}


def train_targets(rows: list[dict], args) -> list[dict]:
    lora = f"lora{args.rank}"
    targets = [
        ratio_target(rows, "Vanilla T-LoRA step at most 1.05x LoRA", "vanilla", lora, 1.05),
        ratio_target(rows, "T-LoRA (ortho) step at most 1.15x LoRA", "ortho", lora, 1.15),
    ]
    if args.size == "full" and args.device.startswith("cuda"):
        peak_gb = max(row["peak_mb"] for row in rows) / 1024
        text = f"peak memory at most {MEMORY_TARGET_GB:.0f} GB"
        targets.append(limit_target(text, "largest peak allocation (GB)", peak_gb, MEMORY_TARGET_GB))
    return targets


def train_table(rows: list[dict], cli: dict | None, args) -> str:
    memory = "peak alloc MB" if args.device.startswith("cuda") else "peak RSS MB"
    headers = ["config", "median s/step", "it/s", f"ratio to LoRA r={args.rank}", memory, "above model MB"]
    lines = [
        [
            r["label"],
            f"{r['median_s']:.3f}",
            f"{1 / r['median_s']:.2f}",
            f"{r['ratio']:.3f}",
            f"{r['peak_mb']:.0f}",
            f"{r['above_model_mb']:.0f}",
        ]
        for r in rows
    ]
    if cli is not None and "error" not in cli:
        script = f"{TRAIN_SCRIPTS[args.family].name} ({SCRIPT_VARIANTS[args.family]})"
        lines.append([script, f"{cli['median_s']:.3f}", f"{1 / cli['median_s']:.2f}"])
    options = ", gradient checkpointing" * args.gradient_checkpointing + ", 8-bit AdamW" * args.use_8bit_adam
    header = (
        f"train: {args.size} {get_family(args.family).denoiser_class}, {args.resolution} px, batch 1, "
        f"{args.dtype}{options} on {args.device}, "
        f"min rank {args.min_rank}\n"
    )
    return header + format_table(headers, lines)


def run_train(args) -> dict:
    adapters = train_adapters(args.rank)
    if args.dry_run:
        return dry_run(args, adapters, baseline=f"lora{args.rank}")
    # before this process allocates anything, so that on a GPU the children have it to themselves
    memory = {adapter.name: memory_in_child(args, adapter) for adapter in adapters}
    base, scheduler = build_base_unet(args.size, args.device, DTYPES[args.dtype], args.family)
    steps = {adapter.name: TrainStep(copy.deepcopy(base), scheduler, adapter, args) for adapter in adapters}
    del base

    def several(step):
        def run():
            for _ in range(args.steps):
                step()

        return run

    times = interleaved_times({name: several(step) for name, step in steps.items()}, args.repeats, args.device)
    del steps
    rows = summarize(adapters, times, args.steps, baseline=f"lora{args.rank}")
    for row in rows:
        row.update(memory[row["name"]])
    targets = train_targets(rows, args)
    result = {
        "benchmark": "train",
        "settings": settings(args),
        "environment": environment(args.device),
        "unit": "seconds per optimizer step (batch 1)",
        "memory": "peak CUDA allocation" if args.device.startswith("cuda") else "peak resident set size",
        "results": rows,
        "targets": targets,
    }
    cli = None
    if args.cli:
        variant = SCRIPT_VARIANTS[args.family]
        cli = result["cli"] = measure_cli(args, next(r["median_s"] for r in rows if r["name"] == variant))
        script = TRAIN_SCRIPTS[args.family].name
        if "error" in cli:
            print(f"{script} could not be measured: {cli['error']}", file=sys.stderr)
        else:
            label = next(adapter.label for adapter in adapters if adapter.name == variant)
            text = "training script steady state at most 1.10x the bare step"
            targets.append(limit_target(text, f"{script} / bare {label} step", cli["ratio"], 1.10))
    return report(result, train_table(rows, cli, args), args)


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--family", choices=FAMILIES, default="sdxl", help="sdxl or flux (default sdxl)")
    common.add_argument("--size", choices=SIZES, default="small", help="tiny, small or full (default small)")
    common.add_argument("--resolution", type=positive_int, help="px (default: the size's own: 64, 256 or 1024)")
    common.add_argument("--rank", type=positive_int, default=64, help="T-LoRA max rank R and LoRA rank (default 64)")
    common.add_argument("--min-rank", type=positive_int, help="T-LoRA minimum rank (default R/2)")
    common.add_argument("--repeats", type=positive_int, default=5, help="timed rounds (default 5)")
    common.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    common.add_argument("--dtype", choices=DTYPES, default="fp32", help="UNet weights (default fp32)")
    common.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    common.add_argument("--json", metavar="OUT", help="also write the numbers to this JSON file")
    common.add_argument("--dry-run", action="store_true", help="count parameters and FLOPs on the meta device")

    commands = parser.add_subparsers(dest="command", required=True)
    infer = commands.add_parser("infer", parents=[common], help="seconds per denoising step")
    infer.add_argument("--steps", type=positive_int, default=10, help="denoising steps per timed call (default 10)")
    infer.set_defaults(func=run_infer)

    train = commands.add_parser("train", parents=[common], help="seconds and peak memory per optimizer step")
    train.add_argument("--steps", type=positive_int, default=2, help="optimizer steps per timed call (default 2)")
    train.add_argument("--gradient_checkpointing", action="store_true")
    train.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit")
    train.add_argument("--cli", action="store_true", help="also time the family's training script's steady state")
    train.add_argument("--cli-steps", type=positive_int, default=20, help="N: runs of N and 2N steps (default 20)")
    train.add_argument("--cli-repeats", type=positive_int, default=1, help="pairs of such runs (default 1)")
    train.set_defaults(func=run_train)

    # one configuration's peak memory, run by `train` in a fresh process
    memory = commands.add_parser("train-memory", parents=[common], help="(run by train) one configuration's memory")
    memory.add_argument("--adapter", required=True)
    memory.add_argument("--steps", type=positive_int, default=2)
    memory.add_argument("--gradient_checkpointing", action="store_true")
    memory.add_argument("--use_8bit_adam", action="store_true")
    memory.set_defaults(func=lambda args: print(json.dumps(measure_memory(args))))
    return parser


def check_args(parser: argparse.ArgumentParser, args) -> None:
    """Turn settings that cannot run into clear errors before anything is built."""
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device.startswith("cuda") and not args.dry_run and not torch.cuda.is_available():
        parser.error("--device cuda: this torch build sees no CUDA device")
    if args.min_rank is None:
        args.min_rank = max(1, args.rank // 2)
    if args.min_rank > args.rank:
        parser.error(f"--min-rank ({args.min_rank}) must not exceed --rank ({args.rank})")
    if args.family == "flux" and args.command == "train" and args.dry_run:
        parser.error("--family flux --dry-run counts a denoising step only: use `infer --family flux --dry-run`")
    if args.resolution is None:
        args.resolution = default_resolution(args.family, args.size)
    if args.family == "flux" and args.resolution % (2 * FLUX_VAE_SCALE):
        parser.error(f"--resolution must be a multiple of 16 for FLUX (VAE and 2x2 packing), got {args.resolution}")
    if args.resolution % 8:
        parser.error(f"--resolution must be a multiple of 8 (the VAE's downsampling), got {args.resolution}")
    if getattr(args, "use_8bit_adam", False) and not args.dry_run and importlib.util.find_spec("bitsandbytes") is None:
        parser.error("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes")
    if getattr(args, "cli", False):
        if args.size == "full":
            parser.error("--cli trains on a saved fixture; use --size tiny or small")
        if args.dtype != "fp32":
            parser.error("--cli compares with the training script's fp32 steps; use --dtype fp32")
    if args.size == "full" and args.device == "cpu" and not args.dry_run:
        print("note: the full-size UNet on a CPU takes minutes per step", file=sys.stderr)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # loading a UNet-only LoRA into a pipeline without text encoders logs one warning per absent encoder
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
