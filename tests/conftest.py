"""Shared pytest setup: offline Hugging Face libraries and a locally built tiny SD-XL.

Fixtures
--------
``tiny_sdxl_dir`` (session)
    Path to a ``save_pretrained`` SD-XL folder with random tiny weights, built
    once per test session by ``scripts.make_tiny_sdxl.save_tiny_sdxl``
    (size "tiny", seed 0; default image 64x64 px).
``tiny_pipe`` (function)
    A fresh ``StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)`` on the
    CPU with its progress bar disabled; tests may modify it freely.
``example_image_path`` (session)
    Path to ``examples/concept.png`` (512x512 RGB).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Must happen before huggingface_hub / transformers / diffusers are imported:
# they read these variables once, at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["DIFFUSERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
# The test models are tiny: a second thread costs more than it saves, and on a busy machine OpenMP's waiting
# threads slow small matmuls and SVDs down by orders of magnitude. Subprocesses inherit the variable.
os.environ["OMP_NUM_THREADS"] = "1"

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

EXAMPLE_IMAGE = REPO_ROOT / "examples" / "concept.png"


def _quiet_loading_progress_bars() -> None:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    """A tiny random SD-XL pipeline folder, written once per session."""
    from scripts.make_tiny_sdxl import save_tiny_sdxl

    _quiet_loading_progress_bars()
    return save_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"), size="tiny", seed=0)


@pytest.fixture
def tiny_pipe(tiny_sdxl_dir):
    """A freshly loaded tiny ``StableDiffusionXLPipeline`` on the CPU, progress bar off."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir).to("cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def example_image_path() -> Path:
    """``examples/concept.png``, the procedurally drawn example concept."""
    assert EXAMPLE_IMAGE.is_file(), f"{EXAMPLE_IMAGE} is missing; run: python examples/make_example_image.py"
    return EXAMPLE_IMAGE
