"""The pipeline API: registration, save/load round trips, unloading, scale, the Hub, and bad input."""

import json
import math
import os
import stat
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors.torch import save_file

import pipelines.tlora as tl
from pipelines.tlora import loader

from tests.tlora_testing import add_random_tlora, generate, read_safetensors_file

SDXL_CLASSES = (
    "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
    "StableDiffusionXLControlNetPipeline",
)
API = ("load_tlora_weights", "unload_tlora_weights", "set_tlora_scale", "save_tlora_weights", "tlora_state_dict")


@pytest.fixture
def saved_adapter(tiny_pipe, tmp_path):
    """The folder of a saved non-trivial ortho adapter (the adapter is unloaded again)."""
    config = add_random_tlora(tiny_pipe.unet, base_model="tiny-sdxl")
    tiny_pipe.save_tlora_weights(tmp_path / "adapter", tl.get_tlora_state_dict(tiny_pipe), config)
    tiny_pipe.unload_tlora_weights()
    return tmp_path / "adapter"


@pytest.fixture
def adapter_dir(tiny_pipe, saved_adapter):
    """A saved adapter and the images it gives."""
    tiny_pipe.load_tlora_weights(saved_adapter)
    images = generate(tiny_pipe)
    tiny_pipe.unload_tlora_weights()
    return saved_adapter, images


def test_stock_pipelines_gain_the_api(tiny_sdxl_dir):
    import diffusers

    for name in SDXL_CLASSES:
        cls = getattr(diffusers, name)
        assert all(callable(getattr(cls, method)) for method in API), name
    pipe = diffusers.AutoPipelineForText2Image.from_pretrained(tiny_sdxl_dir)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline" and hasattr(pipe, "load_tlora_weights")
    img2img = diffusers.AutoPipelineForImage2Image.from_pipe(pipe)
    assert img2img.load_tlora_weights.__func__ is tl.load_tlora_weights


def test_registration_is_idempotent_and_never_overrides():
    import diffusers

    before = {name: diffusers.StableDiffusionXLPipeline.__dict__[name] for name in API}
    tl.register([diffusers.StableDiffusionXLPipeline])
    assert {name: diffusers.StableDiffusionXLPipeline.__dict__[name] for name in API} == before

    class HasItsOwn:
        def load_tlora_weights(self):
            return "own"

    tl.register([HasItsOwn])
    assert HasItsOwn().load_tlora_weights() == "own"
    assert HasItsOwn.unload_tlora_weights is tl.unload_tlora_weights


def test_file_layout_matches_the_format(saved_adapter):
    folder = saved_adapter
    path = folder / tl.WEIGHT_NAME
    tensors, metadata = read_safetensors_file(path)
    assert json.loads(metadata["tlora_config"]) == {
        "format": "tlora",
        "format_version": 1,
        "variant": "ortho",
        "rank": 16,
        "min_rank": 8,
        "schedule_exponent": 1.0,
        "num_train_timesteps": 1000,
        "lora_alpha": None,
        "init": "random-last",
        "target_modules": ["to_q", "to_k", "to_v", "to_out.0"],
        "base_model": "tiny-sdxl",
    }
    path_of = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    assert {
        f"unet.{path_of}.tlora.{p}" for p in ("down", "up", "lambda", "down_base", "up_base", "lambda_base")
    } <= tensors.keys()
    assert len(tensors) == 6 * 24 * 4  # six tensors, four projections of 24 attention modules
    assert tensors[f"unet.{path_of}.tlora.down"].shape == (16, 64)
    assert tensors[f"unet.{path_of}.tlora.lambda"].shape == (16,)
    assert not list(folder.glob("*.tmp"))


@pytest.mark.parametrize("variant", ["ortho", "vanilla"])
def test_save_load_round_trip_gives_identical_images(tiny_pipe, tmp_path, variant):
    config = add_random_tlora(
        tiny_pipe.unet, variant=variant, init="normal" if variant == "vanilla" else "random-last"
    )
    expected = generate(tiny_pipe)
    tiny_pipe.save_tlora_weights(tmp_path, tl.get_tlora_state_dict(tiny_pipe), config)
    tiny_pipe.unload_tlora_weights()
    base = generate(tiny_pipe)
    assert abs(expected - base).max() > 1e-3

    for source in (tmp_path, tmp_path / tl.WEIGHT_NAME, str(tmp_path)):
        tiny_pipe.load_tlora_weights(source)
        assert (generate(tiny_pipe) == expected).all()
    state_dict, loaded_config = tl.tlora_state_dict(tmp_path)
    assert loaded_config == config
    tiny_pipe.load_tlora_weights(state_dict, tlora_config=config.to_dict())  # in memory, replaces "default"
    assert (generate(tiny_pipe) == expected).all()
    assert list(loader.get_router(tiny_pipe.unet).configs) == ["default"]


def test_unload_and_scale_zero_give_the_base_output_bitwise(tiny_pipe, adapter_dir):
    folder, adapted = adapter_dir
    base = generate(tiny_pipe)
    tiny_pipe.load_tlora_weights(folder)
    tiny_pipe.set_tlora_scale(0.0)
    assert (generate(tiny_pipe) == base).all()
    tiny_pipe.set_tlora_scale(1.0)
    assert (generate(tiny_pipe) == adapted).all()
    tiny_pipe.unload_tlora_weights()
    assert (generate(tiny_pipe) == base).all()
    assert not any(".tlora." in name for name, _ in tiny_pipe.unet.named_modules())
    assert not tiny_pipe.unet._forward_pre_hooks


def test_scale_and_lora_alpha_scale_the_update(tiny_pipe):
    from tests.tlora_testing import run_unet, unet_inputs

    unet = tiny_pipe.unet
    inputs = unet_inputs(unet, batch=1)
    with torch.no_grad():
        base = run_unet(unet, inputs, 300)
        add_random_tlora(unet, rank=16, lora_alpha=8)  # scale 8 / 16
        half = run_unet(unet, inputs, 300) - base
        tiny_pipe.set_tlora_scale(2.0)
        full = run_unet(unet, inputs, 300) - base
    # the UNet is non-linear in the update, so compare against a first-order expectation loosely
    assert 1.6 < full.norm() / half.norm() < 2.4


def test_second_adapter_name_adds_same_name_replaces(tiny_pipe, adapter_dir, tmp_path):
    folder, first = adapter_dir
    base = generate(tiny_pipe)
    config = add_random_tlora(tiny_pipe.unet, seed=7, variant="vanilla", init="normal")
    second = generate(tiny_pipe)
    tiny_pipe.save_tlora_weights(tmp_path / "second", tl.get_tlora_state_dict(tiny_pipe), config)
    tiny_pipe.unload_tlora_weights()

    tiny_pipe.load_tlora_weights(folder)
    tiny_pipe.load_tlora_weights(tmp_path / "second")  # same default name: replaces
    assert (generate(tiny_pipe) == second).all()
    tiny_pipe.load_tlora_weights(folder, adapter_name="other")
    both = generate(tiny_pipe)
    assert abs(both - first).max() > 1e-3 and abs(both - second).max() > 1e-3
    tiny_pipe.set_tlora_scale(0.0, adapter_name="default")
    assert abs(generate(tiny_pipe) - first).max() < 1e-5
    tiny_pipe.unload_tlora_weights("other")
    tiny_pipe.unload_tlora_weights("default")
    assert (generate(tiny_pipe) == base).all()
    with pytest.raises(ValueError, match="No T-LoRA adapter named 'other'"):
        tiny_pipe.unload_tlora_weights("other")
    with pytest.raises(ValueError, match="No T-LoRA adapter is loaded"):
        tiny_pipe.set_tlora_scale(0.5)


def test_subclass_and_plain_functions(tiny_sdxl_dir, adapter_dir):
    from diffusers import StableDiffusionXLInstructPix2PixPipeline

    folder, adapted = adapter_dir
    pipe = tl.TLoraStableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_tlora_weights(folder)
    assert (generate(pipe) == adapted).all()
    # any pipeline with a UNet, through the plain functions
    assert not hasattr(StableDiffusionXLInstructPix2PixPipeline, "load_tlora_weights")
    tl.unload_tlora_weights(pipe)
    tl.load_tlora_weights(pipe, folder / tl.WEIGHT_NAME)
    assert (generate(pipe) == adapted).all()


def test_hub_repo_id(tiny_pipe, adapter_dir, monkeypatch):
    folder, adapted = adapter_dir
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs))
        if repo_id != "someone/my-tlora":
            raise LocalEntryNotFoundError("not cached")
        return str(folder / filename)

    monkeypatch.setattr(loader, "hf_hub_download", fake_download)
    tiny_pipe.load_tlora_weights("someone/my-tlora", revision="main", token="t0k")
    assert (generate(tiny_pipe) == adapted).all()
    assert calls[0][:2] == ("someone/my-tlora", tl.WEIGHT_NAME)
    assert calls[0][2]["revision"] == "main" and calls[0][2]["token"] == "t0k"
    with pytest.raises(FileNotFoundError, match="'someone/unknown' is not a local path"):
        tiny_pipe.load_tlora_weights("someone/unknown")


# ---- bad input: a clear error, and the pipeline exactly as it was ----------------------------------------


def corrupt(folder, tmp_path, change):
    """Copy the adapter file with `change(tensors, config_dict)` applied; returns the new file."""
    tensors, metadata = read_safetensors_file(folder / tl.WEIGHT_NAME)
    config = json.loads(metadata["tlora_config"])
    metadata = change(tensors, config) or {"tlora_config": json.dumps(config)}
    path = tmp_path / "broken.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


KEY = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.tlora"


def _nan(tensors, config):
    tensors[f"{KEY}.up"][0, 0] = math.nan


def _inf(tensors, config):
    tensors[f"{KEY}.lambda"][1] = math.inf


def _shape(tensors, config):
    tensors[f"{KEY}.down"] = torch.zeros(16, 96)


def _missing(tensors, config):
    del tensors[f"{KEY}.up_base"]


def _unexpected(tensors, config):
    tensors[f"{KEY}.scale"] = torch.ones(1)


def _unknown_module(tensors, config):
    tensors["unet.down_blocks.7.attn1.to_q.tlora.down"] = tensors.pop(f"{KEY}.down")


def _set(**values):
    def change(tensors, config):
        config.update(values)

    return change


def _no_metadata(tensors, config):
    return {"format": "pt"}


def _raw_config(text):
    def change(tensors, config):
        return {"tlora_config": text}

    return change


@pytest.mark.parametrize(
    "change,error,message",
    [
        (_nan, tl.TLoraFileError, "contains NaN or Inf"),
        (_inf, tl.TLoraFileError, "contains NaN or Inf"),
        (
            _shape,
            tl.TLoraFileError,
            r"Shape mismatch for '.*attn1.to_q.tlora.down': the file has \(16, 96\), .* \(16, 64\)",
        ),
        (_missing, tl.TLoraFileError, r"Missing keys for module .*attn1.to_q.*tlora.up_base"),
        (_unexpected, tl.TLoraFileError, "unknown T-LoRA parameter 'scale': a 'ortho' adapter has down, up, lambda"),
        (_unknown_module, tl.TLoraFileError, "not a linear projection of this UNet"),
        (_set(format_version=99), tl.TLoraFileError, "Unsupported T-LoRA format_version 99"),
        (_set(min_rank=32), tl.TLoraFileError, r"`min_rank` \(32\) must not exceed `rank` \(16\)"),
        (_set(rank=0), tl.TLoraFileError, "`rank` must be an integer from 1 to 65536, got 0"),
        (_set(schedule_exponent=-2), tl.TLoraFileError, "schedule_exponent"),
        (_no_metadata, tl.TLoraFileError, "no `tlora_config` metadata"),
        # claimed sizes and numbers bounded before anything is allocated or computed
        (_set(rank=10**12, min_rank=8), tl.TLoraFileError, "`rank` must be an integer from 1 to 65536, got 10{12}"),
        (_set(rank=16.0), tl.TLoraFileError, "`rank` must be an integer"),
        (_set(lora_alpha=-1), tl.TLoraFileError, "`lora_alpha` .* must be a finite number > 0, got -1"),
        (_raw_config('{"format_version": 1, "rank": 16, "schedule_exponent": NaN}'), tl.TLoraFileError, "holds NaN"),
        (_raw_config('{"format_version": 1, "lora_alpha": Infinity}'), tl.TLoraFileError, "holds Infinity"),
        (_set(schedule_exponent=1e400), tl.TLoraFileError, "holds Infinity"),  # json.dumps writes inf as Infinity
        (_raw_config("[" * 100_000), tl.TLoraFileError, "nests deeper than 32 levels"),
        (_raw_config('{"x": "' + "[" * 100_000 + '"'), tl.TLoraFileError, "not valid JSON"),  # brackets in a string
        (_raw_config(json.dumps([1, 2])), tl.TLoraFileError, "must be a JSON object, got list"),
        (_set(target_modules="to_q"), tl.TLoraFileError, "`target_modules` must be a non-empty list"),
        (_set(init=["random-last"]), tl.TLoraFileError, "`init` must be a string"),
        (_set(variant="x" * 10**6), tl.TLoraFileError, r"`variant` must be one of .*'x{100,240}\.\.\.x{100,240}'\. "),
    ],
)
def test_bad_files_leave_the_pipeline_as_it_was(tiny_pipe, saved_adapter, tmp_path, change, error, message):
    tiny_pipe.load_tlora_weights(saved_adapter)
    before = tl.get_tlora_state_dict(tiny_pipe)
    bad = corrupt(saved_adapter, tmp_path, change)
    with pytest.raises(error, match=message):
        tiny_pipe.load_tlora_weights(bad)
    after = tl.get_tlora_state_dict(tiny_pipe)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert list(loader.get_router(tiny_pipe.unet).configs) == ["default"]


def test_a_rank_wider_than_the_model_is_refused_before_any_mask_is_built(tiny_pipe, tmp_path):
    # Layers store min(rank, in, out) components, so a rank-64 adapter of this 64-wide model has the tensors of
    # any larger rank; only the claimed rank, which would size the masks, tells them apart.
    config = add_random_tlora(tiny_pipe.unet, rank=64, min_rank=8)
    tiny_pipe.save_tlora_weights(tmp_path / "adapter", tl.get_tlora_state_dict(tiny_pipe), config)
    tiny_pipe.unload_tlora_weights()
    wide = corrupt(tmp_path / "adapter", tmp_path, _set(rank=65536))
    with pytest.raises(tl.TLoraInjectionError, match=r"Rank 65536 is larger than any adapted projection can hold"):
        tiny_pipe.load_tlora_weights(wide)
    assert loader.get_router(tiny_pipe.unet) is None
    with pytest.raises(tl.TLoraInjectionError, match=r"the widest allows rank 64\)"):
        tl.inject_tlora(tiny_pipe.unet, tl.TLoraConfig(rank=65, min_rank=1))


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf, "2", None])
def test_set_tlora_scale_refuses_what_is_not_a_finite_number(tiny_pipe, scale):
    add_random_tlora(tiny_pipe.unet)
    with pytest.raises(ValueError, match="The T-LoRA scale must be a finite number"):
        tiny_pipe.set_tlora_scale(scale)
    assert loader.get_router(tiny_pipe.unet).scales == {"default": 1.0}


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_files_get_the_usual_modes_and_stale_temporaries_go(tiny_pipe, tmp_path, umask):
    config = add_random_tlora(tiny_pipe.unet)
    folder = tmp_path / "adapter"
    folder.mkdir()
    stale = folder / f".{tl.WEIGHT_NAME}.k1ll3d.tmp"  # what a killed save leaves behind
    stale.write_bytes(b"partial")
    unrelated = [folder / f".{tl.WEIGHT_NAME}.notes", folder / ".other.safetensors.k1ll3d.tmp"]
    for path in unrelated:
        path.write_text("mine")
    previous = os.umask(umask)
    try:
        path = tiny_pipe.save_tlora_weights(folder, tl.get_tlora_state_dict(tiny_pipe), config)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert not stale.exists() and all(path.read_text() == "mine" for path in unrelated)
    assert sorted(p.name for p in folder.iterdir()) == sorted([tl.WEIGHT_NAME, *(p.name for p in unrelated)])


def test_standard_lora_and_authors_files_point_elsewhere(tiny_pipe, tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"unet.down_blocks.1.attn1.to_q.lora_A.weight": torch.zeros(4, 64)}, str(path))
    with pytest.raises(tl.TLoraFileError, match=r"standard LoRA; load it with `pipe.load_lora_weights"):
        tiny_pipe.load_tlora_weights(path)
    save_file({"down_blocks.1.attn1.processor.to_q_lora.q_layer.weight": torch.zeros(4, 64)}, str(path))
    with pytest.raises(tl.TLoraFileError, match="convert_tlora.py import-official"):
        tiny_pipe.load_tlora_weights(path)
    assert loader.get_router(tiny_pipe.unet) is None


@pytest.mark.parametrize("name", ["adapter.bin", "adapter.pt", "adapter.ckpt"])
def test_pickle_files_are_refused_unread(tiny_pipe, tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"not even opened")
    with pytest.raises(tl.TLoraFileError, match="pickle-based weight files are not loaded"):
        tiny_pipe.load_tlora_weights(path)
    with pytest.raises(tl.TLoraFileError, match="pickle"):
        tiny_pipe.load_tlora_weights(tmp_path, weight_name=name)


def test_missing_paths(tiny_pipe, tmp_path):
    with pytest.raises(FileNotFoundError, match="No such T-LoRA file or folder"):
        tiny_pipe.load_tlora_weights(tmp_path / "nowhere" / "adapter.safetensors")
    (tmp_path / "other.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"No 'pytorch_tlora_weights.safetensors' in .*other.safetensors"):
        tiny_pipe.load_tlora_weights(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a local path"):
        tiny_pipe.load_tlora_weights("nobody/no-such-repo")  # offline: not cached
    with pytest.raises(tl.TLoraConfigError, match="needs its config"):
        tiny_pipe.load_tlora_weights({"unet.x.tlora.down": torch.zeros(1)})
    with pytest.raises(tl.TLoraFileError, match="not a readable safetensors file"):
        tiny_pipe.load_tlora_weights(tmp_path / "other.safetensors")


def test_timestep_count_mismatch_warns(tiny_pipe, saved_adapter, tmp_path):
    bad = corrupt(saved_adapter, tmp_path, _set(num_train_timesteps=500))
    with pytest.warns(UserWarning, match="num_train_timesteps=500.*scheduler has 1000"):
        tiny_pipe.load_tlora_weights(bad)


def test_save_refuses_a_file_as_directory_and_pickle_names(tiny_pipe, tmp_path):
    config = add_random_tlora(tiny_pipe.unet)
    layers = tl.get_tlora_state_dict(tiny_pipe)
    target = tmp_path / "file"
    target.write_text("mine")
    with pytest.raises(NotADirectoryError):
        tiny_pipe.save_tlora_weights(target, layers, config)
    assert target.read_text() == "mine"
    with pytest.raises(tl.TLoraFileError, match="safetensors"):
        tiny_pipe.save_tlora_weights(tmp_path, layers, config, weight_name="adapter.bin")
    assert tiny_pipe.save_tlora_weights(tmp_path, layers, config, is_main_process=False) is None
    assert not Path(tmp_path, tl.WEIGHT_NAME).exists()
