"""Tests of train_tlora_sdxl.py: real training runs of a few steps on the tiny SD-XL at 64 px.

Most runs call `main(parse_args([...]))` in this process; two go through `accelerate launch` as users do.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import re
import shutil
import signal
import sys
import types

import numpy as np
import pytest
import torch
from accelerate.state import PartialState
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from PIL import Image

import pipelines.tlora as tl
import train_tlora_sdxl as train
import training.arguments
from pipelines.tlora.families import SDXL
from training.adapter import method_name, tlora_config_from_args
from training.checkpoints import resume_checkpoint
from training.data import DreamBoothDataset, ImageRecord, ShuffledStreamSampler, load_instance_records, make_record
from training.errors import INTERRUPTED_EXIT_CODE, HubError, InputError
from training.images import image_files, open_image

from tests.tlora_testing import (
    EXAMPLE_IMAGE,
    REPO_ROOT,
    accelerate_launch,
    fake_hub,
    free_port,
    generate,
    max_difference,
    read_adapter,
    reset_accelerate,
    run_main,
    two_shapes,
)

PROMPT = "a photo of sks toy"
VALIDATION_PROMPT = "a photo of sks toy on the beach"
SMALL_RUN = ["--resolution", "64", "--rank", "8", "--learning_rate", "1e-2", "--seed", "0", "--report_to", "none"]


@pytest.fixture(scope="module", autouse=True)
def cpu_only():
    """Every run on the CPU, also on a machine with a GPU: results compared bit for bit need deterministic
    kernels. Module-wide, so that runs made by module fixtures and by tests run alike."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ACCELERATE_USE_CPU", "1")
        yield


@pytest.fixture(autouse=True)
def fresh_accelerate():
    yield
    reset_accelerate()


def base_args(model_dir, output_dir, instance=None, *extra) -> list:
    instance = instance or EXAMPLE_IMAGE
    return [
        "--pretrained_model_name_or_path", model_dir, "--instance_data_dir", instance,
        "--instance_prompt", PROMPT, "--output_dir", output_dir, *SMALL_RUN, *extra,
    ]  # fmt: skip


def record_training_timesteps(monkeypatch) -> list[torch.Tensor]:
    """Timesteps that the UNet receives in training (gradient-enabled) calls."""
    seen = []
    forward = UNet2DConditionModel.forward

    def recording_forward(self, sample, timestep, *args, **kwargs):
        if torch.is_grad_enabled():
            seen.append(torch.as_tensor(timestep).detach().clone())
        return forward(self, sample, timestep, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", recording_forward)
    return seen


def stop_with_ctrl_c_at_call(monkeypatch, call: int) -> None:
    """Deliver a real SIGINT from inside the `call`-th loss computation (1-based)."""
    loss = train.diffusion_loss
    calls = []

    def interrupting_loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            signal.raise_signal(signal.SIGINT)
        return loss(*args, **kwargs)

    monkeypatch.setattr(train, "diffusion_loss", interrupting_loss)


# --------------------------------------------------------------------------- command line


MINIMAL = ["--pretrained_model_name_or_path", "m", "--instance_prompt", PROMPT]
MINIMAL += ["--instance_data_dir", str(REPO_ROOT / "examples")]


def test_defaults_follow_the_paper_and_diffusers():
    args = train.parse_args(MINIMAL)
    assert (args.rank, args.min_rank, args.rank_schedule_exponent) == (64, 32, 1.0)
    assert (args.tlora_variant, args.ortho_init, args.ortho_init_source, args.lora_alpha) == (
        "ortho",
        "last",
        "random",
        None,
    )
    assert args.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
    assert (args.learning_rate, args.adam_weight_decay, args.lr_scheduler, args.lr_warmup_steps) == (
        1e-4,
        1e-4,
        "constant",
        0,
    )
    assert (args.train_batch_size, args.resolution, args.max_train_steps, args.optimizer) == (1, 1024, 800, "adamw")
    assert (args.report_to, args.output_dir, args.cache_latents) == ("tensorboard", "tlora-dreambooth-model", None)
    config = tlora_config_from_args(args, SDXL)
    assert (config.init, config.base_model, method_name(config)) == ("random-last", "m", "T-LoRA")


def test_validation_prompts_take_several_values_and_repeat():
    args = train.parse_args([*MINIMAL, "--validation_prompt", "a", "b", "--validation_prompt", "c"])
    assert args.validation_prompt == ["a", "b", "c"]


def test_min_rank_equal_to_rank_trains_the_unmasked_baselines():
    args = train.parse_args([*MINIMAL, "--rank", "16", "--min_rank", "16", "--tlora_variant", "vanilla"])
    config = tlora_config_from_args(args, SDXL)
    assert not config.is_masked and config.init == "normal" and method_name(config) == "LoRA"


# Command lines that must be refused, and what the message must say. {examples} is a folder of images,
# {empty} a folder without one, {file} a file, {tmp} an empty folder.
DATA = ["--instance_data_dir", "{examples}"]
BAD_COMMAND_LINES = {
    "missing instance folder": (["--instance_data_dir", "{tmp}/nope"], "--instance_data_dir {tmp}/nope does not exist"),
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
    "model folder of another family": (
        [*DATA, "--pretrained_model_name_or_path", "{sd_model}"],
        "holds a StableDiffusionPipeline, not a Stable Diffusion XL pipeline",
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
    "snr_gamma negative": ([*DATA, "--snr_gamma=-1"], "argument --snr_gamma: must be a finite number > 0"),
    "prior weight nan": ([*DATA, "--prior_loss_weight", "nan"], "argument --prior_loss_weight: must be a finite"),
    "beta1 of 1": ([*DATA, "--adam_beta1", "1"], "argument --adam_beta1: must be a finite number >= 0 and < 1"),
    "beta2 negative": ([*DATA, "--adam_beta2=-0.1"], "argument --adam_beta2: must be a finite number >= 0 and < 1"),
    "epsilon 0": ([*DATA, "--adam_epsilon", "0"], "argument --adam_epsilon: must be a finite number > 0"),
    "weight decay inf": ([*DATA, "--adam_weight_decay", "inf"], "argument --adam_weight_decay: must be a finite"),
    "schedule exponent negative": ([*DATA, "--rank_schedule_exponent=-1"], "argument --rank_schedule_exponent"),
    "lora_alpha nan": ([*DATA, "--lora_alpha", "nan"], "argument --lora_alpha: must be a finite number > 0"),
    "guidance nan": ([*DATA, "--guidance_scale", "nan"], "argument --guidance_scale: must be a finite number >= 0"),
    "lr_power inf": ([*DATA, "--lr_power", "inf"], "argument --lr_power: must be a finite number > 0"),
    "missing checkpoint": (
        [*DATA, "--output_dir", "{tmp}", "--resume_from_checkpoint", "checkpoint-7"],
        "--resume_from_checkpoint checkpoint-7 does not exist",
    ),
    "not a checkpoint": ([*DATA, "--resume_from_checkpoint", "{empty}"], "is not a checkpoint-N folder"),
    "checkpoint without optimizer state": (
        [*DATA, "--resume_from_checkpoint", "{no_optimizer}"],
        "checkpoint-3 has no optimizer.bin (the optimizer state)",
    ),
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
    "8-bit adam without bitsandbytes": ([*DATA, "--use_8bit_adam"], "--use_8bit_adam needs bitsandbytes"),
    "prodigy without prodigyopt": ([*DATA, "--optimizer", "prodigy"], "--optimizer prodigy needs prodigyopt"),
    "xformers without xformers": (
        [*DATA, "--enable_xformers_memory_efficient_attention"],
        "--enable_xformers_memory_efficient_attention needs xformers",
    ),
    "dataset without datasets": (["--dataset_name", "user/toys"], "--dataset_name needs the `datasets` library"),
    "push without token": ([*DATA, "--push_to_hub"], "--push_to_hub needs a Hub token"),
}
OPTIONAL_PACKAGES = {
    "8-bit adam": "bitsandbytes",
    "prodigy": "prodigyopt",
    "xformers": "xformers",
    "dataset": "datasets",
}


@pytest.mark.parametrize("case", list(BAD_COMMAND_LINES))
def test_bad_command_lines_are_refused_naming_the_flag(case, tmp_path, capsys, monkeypatch):
    for prefix, package in OPTIONAL_PACKAGES.items():
        if case.startswith(prefix) and importlib.util.find_spec(package) is not None:
            pytest.skip(f"{package} is installed")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    (tmp_path / "a_file").write_text("")
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    no_optimizer = tmp_path / "run" / "checkpoint-3"
    no_optimizer.mkdir(parents=True)
    (no_optimizer / tl.WEIGHT_NAME).write_bytes(b"")
    places = {
        "examples": REPO_ROOT / "examples",
        "empty": tmp_path / "empty",
        "file": tmp_path / "a_file",
        "tmp": tmp_path,
        "sd_model": tmp_path / "sd",
        "no_optimizer": no_optimizer,
    }
    argv, message = BAD_COMMAND_LINES[case]
    argv = [part.format(**places) for part in argv]
    monkeypatch.setattr(training.arguments, "get_token", lambda: None)
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--pretrained_model_name_or_path", "m", "--instance_prompt", PROMPT, *argv])
    assert exit_info.value.code == 2
    assert message.format(**places) in capsys.readouterr().err


def test_unreadable_image_is_named_before_any_model_is_loaded(tmp_path, monkeypatch, capsys):
    images = two_shapes(tmp_path / "images")
    (images / "broken.png").write_bytes(b"this is not a PNG file")
    output = tmp_path / "out"

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(StableDiffusionXLPipeline, "from_pretrained", no_loading)
    monkeypatch.setattr(sys, "argv", ["train_tlora_sdxl.py", *map(str, base_args("unused", output, images))])
    with pytest.raises(SystemExit) as exit_info:
        train.cli()
    assert exit_info.value.code == 2
    assert re.search(r"error: .*broken\.png is not a readable image", capsys.readouterr().err)
    assert not output.exists()


def test_dataset_name_reads_images_and_captions(monkeypatch):
    rows = {
        "image": [Image.new("RGB", (80, 64), "red"), Image.new("L", (64, 64), 200)],
        "text": ["a red sks toy", None],
    }
    fake = types.ModuleType("datasets")
    fake.__spec__ = importlib.machinery.ModuleSpec("datasets", None)
    fake.load_dataset = lambda name, config, cache_dir: {"train": _Table(rows)}
    monkeypatch.setitem(sys.modules, "datasets", fake)
    PartialState()
    args = train.parse_args(["--pretrained_model_name_or_path", "m", "--dataset_name", "user/toys", "--caption_column",
                             "text", "--instance_prompt", PROMPT, "--resolution", "64"])  # fmt: skip
    records = load_instance_records(args)
    assert [r.prompt for r in records] == ["a red sks toy", PROMPT]
    assert [r.image.size for r in records] == [(80, 64), (64, 64)] and records[1].image.mode == "RGB"
    args.caption_column = "caption"
    with pytest.raises(InputError, match="--caption_column 'caption' is not a column"):
        load_instance_records(args)
    fake.load_dataset = lambda name, config, cache_dir: {"train": _Table({"image": []})}
    with pytest.raises(InputError, match="--dataset_name user/toys has no images"):
        load_instance_records(args)


class _Table:
    """The part of a `datasets.Dataset` that the script uses."""

    def __init__(self, columns):
        self.columns = columns
        self.column_names = list(columns)

    def __len__(self):
        return len(next(iter(self.columns.values())))

    def __getitem__(self, column):
        return self.columns[column]


# --------------------------------------------------------------------------- images and data


@pytest.fixture
def accelerate_logging():
    PartialState()  # accelerate's logger needs its state


def test_images_of_every_kind_become_rgb(tmp_path, accelerate_logging):
    gray = tmp_path / "gray.png"
    Image.new("L", (8, 8), 100).save(gray)
    transparent = tmp_path / "rgba.png"
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(transparent)
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 257 * 200, dtype=np.uint16)).save(deep)
    palette = tmp_path / "palette.png"
    Image.new("P", (8, 8), 0).save(palette, transparency=0)

    assert np.asarray(open_image(gray, "gray"))[0, 0].tolist() == [100, 100, 100]
    assert np.asarray(open_image(transparent, "rgba"))[0, 0].tolist() == [255, 255, 255]
    assert Image.open(deep).mode.startswith("I")
    assert np.asarray(open_image(deep, "deep"))[0, 0].tolist() == [200, 200, 200]
    assert np.asarray(open_image(palette, "palette"))[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied(tmp_path, accelerate_logging):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.new("RGB", (40, 20), "blue").save(path, exif=exif)
    assert open_image(path, "rotated").size == (20, 40)


def test_small_images_are_upscaled_with_a_warning(tmp_path, accelerate_logging, caplog):
    path = tmp_path / "small.png"
    Image.new("RGB", (32, 48), "green").save(path)
    record = make_record(path, str(path), 64, PROMPT)
    assert record.image.size == (64, 96) and record.original_size == (48, 32)
    assert "small.png is 32x48 px, smaller than --resolution 64" in caplog.text


def _wide_record() -> ImageRecord:
    image = Image.new("RGB", (100, 64))
    image.paste((255, 0, 0), (0, 0, 10, 64))  # a red stripe along the left edge
    return ImageRecord("wide", image, (320, 500), PROMPT)


def test_center_crop_conditioning():
    args = types.SimpleNamespace(repeats=1, resolution=64, center_crop=True, random_flip=False)
    dataset = DreamBoothDataset([_wide_record()], [], [PROMPT], args, seed=0)
    example = dataset.example(0, np.random.default_rng(0))
    assert example["time_ids"] == (320, 500, 0, 18, 64, 64)  # original size, crop top/left, target size
    pixels = example["pixel_values"]
    assert pixels.shape == (3, 64, 64) and pixels.min() == -1 and pixels.max() <= 1
    assert not dataset.random_augmentation


def test_random_crop_and_flip_match_their_conditioning():
    """The crop position in the conditioning is where the image SD-XL sees was cut, also after a flip."""
    columns = np.tile((np.arange(100, dtype=np.uint8) * 2)[None, :, None], (64, 1, 3))  # pixel value = 2 x column
    record = ImageRecord("ramp", Image.fromarray(columns), (64, 100), PROMPT)
    args = types.SimpleNamespace(repeats=1, resolution=64, center_crop=False, random_flip=True)
    dataset = DreamBoothDataset([record], [], [PROMPT], args, seed=0)
    assert dataset.random_augmentation
    flips = set()
    for seed in range(20):
        example = dataset.example(0, np.random.default_rng(seed))
        shown = np.round((example["pixel_values"][0, 0] + 1) * 127.5 / 2).astype(int)  # original column of each pixel
        flipped = shown[0] > shown[-1]
        assert np.array_equal(np.abs(np.diff(shown)), np.ones(63, dtype=int))
        # Distance from the left edge of what SD-XL sees to the edge of the original image on that side.
        assert example["time_ids"][3] == (99 - shown[0] if flipped else shown[0])
        flips.add(bool(flipped))
    assert flips == {True, False}


def test_stream_sampler_passes_over_every_image_and_is_reproducible():
    sampler = ShuffledStreamSampler(dataset_size=5, length=12, seed=3)
    items = list(sampler)
    assert [position for _, position in items] == list(range(12))
    assert sorted(index for index, _ in items[:5]) == list(range(5))
    assert sorted(index for index, _ in items[5:10]) == list(range(5))
    assert items == list(ShuffledStreamSampler(5, 12, seed=3))
    assert items != list(ShuffledStreamSampler(5, 12, seed=4))


# --------------------------------------------------------------------------- per-sample masks


def _unet_with_adapter(tiny_sdxl_dir) -> torch.nn.Module:
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    unet.requires_grad_(False)
    tl.inject_tlora(unet, tl.TLoraConfig(rank=8, min_rank=2), generator=torch.Generator().manual_seed(0))
    return unet


def _batch(size: int):
    generator = torch.Generator().manual_seed(1)
    conditioning = {
        "encoder_hidden_states": torch.randn(size, 77, 64, generator=generator),
        "text_embeds": torch.randn(size, 32, generator=generator),
        "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * size),
    }
    return (
        torch.randn(size, 4, 8, 8, generator=generator),
        torch.randn(size, 4, 8, 8, generator=generator),
        conditioning,
    )


def _loss_and_gradients(unet, scheduler, latents, noise, timesteps, conditioning, num_instance=None, weight=1.0):
    unet.zero_grad(set_to_none=True)
    num_instance = len(latents) if num_instance is None else num_instance
    loss = train.diffusion_loss(unet, scheduler, latents, noise, timesteps, conditioning, num_instance, None, weight)
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in unet.named_parameters() if p.requires_grad}


def _sample(i: int, latents, noise, timesteps, conditioning) -> tuple:
    """Sample i of a batch, as a batch of one."""
    one = slice(i, i + 1)
    return latents[one], noise[one], timesteps[one], {key: value[one] for key, value in conditioning.items()}


def test_each_sample_of_a_batch_trains_with_its_own_rank_mask(tiny_sdxl_dir):
    from diffusers import DDPMScheduler

    unet, scheduler = _unet_with_adapter(tiny_sdxl_dir), DDPMScheduler(num_train_timesteps=1000)
    latents, noise, conditioning = _batch(2)
    timesteps = torch.tensor([0, 999])  # ranks 8 and 2

    _, batch = _loss_and_gradients(unet, scheduler, latents, noise, timesteps, conditioning)
    singles = [
        _loss_and_gradients(unet, scheduler, *_sample(i, latents, noise, timesteps, conditioning))[1] for i in range(2)
    ]
    for name, gradient in batch.items():
        torch.testing.assert_close(gradient, (singles[0][name] + singles[1][name]) / 2, atol=1e-6, rtol=1e-5)

    # The high-noise sample leaves components 2.. of every adapter untouched; the low-noise one trains them.
    up_gradients = [name for name in batch if name.endswith(".up") and batch[name].shape[1] == 8]
    assert up_gradients
    for name in up_gradients:
        assert torch.all(singles[1][name][:, 2:] == 0)
        assert singles[0][name][:, 2:].abs().sum() > 0

    # A batch whose samples shared the first sample's timestep would train differently.
    _, shared = _loss_and_gradients(unet, scheduler, latents, noise, timesteps[:1].expand(2), conditioning)
    assert any(not torch.allclose(batch[name], shared[name]) for name in up_gradients)


def test_prior_preservation_loss_is_instance_plus_weighted_class_loss(tiny_sdxl_dir):
    from diffusers import DDPMScheduler

    unet, scheduler = _unet_with_adapter(tiny_sdxl_dir), DDPMScheduler(num_train_timesteps=1000)
    latents, noise, conditioning = _batch(2)
    timesteps = torch.tensor([100, 800])
    with torch.no_grad():
        combined = train.diffusion_loss(unet, scheduler, latents, noise, timesteps, conditioning, 1, None, 0.5)
        parts = [
            train.diffusion_loss(unet, scheduler, *_sample(i, latents, noise, timesteps, conditioning), 1)
            for i in range(2)
        ]
    torch.testing.assert_close(combined, parts[0] + 0.5 * parts[1])


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_sdxl_dir):
    from diffusers import DDPMScheduler

    unet, scheduler = _unet_with_adapter(tiny_sdxl_dir), DDPMScheduler(num_train_timesteps=1000)
    unet.train()
    latents, noise, conditioning = _batch(2)
    timesteps = torch.tensor([30, 700])
    plain_loss, plain = _loss_and_gradients(unet, scheduler, latents, noise, timesteps, conditioning)
    unet.enable_gradient_checkpointing()
    checkpointed_loss, checkpointed = _loss_and_gradients(unet, scheduler, latents, noise, timesteps, conditioning)
    assert checkpointed_loss == pytest.approx(plain_loss, abs=1e-7)
    for name, gradient in plain.items():
        torch.testing.assert_close(checkpointed[name], gradient, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------- end-to-end runs


@pytest.fixture(scope="module")
def ortho_run(tiny_sdxl_dir, tmp_path_factory):
    """4 steps of batch 2 on two non-square images with random crops and flips, validation every 2 steps,
    a checkpoint every step (at most 2 kept); records the timesteps the UNet received."""
    root = tmp_path_factory.mktemp("ortho")
    with pytest.MonkeyPatch.context() as monkeypatch:
        timesteps = record_training_timesteps(monkeypatch)
        args = run_main(train, *base_args(
            tiny_sdxl_dir, root / "out", two_shapes(root / "images"),
            "--max_train_steps", "4", "--train_batch_size", "2", "--gradient_accumulation_steps", "2",
            "--random_flip", "--repeats", "2", "--lr_scheduler", "cosine", "--lr_warmup_steps", "1",
            "--checkpointing_steps", "1", "--checkpoints_total_limit", "2",
            "--validation_prompt", PROMPT, VALIDATION_PROMPT, "--num_validation_images", "1",
            "--validation_steps", "2", "--num_inference_steps", "2", "--report_to", "tensorboard",
        ))  # fmt: skip
    return types.SimpleNamespace(args=args, output=root / "out", images=root / "images", timesteps=timesteps)


def test_ortho_run_writes_a_complete_adapter(ortho_run, tiny_sdxl_dir):
    state_dict, config = read_adapter(ortho_run.output)
    assert (config.variant, config.rank, config.min_rank, config.init) == ("ortho", 8, 4, "random-last")
    assert config.base_model == str(tiny_sdxl_dir) and config.lora_alpha is None
    assert config.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
    suffixes = {key.rsplit(".tlora.", 1)[1] for key in state_dict}
    assert suffixes == {"down", "up", "lambda", "down_base", "up_base", "lambda_base"}
    assert all(key.startswith("unet.") for key in state_dict)


def test_ortho_run_validates_through_the_stock_pipeline_and_logs(ortho_run):
    for step in (2, 4):
        for prompt in (0, 1):
            image = Image.open(ortho_run.output / "validation" / f"step-{step}" / f"prompt-{prompt}_image-0.png")
            assert image.size == (64, 64)
    assert list((ortho_run.output / "logs").rglob("events.out.tfevents.*"))
    # Step 4's images come from the saved file; they differ from step 2's because the adapter trained on.
    step2 = np.asarray(Image.open(ortho_run.output / "validation/step-2/prompt-0_image-0.png"), dtype=np.int16)
    step4 = np.asarray(Image.open(ortho_run.output / "validation/step-4/prompt-0_image-0.png"), dtype=np.int16)
    assert np.abs(step2 - step4).max() > 0


def test_ortho_run_writes_a_model_card(ortho_run, tiny_sdxl_dir):
    from huggingface_hub import ModelCard

    card = ModelCard.load(ortho_run.output / "README.md")
    assert card.data.license == "openrail++"
    assert set(card.data.tags) == {
        "text-to-image",
        "diffusers",
        "lora",
        "t-lora",
        "stable-diffusion-xl",
        "template:sd-lora",
    }
    assert card.data.instance_prompt == PROMPT
    assert "import pipelines.tlora" in card.text and "pipe.load_tlora_weights(" in card.text
    # the zero-install snippet comes first, and the loader files it needs are there
    zero_install = f"custom_pipeline={str(ortho_run.output.resolve())!r},\n    trust_remote_code=True"
    assert zero_install in card.text and card.text.index(zero_install) < card.text.index("import pipelines.tlora")
    assert (ortho_run.output / "pipeline.py").is_file() and (ortho_run.output / "tlora_loader.py").is_file()
    assert "| `pytorch_tlora_weights.safetensors` |" in card.text
    assert str(tiny_sdxl_dir) in card.text and "| rank / min rank | 8 / 4 |" in card.text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", card.text)
    validation = ["validation/step-4/prompt-0_image-0.png", "validation/step-4/prompt-1_image-0.png"]
    assert links == ["rank_schedule.png", "validation_grid.png", "loss_curve.png", *validation]
    assert all((ortho_run.output / link).is_file() for link in links)
    assert [entry["output"]["url"] for entry in card.data.widget] == validation
    # the loss curve is drawn from every step's loss
    assert (ortho_run.output / "logs" / "loss.csv").read_text().splitlines()[0] == "step,loss"
    assert len((ortho_run.output / "logs" / "loss.csv").read_text().splitlines()) == 1 + 4


def test_adapter_loads_into_a_fresh_stock_pipeline_and_changes_its_output(ortho_run, tiny_pipe):
    before = generate(tiny_pipe, PROMPT, steps=2)[0]
    tiny_pipe.load_tlora_weights(str(ortho_run.output))
    after = generate(tiny_pipe, PROMPT, steps=2)[0]
    assert np.abs(after - before).max() > 1e-4
    tiny_pipe.unload_tlora_weights()
    np.testing.assert_array_equal(generate(tiny_pipe, PROMPT, steps=2)[0], before)


def test_checkpoints_rotate_and_each_holds_a_loadable_adapter(ortho_run, tiny_pipe):
    checkpoints = sorted(path.name for path in ortho_run.output.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-3", "checkpoint-4"]
    for name in checkpoints:
        folder = ortho_run.output / name
        assert not (folder / "model.safetensors").exists()  # the adapter only, not the whole UNet
        tiny_pipe.load_tlora_weights(str(folder))
    final, _ = read_adapter(ortho_run.output)
    assert max_difference(read_adapter(ortho_run.output / "checkpoint-4")[0], final) == 0


def test_every_training_batch_has_one_timestep_per_sample(ortho_run):
    assert len(ortho_run.timesteps) == 8  # 4 steps x 2 accumulated batches
    assert all(t.shape == (2,) for t in ortho_run.timesteps)
    assert all(t[0] != t[1] for t in ortho_run.timesteps)


def test_ctrl_c_saves_a_checkpoint_and_resuming_gives_the_uninterrupted_result(ortho_run, tiny_sdxl_dir, tmp_path):
    """Stopped at step 2 of 4 by Ctrl-C and resumed, without validation: the same adapter as the
    uninterrupted run (with validation), so resuming restores everything and validation disturbs nothing."""
    argv = base_args(
        tiny_sdxl_dir, tmp_path / "out", ortho_run.images,
        "--max_train_steps", "4", "--train_batch_size", "2", "--gradient_accumulation_steps", "2",
        "--random_flip", "--repeats", "2", "--lr_scheduler", "cosine", "--lr_warmup_steps", "1",
        "--checkpointing_steps", "100",
    )  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        stop_with_ctrl_c_at_call(patch, call=3)  # during the first batch of step 2
        with pytest.raises(SystemExit) as exit_info:
            run_main(train, *argv)
    assert exit_info.value.code == INTERRUPTED_EXIT_CODE
    assert [path.name for path in (tmp_path / "out").glob("checkpoint-*")] == ["checkpoint-2"]
    assert not (tmp_path / "out" / tl.WEIGHT_NAME).exists()

    run_main(train, *argv, "--resume_from_checkpoint", "latest")
    assert max_difference(read_adapter(tmp_path / "out")[0], read_adapter(ortho_run.output)[0]) <= 1e-6
    assert max_difference(read_adapter(tmp_path / "out" / "checkpoint-2")[0], read_adapter(tmp_path / "out")[0]) > 0


def test_resuming_with_other_tlora_settings_is_refused(ortho_run, tiny_sdxl_dir, tmp_path):
    output = tmp_path / "out"
    shutil.copytree(ortho_run.output / "checkpoint-3", output / "checkpoint-3")
    with pytest.raises(InputError, match="rank: 8 in the checkpoint, 16 now"):
        run_main(train, *base_args(tiny_sdxl_dir, output, None, "--rank", "16", "--resume_from_checkpoint", "latest"))


def test_vanilla_run_with_gradient_checkpointing(tiny_sdxl_dir, tmp_path, tiny_pipe, caplog):
    output = tmp_path / "out"
    run_main(train, *base_args(
        tiny_sdxl_dir, output, None, "--tlora_variant", "vanilla", "--gradient_checkpointing", "--max_train_steps", "2",
        "--resume_from_checkpoint", "latest", "--validation_prompt", PROMPT, "--num_validation_images", "1",
        "--num_inference_steps", "2",
    ))  # fmt: skip
    assert "no checkpoint in" in caplog.text and "starting a new training run" in caplog.text
    state_dict, config = read_adapter(output)
    assert (config.variant, config.init, method_name(config)) == ("vanilla", "normal", "Vanilla T-LoRA")
    assert {key.rsplit(".tlora.", 1)[1] for key in state_dict} == {"down", "up"}
    assert (output / "validation" / "step-2" / "prompt-0_image-0.png").is_file()
    assert "Vanilla T-LoRA" in (output / "README.md").read_text()
    before = generate(tiny_pipe, PROMPT, steps=2)[0]
    tiny_pipe.load_tlora_weights(str(output))
    assert np.abs(generate(tiny_pipe, PROMPT, steps=2)[0] - before).max() > 1e-4


def test_a_crash_while_saving_leaves_the_previous_checkpoint_usable(tiny_sdxl_dir, tmp_path, tiny_pipe):
    output = tmp_path / "out"
    argv = base_args(tiny_sdxl_dir, output, None, "--max_train_steps", "2", "--checkpointing_steps", "1")
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
            run_main(train, *argv)
    assert (output / "checkpoint-2.tmp").is_dir()
    latest = resume_checkpoint(types.SimpleNamespace(resume_from_checkpoint="latest", output_dir=str(output)))
    assert latest == output / "checkpoint-1"
    tiny_pipe.load_tlora_weights(str(latest))

    run_main(train, *argv, "--resume_from_checkpoint", "latest")
    assert sorted(path.name for path in output.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


# --------------------------------------------------------------------------- runs that must not mix or lose work


def test_a_second_run_into_a_used_folder_is_refused_unless_overwrite(tiny_sdxl_dir, tmp_path, caplog):
    output = tmp_path / "out"
    argv = base_args(tiny_sdxl_dir, output, None, "--max_train_steps", "2", "--checkpointing_steps", "1")
    run_main(train, *argv)
    first = read_adapter(output)[0]
    (output / "README.md").write_text("my notes")  # something of the user's in the folder
    with pytest.raises(InputError, match="already holds files of another training run .* replace it with --overwrite"):
        run_main(train, *argv, "--learning_rate", "5e-2")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="It holds no checkpoint of its own run"):
        run_main(train, *argv, "--resume_from_checkpoint", "latest", "--output_dir", tmp_path / "new")
    assert (output / "README.md").read_text() == "my notes"
    assert max_difference(read_adapter(output)[0], first) == 0

    run_main(train, *argv, "--learning_rate", "5e-2", "--max_train_steps", "1", "--overwrite")
    assert max_difference(read_adapter(output)[0], first) > 0
    # The earlier run's checkpoint-2 is gone; a later `latest` can only continue the new run.
    assert sorted(path.name for path in output.glob("checkpoint-*")) == ["checkpoint-1"]
    latest = resume_checkpoint(types.SimpleNamespace(resume_from_checkpoint="latest", output_dir=str(output)))
    assert latest == output / "checkpoint-1"


def test_latest_never_continues_another_runs_checkpoint(tiny_sdxl_dir, tmp_path, caplog):
    output = tmp_path / "out"
    run_main(train, *base_args(tiny_sdxl_dir, output, None, "--max_train_steps", "2", "--checkpointing_steps", "1"))
    other = tmp_path / "other"
    run_main(train, *base_args(tiny_sdxl_dir, other, None, "--max_train_steps", "3", "--checkpointing_steps", "3"))
    shutil.copytree(other / "checkpoint-3", output / "checkpoint-3")  # e.g. a copy into the wrong folder
    PartialState()  # accelerate's logger needs its state
    latest = resume_checkpoint(types.SimpleNamespace(resume_from_checkpoint="latest", output_dir=str(output)))
    assert latest == output / "checkpoint-2"
    assert "skipping checkpoint-3, of another run" in caplog.text


def test_an_explicit_resume_keeps_the_checkpoint_it_writes_and_refuses_changed_optimizer_settings(
    tiny_sdxl_dir, tmp_path
):
    output = tmp_path / "out"
    argv = base_args(
        tiny_sdxl_dir, output, None, "--max_train_steps", "4", "--checkpointing_steps", "1",
        "--checkpoints_total_limit", "2",
    )  # fmt: skip
    run_main(train, *argv)
    assert sorted(path.name for path in output.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    with pytest.raises(InputError, match=r"later checkpoints of this run \(checkpoint-4\); resuming from"):
        run_main(train, *argv, "--resume_from_checkpoint", "checkpoint-3")
    with pytest.raises(InputError, match="--learning_rate 0.01 in the checkpoint, 0.02 now"):
        run_main(train, *argv, "--resume_from_checkpoint", "checkpoint-3", "--learning_rate", "2e-2", "--overwrite")

    run_main(train, *argv, "--resume_from_checkpoint", "checkpoint-3", "--overwrite", "--max_train_steps", "5")
    assert sorted(path.name for path in output.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]
    assert max_difference(read_adapter(output / "checkpoint-5")[0], read_adapter(output)[0]) == 0


def test_a_diverging_run_stops_before_saving_anything_diverged(tiny_sdxl_dir, tmp_path, capsys, monkeypatch):
    output = tmp_path / "out"
    argv = base_args(tiny_sdxl_dir, output, None, "--max_train_steps", "6", "--checkpointing_steps", "1")
    argv[argv.index("--learning_rate") + 1] = "1e30"  # finite, accepted, and far too high
    monkeypatch.setattr(sys, "argv", ["train_tlora_sdxl.py", *map(str, argv)])
    with pytest.raises(SystemExit) as exit_info:
        train.cli()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(r"error: training diverged at step (\d+): the gradients are (nan|inf) .*is intact\.", err)
    diverged_at = int(re.search(r"step (\d+)", err).group(1))
    checkpoints = sorted(output.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    assert [path.name for path in checkpoints] == [f"checkpoint-{n}" for n in range(1, diverged_at)]
    assert all(torch.isfinite(t).all() for path in checkpoints for t in read_adapter(path)[0].values())
    assert not (output / tl.WEIGHT_NAME).exists()


AFTER_LOADING = {
    "resolution too small": (["--resolution", "8"], "--resolution 8 is too small for this model: it needs at least"),
    "target modules matching nothing": (["--target_modules", "to_nowhere"], "matches target_modules=['to_nowhere']"),
    "rank wider than the model": (["--rank", "65536"], "Rank 65536 is larger than any adapted projection can hold"),
    "unknown hub model": (["--pretrained_model_name_or_path", "nobody/no-model"], "cannot load nobody/no-model"),
}


@pytest.mark.parametrize("case", list(AFTER_LOADING))
def test_what_only_the_loaded_model_can_refuse_ends_in_one_error_line(
    case, tiny_sdxl_dir, tmp_path, capsys, monkeypatch
):
    extra, message = AFTER_LOADING[case]
    argv = [*base_args(tiny_sdxl_dir, tmp_path / "out", None, "--max_train_steps", "1"), *extra]
    monkeypatch.setattr(sys, "argv", ["train_tlora_sdxl.py", *map(str, argv)])
    with pytest.raises(SystemExit) as exit_info:
        train.cli()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: ")
    assert message in err.strip().splitlines()[-1]
    assert not (tmp_path / "out" / tl.WEIGHT_NAME).exists()


def test_an_image_far_from_square_is_refused_before_resizing(tmp_path):
    Image.new("RGB", (60000, 2), "red").save(tmp_path / "strip.png")
    with pytest.raises(InputError, match=r"strip.png is 60000x2 px, more than 16 times wider than high"):
        make_record(tmp_path / "strip.png", str(tmp_path / "strip.png"), 1024, PROMPT)


def test_prior_preservation_generates_missing_class_images(tiny_sdxl_dir, tmp_path, monkeypatch):
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    Image.open(EXAMPLE_IMAGE).convert("L").resize((80, 64)).save(class_dir / "premade.png")
    timesteps = record_training_timesteps(monkeypatch)
    run_main(train, *base_args(
        tiny_sdxl_dir, tmp_path / "out", None, "--with_prior_preservation", "--class_data_dir", class_dir,
        "--class_prompt", "a photo of a toy", "--num_class_images", "2", "--num_inference_steps", "2",
        "--max_train_steps", "2", "--prior_loss_weight", "0.5",
    ))  # fmt: skip
    generated = [path for path in image_files(class_dir) if path.name != "premade.png"]
    assert len(generated) == 1 and generated[0].suffix == ".jpg" and Image.open(generated[0]).size == (64, 64)
    # Instance and class halves of each batch have their own timesteps.
    assert len(timesteps) == 2 and all(t.shape == (2,) and t[0] != t[1] for t in timesteps)
    assert 'prior preservation | yes: "a photo of a toy", weight 0.5' in (tmp_path / "out" / "README.md").read_text()


def test_push_to_hub_uploads_the_result_without_checkpoints(tiny_sdxl_dir, tmp_path, monkeypatch):
    calls = fake_hub(monkeypatch)
    output = tmp_path / "my-toy"
    run_main(train, *base_args(tiny_sdxl_dir, output, None, "--max_train_steps", "1", "--checkpointing_steps", "1",
                        "--push_to_hub", "--hub_token", "hf_test", "--report_to", "tensorboard",
                        "--export_for_tools"))  # fmt: skip
    assert calls["create"] == {"repo_id": "my-toy", "token": "hf_test"}
    upload = calls["upload"]
    assert upload["repo_id"] == "someone/my-toy" and upload["token"] == "hf_test"
    node, kohya = "my-toy_tlora-node_ortho_r8-min4.safetensors", "my-toy_lora-rank16.safetensors"
    assert {"README.md", tl.WEIGHT_NAME, "pipeline.py", "tlora_loader.py", node, kohya} <= set(upload["files"])
    assert any(name.startswith("logs/") for name in upload["files"])
    assert not [name for name in upload["files"] if "checkpoint" in name]
    assert (output / "checkpoint-1" / tl.WEIGHT_NAME).is_file()
    card = (output / "README.md").read_text()
    assert "pipe.load_tlora_weights('someone/my-toy')" in card and "hf_test" not in card
    assert "custom_pipeline='someone/my-toy',\n    trust_remote_code=True" in card
    assert "num_inference_steps=25, guidance_scale=5.0" in card  # the validation settings, also of the plot
    assert f"| `{node}` | ComfyUI with the ComfyUI-T-LoRA custom nodes" in card and f"| `{kohya}` | ComfyUI's LoraLoader" in card
    hparams = "".join(path.read_text() for path in (output / "logs").rglob("hparams.yml"))
    assert "hf_test" not in hparams


def test_a_failed_upload_keeps_the_local_result_and_says_why(tiny_sdxl_dir, tmp_path, monkeypatch):
    fake_hub(monkeypatch, fail_upload=True)
    output = tmp_path / "out"
    with pytest.raises(HubError, match="simulated.*complete in") as error:
        run_main(train, *base_args(tiny_sdxl_dir, output, None, "--max_train_steps", "1", "--push_to_hub",
                                   "--hub_token", "t"))  # fmt: skip
    assert "hf upload" in str(error.value)
    read_adapter(output)
    assert (output / "README.md").is_file()


# --------------------------------------------------------------------------- accelerate launch


def test_accelerate_launch_single_process(tiny_sdxl_dir, tmp_path):
    output = tmp_path / "out"
    result = accelerate_launch("train_tlora_sdxl.py", tmp_path, ["--cpu", "--num_processes", "1"],
                     base_args(tiny_sdxl_dir, output, None, "--max_train_steps", "2"))  # fmt: skip
    assert re.search(r"Steps: 100%.*2/2.*loss=[\d.]+, lr=1\.00e-02", result.stderr)
    assert re.search(
        rf"Trained steps 1-2 \(2 steps\) in [\d.]+ s, [\d.]+ s/step\. Adapter: {re.escape(str(output))}", result.stdout
    )
    read_adapter(output)


def test_accelerate_launch_two_processes_ddp(tiny_sdxl_dir, tmp_path):
    """Two CPU processes with DDP (gloo). accelerate's `--cpu` launcher starts a single process unless it
    uses mpirun, so the processes are started through torchrun (`--multi_gpu`) with ACCELERATE_USE_CPU."""
    output = tmp_path / "out"
    result = accelerate_launch(
        "train_tlora_sdxl.py",
        tmp_path,
        ["--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port())],
        base_args(tiny_sdxl_dir, output, None, "--max_train_steps", "3", "--checkpointing_steps", "2",
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
