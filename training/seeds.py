"""Seeds for the random streams of a training run.

Every random draw (data order, crop and flip, VAE latent sample, noise, timesteps, adapter initialisation,
class images) is a function of `--seed` and of the position in the run, never of a running generator. A run
stopped at step N and resumed from `checkpoint-N` therefore computes exactly what an uninterrupted run does,
and every process of a multi-process run can compute any stream without communicating.
"""

from __future__ import annotations

import numpy as np

# Stream labels, so that the random streams used for different purposes never coincide.
ORDER_STREAM, AUGMENT_STREAM, NOISE_STREAM, INIT_STREAM, CLASS_IMAGE_STREAM = range(5)


def derived_seed(seed: int, *keys: int) -> int:
    """A 64-bit seed for one random stream, a pure function of the run's seed and the stream's keys."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1, np.uint64)[0])
