"""Helpers shared by the tests: non-trivial adapters and direct UNet inputs for the tiny SD-XL, reading a
safetensors file independently of the package, running a script as a user would, and training runs of the
`train_tlora_<family>.py` scripts (in this process or through `accelerate launch`)."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import torch
from accelerate.state import AcceleratorState, GradientState
from huggingface_hub.utils import filter_repo_objects
from PIL import Image
from safetensors import safe_open

import pipelines.tlora as tl
import training.hub

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_IMAGE = REPO_ROOT / "examples" / "concept.png"


def perturb_adapters(adapters: dict, seed: int = 0, std: float = 0.05) -> None:
    """Move every trainable factor away from its initial value, so the update is non-zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in adapters.values():
            for parameter in adapter.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * std)


def add_random_tlora(denoiser, seed: int = 0, adapter_name: str = "default", **config_kwargs) -> tl.TLoraConfig:
    """Attach a seeded, perturbed T-LoRA adapter to a UNet or transformer; returns its config.

    SD-XL adapters are made without `model_family`, as before families existed; the others with their family's
    defaults (FLUX: vanilla, the authors' projections)."""
    family = tl.family_of_denoiser(denoiser)
    settings = {"rank": 16, "min_rank": 8, **config_kwargs}
    config = (
        tl.TLoraConfig(**settings) if family.name == "sdxl" else tl.TLoraConfig.for_family(family.name, **settings)
    )
    adapters = tl.inject_tlora(denoiser, config, adapter_name, generator=torch.Generator().manual_seed(seed))
    perturb_adapters(adapters, seed + 1)
    return config


def unet_inputs(unet, batch: int = 2, seed: int = 0) -> dict:
    """Random SD-XL UNet keyword inputs (everything but the timestep)."""
    generator = torch.Generator().manual_seed(seed)
    config = unet.config
    size = config.sample_size
    text_embeds_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim

    def randn(*shape):
        return torch.randn(shape, generator=generator)

    return {
        "sample": randn(batch, config.in_channels, size, size),
        "encoder_hidden_states": randn(batch, 77, config.cross_attention_dim),
        "added_cond_kwargs": {
            "text_embeds": randn(batch, text_embeds_dim),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(batch, 1),
        },
    }


def run_unet(unet, inputs: dict, timesteps) -> torch.Tensor:
    return unet(inputs["sample"], timesteps, **{k: v for k, v in inputs.items() if k != "sample"}).sample


def flux_inputs(transformer, batch: int = 2, seed: int = 0, tokens: int = 16, text_tokens: int = 8) -> dict:
    """Random FLUX transformer keyword inputs (everything but the timestep), as FluxPipeline passes them."""
    generator = torch.Generator().manual_seed(seed)
    config = transformer.config

    def randn(*shape):
        return torch.randn(shape, generator=generator)

    inputs = {
        "hidden_states": randn(batch, tokens, config.in_channels),
        "encoder_hidden_states": randn(batch, text_tokens, config.joint_attention_dim),
        "pooled_projections": randn(batch, config.pooled_projection_dim),
        "img_ids": torch.stack([torch.zeros(tokens), torch.arange(tokens) // 4, torch.arange(tokens) % 4], -1).float(),
        "txt_ids": torch.zeros(text_tokens, 3),
    }
    if config.guidance_embeds:
        inputs["guidance"] = torch.full((batch,), 3.5)
    return inputs


def read_safetensors_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a .safetensors file, read by the safetensors library rather than the package's
    own reader, so that a test of what the package wrote does not trust the package to read it."""
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})


def run_script(script: str, *argv, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python <script> ARGV` in a child process, `script` relative to the repository root, as a user types it:
    without this process's PYTHON* variables, so the script has to find the project's packages by itself."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env |= {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO_ROOT / script), *map(str, argv)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """scripts/convert_tlora.py's `main(ARGV)` in this process: (exit code, stdout, stderr)."""
    from scripts.convert_tlora import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_refused(capsys, *argv, match: str) -> str:
    """scripts/convert_tlora.py ARGV exits with 2 and a one-line error (no traceback) containing `match`."""
    code, _, err = run_cli(capsys, *argv)
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    assert match in err, err
    return err


def generate(pipe, prompt: str = "a photo of sks dog", steps: int = 3, seed: int = 0, **kwargs):
    """Deterministic pipeline output as a numpy array."""
    return pipe(
        prompt,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        **kwargs,
    ).images


# --------------------------------------------------------------------------- training runs


def reset_accelerate() -> None:
    # accelerate keeps process-wide singletons that a run in this process must not inherit from another.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_main(script, *argv) -> argparse.Namespace:
    """Train in this process, as `python <script>.py ARGV` would; also a failed run leaves no state."""
    args = script.parse_args([str(a) for a in argv])
    try:
        script.main(args)
    finally:
        reset_accelerate()
    return args


def two_shapes(folder: Path) -> Path:
    """Two instance images of different, non-square shapes, so random crops really are random."""
    folder.mkdir(parents=True, exist_ok=True)
    concept = Image.open(EXAMPLE_IMAGE)
    concept.resize((96, 72)).save(folder / "wide.png")
    concept.rotate(90).resize((64, 80)).save(folder / "tall.png")
    return folder


def read_adapter(path: Path):
    """(state dict, config) of an adapter file, or of the adapter in a folder."""
    return tl.read_tlora_file(path / tl.WEIGHT_NAME if path.is_dir() else path)


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[key] - b[key]).abs().max().item() for key in a)


def fake_hub(monkeypatch, fail_upload: bool = False) -> dict:
    """Replace the Hub's network calls (repository creation, upload) by recorders; returns what they saw:
    `create` (repo_id, token) and `upload` (repo_id, token, the files the ignore patterns let through)."""
    calls = {}

    def create_repo(repo_id, exist_ok, token):
        calls["create"] = {"repo_id": repo_id, "token": token}
        return types.SimpleNamespace(repo_id=f"someone/{repo_id}")

    def upload_folder(repo_id, folder_path, ignore_patterns, token, **kwargs):
        if fail_upload:
            raise ConnectionError("the Hub is unreachable (simulated)")
        folder = Path(folder_path)
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        calls["upload"] = {
            "repo_id": repo_id,
            "token": token,
            "files": list(filter_repo_objects(files, ignore_patterns=ignore_patterns)),
        }

    monkeypatch.setattr(training.hub, "create_repo", create_repo)
    monkeypatch.setattr(training.hub, "upload_folder", upload_folder)
    return calls


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def accelerate_launch(
    script: str, tmp_path: Path, launch_flags: list[str], script_flags: list, extra_env=None, succeeds: bool = True
) -> subprocess.CompletedProcess:
    """`accelerate launch [launch_flags] <script> [script_flags]` from the repository root; asserts exit 0 (or,
    with `succeeds=False`, another exit code).

    CPU runs, also on a GPU machine (where a two-process run otherwise fails: some library code addresses
    cuda:<local rank>); own HF_HOME: no accelerate config of the machine; one thread per process."""
    command = [sys.executable, "-m", "accelerate.commands.launch", *launch_flags, "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO_ROOT / script),
               *map(str, script_flags)]  # fmt: skip
    env = dict(
        os.environ, CUDA_VISIBLE_DEVICES="", HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"
    )
    result = subprocess.run(command, cwd=REPO_ROOT, env={**env, **(extra_env or {})}, capture_output=True, text=True)
    assert (result.returncode == 0) == succeeds, result.stdout[-3000:] + result.stderr[-3000:]
    return result
