"""Shared pytest setup: offline Hugging Face libraries and locally built tiny pipelines of every model family.

Fixtures
--------
``tiny_sdxl_dir`` (session)
    Path to a ``save_pretrained`` SD-XL folder with random tiny weights, built
    once per test session by ``scripts.make_tiny_pipeline.save_pipeline``
    (family "sdxl", size "tiny", seed 0; default image 64x64 px).
``tiny_pipe`` (function)
    A fresh ``StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)`` on the
    CPU with its progress bar disabled; tests may modify it freely.
``tiny_sd_dir`` (session), ``tiny_sd_pipe`` (function)
    The same for SD 1.x: a ``StableDiffusionPipeline`` folder (one CLIP text
    encoder, PNDM scheduler as SD 1.5, no safety checker; default image 64x64 px)
    and a fresh pipeline loaded from it.
``tiny_flux_dir`` (session), ``tiny_flux_pipe`` (function)
    The same for FLUX.1: a ``FluxPipeline`` folder (FluxTransformer2DModel,
    16-channel VAE, CLIP + T5 encoders, FLUX.1-dev's flow-matching scheduler) and
    a fresh pipeline loaded from it. FluxPipeline's default size is 1024 px
    whatever the model: pass ``height=64, width=64``; ``max_sequence_length``
    may be anything up to 512.
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


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a real training run end to end (left out by `make test-fast`)")


def _quiet_loading_progress_bars() -> None:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def _save_tiny(tmp_path_factory, family: str) -> Path:
    from scripts.make_tiny_pipeline import save_pipeline

    _quiet_loading_progress_bars()
    return save_pipeline(tmp_path_factory.mktemp(f"tiny-{family}"), family, "tiny", seed=0)


def _load_on_cpu(pipeline_class: str, folder: Path):
    import diffusers

    pipe = getattr(diffusers, pipeline_class).from_pretrained(folder).to("cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def cpu_accelerate(monkeypatch):
    """For training runs in the test process: on the CPU, also on a GPU machine (results compared bit for bit
    need deterministic kernels), and with accelerate's process-wide state reset afterwards."""
    from tests.tlora_testing import reset_accelerate

    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    yield
    reset_accelerate()


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    """A tiny random SD-XL pipeline folder, written once per session."""
    return _save_tiny(tmp_path_factory, "sdxl")


@pytest.fixture
def tiny_pipe(tiny_sdxl_dir):
    """A freshly loaded tiny ``StableDiffusionXLPipeline`` on the CPU, progress bar off."""
    return _load_on_cpu("StableDiffusionXLPipeline", tiny_sdxl_dir)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    """A tiny random SD 1.x pipeline folder, written once per session."""
    return _save_tiny(tmp_path_factory, "sd")


@pytest.fixture
def tiny_sd_pipe(tiny_sd_dir):
    """A freshly loaded tiny ``StableDiffusionPipeline`` on the CPU, progress bar off."""
    return _load_on_cpu("StableDiffusionPipeline", tiny_sd_dir)


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory) -> Path:
    """A tiny random FLUX.1 pipeline folder, written once per session."""
    return _save_tiny(tmp_path_factory, "flux")


@pytest.fixture
def tiny_flux_pipe(tiny_flux_dir):
    """A freshly loaded tiny ``FluxPipeline`` on the CPU, progress bar off."""
    return _load_on_cpu("FluxPipeline", tiny_flux_dir)


@pytest.fixture(scope="session")
def example_image_path() -> Path:
    """``examples/concept.png``, the procedurally drawn example concept."""
    assert EXAMPLE_IMAGE.is_file(), f"{EXAMPLE_IMAGE} is missing; run: python examples/make_example_image.py"
    return EXAMPLE_IMAGE
