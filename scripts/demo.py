#!/usr/bin/env python
"""End-to-end demo on the CPU: train a T-LoRA adapter on examples/concept.png and compare it with the base model.

    python scripts/demo.py [--size tiny|small] [--steps N] [--readme-images]

1. Builds a randomly initialised, SD-XL-shaped model in outputs/demo/<size>-sdxl (reused when present).
2. Trains with `accelerate launch train_tlora_sdxl.py ...`, exactly as a user would on a GPU.
3. Samples a few prompts with a stock `StableDiffusionXLPipeline`, before and after
   `pipe.load_tlora_weights(...)`, into outputs/demo/grid.png (rows: prompts; columns: base, T-LoRA).
4. The trainer's model card, outputs/demo/tlora-<size>/README.md, shows the rank schedule over the sampler's
   steps, its own base-vs-adapter grid and the loss curve. `--readme-images` copies the grid and the schedule
   plot to docs/demo/, where the project README shows them.

The model is random, so the pictures are noise; the demo shows the workflow and the files it makes, and
that the adapter changes what the pipeline draws.
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

DEMO_DIR = REPO_ROOT / "outputs" / "demo"
README_IMAGES_DIR = REPO_ROOT / "docs" / "demo"
CONCEPT_IMAGE = REPO_ROOT / "examples" / "concept.png"
INSTANCE_PROMPT = "a photo of sks toy"
PROMPTS = (INSTANCE_PROMPT, "a photo of sks toy on the beach")
RESOLUTION = {"tiny": 64, "small": 256}
SCHEDULE_PLOT = "rank_schedule.png"
CARD_PLOTS = (SCHEDULE_PLOT, "validation_grid.png", "loss_curve.png")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(RESOLUTION), default="tiny", help="model size (default tiny: fastest)")
    parser.add_argument("--steps", type=int, default=150, help="training steps (default 150)")
    parser.add_argument(
        "--readme-images", action="store_true", help=f"copy the grid and the card's plots to {README_IMAGES_DIR}"
    )
    return parser.parse_args(argv)


def demo_environment() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    # One thread is faster for models this small: with more, the threads mostly wait for each other.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def ensure_model(size: str) -> Path:
    from scripts.make_tiny_pipeline import save_pipeline

    folder = DEMO_DIR / f"{size}-sdxl"
    if (folder / "model_index.json").is_file():
        print(f"Reusing the {size} model in {folder}")
        return folder
    print(f"Building a random {size} SD-XL model in {folder}")
    return save_pipeline(folder, "sdxl", size, overwrite=True)


def train(model: Path, output_dir: Path, size: str, steps: int) -> None:
    """Run the training script through `accelerate launch`, on the CPU, in one process."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(REPO_ROOT / "train_tlora_sdxl.py"),
        "--pretrained_model_name_or_path", str(model),
        "--instance_data_dir", str(CONCEPT_IMAGE),
        "--instance_prompt", INSTANCE_PROMPT,
        "--resolution", str(RESOLUTION[size]),
        "--rank", "8",
        "--learning_rate", "1e-2",
        "--max_train_steps", str(steps),
        "--checkpointing_steps", str(max(1, steps // 2)),
        "--validation_prompt", *PROMPTS,
        "--num_validation_images", "1",
        "--validation_steps", str(max(1, steps // 2)),
        "--num_inference_steps", "10",
        "--seed", "0",
        "--output_dir", str(output_dir),
        "--overwrite",  # the demo's own folder: running the demo again replaces its earlier result
    ]  # fmt: skip
    print("Training: accelerate launch", shlex.join(command[3:]), flush=True)
    subprocess.run(command, check=True, env=demo_environment(), cwd=REPO_ROOT)


def sample(pipe, prompt: str, size: str):
    import torch

    generator = torch.Generator("cpu").manual_seed(0)
    resolution = RESOLUTION[size]
    return pipe(
        prompt, height=resolution, width=resolution, num_inference_steps=10, guidance_scale=5.0, generator=generator
    ).images[0]


def compare(model: Path, adapter_dir: Path, size: str) -> Path:
    """Base vs T-LoRA through a stock pipeline; returns the grid's path."""
    import numpy as np
    from diffusers import StableDiffusionXLPipeline

    import pipelines.tlora  # noqa: F401  (adds load_tlora_weights to the SD-XL pipelines)
    from training.card_assets import validation_grid

    pipe = StableDiffusionXLPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    base = [sample(pipe, prompt, size) for prompt in PROMPTS]
    pipe.load_tlora_weights(adapter_dir)
    tuned = [sample(pipe, prompt, size) for prompt in PROMPTS]

    for prompt, before, after in zip(PROMPTS, base, tuned, strict=True):
        change = np.abs(np.asarray(before, dtype=np.float32) - np.asarray(after, dtype=np.float32)).mean()
        print(f"  {prompt!r}: mean pixel change from the adapter {change:.1f} / 255")
    rows = [(prompt, [before], [after]) for prompt, before, after in zip(PROMPTS, base, tuned, strict=True)]
    return validation_grid(rows, DEMO_DIR / "grid.png")


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.update(demo_environment())
    started = time.perf_counter()
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    model = ensure_model(args.size)
    adapter_dir = DEMO_DIR / f"tlora-{args.size}"
    train(model, adapter_dir, args.size, args.steps)
    print("Sampling base vs T-LoRA:")
    grid = compare(model, adapter_dir, args.size)
    print(f"\nDone in {time.perf_counter() - started:.0f} s.")
    print(f"  grid (rows: prompts {list(PROMPTS)}; columns: base, T-LoRA): {grid}")
    print(f"  adapter: {adapter_dir / 'pytorch_tlora_weights.safetensors'}")
    print(f"  model card: {adapter_dir / 'README.md'}, with {', '.join(CARD_PLOTS)}")
    print(f"  validation images: {adapter_dir / 'validation'}")
    print(f"  TensorBoard logs: tensorboard --logdir {adapter_dir / 'logs'}")
    if args.readme_images:
        README_IMAGES_DIR.mkdir(parents=True, exist_ok=True)
        for source in (grid, adapter_dir / SCHEDULE_PLOT):
            shutil.copyfile(source, README_IMAGES_DIR / source.name)
        print(f"  copied the grid and the schedule plot to {README_IMAGES_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
