#!/usr/bin/env python
"""End-to-end demo on the CPU: teach the toy base model a robot from one picture, then place it where prompts say.

    python scripts/demo.py [--family sdxl|flux] [--base_model DIR] [--steps N] [--readme-images]

1. Uses the miniature SD-XL base model trained on the toy world (`models/toy-sdxl`, shipped with the project;
   `make toy-base` retrains it), which has never seen the robot of examples/concept.png.
2. Places the robot on the pink background of the toy world (outputs/demo/concept.png, 64 px) and trains a
   T-LoRA adapter on that one picture with `accelerate launch train_tlora_sdxl.py ...`, exactly as a user
   would on a GPU.
3. Samples a few prompts with a stock `StableDiffusionXLPipeline`, two seeds each, before and after
   `pipe.load_tlora_weights(...)`, into outputs/demo/grid.png (rows: prompts; left: base, right: T-LoRA).
4. The trainer's model card, outputs/demo/tlora/README.md, shows the rank schedule over the sampler's
   steps, its own base-vs-adapter grid and the loss curve. `--readme-images` copies the grid and the schedule
   plot to docs/demo/, where the project README shows them.

`--family flux` runs the same steps with `train_tlora_flux.py` and a stock `FluxPipeline` on a tiny random FLUX.1
model (outputs/demo/tiny-flux, built when missing; there is no toy FLUX base yet), into grid-flux.png and
outputs/demo/tlora-flux/: it shows the FLUX path working end to end, not a learned robot.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from scripts import toy_experiment, toy_world  # noqa: E402

DEMO_DIR = REPO_ROOT / "outputs" / "demo"
README_IMAGES_DIR = REPO_ROOT / "docs" / "demo"
CONCEPT_IMAGE = REPO_ROOT / "examples" / "concept.png"
SHIPPED_BASE = REPO_ROOT / "models" / "toy-sdxl"
CONCEPT_CONTEXT = "pink background"
INSTANCE_PROMPT = toy_world.CONCEPT_PROMPT  # "a sks toy"; toy_world says why not "a photo of sks toy"
# the toy experiment's contextual prompts, all of them
PROMPTS = (INSTANCE_PROMPT, *(template.format(toy_world.CONCEPT) for template in toy_experiment.TOY_PROMPTS["toy"]))
RESOLUTION = 64
SAMPLING_STEPS = 20
SEEDS = (0, 1)
DEMO_RANK = 8
SCHEDULE_PLOT = "rank_schedule.png"
# Per family: the pipeline, the guidance it samples with, the run's length and learning rate, and the training flags
# that differ from the family's defaults for a run on the CPU. SD-XL: the toy experiment's recipe
# (scripts/toy_experiment.py), min-SNR weighting and adapted layers included. FLUX: AdamW, as Prodigy's first steps
# are too small to show in a short run; fp32, as bf16 is slow on most CPUs; a short T5 prompt length.
FAMILIES = {
    "sdxl": {
        "pipeline": "StableDiffusionXLPipeline",
        "guidance_scale": 5.0,
        "steps": toy_experiment.STEPS,
        "learning_rate": toy_experiment.LEARNING_RATE,
        "flags": ["--snr_gamma", str(toy_experiment.SNR_GAMMA), "--target_modules", *toy_experiment.TARGET_MODULES],
    },
    "flux": {
        "pipeline": "FluxPipeline",
        "guidance_scale": 3.5,
        "steps": 200,
        "learning_rate": 1e-2,
        "flags": ["--optimizer", "adamw", "--mixed_precision", "no", "--max_sequence_length", "64"],
    },
}
RANDOM_FLUX_BASE = DEMO_DIR / "tiny-flux"
CARD_PLOTS = (SCHEDULE_PLOT, "validation_grid.png", "loss_curve.png")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="sdxl", help="model family (default sdxl)")
    parser.add_argument(
        "--base_model",
        type=Path,
        default=None,
        help="the base model folder (default for sdxl: the shipped models/toy-sdxl, built with train_toy_base.py "
        f"when missing, which takes about 30 minutes; for flux: a tiny random model in {RANDOM_FLUX_BASE})",
    )
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: 600 for sdxl, 200 for flux)")
    parser.add_argument(
        "--readme-images", action="store_true", help=f"copy the grid and the card's plots to {README_IMAGES_DIR}"
    )
    return parser.parse_args(argv)


def demo_environment() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    # One thread is faster for models this small: with more, the threads mostly wait for each other.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def ensure_model(folder: Path, family: str) -> Path:
    if (folder / "model_index.json").is_file():
        print(f"Using the base model in {folder}")
        return folder
    if family == "flux":
        from scripts.make_tiny_pipeline import save_pipeline

        print(f"Building a tiny random FLUX.1 model in {folder}")
        return save_pipeline(folder, "flux", "tiny", overwrite=True)
    print(f"No toy base model in {folder}: training one (about 30 minutes on 2 cores; resumable)", flush=True)
    subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "train_toy_base.py"), str(folder)],
        check=True, env=demo_environment(), cwd=REPO_ROOT,
    )  # fmt: skip
    return folder


def make_concept_picture() -> Path:
    path = DEMO_DIR / "concept.png"
    toy_world.concept_on_context(CONCEPT_IMAGE, CONCEPT_CONTEXT).save(path)
    return path


def train(model: Path, concept: Path, output_dir: Path, family: str, steps: int) -> None:
    """Run the training script through `accelerate launch`, on the CPU, in one process."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(REPO_ROOT / f"train_tlora_{family}.py"),
        "--pretrained_model_name_or_path", str(model),
        "--instance_data_dir", str(concept),
        "--instance_prompt", INSTANCE_PROMPT,
        "--resolution", str(RESOLUTION),
        "--rank", str(DEMO_RANK),
        "--learning_rate", str(FAMILIES[family]["learning_rate"]),
        "--max_train_steps", str(steps),
        "--checkpointing_steps", str(max(1, steps // 2)),
        "--validation_prompt", *PROMPTS,
        "--num_validation_images", "1",
        "--validation_steps", str(max(1, steps // 2)),
        "--num_inference_steps", str(SAMPLING_STEPS),
        "--seed", "0",
        "--output_dir", str(output_dir),
        "--overwrite",  # the demo's own folder: running the demo again replaces its earlier result
        *FAMILIES[family]["flags"],
    ]  # fmt: skip
    print("Training: accelerate launch", shlex.join(command[3:]), flush=True)
    subprocess.run(command, check=True, env=demo_environment(), cwd=REPO_ROOT)


def sample(pipe, seed: int, guidance_scale: float):
    import torch

    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(
        list(PROMPTS), height=RESOLUTION, width=RESOLUTION, num_inference_steps=SAMPLING_STEPS,
        guidance_scale=guidance_scale, generator=generator,
    ).images  # fmt: skip


def compare(model: Path, adapter_dir: Path, family: str, grid_path: Path) -> Path:
    """Base vs T-LoRA through a stock pipeline, each prompt with every seed of SEEDS; returns the grid's path."""
    import diffusers
    import numpy as np
    import torch

    import pipelines.tlora  # noqa: F401  (adds load_tlora_weights to the stock pipelines)
    from training.card_assets import validation_grid

    pipe = getattr(diffusers, FAMILIES[family]["pipeline"]).from_pretrained(model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    guidance_scale = FAMILIES[family]["guidance_scale"]
    base = [sample(pipe, seed, guidance_scale) for seed in SEEDS]
    pipe.load_tlora_weights(adapter_dir)
    tuned = [sample(pipe, seed, guidance_scale) for seed in SEEDS]

    rows = []
    for index, prompt in enumerate(PROMPTS):
        before, after = [images[index] for images in base], [images[index] for images in tuned]
        pairs = zip(before, after, strict=True)
        change = np.mean([np.abs(np.asarray(b, np.float32) - np.asarray(a, np.float32)).mean() for b, a in pairs])
        print(f"  {prompt!r}: mean pixel change from the adapter {change:.1f} / 255")
        rows.append((prompt, before, after))
    return validation_grid(rows, grid_path)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.steps is None:
        args.steps = FAMILIES[args.family]["steps"]
    if args.steps < 1:
        print(f"error: --steps must be at least 1, got {args.steps}", file=sys.stderr)
        return 2
    os.environ.update(demo_environment())
    started = time.perf_counter()
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    # SD-XL's outputs keep their plain names (grid.png, tlora/); other families' carry the family
    suffix = "" if args.family == "sdxl" else f"-{args.family}"
    default_base = SHIPPED_BASE if args.family == "sdxl" else RANDOM_FLUX_BASE
    model = ensure_model(args.base_model or default_base, args.family)
    concept = make_concept_picture()
    adapter_dir = DEMO_DIR / f"tlora{suffix}"
    train(model, concept, adapter_dir, args.family, args.steps)
    print("Sampling base vs T-LoRA:")
    grid = compare(model, adapter_dir, args.family, DEMO_DIR / f"grid{suffix}.png")
    print(f"\nDone in {time.perf_counter() - started:.0f} s.")
    print(f"  grid (rows: prompts {list(PROMPTS)}; columns: base, T-LoRA): {grid}")
    print(f"  training picture: {concept}")
    print(f"  adapter: {adapter_dir / 'pytorch_tlora_weights.safetensors'}")
    print(f"  model card: {adapter_dir / 'README.md'}, with {', '.join(CARD_PLOTS)}")
    print(f"  validation images: {adapter_dir / 'validation'}")
    print(f"  TensorBoard logs: tensorboard --logdir {adapter_dir / 'logs'}")
    if args.readme_images:
        README_IMAGES_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(grid, README_IMAGES_DIR / grid.name)
        shutil.copyfile(adapter_dir / SCHEDULE_PLOT, README_IMAGES_DIR / f"{Path(SCHEDULE_PLOT).stem}{suffix}.png")
        print(f"  copied the grid and the schedule plot to {README_IMAGES_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
