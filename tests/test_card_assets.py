"""Model-card assets: the ranks of the sampler's actual steps, the validation grid, the loss record and curve."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

import pipelines.tlora as tl
from scripts.make_tiny_pipeline import build_scheduler
from training.card_assets import (
    LossHistory,
    plot_loss,
    plot_rank_schedule,
    ranks_at,
    read_loss_history,
    sampler_timesteps,
    validation_grid,
)


def paper_rank(t: float, rank: int, min_rank: int, exponent: float = 1.0, total: int = 1000) -> int:
    return math.floor(((total - t) / total) ** exponent * (rank - min_rank)) + min_rank


def test_sdxl_euler_steps_and_their_ranks():
    scheduler = build_scheduler("sdxl")
    timesteps = sampler_timesteps(scheduler, 25)
    # "leading" spacing with steps_offset 1: every 40th training timestep, from 961 down to 1
    assert timesteps == [float(1 + 40 * i) for i in reversed(range(25))]
    assert scheduler.timesteps.numel() == 1000  # the caller's scheduler is left as it was

    config = tl.TLoraConfig(rank=64, min_rank=32, schedule_exponent=1.5)
    assert ranks_at(config, timesteps) == [paper_rank(t, 64, 32, 1.5) for t in timesteps]


def test_flux_steps_are_shifted_and_already_in_schedule_units():
    """FLUX.1-dev at 28 steps, 1024 px: t from 1000 down to about 105, so with R = 32, r_min = 1 the ranks run
    1..28 (not 1..32: the sampler never reaches low t)."""
    # the fixture builder's FLUX scheduler is configured as FLUX.1-dev's
    timesteps = sampler_timesteps(build_scheduler("flux"), 28, resolution=1024)
    assert len(timesteps) == 28
    shifted = math.e**1.15 / (math.e**1.15 + (28 - 1))  # the time shift of the last sigma, 1/28, at mu = 1.15
    assert timesteps[0] == pytest.approx(1000.0) and timesteps[-1] == pytest.approx(1000 * shifted, abs=1e-3)
    ranks = ranks_at(tl.TLoraConfig(rank=32, min_rank=1, variant="vanilla"), timesteps)
    assert ranks[0] == 1 and ranks[-1] == 28 and ranks == sorted(ranks)


def _png(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB")).astype(int)


def test_plots_are_written(tmp_path):
    config = tl.TLoraConfig(rank=8, min_rank=4)
    timesteps = sampler_timesteps(build_scheduler("sdxl"), 10)
    pixels = _png(plot_rank_schedule(config, timesteps, tmp_path / "schedule.png", "Euler"))
    assert pixels.shape == (360, 800, 3) and pixels.std() > 10

    history = [(step, 1.0 / step) for step in range(1, 101)]
    pixels = _png(plot_loss(history, tmp_path / "loss.png"))
    assert pixels.shape == (360, 800, 3) and pixels.std() > 10
    with pytest.raises(ValueError, match="No loss"):
        plot_loss([], tmp_path / "empty.png")


def test_validation_grid_puts_base_left_and_adapter_right(tmp_path):
    red, blue = Image.new("RGB", (64, 64), (255, 0, 0)), Image.new("RGB", (64, 64), (0, 0, 255))
    rows = [("a photo of sks toy", [red, red], [blue, blue]), ("sks toy on the beach", [red, red], [blue, blue])]
    pixels = _png(validation_grid(rows, tmp_path / "grid.png"))
    assert pixels.shape == (round(100 * (2.4 * 2 + 0.4)), round(100 * 2.4 * 4), 3)

    def is_red(part):
        return (part[..., 0] > 200) & (part[..., 1] < 60) & (part[..., 2] < 60)

    def is_blue(part):
        return (part[..., 2] > 200) & (part[..., 0] < 60) & (part[..., 1] < 60)

    red_columns, blue_columns = np.nonzero(is_red(pixels).any(0))[0], np.nonzero(is_blue(pixels).any(0))[0]
    assert red_columns.max() < blue_columns.min()  # every base image left of every adapter image
    assert is_red(pixels).mean() > 0.3 and is_blue(pixels).mean() > 0.3


def test_tool_files_say_which_file_is_for_which_tool(tiny_pipe, tmp_path):
    from safetensors import safe_open

    from training.tool_exports import write_tool_files

    from tests.tlora_testing import add_random_tlora

    config = add_random_tlora(tiny_pipe.unet, rank=8, min_rank=4, model_family="sdxl")
    output_dir = tmp_path / "tlora-dog"
    tiny_pipe.save_tlora_weights(output_dir, tl.get_tlora_state_dict(tiny_pipe), config)

    files = write_tool_files(output_dir, "sdxl", with_exports=False)
    assert list(files) == ["pytorch_tlora_weights.safetensors", "pipeline.py, tlora_*.py"]
    assert (output_dir / "pipeline.py").is_file() and (output_dir / "tlora_loader.py").is_file()

    files = write_tool_files(output_dir, "sdxl", with_exports=True)
    node, static = "tlora-dog_tlora-node_ortho_r8-min4.safetensors", "tlora-dog_lora-rank16.safetensors"
    assert list(files)[2:] == [node, static]
    assert "ComfyUI-T-LoRA" in files[node] and "min_rank 4" in files[node]
    assert "LoraLoader, A1111" in files[static] and "exact at timestep 0 only" in files[static]
    with safe_open(str(output_dir / static), framework="pt") as handle:
        assert all(key.startswith("lora_unet_") for key in handle.keys())
    # the T-LoRA file is still the one the loader finds in the folder
    tl.remove_tlora(tiny_pipe.unet)
    tiny_pipe.load_tlora_weights(output_dir)
    assert tl.get_tlora_config(tiny_pipe).rank == 8


def test_loss_history_survives_a_resume(tmp_path):
    path = tmp_path / "logs" / "loss.csv"
    history = LossHistory(path)
    for step in range(1, 11):
        history.log({"loss": 1.0 / step, "lr": 1e-4}, step=step)
    history.log({"lr": 1e-4}, step=11)  # other values are not the loss
    assert [step for step, _ in read_loss_history(path)] == list(range(1, 11))

    resumed = LossHistory(path)  # a run resumed from checkpoint-5 computes steps 6-10 again
    resumed.log({"loss": 0.25}, step=6)
    resumed.log({"loss": 0.2}, step=7)
    assert [step for step, _ in read_loss_history(path)] == [1, 2, 3, 4, 5, 6, 7]
    assert read_loss_history(path)[-2:] == [(6, 0.25), (7, 0.2)]


def test_loss_history_records_what_accelerate_logs(tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, log_with=[LossHistory(tmp_path / "loss.csv")])
    accelerator.init_trackers("test")
    for step in (1, 2, 3):
        accelerator.log({"loss": step / 10, "lr": 0.1}, step=step)
    accelerator.end_training()
    assert read_loss_history(tmp_path / "loss.csv") == [(1, 0.1), (2, 0.2), (3, 0.3)]
