"""The timestep-dependent rank schedule of T-LoRA.

    r(t) = floor(((T - t) / T) ** e * (R - r_min)) + r_min

Timesteps outside `[0, T]` are clamped into it, so a scheduler that hands the UNet a slightly out-of-range
value (some samplers add an offset) still gets a rank between `r_min` and `R`.
Everything here is tensor arithmetic on the timesteps' device: no `.item()`, so building a mask never waits
for the accelerator.
"""

from __future__ import annotations

import torch


def _as_tensor(timesteps, device=None) -> torch.Tensor:
    if not torch.is_tensor(timesteps):
        timesteps = torch.tensor(timesteps)
    if device is not None:
        timesteps = timesteps.to(device)
    return timesteps


def _schedule_dtype(device: torch.device) -> torch.dtype:
    # float64 makes the tensor result agree with the formula evaluated in Python for every integer t;
    # MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def rank_schedule(
    timesteps,
    rank: int,
    min_rank: int,
    num_train_timesteps: int = 1000,
    exponent: float = 1.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Active rank for each timestep.

    Args:
        timesteps: a Python number, a 0-d tensor or a `(B,)` tensor, integer or float.
        rank, min_rank: `R` and `r_min`.
        num_train_timesteps: `T`.
        exponent: `e`.

    Returns:
        An int64 tensor of the same shape as `timesteps`.
    """
    t = _as_tensor(timesteps, device)
    t = t.to(_schedule_dtype(t.device))
    total = float(num_train_timesteps)
    progress = ((total - t.clamp(0.0, total)) / total) ** exponent
    return torch.floor(progress * (rank - min_rank)).long() + min_rank


def rank_mask(
    timesteps,
    rank: int,
    min_rank: int,
    num_train_timesteps: int = 1000,
    exponent: float = 1.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Mask `m(t)`: ones on the first `r(t)` of `rank` components, zeros after.

    Returns a `(1, rank)` tensor for a scalar timestep and a `(B, rank)` tensor for a `(B,)` vector, so that
    row `i` belongs to sample `i` of the UNet batch.
    """
    ranks = rank_schedule(timesteps, rank, min_rank, num_train_timesteps, exponent, device).reshape(-1, 1)
    components = torch.arange(rank, device=ranks.device)
    return (components < ranks).to(dtype)
