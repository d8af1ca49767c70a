"""What every training script guarantees, checked for each (`train_tlora_sdxl.py`, `train_tlora_flux.py`): real
training runs of a few steps on the tiny fixtures at 64 px.

Most runs call `main(parse_args([...]))` in this process; the `accelerate launch` ones run as users do. The
runs are the slow part of the suite (`make test-fast` leaves them out).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import signal
import sys
import types
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from accelerate.state import PartialState
from diffusers import FluxPipeline, FluxTransformer2DModel, StableDiffusionXLPipeline, UNet2DConditionModel
from huggingface_hub import ModelCard
from PIL import Image

import pipelines.tlora as tl
import train_tlora_flux
import train_tlora_sdxl
import training.arguments
from training.checkpoints import resume_checkpoint
from training.errors import INTERRUPTED_EXIT_CODE, HubError, InputError
from training.images import image_files

from tests.tlora_testing import (
    EXAMPLE_IMAGE,
    REPO_ROOT,
    accelerate_launch,
    fake_hub,
    free_port,
    generate,
    max_difference,
    read_adapter,
    run_main,
    two_shapes,
)

PROMPT = "a photo of sks toy"
VALIDATION_PROMPT = "a photo of sks toy on the beach"
RESOLUTION = 64
SMALL_RUN = [
    "--resolution",
    RESOLUTION,
    "--rank",
    "8",
    "--learning_rate",
    "1e-2",
    "--seed",
    "0",
    "--report_to",
    "none",
]


@dataclass(frozen=True)
class Script:
    """One training script and what its runs on the tiny fixture must produce."""

    module: types.ModuleType
    base_model_fixture: str  # the conftest fixture giving the tiny base model folder
    pipe_fixture: str  # the conftest fixture giving a freshly loaded stock pipeline of it
    pipeline_class: type
    denoiser_class: type
    loss_function: str  # the script's loss, where a test delivers Ctrl-C inside a step
    small_run: list  # flags every tiny run adds to SMALL_RUN
    default_adapter: dict  # config of an adapter trained with the defaults (and --rank 8)
    tensor_suffixes: set
    target_modules: list
    license: str | None  # of an adapter of the tiny fixture, a local folder
    tags: set
    card_sampling: str = ""  # the usage example's sampling settings: the validation defaults
    sampling: dict = field(default_factory=dict)  # extra pipeline arguments for a 64 px image

    @property
    def file_name(self) -> str:
        return self.module.__name__ + ".py"

    @property
    def prefix(self) -> str:
        return "unet." if self.denoiser_class is UNet2DConditionModel else "transformer."


SCRIPTS = {
    "sdxl": Script(
        module=train_tlora_sdxl,
        base_model_fixture="tiny_sdxl_dir",
        pipe_fixture="tiny_pipe",
        pipeline_class=StableDiffusionXLPipeline,
        denoiser_class=UNet2DConditionModel,
        loss_function="diffusion_loss",
        small_run=[],
        default_adapter={"variant": "ortho", "rank": 8, "min_rank": 4, "init": "random-last", "model_family": "sdxl"},
        tensor_suffixes={"down", "up", "lambda", "down_base", "up_base", "lambda_base"},
        target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        license="openrail++",
        tags={"text-to-image", "diffusers", "lora", "t-lora", "stable-diffusion-xl", "template:sd-lora"},
        card_sampling="num_inference_steps=25, guidance_scale=5.0",
    ),
    "flux": Script(
        module=train_tlora_flux,
        base_model_fixture="tiny_flux_dir",
        pipe_fixture="tiny_flux_pipe",
        pipeline_class=FluxPipeline,
        denoiser_class=FluxTransformer2DModel,
        loss_function="flow_matching_loss",
        # AdamW (Prodigy's first steps are too small to show in a 4-step run) in fp32 (bit-exact comparisons)
        small_run=["--optimizer", "adamw", "--mixed_precision", "no", "--max_sequence_length", "32"],
        default_adapter={"variant": "vanilla", "rank": 8, "min_rank": 1, "init": "normal", "model_family": "flux"},
        tensor_suffixes={"down", "up"},
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj"],
        license=None,  # FLUX.1 models differ in licence, so none is stated for an unknown base model
        tags={"text-to-image", "diffusers", "lora", "t-lora", "flux", "flux-diffusers", "template:sd-lora"},
        card_sampling="num_inference_steps=28, guidance_scale=3.5",
        sampling={"height": RESOLUTION, "width": RESOLUTION, "max_sequence_length": 32},
    ),
}


@pytest.fixture(scope="module", autouse=True)
def cpu_only():
    """`cpu_accelerate` for the runs that module fixtures make."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ACCELERATE_USE_CPU", "1")
        yield


pytestmark = pytest.mark.usefixtures("cpu_accelerate")


@pytest.fixture(scope="module", params=list(SCRIPTS))
def script(request) -> Script:
    return SCRIPTS[request.param]


@pytest.fixture(scope="module")
def base_model(script, request):
    return request.getfixturevalue(script.base_model_fixture)


@pytest.fixture
def fresh_pipe(script, request):
    """A freshly loaded stock pipeline of the script's family, on the CPU."""
    return request.getfixturevalue(script.pipe_fixture)


def sample(script: Script, pipe) -> np.ndarray:
    return generate(pipe, PROMPT, steps=2, **script.sampling)[0]


def base_args(script: Script, model_dir, output_dir, instance=None, *extra) -> list:
    return [
        "--pretrained_model_name_or_path", model_dir, "--instance_data_dir", instance or EXAMPLE_IMAGE,
        "--instance_prompt", PROMPT, "--output_dir", output_dir, *SMALL_RUN, *script.small_run, *extra,
    ]  # fmt: skip


def record_training_timesteps(monkeypatch, denoiser_class) -> list[torch.Tensor]:
    """Timesteps that the denoiser receives in training (gradient-enabled) calls."""
    seen = []
    forward = denoiser_class.forward

    def recording_forward(self, *args, **kwargs):
        if torch.is_grad_enabled():
            timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
            seen.append(torch.as_tensor(timestep).detach().clone())
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(denoiser_class, "forward", recording_forward)
    return seen


def stop_with_ctrl_c_at_call(monkeypatch, script: Script, call: int) -> None:
    """Deliver a real SIGINT from inside the `call`-th loss computation (1-based)."""
    loss = getattr(script.module, script.loss_function)
    calls = []

    def interrupting_loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            signal.raise_signal(signal.SIGINT)
        return loss(*args, **kwargs)

    monkeypatch.setattr(script.module, script.loss_function, interrupting_loss)


# --------------------------------------------------------------------------- bad input


# Command lines that every script must refuse, and what the message must say. {examples} is a folder of images,
# {empty} a folder without one, {file} a file, {tmp} an empty folder, {sdxl} / {flux} a tiny model of that family.
DATA = ["--instance_data_dir", "{examples}"]
BAD_COMMAND_LINES = {
    "missing instance folder": (
        ["--instance_data_dir", "{tmp}/nope"],
        "--instance_data_dir {tmp}/nope does not exist",
    ),
    "empty instance folder": (["--instance_data_dir", "{empty}"], "holds no image files"),
    "no data": ([], "--instance_data_dir and --dataset_name"),
    "min_rank above rank": ([*DATA, "--rank", "8", "--min_rank", "9"], "--min_rank (9) must not exceed --rank (8)"),
    "resolution not divisible by 8": ([*DATA, "--resolution", "100"], "--resolution must be divisible by 8"),
    "output_dir is a file": ([*DATA, "--output_dir", "{file}"], "argument --output_dir: {file} is a file"),
    "output_dir below a file": ([*DATA, "--output_dir", "{file}/out"], "argument --output_dir: {file} is a file, so"),
    "output_dir empty": ([*DATA, "--output_dir", ""], "argument --output_dir: must not be empty"),
    "instance_data_dir empty": (["--instance_data_dir", ""], "argument --instance_data_dir: must not be empty"),
    "logging_dir below a file": ([*DATA, "--output_dir", "{tmp}", "--logging_dir", "a_file/logs"], "--logging_dir"),
    "model folder missing": (
        [*DATA, "--pretrained_model_name_or_path", "{tmp}/no-model"],
        "--pretrained_model_name_or_path {tmp}/no-model: no such folder",
    ),
    "model folder not a pipeline": (
        [*DATA, "--pretrained_model_name_or_path", "{empty}"],
        "not a diffusers pipeline folder (no readable model_index.json",
    ),
    "model folder of a family no script trains": (
        [*DATA, "--pretrained_model_name_or_path", "{sd_model}"],
        "is a Stable Diffusion 1.x/2.x model (StableDiffusionPipeline), not",
    ),
    "model folder of no family": (
        [*DATA, "--pretrained_model_name_or_path", "{kandinsky_model}"],
        "holds a KandinskyPipeline, not a",
    ),
    "target module with a space": ([*DATA, "--target_modules", "to_q to_k"], "--target_modules 'to_q to_k'"),
    "target module with a trailing dot": ([*DATA, "--target_modules", "to_q."], "--target_modules 'to_q.'"),
    "rank of 10**12": ([*DATA, "--rank", "1000000000000"], "argument --rank: must be an integer from 1 to 65536"),
    "rank as 1e12": ([*DATA, "--rank", "1e12"], "argument --rank: must be an integer from 1 to 65536, got '1e12'"),
    "repeats of 10**9": ([*DATA, "--repeats", "1000000000"], "argument --repeats: must be an integer from 1 to 10000"),
    "learning rate inf": ([*DATA, "--learning_rate", "inf"], "argument --learning_rate: must be a finite number > 0"),
    "learning rate nan": ([*DATA, "--learning_rate", "nan"], "argument --learning_rate: must be a finite number > 0"),
    "learning rate 0": ([*DATA, "--learning_rate", "0"], "argument --learning_rate: must be a finite number > 0"),
    "max_grad_norm nan": ([*DATA, "--max_grad_norm", "nan"], "argument --max_grad_norm: must be a finite number > 0"),
    "max_grad_norm negative": ([*DATA, "--max_grad_norm=-1"], "argument --max_grad_norm: must be a finite number > 0"),
    "prior weight nan": ([*DATA, "--prior_loss_weight", "nan"], "argument --prior_loss_weight: must be a finite"),
    "beta1 of 1": ([*DATA, "--adam_beta1", "1"], "argument --adam_beta1: must be a finite number >= 0 and < 1"),
    "beta2 negative": ([*DATA, "--adam_beta2=-0.1"], "argument --adam_beta2: must be a finite number >= 0 and < 1"),
    "epsilon 0": ([*DATA, "--adam_epsilon", "0"], "argument --adam_epsilon: must be a finite number > 0"),
    "weight decay inf": ([*DATA, "--adam_weight_decay", "inf"], "argument --adam_weight_decay: must be a finite"),
    "schedule exponent negative": ([*DATA, "--rank_schedule_exponent=-1"], "argument --rank_schedule_exponent"),
    "lora_alpha nan": ([*DATA, "--lora_alpha", "nan"], "argument --lora_alpha: must be a finite number > 0"),
    "lr_power inf": ([*DATA, "--lr_power", "inf"], "argument --lr_power: must be a finite number > 0"),
    "checkpoint without optimizer state": (
        [*DATA, "--resume_from_checkpoint", "{no_optimizer}"],
        "checkpoint-3 has no optimizer.bin (the optimizer state)",
    ),
    "missing checkpoint": (
        [*DATA, "--output_dir", "{tmp}", "--resume_from_checkpoint", "checkpoint-7"],
        "--resume_from_checkpoint checkpoint-7 does not exist",
    ),
    "not a checkpoint": ([*DATA, "--resume_from_checkpoint", "{empty}"], "is not a checkpoint-N folder"),
    "prior without class prompt": (
        [*DATA, "--with_prior_preservation", "--class_data_dir", "{tmp}"],
        "--with_prior_preservation needs --class_prompt",
    ),
    "prior without class folder": (
        [*DATA, "--with_prior_preservation", "--class_prompt", "a toy"],
        "--with_prior_preservation needs --class_data_dir",
    ),
    "validation prompt without images": (
        [*DATA, "--validation_prompt", "x", "--num_validation_images", "0"],
        "--num_validation_images is 0",
    ),
    "zero steps": ([*DATA, "--max_train_steps", "0"], "argument --max_train_steps: must be an integer >= 1"),
    "8-bit adam without bitsandbytes": (
        [*DATA, "--optimizer", "adamw", "--use_8bit_adam"],
        "--use_8bit_adam needs bitsandbytes",
    ),
    "prodigy without prodigyopt": ([*DATA, "--optimizer", "prodigy"], "--optimizer prodigy needs prodigyopt"),
    "dataset without datasets": (["--dataset_name", "user/toys"], "--dataset_name needs the `datasets` library"),
    "push without token": ([*DATA, "--push_to_hub"], "--push_to_hub needs a Hub token"),
}
FAMILY_BAD_COMMAND_LINES = {
    "sdxl": {
        "snr_gamma negative": ([*DATA, "--snr_gamma=-1"], "argument --snr_gamma: must be a finite number > 0"),
        "guidance nan": (
            [*DATA, "--guidance_scale", "nan"],
            "argument --guidance_scale: must be a finite number >= 0",
        ),
        "xformers without xformers": (
            [*DATA, "--enable_xformers_memory_efficient_attention"],
            "--enable_xformers_memory_efficient_attention needs xformers",
        ),
        "a FLUX.1 model": (
            [*DATA, "--pretrained_model_name_or_path", "{flux}"],
            "--pretrained_model_name_or_path {flux} is a FLUX.1 model (FluxPipeline), not Stable Diffusion XL: "
            "train it with train_tlora_flux.py",
        ),
    },
    "flux": {
        "nf4 without bitsandbytes": (
            [*DATA, "--base_quantization", "nf4"],
            "--base_quantization nf4 needs bitsandbytes",
        ),
        "unknown quantisation": (
            [*DATA, "--base_quantization", "fp8"],
            "argument --base_quantization: invalid choice",
        ),
        "sequence over 512": ([*DATA, "--max_sequence_length", "513"], "--max_sequence_length must be at most 512"),
        "sequence under 1": (
            [*DATA, "--max_sequence_length", "0"],
            "argument --max_sequence_length: must be an integer >= 1",
        ),
        "negative guidance": (
            [*DATA, "--guidance_scale=-1"],
            "argument --guidance_scale: must be a finite number >= 0",
        ),
        "guidance nan": (
            [*DATA, "--guidance_scale", "nan"],
            "argument --guidance_scale: must be a finite number >= 0",
        ),
        "validation guidance inf": (
            [*DATA, "--validation_guidance_scale", "inf"],
            "argument --validation_guidance_scale: must be a finite number >= 0, got 'inf'",
        ),
        "negative validation guidance": (
            [*DATA, "--validation_guidance_scale=-0.5"],
            "argument --validation_guidance_scale: must be a finite number >= 0",
        ),
        "logit mean nan": (
            [*DATA, "--logit_mean", "nan"],
            "argument --logit_mean: must be a finite number, got 'nan'",
        ),
        "logit mean -inf": (
            [*DATA, "--logit_mean=-inf"],
            "argument --logit_mean: must be a finite number, got '-inf'",
        ),
        "logit std 0": ([*DATA, "--logit_std", "0"], "argument --logit_std: must be a finite number > 0, got '0'"),
        "logit std negative": ([*DATA, "--logit_std=-1"], "argument --logit_std: must be a finite number > 0"),
        "logit std inf": ([*DATA, "--logit_std", "inf"], "argument --logit_std: must be a finite number > 0"),
        "mode scale nan": ([*DATA, "--mode_scale", "nan"], "argument --mode_scale: must be a finite number >= -1"),
        "mode scale too large": (
            [*DATA, "--mode_scale", "2"],
            "argument --mode_scale: must be a finite number >= -1 and <= 1.75194, got '2'",
        ),
        "mode scale below -1": ([*DATA, "--mode_scale=-1.5"], "argument --mode_scale: must be a finite number >= -1"),
        "unknown weighting": ([*DATA, "--weighting_scheme", "uniform"], "argument --weighting_scheme: invalid choice"),
        "resolution not divisible by 16": ([*DATA, "--resolution", "72"], "--resolution must be divisible by 16"),
        "an SD-XL model": (
            [*DATA, "--pretrained_model_name_or_path", "{sdxl}"],
            "--pretrained_model_name_or_path {sdxl} is a Stable Diffusion XL model (StableDiffusionXLPipeline), "
            "not FLUX.1: train it with train_tlora_sdxl.py",
        ),
    },
}
# Cases that need a package to be missing: it is hidden from the checks.
MISSING_PACKAGES = {
    "8-bit adam": "bitsandbytes",
    "nf4": "bitsandbytes",
    "prodigy": "prodigyopt",
    "dataset": "datasets",
}
BAD_CASES = [(family, case) for family in SCRIPTS for case in [*BAD_COMMAND_LINES, *FAMILY_BAD_COMMAND_LINES[family]]]


def hide_package(monkeypatch, package: str) -> None:
    """Make the installation checks see `package` as not installed."""
    find_spec = importlib.util.find_spec

    def hiding_find_spec(name, *args):
        return None if name == package else find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", hiding_find_spec)


@pytest.mark.parametrize(("family", "case"), BAD_CASES)
def test_bad_command_lines_are_refused_naming_the_flag(family, case, tmp_path, capsys, monkeypatch, request):
    script = SCRIPTS[family]
    for prefix, package in MISSING_PACKAGES.items():
        if case.startswith(prefix):
            hide_package(monkeypatch, package)
    if case == "xformers without xformers" and importlib.util.find_spec("xformers") is not None:
        pytest.skip("xformers is installed")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    (tmp_path / "a_file").write_text("")
    for name, pipeline_class in (("sd", "StableDiffusionPipeline"), ("kandinsky", "KandinskyPipeline")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text(json.dumps({"_class_name": pipeline_class}))
    no_optimizer = tmp_path / "run" / "checkpoint-3"
    no_optimizer.mkdir(parents=True)
    (no_optimizer / tl.WEIGHT_NAME).write_bytes(b"")
    argv, message = {**BAD_COMMAND_LINES, **FAMILY_BAD_COMMAND_LINES[family]}[case]
    places = {
        "examples": REPO_ROOT / "examples",
        "empty": tmp_path / "empty",
        "file": tmp_path / "a_file",
        "tmp": tmp_path,
        "sd_model": tmp_path / "sd",
        "kandinsky_model": tmp_path / "kandinsky",
        "no_optimizer": no_optimizer,
    }
    for other in ("sdxl", "flux"):
        if any(f"{{{other}}}" in part for part in argv):
            places[other] = request.getfixturevalue(SCRIPTS[other].base_model_fixture)
    argv = [part.format(**places) for part in argv]
    monkeypatch.setattr(training.arguments, "get_token", lambda: None)
    with pytest.raises(SystemExit) as exit_info:
        script.module.parse_args(["--pretrained_model_name_or_path", "m", "--instance_prompt", PROMPT, *argv])
    assert exit_info.value.code == 2
    assert message.format(**places) in capsys.readouterr().err


def test_unreadable_image_is_named_before_any_model_is_loaded(script, tmp_path, monkeypatch, capsys):
    images = two_shapes(tmp_path / "images")
    (images / "broken.png").write_bytes(b"this is not a PNG file")
    output = tmp_path / "out"

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(script.pipeline_class, "from_pretrained", no_loading)
    monkeypatch.setattr(sys, "argv", [script.file_name, *map(str, base_args(script, "unused", output, images))])
    with pytest.raises(SystemExit) as exit_info:
        script.module.cli()
    assert exit_info.value.code == 2
    assert re.search(r"error: .*broken\.png is not a readable image", capsys.readouterr().err)
    assert not output.exists()


def test_only_the_main_process_prints_a_refusal(script, capsys, monkeypatch):
    """Before accelerate's state exists, the rank that torchrun puts in the environment says which process
    speaks; every process exits with 2."""
    monkeypatch.setattr(PartialState, "_shared_state", {})
    for rank, printed in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as exit_info:
            script.module.parse_args([*map(str, base_args(script, "m", "out")), "--rank", "0"])
        assert exit_info.value.code == 2
        assert ("error: argument --rank: must be an integer from 1" in capsys.readouterr().err) is printed


@pytest.mark.slow
def test_an_input_error_of_a_two_process_run_is_printed_once(tmp_path):
    """Both processes of a DDP launch find the broken image and exit with 2; the main one says why."""
    images = two_shapes(tmp_path / "images")
    (images / "broken.png").write_bytes(b"this is not a PNG file")
    script = SCRIPTS["sdxl"]  # the reporting is shared by the scripts
    result = accelerate_launch(
        script.file_name,
        tmp_path,
        ["--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port())],
        base_args(script, "unused", tmp_path / "out", images),
        extra_env={"ACCELERATE_USE_CPU": "1"},
        succeeds=False,
    )
    log = result.stdout + result.stderr
    assert len(re.findall(r"^error: .*broken\.png is not a readable image", log, re.MULTILINE)) == 1
    assert "exitcode  : 2" in log


# --------------------------------------------------------------------------- a run with everything on


@pytest.fixture(scope="module")
def family_run(script, base_model, tmp_path_factory):
    """With the family's default variant: 4 steps of batch 2 on two non-square images with random crops and
    flips, validation every 2 steps, a checkpoint every step (at most 2 kept); records the timesteps the
    denoiser received."""
    root = tmp_path_factory.mktemp(script.module.__name__)
    with pytest.MonkeyPatch.context() as monkeypatch:
        timesteps = record_training_timesteps(monkeypatch, script.denoiser_class)
        args = run_main(script.module, *base_args(
            script, base_model, root / "out", two_shapes(root / "images"),
            "--max_train_steps", "4", "--train_batch_size", "2", "--gradient_accumulation_steps", "2",
            "--random_flip", "--repeats", "2", "--lr_scheduler", "cosine", "--lr_warmup_steps", "1",
            "--checkpointing_steps", "1", "--checkpoints_total_limit", "2",
            "--validation_prompt", PROMPT, VALIDATION_PROMPT, "--num_validation_images", "1",
            "--validation_steps", "2", "--num_inference_steps", "2", "--report_to", "tensorboard",
        ))  # fmt: skip
    return types.SimpleNamespace(args=args, output=root / "out", images=root / "images", timesteps=timesteps)


@pytest.mark.slow
def test_run_writes_a_complete_adapter(script, family_run, base_model):
    state_dict, config = read_adapter(family_run.output)
    assert {key: getattr(config, key) for key in script.default_adapter} == script.default_adapter
    assert config.base_model == str(base_model) and config.lora_alpha is None
    assert config.target_modules == script.target_modules
    suffixes = {key.rsplit(".tlora.", 1)[1] for key in state_dict}
    assert suffixes == script.tensor_suffixes
    assert all(key.startswith(script.prefix) for key in state_dict)


@pytest.mark.slow
def test_run_validates_through_the_stock_pipeline_and_logs(family_run):
    for step in (2, 4):
        for prompt in (0, 1):
            image = Image.open(family_run.output / "validation" / f"step-{step}" / f"prompt-{prompt}_image-0.png")
            assert image.size == (RESOLUTION, RESOLUTION)
    assert list((family_run.output / "logs").rglob("events.out.tfevents.*"))
    # Step 4's images come from the saved file; they differ from step 2's because the adapter trained on.
    step2 = np.asarray(Image.open(family_run.output / "validation/step-2/prompt-0_image-0.png"), dtype=np.int16)
    step4 = np.asarray(Image.open(family_run.output / "validation/step-4/prompt-0_image-0.png"), dtype=np.int16)
    assert np.abs(step2 - step4).max() > 0


@pytest.mark.slow
def test_run_writes_a_model_card(script, family_run, base_model):
    card = ModelCard.load(family_run.output / "README.md")
    assert card.data.license == script.license
    assert set(card.data.tags) == script.tags
    assert card.data.instance_prompt == PROMPT
    assert "import pipelines.tlora" in card.text and "pipe.load_tlora_weights(" in card.text
    assert f"{script.pipeline_class.__name__}.from_pretrained(" in card.text
    # the zero-install snippet comes first, and the loader files it needs are there
    zero_install = f"custom_pipeline={str(family_run.output.resolve())!r},\n    trust_remote_code=True"
    assert zero_install in card.text and card.text.index(zero_install) < card.text.index("import pipelines.tlora")
    assert (family_run.output / "pipeline.py").is_file() and (family_run.output / "tlora_loader.py").is_file()
    assert "| `pytorch_tlora_weights.safetensors` |" in card.text
    min_rank = script.default_adapter["min_rank"]
    assert str(base_model) in card.text and f"| rank / min rank | 8 / {min_rank} |" in card.text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", card.text)
    validation = ["validation/step-4/prompt-0_image-0.png", "validation/step-4/prompt-1_image-0.png"]
    assert links == ["rank_schedule.png", "validation_grid.png", "loss_curve.png", *validation]
    assert all((family_run.output / link).is_file() for link in links)
    assert [entry["output"]["url"] for entry in card.data.widget] == validation
    # the loss curve is drawn from every step's loss
    assert (family_run.output / "logs" / "loss.csv").read_text().splitlines()[0] == "step,loss"
    assert len((family_run.output / "logs" / "loss.csv").read_text().splitlines()) == 1 + 4


@pytest.mark.slow
def test_adapter_loads_into_a_fresh_stock_pipeline_and_changes_its_output(script, family_run, fresh_pipe):
    before = sample(script, fresh_pipe)
    fresh_pipe.load_tlora_weights(str(family_run.output))
    after = sample(script, fresh_pipe)
    assert np.abs(after - before).max() > 1e-4
    fresh_pipe.unload_tlora_weights()
    np.testing.assert_array_equal(sample(script, fresh_pipe), before)


@pytest.mark.slow
def test_checkpoints_rotate_and_each_holds_a_loadable_adapter(family_run, fresh_pipe):
    checkpoints = sorted(path.name for path in family_run.output.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-3", "checkpoint-4"]
    for name in checkpoints:
        folder = family_run.output / name
        assert not (folder / "model.safetensors").exists()  # the adapter only, not the whole denoiser
        fresh_pipe.load_tlora_weights(str(folder))
    final, _ = read_adapter(family_run.output)
    assert max_difference(read_adapter(family_run.output / "checkpoint-4")[0], final) == 0


@pytest.mark.slow
def test_every_training_batch_has_one_timestep_per_sample(family_run):
    assert len(family_run.timesteps) == 8  # 4 steps x 2 accumulated batches
    assert all(t.shape == (2,) for t in family_run.timesteps)
    assert all(t[0] != t[1] for t in family_run.timesteps)


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_resuming_gives_the_uninterrupted_result(
    script, family_run, base_model, tmp_path
):
    """Stopped at step 2 of 4 by Ctrl-C and resumed, without validation: the same adapter as the
    uninterrupted run (with validation), so resuming restores everything and validation disturbs nothing."""
    argv = base_args(
        script, base_model, tmp_path / "out", family_run.images,
        "--max_train_steps", "4", "--train_batch_size", "2", "--gradient_accumulation_steps", "2",
        "--random_flip", "--repeats", "2", "--lr_scheduler", "cosine", "--lr_warmup_steps", "1",
        "--checkpointing_steps", "100",
    )  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        stop_with_ctrl_c_at_call(patch, script, call=3)  # during the first batch of step 2
        with pytest.raises(SystemExit) as exit_info:
            run_main(script.module, *argv)
    assert exit_info.value.code == INTERRUPTED_EXIT_CODE
    assert [path.name for path in (tmp_path / "out").glob("checkpoint-*")] == ["checkpoint-2"]
    assert not (tmp_path / "out" / tl.WEIGHT_NAME).exists()

    run_main(script.module, *argv, "--resume_from_checkpoint", "latest")
    assert max_difference(read_adapter(tmp_path / "out")[0], read_adapter(family_run.output)[0]) <= 1e-6
    assert max_difference(read_adapter(tmp_path / "out" / "checkpoint-2")[0], read_adapter(tmp_path / "out")[0]) > 0


@pytest.mark.slow
def test_resuming_with_other_tlora_settings_is_refused(script, family_run, base_model, tmp_path):
    output = tmp_path / "out"
    shutil.copytree(family_run.output / "checkpoint-3", output / "checkpoint-3")
    with pytest.raises(InputError, match="rank: 8 in the checkpoint, 16 now"):
        run_main(script.module, *base_args(script, base_model, output, None, "--rank", "16",
                                           "--resume_from_checkpoint", "latest"))  # fmt: skip


# --------------------------------------------------------------------------- failures, prior, Hub


@pytest.mark.slow
def test_a_crash_while_saving_leaves_the_previous_checkpoint_usable(script, base_model, tmp_path, fresh_pipe):
    output = tmp_path / "out"
    argv = base_args(script, base_model, output, None, "--max_train_steps", "2", "--checkpointing_steps", "1")
    save = tl.save_tlora_weights
    calls = []

    def crash_on_second_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("No space left on device (simulated)")
        return save(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tl, "save_tlora_weights", crash_on_second_save)
        with pytest.raises(OSError, match="simulated"):
            run_main(script.module, *argv)
    assert (output / "checkpoint-2.tmp").is_dir()
    latest = resume_checkpoint(types.SimpleNamespace(resume_from_checkpoint="latest", output_dir=str(output)))
    assert latest == output / "checkpoint-1"
    fresh_pipe.load_tlora_weights(str(latest))

    run_main(script.module, *argv, "--resume_from_checkpoint", "latest")
    assert sorted(path.name for path in output.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


@pytest.mark.slow
def test_prior_preservation_generates_missing_class_images(script, base_model, tmp_path, monkeypatch):
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    Image.open(EXAMPLE_IMAGE).convert("L").resize((80, 64)).save(class_dir / "premade.png")
    timesteps = record_training_timesteps(monkeypatch, script.denoiser_class)
    run_main(script.module, *base_args(
        script, base_model, tmp_path / "out", None, "--with_prior_preservation", "--class_data_dir", class_dir,
        "--class_prompt", "a photo of a toy", "--num_class_images", "2", "--num_inference_steps", "2",
        "--max_train_steps", "2", "--prior_loss_weight", "0.5",
    ))  # fmt: skip
    generated = [path for path in image_files(class_dir) if path.name != "premade.png"]
    assert len(generated) == 1 and generated[0].suffix == ".jpg"
    assert Image.open(generated[0]).size == (RESOLUTION, RESOLUTION)
    # Instance and class halves of each batch have their own timesteps.
    assert len(timesteps) == 2 and all(t.shape == (2,) and t[0] != t[1] for t in timesteps)
    assert 'prior preservation | yes: "a photo of a toy", weight 0.5' in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.slow
def test_push_to_hub_uploads_the_result_without_checkpoints(script, base_model, tmp_path, monkeypatch):
    calls = fake_hub(monkeypatch)
    output = tmp_path / "my-toy"
    run_main(script.module, *base_args(script, base_model, output, None, "--max_train_steps", "1",
                                       "--checkpointing_steps", "1", "--push_to_hub", "--hub_token", "hf_test",
                                       "--report_to", "tensorboard"))  # fmt: skip
    assert calls["create"] == {"repo_id": "my-toy", "token": "hf_test"}
    upload = calls["upload"]
    assert upload["repo_id"] == "someone/my-toy" and upload["token"] == "hf_test"
    assert {"README.md", tl.WEIGHT_NAME} <= set(upload["files"])
    assert any(name.startswith("logs/") for name in upload["files"])
    assert not [name for name in upload["files"] if "checkpoint" in name]
    assert (output / "checkpoint-1" / tl.WEIGHT_NAME).is_file()
    card = (output / "README.md").read_text()
    assert "pipe.load_tlora_weights('someone/my-toy')" in card and "hf_test" not in card
    assert "custom_pipeline='someone/my-toy',\n    trust_remote_code=True" in card
    assert script.card_sampling in card  # the validation settings, also of the schedule plot
    assert {"pipeline.py", "tlora_loader.py"} <= set(upload["files"])
    hparams = "".join(path.read_text() for path in (output / "logs").rglob("hparams.yml"))
    assert "hf_test" not in hparams


@pytest.mark.slow
def test_a_failed_upload_keeps_the_local_result_and_says_why(script, base_model, tmp_path, monkeypatch):
    fake_hub(monkeypatch, fail_upload=True)
    output = tmp_path / "out"
    with pytest.raises(HubError, match="simulated.*complete in") as error:
        run_main(script.module, *base_args(script, base_model, output, None, "--max_train_steps", "1",
                                           "--push_to_hub", "--hub_token", "t"))  # fmt: skip
    assert "hf upload" in str(error.value)
    read_adapter(output)
    assert (output / "README.md").is_file()


# --------------------------------------------------------------------------- runs that must not mix or lose work


@pytest.mark.slow
def test_a_second_run_into_a_used_folder_is_refused_unless_overwrite(script, base_model, tmp_path):
    output = tmp_path / "out"
    argv = base_args(script, base_model, output, None, "--max_train_steps", "2", "--checkpointing_steps", "1")
    run_main(script.module, *argv)
    first = read_adapter(output)[0]
    (output / "README.md").write_text("my notes")  # something of the user's in the folder
    with pytest.raises(InputError, match="already holds files of another training run .* replace it with --overwrite"):
        run_main(script.module, *argv, "--learning_rate", "5e-2")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="It holds no checkpoint of its own run"):
        run_main(script.module, *argv, "--resume_from_checkpoint", "latest", "--output_dir", tmp_path / "new")
    assert (output / "README.md").read_text() == "my notes"
    assert max_difference(read_adapter(output)[0], first) == 0

    run_main(script.module, *argv, "--learning_rate", "5e-2", "--max_train_steps", "1", "--overwrite")
    assert max_difference(read_adapter(output)[0], first) > 0
    # The earlier run's checkpoint-2 is gone; a later `latest` can only continue the new run.
    assert sorted(path.name for path in output.glob("checkpoint-*")) == ["checkpoint-1"]
    latest = resume_checkpoint(types.SimpleNamespace(resume_from_checkpoint="latest", output_dir=str(output)))
    assert latest == output / "checkpoint-1"


@pytest.mark.slow
def test_latest_never_continues_another_runs_checkpoint(script, base_model, tmp_path, caplog):
    output = tmp_path / "out"
    run_main(script.module, *base_args(script, base_model, output, None, "--max_train_steps", "2",
                                       "--checkpointing_steps", "1"))  # fmt: skip
    other = tmp_path / "other"
    run_main(script.module, *base_args(script, base_model, other, None, "--max_train_steps", "3",
                                       "--checkpointing_steps", "3"))  # fmt: skip
    shutil.copytree(other / "checkpoint-3", output / "checkpoint-3")  # e.g. a copy into the wrong folder
    PartialState()  # accelerate's logger needs its state
    latest = resume_checkpoint(types.SimpleNamespace(resume_from_checkpoint="latest", output_dir=str(output)))
    assert latest == output / "checkpoint-2"
    assert "skipping checkpoint-3, of another run" in caplog.text


@pytest.mark.slow
def test_an_explicit_resume_keeps_the_checkpoint_it_writes_and_refuses_changed_optimizer_settings(
    script, base_model, tmp_path
):
    output = tmp_path / "out"
    argv = base_args(
        script, base_model, output, None, "--max_train_steps", "4", "--checkpointing_steps", "1",
        "--checkpoints_total_limit", "2",
    )  # fmt: skip
    run_main(script.module, *argv)
    assert sorted(path.name for path in output.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    with pytest.raises(InputError, match=r"later checkpoints of this run \(checkpoint-4\); resuming from"):
        run_main(script.module, *argv, "--resume_from_checkpoint", "checkpoint-3")
    with pytest.raises(InputError, match="--learning_rate 0.01 in the checkpoint, 0.02 now"):
        run_main(script.module, *argv, "--resume_from_checkpoint", "checkpoint-3", "--learning_rate", "2e-2",
                 "--overwrite")  # fmt: skip

    run_main(script.module, *argv, "--resume_from_checkpoint", "checkpoint-3", "--overwrite", "--max_train_steps", "5")
    assert sorted(path.name for path in output.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]
    assert max_difference(read_adapter(output / "checkpoint-5")[0], read_adapter(output)[0]) == 0


def run_cli(script: Script, argv: list, monkeypatch) -> int:
    """Run the script as its command line does; returns the exit code."""
    monkeypatch.setattr(sys, "argv", [script.file_name, *map(str, argv)])
    with pytest.raises(SystemExit) as exit_info:
        script.module.cli()
    return exit_info.value.code


@pytest.mark.slow
def test_a_diverging_run_stops_before_saving_anything_diverged(script, base_model, tmp_path, capsys, monkeypatch):
    output = tmp_path / "out"
    argv = base_args(script, base_model, output, None, "--max_train_steps", "6", "--checkpointing_steps", "1")
    argv[argv.index("--learning_rate") + 1] = "1e30"  # finite, accepted, and far too high
    assert run_cli(script, argv, monkeypatch) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(r"error: training diverged at step (\d+): the gradients are (nan|inf) .*is intact\.", err)
    diverged_at = int(re.search(r"step (\d+)", err).group(1))
    checkpoints = sorted(output.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    assert [path.name for path in checkpoints] == [f"checkpoint-{n}" for n in range(1, diverged_at)]
    assert all(torch.isfinite(t).all() for path in checkpoints for t in read_adapter(path)[0].values())
    assert not (output / tl.WEIGHT_NAME).exists()


AFTER_LOADING = {
    "target modules matching nothing": (["--target_modules", "to_nowhere"], "matches target_modules=['to_nowhere']"),
    "rank wider than the model": (["--rank", "65536"], "Rank 65536 is larger than any adapted projection can hold"),
    "unknown hub model": (
        ["--pretrained_model_name_or_path", "nobody/no-model"],
        "--pretrained_model_name_or_path: cannot load nobody/no-model",
    ),
}
# FLUX.1's smallest resolution, 16 px (one 2x2 patch of latents), is refused with the command line.
FAMILY_AFTER_LOADING = {
    "sdxl": {"resolution too small": (["--resolution", "8"], "--resolution 8 is too small for this model: it needs")},
    "flux": {},
}
AFTER_LOADING_CASES = [
    (family, case) for family in SCRIPTS for case in [*AFTER_LOADING, *FAMILY_AFTER_LOADING[family]]
]


@pytest.mark.parametrize(("family", "case"), AFTER_LOADING_CASES)
def test_what_only_the_loaded_model_can_refuse_ends_in_one_error_line(
    family, case, tmp_path, capsys, monkeypatch, request
):
    script = SCRIPTS[family]
    extra, message = {**AFTER_LOADING, **FAMILY_AFTER_LOADING[family]}[case]
    base_model = request.getfixturevalue(script.base_model_fixture)
    argv = [*base_args(script, base_model, tmp_path / "out", None, "--max_train_steps", "1"), *extra]
    assert run_cli(script, argv, monkeypatch) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: ")
    assert message in err.strip().splitlines()[-1]
    assert not (tmp_path / "out" / tl.WEIGHT_NAME).exists()


# --------------------------------------------------------------------------- accelerate launch


@pytest.mark.slow
def test_accelerate_launch_single_process(script, base_model, tmp_path):
    output = tmp_path / "out"
    result = accelerate_launch(script.file_name, tmp_path, ["--cpu", "--num_processes", "1"],
                               base_args(script, base_model, output, None, "--max_train_steps", "2"))  # fmt: skip
    assert re.search(r"Steps: 100%.*2/2.*loss=[\d.]+, lr=1\.00e-02", result.stderr)
    assert re.search(
        rf"Trained steps 1-2 \(2 steps\) in [\d.]+ s, [\d.]+ s/step\. Adapter: {re.escape(str(output))}", result.stdout
    )
    read_adapter(output)


@pytest.mark.slow
def test_accelerate_launch_two_processes_ddp(script, base_model, tmp_path):
    """Two CPU processes with DDP (gloo). accelerate's `--cpu` launcher starts a single process unless it
    uses mpirun, so the processes are started through torchrun (`--multi_gpu`) with ACCELERATE_USE_CPU."""
    output = tmp_path / "out"
    result = accelerate_launch(
        script.file_name,
        tmp_path,
        ["--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port())],
        base_args(script, base_model, output, None, "--max_train_steps", "3", "--checkpointing_steps", "2",
                  "--report_to", "tensorboard"),
        extra_env={"ACCELERATE_USE_CPU": "1"},
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert "DistributedType.MULTI_CPU" in log and "Process index: 1" in log
    assert "3 steps of 2 samples" in log
    state_dict, config = read_adapter(output)
    assert config.rank == 8
    read_adapter(output / "checkpoint-2")
    # Only the main process writes: one set of TensorBoard event files, one summary line.
    assert len(list((output / "logs").glob("*/events.out.tfevents.*"))) == 1
    assert log.count("Trained steps 1-3") == 1
