"""Smoke tests of scripts/benchmark.py on the tiny fixture with one repeat.

They check what the benchmark prints and writes and that it measures what it says (adapters really loaded
and non-zero, training steps really training the adapter); they never judge the timings themselves.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

import pipelines.tlora as tl
from scripts import benchmark

from tests.tlora_testing import run_unet, unet_inputs

RANK = 8


def assert_rows(result: dict, names: list[str], baseline: str) -> None:
    rows = {row["name"]: row for row in result["results"]}
    assert list(rows) == names
    for row in rows.values():
        assert row["median_s"] > 0
        assert len(row["samples_s"]) == 1
        assert row["ratio"] == pytest.approx(row["median_s"] / rows[baseline]["median_s"])
    assert rows[baseline]["ratio"] == 1.0


def assert_targets_printed(result: dict, printed: str, measures: list[str]) -> None:
    assert [target["measure"] for target in result["targets"]] == measures
    for target in result["targets"]:
        assert math.isfinite(target["value"])
        status = "PASS" if target["passed"] else "FAIL"
        assert any(line.startswith(status) and target["measure"] in line for line in printed.splitlines())


@pytest.mark.parametrize("adapter", benchmark.infer_adapters(RANK)[1:], ids=lambda adapter: adapter.name)
def test_loaded_adapters_change_the_unet_output(tiny_pipe, tmp_path, adapter):
    unet = tiny_pipe.unet
    inputs = unet_inputs(unet)
    with torch.no_grad():
        before = run_unet(unet, inputs, 500)
        pipe = benchmark.inference_pipeline(unet, tiny_pipe.scheduler)
        benchmark.attach_for_inference(pipe, adapter, RANK // 2, tmp_path)
        after = run_unet(unet, inputs, 500)

    assert torch.isfinite(after).all()
    assert (after - before).abs().max() > 1e-4
    if adapter.kind == "tlora":
        assert tl.get_tlora_config(unet).variant == adapter.variant
        assert (tmp_path / tl.WEIGHT_NAME).is_file()
    else:
        assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
        to_q = unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
        (lora_a,) = to_q.lora_A.values()
        assert lora_a.out_features == adapter.rank


# Per family: the fixture pipeline, its denoiser, and a frozen weight no adapter touches.
FAMILY_CASES = {"sdxl": ("tiny_pipe", "unet", "conv_in"), "flux": ("tiny_flux_pipe", "transformer", "x_embedder")}


@pytest.mark.parametrize("family", list(FAMILY_CASES))
@pytest.mark.parametrize("adapter", benchmark.train_adapters(RANK), ids=lambda adapter: adapter.name)
def test_train_step_trains_only_the_adapter_on_the_familys_projections(family, adapter, request):
    pipe_fixture, attribute, frozen_module = FAMILY_CASES[family]
    pipe = request.getfixturevalue(pipe_fixture)
    args = benchmark.parse_args(["train", "--family", family, "--size", "tiny", "--rank", str(RANK)])
    denoiser = getattr(pipe, attribute).requires_grad_(False)
    targets = set(tl.injection.find_target_projections(denoiser, benchmark.target_modules(family)))
    frozen = denoiser.get_submodule(frozen_module).weight.clone()
    step = benchmark.TrainStep(denoiser, pipe.scheduler, adapter, args)
    trainable = {name: p.detach().clone() for name, p in denoiser.named_parameters() if p.requires_grad}
    step()

    marker = ".tlora." if adapter.kind == "tlora" else ".lora_"
    assert trainable and all(marker in name for name in trainable)
    # LoRA and T-LoRA go on the same projections (FLUX: 2 double-stream blocks x 7, 2 single-stream blocks x 3)
    assert {name.split(marker)[0] for name in trainable} == targets
    assert family != "flux" or len(targets) == 20
    current = dict(denoiser.named_parameters())
    assert any(not torch.equal(current[name], value) for name, value in trainable.items())
    assert torch.equal(denoiser.get_submodule(frozen_module).weight, frozen)


def test_infer_prints_the_table_and_targets_and_writes_json(tmp_path, capsys):
    out = tmp_path / "results" / "infer.json"
    argv = ["infer", "--size", "tiny", "--repeats", "1", "--steps", "2", "--json", str(out)]
    assert benchmark.main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())

    assert result["benchmark"] == "infer"
    expected = {"size": "tiny", "resolution": 64, "rank": 64, "min_rank": 32, "steps": 2, "repeats": 1}
    assert expected.items() <= result["settings"].items()
    assert_rows(result, ["none", "vanilla", "ortho", "lora64", "lora128"], baseline="none")
    for label in ("no adapter", "Vanilla T-LoRA R=64", "T-LoRA (ortho) R=64", "LoRA r=64", "LoRA r=128"):
        assert label in printed
    assert_targets_printed(result, printed, ["Vanilla T-LoRA R=64 / LoRA r=64", "T-LoRA (ortho) R=64 / LoRA r=128"])
    assert not list(out.parent.glob(".*.tmp"))


@pytest.mark.slow  # a child process per configuration measures its memory
def test_train_prints_speed_and_memory(tmp_path, capsys):
    out = tmp_path / "train.json"
    argv = ["train", "--size", "tiny", "--rank", str(RANK), "--repeats", "1", "--steps", "1", "--json", str(out)]
    assert benchmark.main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())

    assert result["benchmark"] == "train"
    assert_rows(result, [f"lora{RANK}", "vanilla", "ortho"], baseline=f"lora{RANK}")
    for row in result["results"]:
        # each configuration's peak comes from a child process of its own, above the frozen model
        assert row["peak_mb"] > row["above_model_mb"] > 0
        assert row["label"] in printed
    assert_targets_printed(
        result, printed, [f"Vanilla T-LoRA R={RANK} / LoRA r={RANK}", f"T-LoRA (ortho) R={RANK} / LoRA r={RANK}"]
    )


def test_full_size_is_the_sdxl_base_unet():
    unet = benchmark.meta_unet("full")
    projections = tl.injection.find_target_projections(unet, benchmark.TARGET_MODULES)

    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    assert len(projections) == 560
    assert len({benchmark.owner_module(path) for path in projections}) == 140


def dry_run(tmp_path, command: str) -> tuple[int, dict]:
    out = tmp_path / f"{command}.json"
    benchmark.main([command, "--size", "tiny", "--rank", str(RANK), "--dry-run", "--json", str(out)])
    result = json.loads(out.read_text())
    return result["adapted_projections"], {row["name"]: row for row in result["results"]}


def test_dry_run_counts_inference_parameters_and_flops(tmp_path):
    projections, rows = dry_run(tmp_path, "infer")
    size = {name: row["adapter_parameters"] for name, row in rows.items()}
    flops = {name: row["flops"] for name, row in rows.items()}

    assert size["none"] == 0
    assert size["vanilla"] == size[f"lora{RANK}"]
    assert size[f"lora{2 * RANK}"] == 2 * size[f"lora{RANK}"]
    # trained and frozen copies of both factors, plus a trained and a frozen lambda per projection
    assert size["ortho"] == 2 * size["vanilla"] + 2 * RANK * projections
    # at timestep 500 only 3/4 of the components are active, and T-LoRA skips the others
    assert flops["none"] < flops["vanilla"] < flops[f"lora{RANK}"]
    assert flops["vanilla"] < flops["ortho"] < flops[f"lora{2 * RANK}"]


def test_dry_run_counts_training_flops(tmp_path):
    _, rows = dry_run(tmp_path, "train")

    assert rows["vanilla"]["flops"] == rows[f"lora{RANK}"]["flops"]
    assert rows["ortho"]["ratio"] > 1  # the frozen branch still runs forward and backward


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--size", "tiny", "--rank", "8", "--min-rank", "9"], "--min-rank (9) must not exceed --rank (8)"),
        (["infer", "--size", "tiny", "--resolution", "60"], "--resolution must be a multiple of 8"),
        (["train", "--size", "full", "--cli"], "--cli trains on a saved fixture"),
        (["infer", "--device", "tpu"], "--device must be cpu or cuda"),
        pytest.param(
            ["infer", "--device", "cuda"],
            "this torch build sees no CUDA device",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available"),
        ),
        pytest.param(
            ["train", "--size", "tiny", "--use_8bit_adam"],
            "--use_8bit_adam needs bitsandbytes",
            marks=pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="installed"),
        ),
    ],
)
def test_settings_that_cannot_run_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# --------------------------------------------------------------------------- FLUX


@pytest.mark.parametrize("adapter", benchmark.infer_adapters(RANK, "flux")[1:], ids=lambda adapter: adapter.name)
def test_loaded_flux_adapters_change_the_transformer_output(tmp_path, adapter):
    from tests.tlora_testing import flux_inputs

    transformer, scheduler = benchmark.build_base_flux("tiny", "cpu", torch.float32)
    inputs = flux_inputs(transformer, batch=1)
    with torch.no_grad():
        before = transformer(**inputs, timestep=torch.full((1,), 0.5)).sample
        pipe = benchmark.flux_inference_pipeline(transformer, scheduler)
        benchmark.attach_for_inference(pipe, adapter, RANK // 2, tmp_path)
        after = transformer(**inputs, timestep=torch.full((1,), 0.5)).sample

    assert (after - before).abs().max() > 1e-4
    family_targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj"]
    assert benchmark.target_modules("flux") == family_targets
    projections = tl.injection.find_target_projections(transformer, family_targets)
    if adapter.kind == "tlora":
        config = tl.get_tlora_config(transformer)
        assert (config.model_family, config.variant) == ("flux", "vanilla")
        assert sorted(tl.get_tlora_adapters(transformer)) == sorted(projections)
    else:
        lora_modules = [name for name, module in transformer.named_modules() if hasattr(module, "lora_A")]
        assert sorted(lora_modules) == sorted(projections)  # the same projections as the T-LoRA


def test_infer_flux_rows_and_target(tmp_path, capsys):
    out = tmp_path / "flux.json"
    argv = ["infer", "--family", "flux", "--size", "tiny", "--rank", str(RANK), "--repeats", "1", "--steps", "2"]
    assert benchmark.main([*argv, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())

    assert result["settings"]["family"] == "flux" and result["settings"]["resolution"] == 64
    assert_rows(result, ["none", "vanilla", f"lora{RANK}"], baseline="none")
    assert "tiny FluxTransformer2DModel" in printed
    assert_targets_printed(result, printed, [f"Vanilla T-LoRA R={RANK} / LoRA r={RANK}"])


def test_flux_full_size_is_flux_dev_and_its_flops_count(tmp_path):
    transformer = benchmark.meta_flux("full")
    projections = tl.injection.find_target_projections(transformer, benchmark.target_modules("flux"))
    assert sum(p.numel() for p in transformer.parameters()) == 11_901_408_320
    assert len(projections) == 247

    out = tmp_path / "flux-dry.json"
    argv = ["infer", "--family", "flux", "--size", "tiny", "--rank", str(RANK), "--dry-run", "--json", str(out)]
    benchmark.main(argv)
    rows = {row["name"]: row for row in json.loads(out.read_text())["results"]}
    assert rows["vanilla"]["adapter_parameters"] == rows[f"lora{RANK}"]["adapter_parameters"] > 0
    # at sigma 0.5 (t = 500) only 3/4 of the components are active, and T-LoRA skips the others
    assert rows["none"]["flops"] < rows["vanilla"]["flops"] < rows[f"lora{RANK}"]["flops"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--family", "flux", "--size", "tiny", "--dry-run"], "use `infer --family flux --dry-run`"),
        (["infer", "--family", "flux", "--size", "tiny", "--resolution", "72"], "multiple of 16 for FLUX"),
        (["train", "--family", "flux", "--size", "tiny", "--resolution", "72"], "multiple of 16 for FLUX"),
    ],
)
def test_flux_settings_that_cannot_run_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        benchmark.parse_args(argv)
    assert message in capsys.readouterr().err
