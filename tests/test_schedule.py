import math

import pytest
import torch
from diffusers import EulerDiscreteScheduler

from pipelines.tlora import TLoraConfig, TLoraConfigError, rank_mask, rank_schedule


def formula(t, rank, min_rank, total=1000, exponent=1.0):
    return math.floor(((total - t) / total) ** exponent * (rank - min_rank)) + min_rank


@pytest.mark.parametrize("rank,min_rank,exponent", [(64, 32, 1.0), (16, 4, 1.0), (64, 1, 2.0), (8, 8, 1.0)])
def test_every_integer_timestep_matches_the_formula(rank, min_rank, exponent):
    timesteps = torch.arange(1000)
    ranks = rank_schedule(timesteps, rank, min_rank, 1000, exponent)
    expected = torch.tensor([formula(t, rank, min_rank, 1000, exponent) for t in range(1000)])
    assert ranks.dtype == torch.int64
    assert torch.equal(ranks, expected)


def test_paper_examples_and_input_kinds():
    for t, expected in ((999, 32), (500, 48), (0, 64)):
        assert int(rank_schedule(t, 64, 32)) == expected
        assert int(rank_schedule(torch.tensor(t), 64, 32)) == expected
        assert int(rank_schedule(float(t), 64, 32)) == expected
    assert int(rank_schedule(torch.tensor(499.5, dtype=torch.float16), 64, 32)) == formula(499.5, 64, 32)


def test_out_of_range_timesteps_are_clamped():
    ranks = rank_schedule(torch.tensor([-20.0, 1000.0, 1500.0, 1e9]), 64, 32)
    assert ranks.tolist() == [64, 32, 32, 32]


def test_mask_has_one_row_per_sample():
    mask = rank_mask(torch.tensor([0, 500, 999]), 64, 32)
    assert mask.shape == (3, 64)
    assert mask.sum(dim=1).tolist() == [64, 48, 32]
    # a prefix of ones, then zeros
    assert torch.equal(mask[1], torch.cat([torch.ones(48), torch.zeros(16)]))
    assert rank_mask(torch.tensor(999), 64, 32).shape == (1, 64)
    assert rank_mask(250, 64, 32, dtype=torch.float16).dtype == torch.float16


def test_mask_is_built_without_reading_values_on_the_host():
    # meta tensors have no data: any `.item()` or Python branch on a value would fail here
    mask = rank_mask(torch.empty(4, device="meta"), 64, 32)
    assert mask.shape == (4, 64) and mask.device.type == "meta"


def test_euler_25_leading_steps_use_ranks_33_to_63():
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    scheduler.set_timesteps(25)
    ranks = rank_schedule(scheduler.timesteps, 64, 32)
    assert scheduler.timesteps.is_floating_point()
    assert (int(ranks.min()), int(ranks.max())) == (33, 63)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"rank": 8, "min_rank": 16}, "must not exceed"),
        ({"rank": 0, "min_rank": 1}, "`rank` must be an integer from 1 to 65536, got 0"),
        ({"rank": 65537, "min_rank": 1}, "`rank` must be an integer from 1 to 65536, got 65537"),
        ({"rank": True, "min_rank": 1}, "`rank` must be an integer"),
        ({"rank": 8, "min_rank": 2.0}, "`min_rank` must be an integer >= 1, got 2.0"),
        ({"rank": 8, "num_train_timesteps": 1000.0}, "`num_train_timesteps` must be an integer"),
        ({"rank": 8, "schedule_exponent": -1.0}, r"`schedule_exponent` must be a finite number >= 0, got -1\.0"),
        ({"rank": 8, "schedule_exponent": math.nan}, "`schedule_exponent` must be a finite number >= 0, got nan"),
        ({"rank": 8, "schedule_exponent": math.inf}, "`schedule_exponent` must be a finite number >= 0, got inf"),
        ({"rank": 8, "schedule_exponent": "1"}, "`schedule_exponent` must be a finite number >= 0, got '1'"),
        ({"rank": 8, "variant": "dora"}, "variant"),
        ({"rank": 8, "lora_alpha": 0}, r"`lora_alpha` \(or None\) must be a finite number > 0, got 0"),
        ({"rank": 8, "lora_alpha": math.nan}, "`lora_alpha` .* got nan"),
        ({"rank": 8, "lora_alpha": -math.inf}, "`lora_alpha` .* got -inf"),
        ({"rank": 8, "target_modules": "to_q"}, "`target_modules` must be a non-empty list of module names"),
        ({"rank": 8, "target_modules": ["to_q", ""]}, "`target_modules` must be a non-empty list of module names"),
        ({"rank": 8, "base_model": 3}, "`base_model` must be a string or None, got 3"),
    ],
)
def test_invalid_configs_are_refused(kwargs, message):
    with pytest.raises(TLoraConfigError, match=message):
        TLoraConfig(**kwargs)


def test_config_json_round_trip_and_version_check():
    config = TLoraConfig(rank=32, min_rank=8, variant="vanilla", lora_alpha=16, init="normal", base_model="x")
    data = config.to_dict()
    assert data["format"] == "tlora" and data["format_version"] == 1
    assert TLoraConfig.from_json(config.to_json()) == config
    assert config.scale == 0.5
    assert TLoraConfig(rank=64).min_rank == 32
    with pytest.raises(TLoraConfigError, match="format_version 2"):
        TLoraConfig.from_dict({**data, "format_version": 2})
