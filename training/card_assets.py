"""What a trained adapter's model card shows: the rank schedule over the sampler's steps, a base-vs-adapter grid of
the validation prompts, the training loss curve, and the usage and file sections that say how to load it.

The schedule plot shows the ranks the adapter actually uses at inference with the card's sampling settings: the
base model's scheduler is set up for that many steps as its pipeline would (for FLUX, with the resolution-dependent
shift) and each of its timesteps goes through the adapter's r(t). Scheduler timesteps are already in the
schedule's units (FLUX's flow-matching timesteps are 1000 sigma), so no family-specific scale applies here.

Figures are drawn on `matplotlib.figure.Figure` objects, not through pyplot, so no global backend or figure state
is touched inside a training run.
"""

from __future__ import annotations

import csv
import math
import os
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from accelerate.tracking import GeneralTracker
from matplotlib.figure import Figure
from PIL import Image

import pipelines.tlora as tl
from pipelines.tlora.file_format import write_atomically

from .tool_exports import write_tool_files

SCHEDULE_PLOT = "rank_schedule.png"
VALIDATION_GRID = "validation_grid.png"
LOSS_CURVE = "loss_curve.png"
LOSS_HISTORY = "loss.csv"
MAX_LOSS_LINE = 64  # a row is a step and a loss written with 6 significant digits
# FLUX pipelines pack 2 x 2 latent patches; the VAE downsamples 8 x
FLUX_PIXELS_PER_TOKEN = 16


def sampler_timesteps(scheduler, num_inference_steps: int, resolution: int = 1024) -> list[float]:
    """The timesteps a pipeline hands its denoiser when sampling `num_inference_steps` steps with `scheduler`.

    A copy of `scheduler` is set up, so the caller's keeps its state. Flow-matching schedulers with dynamic
    shifting (FLUX) get the sigmas and the shift `mu` that FluxPipeline computes for a `resolution` square image.
    """
    scheduler = type(scheduler).from_config(scheduler.config)
    if scheduler.config.get("use_dynamic_shifting", False):
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = scheduler.config
        image_seq_len = (resolution // FLUX_PIXELS_PER_TOKEN) ** 2
        mu = calculate_shift(
            image_seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        scheduler.set_timesteps(sigmas=sigmas, mu=mu)
    else:
        scheduler.set_timesteps(num_inference_steps)
    return [float(t) for t in scheduler.timesteps]


def ranks_at(config: tl.TLoraConfig, timesteps: list[float]) -> list[int]:
    ranks = tl.rank_schedule(
        timesteps, config.rank, config.min_rank, config.num_train_timesteps, config.schedule_exponent
    )
    return [int(rank) for rank in ranks]


def _save_figure(figure: Figure, path: Path) -> Path:
    return write_atomically(path, lambda temporary: figure.savefig(temporary, format="png", dpi=100))


def plot_rank_schedule(
    config: tl.TLoraConfig, timesteps: list[float], path: str | os.PathLike, sampler: str = "sampler"
) -> Path:
    """Bar chart of the active rank at each sampling step, labelled with the step's timestep."""
    ranks = ranks_at(config, timesteps)
    steps = np.arange(1, len(timesteps) + 1)
    figure = Figure(figsize=(8, 3.6), layout="constrained")
    axes = figure.add_subplot()
    axes.bar(steps, ranks, color="#4c72b0", width=0.8)
    axes.axhline(config.rank, color="#55a868", linestyle="--", linewidth=1, label=f"rank R = {config.rank}")
    axes.axhline(config.min_rank, color="#c44e52", linestyle=":", linewidth=1, label=f"min rank = {config.min_rank}")
    # every step when they fit, else about ten evenly spaced ones, always with the first and the last
    stride = max(1, round(len(steps) / 10))
    shown = sorted({*range(0, len(steps), stride), len(steps) - 1})
    axes.set_xticks(steps[shown], [f"{steps[i]}\nt={timesteps[i]:.0f}" for i in shown])
    axes.set_xlabel("sampling step (timestep t)")
    axes.set_ylabel("active rank components")
    axes.set_ylim(0, config.rank * 1.12)
    axes.set_title(f"T-LoRA rank per step: {sampler}, {len(steps)} steps (r(t) exponent {config.schedule_exponent:g})")
    # the high-noise steps on the left have the fewest components, leaving the top left free
    axes.legend(loc="upper left", fontsize="small")
    return _save_figure(figure, Path(path))


def validation_grid(rows: list[tuple[str, list[Image.Image], list[Image.Image]]], path: str | os.PathLike) -> Path:
    """One image: a row per prompt, its base-model images on the left and the adapter's on the right."""
    if not rows:
        raise ValueError("A validation grid needs at least one prompt.")
    per_side = max(len(base) for _, base, _ in rows)
    columns = 2 * per_side
    cell = 2.4
    figure = Figure(figsize=(cell * columns, cell * len(rows) + 0.4), layout="constrained")
    grid = figure.subplots(len(rows), columns, squeeze=False)
    for row, (prompt, base, adapted) in enumerate(rows):
        for column, image in enumerate([*base, *adapted]):
            axes = grid[row][column if column < len(base) else per_side + column - len(base)]
            axes.imshow(np.asarray(image.convert("RGB")), interpolation="nearest")
        for axes in grid[row]:
            axes.set_xticks([])
            axes.set_yticks([])
            for spine in axes.spines.values():
                spine.set_visible(False)
        grid[row][0].set_ylabel("\n".join(textwrap.wrap(prompt, 28)), fontsize="small")
    for column in range(columns):
        grid[0][column].set_title("base model" if column < per_side else "with T-LoRA", fontsize="medium")
    return _save_figure(figure, Path(path))


class LossHistory(GeneralTracker):
    """An accelerate tracker that keeps the loss of every optimizer step in `loss.csv` (step, loss), across resumed
    runs, for the card's loss curve whatever --report_to says.

    The first step a run logs decides what is kept: rows from that step on were written by an earlier run that
    this one (resumed from a checkpoint before them) computes again.
    """

    name = "loss_history"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        self.path = Path(path)
        self._continuing = False

    @property
    def tracker(self) -> Path:
        return self.path

    def store_init_configuration(self, values: dict) -> None:
        """Nothing to store: only the loss is recorded."""

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        if "loss" not in values or step is None:
            return
        if not self._continuing:
            kept = [(earlier, loss) for earlier, loss in read_loss_history(self.path) if earlier < step]
            write_atomically(self.path, lambda temporary: _write_rows(temporary, kept))
            self._continuing = True
        with open(self.path, "a", newline="") as handle:
            csv.writer(handle).writerow((step, f"{float(values['loss']):.6g}"))


def _write_rows(path: Path, rows) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("step", "loss"))
        writer.writerows(rows)


def read_loss_history(path: str | os.PathLike) -> list[tuple[int, float]]:
    """The (step, loss) rows of a loss history. A row that is not a step and a finite loss (a line cut short by a
    crash, an edited or damaged file) is left out with a warning rather than stopping a run: the history only draws
    the card's loss curve. Lines are read at most `MAX_LOSS_LINE` characters at a time, so no line fills memory."""
    path = Path(path)
    if not path.is_file():
        return []
    rows, skipped = [], 0
    with open(path, encoding="utf-8", errors="replace", newline="") as handle:
        while line := handle.readline(MAX_LOSS_LINE):
            if len(line) == MAX_LOSS_LINE and not line.endswith("\n"):  # an overlong line: skip to its end
                while (rest := handle.readline(MAX_LOSS_LINE)) and not rest.endswith("\n"):
                    pass
                line = ""
            row = _loss_row(line.strip())
            if row is not None:
                rows.append(row)
            elif line.strip() != "step,loss":
                skipped += 1
    if skipped:
        warnings.warn(f"{path}: {skipped} damaged lines left out of the loss history.", stacklevel=2)
    return rows


def _loss_row(line: str) -> tuple[int, float] | None:
    step, _, loss = line.partition(",")
    try:
        row = int(step), float(loss)
    except ValueError:
        return None
    return row if row[0] >= 0 and math.isfinite(row[1]) else None


def plot_loss(history: list[tuple[int, float]], path: str | os.PathLike) -> Path:
    """The per-step loss (faint) and its moving average over about a twentieth of the run."""
    if not history:
        raise ValueError("No loss values to plot.")
    steps = np.array([step for step, _ in history])
    losses = np.array([loss for _, loss in history])
    window = max(1, len(losses) // 20)
    smoothed = np.convolve(losses, np.ones(window) / window, mode="valid")
    figure = Figure(figsize=(8, 3.6), layout="constrained")
    axes = figure.add_subplot()
    axes.plot(steps, losses, color="#4c72b0", alpha=0.3, linewidth=0.8, label="loss per step")
    axes.plot(steps[window - 1 :], smoothed, color="#4c72b0", linewidth=2, label=f"moving average ({window} steps)")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("diffusion loss")
    axes.set_title("Training loss")
    axes.legend(loc="upper right", fontsize="small")
    return _save_figure(figure, Path(path))


# --------------------------------------------------------------------------- at the end of training


def base_model_images(pipeline, validation_embeddings: list[dict], args, accelerator, seed: int, *, generate):
    """The validation prompts sampled with every adapter switched off (scale 0), with the validation seeds, for
    the base column of the grid; `generate` is the family script's sampler, as in `run_validation`."""
    seeds = [seed + j for j in range(args.num_validation_images)]
    pipeline.set_tlora_scale(0.0)
    try:
        return [
            [generate(pipeline, embeddings, [one], args, accelerator)[0] for one in seeds]
            for embeddings in validation_embeddings
        ]
    finally:
        pipeline.set_tlora_scale(1.0)


def write_card_assets(
    args, config: tl.TLoraConfig, scheduler, validation_rows: list[tuple[str, list, list]]
) -> dict[str, str]:
    """Write the schedule plot, the validation grid (when there are validation prompts) and the loss curve (when
    steps were logged) into --output_dir; returns `{caption: path relative to --output_dir}` for the card."""
    output_dir = Path(args.output_dir)
    timesteps = sampler_timesteps(scheduler, args.num_inference_steps, args.resolution)
    sampler = f"{type(scheduler).__name__}, {args.num_inference_steps} steps"
    written = {
        f"Active rank at each sampling step ({sampler})": plot_rank_schedule(
            config, timesteps, output_dir / SCHEDULE_PLOT, type(scheduler).__name__
        )
    }
    if validation_rows:
        written["Validation prompts: base model (left) and with this adapter (right)"] = validation_grid(
            validation_rows, output_dir / VALIDATION_GRID
        )
    history = read_loss_history(output_dir / args.logging_dir / LOSS_HISTORY)
    if history:
        written["Training loss"] = plot_loss(history, output_dir / LOSS_CURVE)
    return {caption: path.relative_to(output_dir).as_posix() for caption, path in written.items()}


@dataclass
class CardExtras:
    """What the end of a run adds to the model card: `{caption: image path}` and `{file: what it is for}`, paths
    relative to --output_dir."""

    assets: dict[str, str]
    files: dict[str, str]


def write_card_extras(
    args,
    config: tl.TLoraConfig,
    pipeline,
    validation_embeddings: list[dict],
    validation_paths: list[list[Path]],
    accelerator,
    seed: int,
    *,
    generate,
) -> CardExtras:
    """At the end of a run (main process), with the saved adapter loaded into `pipeline`: sample the validation
    prompts without it for the grid, draw the card's images, and write the files for other tools."""
    rows = []
    if validation_paths:
        base = base_model_images(pipeline, validation_embeddings, args, accelerator, seed, generate=generate)
        for prompt, base_images, paths in zip(args.validation_prompt, base, validation_paths, strict=True):
            rows.append((prompt, base_images, [Image.open(path).convert("RGB") for path in paths]))
    assets = write_card_assets(args, config, pipeline.scheduler, rows)
    family = config.model_family or "sdxl"
    files = write_tool_files(args.output_dir, family, getattr(args, "export_for_tools", False))
    return CardExtras(assets, files)


# --------------------------------------------------------------------------- card sections


def usage_section(
    base_model: str,
    adapter: str,
    prompt: str,
    sampling: str,
    pipeline_class: str,
    torch_dtype: str,
    has_loader_files: bool = True,
) -> str:
    """Markdown: loading with diffusers alone through the loader files first, then with this project installed.

    `sampling` holds the keyword arguments of the pipeline call, e.g. "num_inference_steps=25, guidance_scale=5.0".
    """
    call = f"image = pipe({prompt!r}, {sampling}).images[0]"
    with_project = f"""With the project that trained it installed, its `pipelines.tlora` package adds
`load_tlora_weights` to the stock pipelines:

```python
import torch
from diffusers import {pipeline_class}

import pipelines.tlora  # adds load_tlora_weights to the stock pipelines

pipe = {pipeline_class}.from_pretrained({base_model!r}, torch_dtype={torch_dtype}).to("cuda")
pipe.load_tlora_weights({adapter!r})
{call}
```
"""
    if not has_loader_files:
        return f"""The adapter is a T-LoRA file (`{tl.WEIGHT_NAME}`), not a standard LoRA. This folder has no loader
files (`pipeline.py`, `tlora_*.py`) for diffusers alone; `python scripts/convert_tlora.py loader-files FOLDER` of
the project that trained it writes them.

{with_project}"""
    return f"""The adapter is a T-LoRA file (`{tl.WEIGHT_NAME}`), not a standard LoRA. The loader files next to it
(`pipeline.py`, `tlora_*.py`) let diffusers alone load it, nothing else to install:

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained(
    {base_model!r},
    custom_pipeline={adapter!r},
    trust_remote_code=True,
    torch_dtype={torch_dtype},
).to("cuda")
pipe.load_tlora_weights({adapter!r})
{call}
```

`trust_remote_code=True` runs the `pipeline.py` and `tlora_*.py` of this repository: read them first. A copy of this
adapter without those files (or diffusers' refusal to find `pipeline.py`) gets them back with
`python scripts/convert_tlora.py loader-files FOLDER` of the project that trained it.

{with_project}"""


def files_section(files: dict[str, str]) -> str:
    """Markdown table: which file is for which tool."""
    rows = "\n".join(f"| `{name}` | {purpose} |" for name, purpose in files.items())
    return f"| file | for |\n|---|---|\n{rows}\n"


def images_section(assets: dict[str, str]) -> str:
    """Markdown images, `{caption: relative path}`."""
    return "\n\n".join(f"**{caption}**\n\n![{caption}]({path})" for caption, path in assets.items())
