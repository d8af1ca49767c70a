"""Conversion between this package's T-LoRA files, the authors' checkpoints and standard LoRA files.

The authors' checkpoints are built here from their documented layout, for every attention processor (attn1 and
attn2) of the tiny UNet; their forward math is re-implemented below as an attention processor, independently of
the package, and serves as the reference for the imported adapters.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file

import pipelines.tlora as tl
from scripts.convert_tlora import main

from tests.tlora_testing import (
    add_random_tlora,
    assert_refused,
    read_safetensors_file,
    run_cli,
    run_script,
    run_unet,
    unet_inputs,
)

RANK, MIN_RANK, EXPONENT = 8, 3, 1.5
# the authors' projection names -> the attention module's attribute
THEIR_PROJECTIONS = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
TRAINER_TYPES = {"vanilla": "lora", "ortho": "ortho_lora"}


def hparams_for(variant: str, **changes) -> dict:
    """A training-argument dump like the authors' trainer writes (with unrelated entries, as theirs has)."""
    hparams = {
        "lora_rank": RANK,
        "min_rank": MIN_RANK,
        "alpha_rank_scale": EXPONENT,
        "trainer_type": TRAINER_TYPES[variant],
        "trainer_class": "sdxl_tlora",
        "sig_type": "last",
        "pretrained_model_name_or_path": "stabilityai/stable-diffusion-xl-base-1.0",
        "learning_rate": 1e-4,
        "argv": ["train.py", "--lora_rank", str(RANK)],
        "validation_prompts": None,
        "crop_size": (1024, 1024),  # yaml.dump writes tuples with a !!python/tuple tag
    }
    hparams.update(changes)
    return hparams


@pytest.fixture(scope="module")
def attention_shapes(tiny_sdxl_dir) -> dict[str, dict[str, tuple[int, int]]]:
    """`{attention processor name: {their projection: (in_features, out_features)}}` of the tiny UNet."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    shapes = {}
    for name in unet.attn_processors:
        attention = unet.get_submodule(name.removesuffix(".processor"))
        shapes[name] = {
            theirs: (attention.get_submodule(ours).in_features, attention.get_submodule(ours).out_features)
            for theirs, ours in THEIR_PROJECTIONS.items()
        }
    assert any(".attn1." in n for n in shapes) and any(".attn2." in n for n in shapes)
    return shapes


def official_tensors(attention_shapes, variant: str, seed: int = 0, rank: int = RANK) -> dict[str, torch.Tensor]:
    """Random (non-trivial) adapter tensors under the authors' key names."""
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape):
        return 0.1 * torch.randn(shape, generator=generator)

    tensors = {}
    for processor, projections in attention_shapes.items():
        for projection, (in_features, out_features) in projections.items():
            prefix = f"{processor}.{projection}_lora."
            if variant == "vanilla":
                tensors[prefix + "down.weight"] = normal(rank, in_features)
                tensors[prefix + "up.weight"] = normal(out_features, rank)
                continue
            for trained, frozen in (("q_layer", "base_q"), ("p_layer", "base_p")):
                shape = (rank, in_features) if trained == "q_layer" else (out_features, rank)
                tensors[f"{prefix}{trained}.weight"] = normal(*shape)
                tensors[f"{prefix}{frozen}.weight"] = normal(*shape)
            tensors[prefix + "lambda_layer"] = 1 + torch.rand((1, rank), generator=generator)
            tensors[prefix + "base_lambda"] = 1 + torch.rand((1, rank), generator=generator)
    return tensors


def write_official_run(run: Path, tensors: dict, hparams: dict | None, step: int = 100) -> Path:
    """`<run>/checkpoint-<step>/pytorch_lora_weights.safetensors` (+ `<run>/logs/hparams.yml`)."""
    checkpoint = run / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    save_file(tensors, str(checkpoint / "pytorch_lora_weights.safetensors"))
    if hparams is not None:
        (run / "logs").mkdir()
        (run / "logs" / "hparams.yml").write_text(yaml.dump(hparams))
    return checkpoint


def authors_rank(t: float, rank=RANK, min_rank=MIN_RANK, exponent=EXPONENT, total=1000) -> int:
    return int(((total - t) / total) ** exponent * (rank - min_rank)) + min_rank


def authors_mask(t: float) -> torch.Tensor:
    mask = torch.zeros((1, RANK))
    mask[:, : authors_rank(t)] = 1.0
    return mask


class ReferenceProcessor:
    """The authors' attention processor math: each projection plus `up(down(x) * mask)` (vanilla) or
    `P((Q x) * lam * mask) - P0((Q0 x) * lam0 * mask)` (ortho), scale 1, mask passed as `sigma_mask`."""

    def __init__(self, tensors: dict[str, torch.Tensor], prefix: str, variant: str):
        self.prefix, self.variant, self.tensors = prefix, variant, tensors

    def delta(self, projection: str, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        t = {k.removeprefix(f"{self.prefix}.{projection}_lora."): v for k, v in self.tensors.items()}
        if self.variant == "vanilla":
            return F.linear(F.linear(x, t["down.weight"]) * mask, t["up.weight"])
        trained = F.linear(F.linear(x, t["q_layer.weight"]) * t["lambda_layer"] * mask, t["p_layer.weight"])
        frozen = F.linear(F.linear(x, t["base_q.weight"]) * t["base_lambda"] * mask, t["base_p.weight"])
        return trained - frozen

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, sigma_mask=None):
        batch, length, _ = hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.to_q(hidden_states) + self.delta("to_q", hidden_states, sigma_mask)
        key = attn.to_k(context) + self.delta("to_k", context, sigma_mask)
        value = attn.to_v(context) + self.delta("to_v", context, sigma_mask)
        query, key, value = (attn.head_to_batch_dim(x) for x in (query, key, value))
        probabilities = attn.get_attention_scores(query, key, attention_mask)
        hidden = attn.batch_to_head_dim(torch.bmm(probabilities, value))
        return attn.to_out[1](attn.to_out[0](hidden) + self.delta("to_out", hidden, sigma_mask))


@torch.no_grad()
def unet_output(unet, timestep, **extra) -> torch.Tensor:
    return run_unet(unet, {**unet_inputs(unet), **extra}, timestep)


def import_checkpoint(tmp_path, attention_shapes, variant, capsys, **hparam_changes) -> Path:
    checkpoint = write_official_run(
        tmp_path / f"run-{variant}",
        official_tensors(attention_shapes, variant),
        hparams_for(variant, **hparam_changes),
    )
    out = tmp_path / f"imported-{variant}"
    code, _, err = run_cli(capsys, "import-official", checkpoint, out)
    assert code == 0, err
    return out


def add_scaled_tlora(unet, variant: str, seed: int) -> tl.TLoraConfig:
    """A random adapter with the test schedule and scale 0.5, which exports to scale-1 layouts fold in."""
    return add_random_tlora(
        unet,
        seed=seed,
        rank=RANK,
        min_rank=MIN_RANK,
        variant=variant,
        schedule_exponent=EXPONENT,
        lora_alpha=4.0,
        init="normal" if variant == "vanilla" else "random-last",
    )


# -------------------------------------------------------------------------------------------------------------
# import-official


@pytest.mark.parametrize("variant", ["vanilla", "ortho"])
def test_import_reproduces_the_authors_forward(tiny_pipe, tiny_sdxl_dir, attention_shapes, tmp_path, capsys, variant):
    from diffusers import UNet2DConditionModel

    tensors = official_tensors(attention_shapes, variant)
    checkpoint = write_official_run(tmp_path / "run", tensors, hparams_for(variant))
    code, out, err = run_cli(capsys, "import-official", checkpoint, tmp_path / "ours")
    assert code == 0, err
    assert "hparams.yml" in out

    _, config = tl.read_tlora_file(tmp_path / "ours" / tl.WEIGHT_NAME)
    assert (config.variant, config.rank, config.min_rank, config.schedule_exponent) == (
        variant,
        RANK,
        MIN_RANK,
        EXPONENT,
    )
    assert config.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
    assert config.base_model == "stabilityai/stable-diffusion-xl-base-1.0"
    assert config.init == ("normal" if variant == "vanilla" else "random-last")

    base = unet_output(tiny_pipe.unet, 999)
    tiny_pipe.load_tlora_weights(tmp_path / "ours")
    assert len(tl.get_tlora_adapters(tiny_pipe.unet)) == 4 * len(attention_shapes)

    reference = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet").eval()
    reference.set_attn_processor(
        {name: ReferenceProcessor(tensors, name, variant) for name in reference.attn_processors}
    )
    outputs = {}
    for t in (0, 450, 999):
        expected = unet_output(reference, t, cross_attention_kwargs={"sigma_mask": authors_mask(t)})
        outputs[t] = unet_output(tiny_pipe.unet, t)
        torch.testing.assert_close(outputs[t], expected, atol=1e-5, rtol=0)
    # the adapter does something, and something different per timestep
    assert (outputs[999] - base).abs().max() > 1e-2
    assert (outputs[0] - outputs[999]).abs().max() > 1e-3


@pytest.mark.parametrize("variant", ["vanilla", "ortho"])
def test_official_round_trip_is_bitwise(attention_shapes, tmp_path, capsys, variant):
    tensors = official_tensors(attention_shapes, variant, seed=1)
    checkpoint = write_official_run(tmp_path / "run", tensors, hparams_for(variant))
    assert (
        run_cli(capsys, "import-official", checkpoint / "pytorch_lora_weights.safetensors", tmp_path / "ours")[0] == 0
    )
    code, _, err = run_cli(
        capsys, "export-official", tmp_path / "ours" / tl.WEIGHT_NAME, tmp_path / "back", "--step", 7
    )
    assert code == 0, err

    back = load_file(str(tmp_path / "back" / "checkpoint-7" / "pytorch_lora_weights.safetensors"))
    assert back.keys() == tensors.keys()
    for key, tensor in tensors.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key
    hparams = yaml.safe_load((tmp_path / "back" / "logs" / "hparams.yml").read_text())
    original = hparams_for(variant)
    for key in ("lora_rank", "min_rank", "alpha_rank_scale", "trainer_type", "sig_type", "trainer_class"):
        assert hparams[key] == original[key], key
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back", "ours", "run"]  # no staging folders left


def test_import_without_hparams_needs_the_min_rank(attention_shapes, tmp_path, capsys):
    checkpoint = write_official_run(tmp_path / "run", official_tensors(attention_shapes, "ortho"), hparams=None)
    assert_refused(capsys, "import-official", checkpoint, tmp_path / "out", match="--min-rank")
    assert not (tmp_path / "out").exists()

    code, out, err = run_cli(
        capsys, "import-official", checkpoint, tmp_path / "out", "--min-rank", 2, "--base-model", "sdxl"
    )
    assert code == 0, err
    assert "rank 8 taken from the tensor shapes" in out and "exponent 1.0 assumed" in out
    _, config = tl.read_tlora_file(tmp_path / "out" / tl.WEIGHT_NAME)
    assert (config.rank, config.min_rank, config.schedule_exponent, config.init, config.base_model) == (
        RANK,
        2,
        1.0,
        "unknown",
        "sdxl",
    )


def test_flags_override_hparams_and_unmasked_trainer(attention_shapes, tmp_path, capsys):
    hparams = tmp_path / "elsewhere.yml"
    hparams.write_text(yaml.dump(hparams_for("vanilla", trainer_class="sdxl_lora", min_rank=1)))
    checkpoint = write_official_run(tmp_path / "run", official_tensors(attention_shapes, "vanilla"), hparams=None)

    code, out, _ = run_cli(capsys, "import-official", checkpoint, tmp_path / "a", "--hparams", hparams)
    assert code == 0 and "trains without rank masks" in out
    assert tl.read_tlora_file(tmp_path / "a" / tl.WEIGHT_NAME)[1].min_rank == RANK

    code, _, _ = run_cli(
        capsys,
        "import-official",
        checkpoint,
        tmp_path / "b",
        "--hparams",
        hparams,
        "--min-rank",
        5,
        "--schedule-exponent",
        2,
    )
    _, config = tl.read_tlora_file(tmp_path / "b" / tl.WEIGHT_NAME)
    assert code == 0 and (config.min_rank, config.schedule_exponent) == (5, 2.0)


# -------------------------------------------------------------------------------------------------------------
# export-official


def test_export_official_folds_the_scale(tmp_path, capsys):
    generator = torch.Generator().manual_seed(3)
    path = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0"
    names = ("down", "up", "lambda", "down_base", "up_base", "lambda_base")
    shapes = {"down": (4, 64), "up": (64, 4), "lambda": (4,)}
    state_dict = {
        f"{path}.tlora.{n}": torch.randn(shapes[n.removesuffix("_base")], generator=generator) for n in names
    }
    config = tl.TLoraConfig(rank=4, min_rank=2, lora_alpha=2.0, target_modules=["to_out.0"])
    tl.save_tlora_file(state_dict, config, tmp_path / "ours.safetensors")

    code, out, err = run_cli(capsys, "export-official", tmp_path / "ours.safetensors", tmp_path / "official")
    assert code == 0, err
    assert "scale 0.5" in out and "has no adapter on to_k, to_q, to_v" in out
    assert "'stabilityai/stable-diffusion-xl-base-1.0' written" in out  # the adapter names no base model
    back = load_file(str(tmp_path / "official" / "checkpoint-0" / "pytorch_lora_weights.safetensors"))
    prefix = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora."
    torch.testing.assert_close(back[prefix + "p_layer.weight"], 0.5 * state_dict[f"{path}.tlora.up"])
    torch.testing.assert_close(back[prefix + "base_p.weight"], 0.5 * state_dict[f"{path}.tlora.up_base"])
    assert torch.equal(back[prefix + "lambda_layer"], state_dict[f"{path}.tlora.lambda"].reshape(1, 4))
    assert torch.equal(back[prefix + "q_layer.weight"], state_dict[f"{path}.tlora.down"])


def test_export_official_hparams_hold_what_the_authors_inference_reads(attention_shapes, tmp_path, capsys):
    ours = import_checkpoint(tmp_path, attention_shapes, "ortho", capsys)
    out = tmp_path / "official"
    code, printed, err = run_cli(
        capsys, "export-official", ours, out, "--placeholder-token", "zwx", "--class-name", "dog"
    )
    assert code == 0, err
    hparams = yaml.safe_load((out / "logs" / "hparams.yml").read_text())
    # the keys their inference script reads from hparams.yml
    read_by_inference = {
        "output_dir": str(out.resolve()),
        "pretrained_model_name_or_path": "stabilityai/stable-diffusion-xl-base-1.0",
        "revision": None,
        "placeholder_token": "zwx",
        "class_name": "dog",
        "lora_rank": RANK,
        "min_rank": MIN_RANK,
        "alpha_rank_scale": EXPONENT,
        "trainer_type": "ortho_lora",
        "sig_type": "last",
        "trainer_class": "sdxl_tlora",
    }
    assert {key: hparams.get(key, "missing") for key in read_by_inference} == read_by_inference

    assert run_cli(capsys, "export-official", ours, tmp_path / "defaults")[0] == 0
    defaults = yaml.safe_load((tmp_path / "defaults" / "logs" / "hparams.yml").read_text())
    assert (defaults["placeholder_token"], defaults["class_name"]) == ("sks", "object")
    assert_refused(capsys, "export-official", ours, tmp_path / "x", "--class-name", " ", match="class name")


# -------------------------------------------------------------------------------------------------------------
# export-lora


@pytest.mark.parametrize(
    "variant, tool, freeze, timestep",
    [
        ("vanilla", "diffusers", "timestep", 420),
        ("vanilla", "a1111", "rank", 700),
        ("ortho", "diffusers", None, 0),  # default: full rank, the rank of timestep 0
        ("ortho", None, "timestep", 420),  # default tool: ComfyUI, kohya keys
    ],
)
def test_export_lora_equals_the_tlora_at_its_timestep(tiny_pipe, tmp_path, capsys, variant, tool, freeze, timestep):
    config = add_scaled_tlora(tiny_pipe.unet, variant, seed=5)
    tiny_pipe.save_tlora_weights(tmp_path / "tlora", tl.get_tlora_state_dict(tiny_pipe), config)
    expected = unet_output(tiny_pipe.unet, timestep)
    other_timestep = 0 if authors_rank(timestep) < RANK else 999
    tlora_elsewhere = unet_output(tiny_pipe.unet, other_timestep)
    tiny_pipe.unload_tlora_weights()

    options = {"timestep": ["--timestep", timestep], "rank": ["--rank", authors_rank(timestep)], None: []}[freeze]
    out = tmp_path / "exported"
    options += [] if tool is None else ["--for", tool]
    code, printed, err = run_cli(capsys, "export-lora", tmp_path / "tlora", out, *options)
    assert code == 0, err
    assert "approximation without timestep masking" in printed

    lora_format = "diffusers" if tool == "diffusers" else "kohya"
    lora_rank = authors_rank(timestep) * (2 if variant == "ortho" else 1)
    # diffusers finds its default name in a folder; the other tools list files by name
    name = "pytorch_lora_weights" if lora_format == "diffusers" else f"tlora_lora-rank{lora_rank}"
    assert sorted(p.name for p in out.iterdir()) == [f"{name}.safetensors"]
    assert f"{lora_format} layout, for {tool or 'comfyui'}" in printed
    weights = out / f"{name}.safetensors"
    tensors, metadata = read_safetensors_file(weights)
    record = json.loads(metadata["tlora_export"])
    assert record["rank"] == authors_rank(timestep) and "exact at timestep" in record["description"]
    down_key = next(k for k in tensors if k.endswith(("lora_A.weight", "lora_down.weight")))
    assert tensors[down_key].shape[0] == lora_rank
    if lora_format == "kohya":
        # kohya's SD-XL names: the original UNet's input/middle/output blocks, two layers per block
        for module in (
            "input_blocks_4_1_transformer_blocks_0_attn1_to_q",  # down_blocks.1.attentions.0
            "input_blocks_5_1_transformer_blocks_1_attn2_to_out_0",  # down_blocks.1.attentions.1
            "middle_block_1_transformer_blocks_0_attn2_to_k",  # mid_block.attentions.0
            "output_blocks_2_1_transformer_blocks_1_attn1_to_v",  # up_blocks.0.attentions.2
        ):
            assert f"lora_unet_{module}.lora_down.weight" in tensors and f"lora_unet_{module}.alpha" in tensors, module
    else:
        assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in tensors
    assert all(k.startswith("lora_unet_" if lora_format == "kohya" else "unet.") for k in tensors)

    assert_refused(capsys, "inspect", weights, match="exported from a T-LoRA: Standard LoRA")

    tiny_pipe.load_lora_weights(weights)
    torch.testing.assert_close(unet_output(tiny_pipe.unet, timestep), expected, atol=1e-5, rtol=0)
    # the LoRA has lost the timestep dependence: at another rank it is not the T-LoRA
    assert (unet_output(tiny_pipe.unet, other_timestep) - tlora_elsewhere).abs().max() > 1e-4


def test_kohya_names_cover_the_full_sdxl_unet():
    """Every attention projection of the real SD-XL UNet (built on the meta device: no memory) gets the name
    kohya's sd-scripts give it, listed here from the original UNet's layout."""
    from diffusers import UNet2DConditionModel

    from pipelines.tlora.lora_export import kohya_state_dict
    from scripts.make_tiny_pipeline import SDXL_BASE_UNET_CONFIG

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_BASE_UNET_CONFIG)
    paths = [
        name
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Linear) and name.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))
    ]
    frozen = {path: (torch.empty(4, 8, device="meta"), torch.empty(8, 4, device="meta")) for path in paths}
    keys = set(kohya_state_dict(frozen))

    # the original UNet: input blocks 4, 5 (2 transformer blocks each) and 7, 8 (10 each), the middle block (10),
    # output blocks 0-2 (10 each) and 3-5 (2 each); attn1 and attn2, four projections each
    blocks = {f"input_blocks_{i}_1": 2 for i in (4, 5)} | {f"input_blocks_{i}_1": 10 for i in (7, 8)}
    blocks |= {"middle_block_1": 10} | {f"output_blocks_{i}_1": 10 for i in (0, 1, 2)}
    blocks |= {f"output_blocks_{i}_1": 2 for i in (3, 4, 5)}
    modules = [
        f"lora_unet_{block}_transformer_blocks_{j}_{attention}_{projection}"
        for block, depth in blocks.items()
        for j in range(depth)
        for attention in ("attn1", "attn2")
        for projection in ("to_q", "to_k", "to_v", "to_out_0")
    ]
    assert len(modules) == 560
    assert keys == {f"{m}.{suffix}" for m in modules for suffix in ("lora_down.weight", "lora_up.weight", "alpha")}


# -------------------------------------------------------------------------------------------------------------
# export-comfyui


def node_rank(t: float, settings: dict) -> int:
    """The ComfyUI T-LoRA node's active rank at timestep t for its input settings."""
    progress = (settings["max_timestep"] - t) / settings["max_timestep"]
    return int(progress ** settings["alpha"] * (settings["max_rank"] - settings["min_rank"])) + settings["min_rank"]


@pytest.mark.parametrize("variant", ["vanilla", "ortho"])
def test_comfyui_node_export_reproduces_the_tlora(
    tiny_pipe, tiny_sdxl_dir, attention_shapes, tmp_path, capsys, variant
):
    from diffusers import UNet2DConditionModel

    config = add_scaled_tlora(tiny_pipe.unet, variant, seed=7)
    tiny_pipe.save_tlora_weights(tmp_path / "dog", tl.get_tlora_state_dict(tiny_pipe), config)
    expected = {t: unet_output(tiny_pipe.unet, t) for t in (0, 450, 999)}

    code, printed, err = run_cli(capsys, "export-comfyui", tmp_path / "dog", tmp_path / "loras")
    assert code == 0, err
    name = f"dog_tlora-node_{variant}_r{RANK}-min{MIN_RANK}.safetensors"
    assert sorted(p.name for p in (tmp_path / "loras").iterdir()) == [name]
    settings = {"strength_model": 1.0, "max_rank": RANK, "min_rank": MIN_RANK, "alpha": EXPONENT, "max_timestep": 1000}
    assert "'Load T-LoRA (Bypass)'" in printed
    assert "max_rank 8, min_rank 3, alpha 1.5, max_timestep 1000" in printed

    tensors, metadata = read_safetensors_file(tmp_path / "loras" / name)
    record = json.loads(metadata["tlora_comfyui_node"])
    assert "tlora_config" not in metadata  # not a file of this package's own format
    assert record["node"] == "Load T-LoRA (Bypass)" and record["settings"] == settings
    parameters = {
        "vanilla": ("down.weight", "up.weight"),
        "ortho": ("q_layer.weight", "p_layer.weight", "lambda_layer", "base_q.weight", "base_p.weight", "base_lambda"),
    }[variant]
    assert tensors.keys() == {
        f"{processor}.{projection}_lora.{parameter}"
        for processor in attention_shapes
        for projection in THEIR_PROJECTIONS
        for parameter in parameters
    }

    # the node's schedule with these settings is the adapter's, at every integer timestep
    assert all(node_rank(t, settings) == authors_rank(t) for t in range(1000))
    reference = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet").eval()
    reference.set_attn_processor(
        {name: ReferenceProcessor(tensors, name, variant) for name in reference.attn_processors}
    )
    for t, output in expected.items():
        mask = torch.zeros((1, RANK))
        mask[:, : node_rank(t, settings)] = 1.0
        reached = unet_output(reference, t, cross_attention_kwargs={"sigma_mask": mask})
        torch.testing.assert_close(reached, output, atol=1e-5, rtol=0)


def test_comfyui_exports_a_loader_cannot_represent_are_refused(tiny_pipe, tmp_path, capsys):
    for variant in ("ortho", "vanilla"):
        config = add_random_tlora(tiny_pipe.unet, rank=4, min_rank=2, variant=variant, adapter_name=variant)
        state_dict = tl.get_tlora_state_dict(tiny_pipe, variant)
        tiny_pipe.save_tlora_weights(tmp_path / variant, state_dict, config)
    err = assert_refused(
        capsys, "export-comfyui", tmp_path / "ortho", tmp_path / "out", "--loader", "stock", match="stock LoraLoader"
    )
    assert "export-lora --for comfyui" in err and "'Load T-LoRA (Bypass)'" in err
    assert not (tmp_path / "out").exists()

    code, printed, err = run_cli(capsys, "export-comfyui", tmp_path / "vanilla", tmp_path / "out", "--loader", "stock")
    assert code == 0, err
    assert "reads this file as a standard LoRA without masks" in printed and "exact at timestep 0 only" in printed

    flat = tl.TLoraConfig(rank=4, min_rank=2, variant="vanilla", schedule_exponent=0.0)
    tl.save_tlora_file(tl.get_tlora_state_dict(tiny_pipe, "vanilla"), flat, tmp_path / "flat.safetensors")
    assert_refused(
        capsys, "export-comfyui", tmp_path / "flat.safetensors", tmp_path / "out", match="outside the node's alpha"
    )


# -------------------------------------------------------------------------------------------------------------
# inspect


def test_inspect_both_layouts(attention_shapes, tmp_path, capsys):
    ours = import_checkpoint(tmp_path, attention_shapes, "ortho", capsys)
    code, out, err = run_cli(capsys, "inspect", ours)
    assert code == 0, err
    expected_ranks = ", ".join(f"t={t}: {authors_rank(t)}" for t in (0, 250, 500, 750, 999))
    for line in (
        "layout: T-LoRA (this package)",
        "variant: ortho",
        f"rank: {RANK}, min_rank: {MIN_RANK}",
        "base model: stabilityai/stable-diffusion-xl-base-1.0",
        "target modules: to_q, to_k, to_v, to_out.0",
        f"adapted modules: {4 * len(attention_shapes)}",
        f"rank by timestep: {expected_ranks}",
    ):
        assert line in out, (line, out)
    trained = sum(
        t.numel() for k, t in tl.read_tlora_file(ours / tl.WEIGHT_NAME)[0].items() if not k.endswith("_base")
    )
    assert f"parameters: {trained:,} trained, {trained:,} frozen" in out
    # import-official wrote the loader files; without them, inspect says how to add them
    assert f"loader files: pipeline.py and tlora_*.py, written by pipelines.tlora {tl.__version__}" in out
    (ours / "pipeline.py").unlink()
    code, out, _ = run_cli(capsys, "inspect", ours)
    assert code == 0 and "loader files: none (diffusers alone cannot load this folder); add them with" in out

    code, out, _ = run_cli(capsys, "inspect", tmp_path / "run-ortho" / "checkpoint-100")
    assert code == 0 and "layout: T-LoRA authors' checkpoint" in out and f"rank by timestep: {expected_ranks}" in out

    bare = write_official_run(tmp_path / "bare", official_tensors(attention_shapes, "vanilla"), hparams=None)
    code, out, _ = run_cli(capsys, "inspect", bare / "pytorch_lora_weights.safetensors")
    assert code == 0 and "schedule unknown" in out and "--min-rank" in out and "rank by timestep" not in out


def test_cli_runs_as_a_script(attention_shapes, tmp_path, capsys):
    ours = import_checkpoint(tmp_path, attention_shapes, "vanilla", capsys)
    result = run_script("scripts/convert_tlora.py", "inspect", ours / tl.WEIGHT_NAME, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "variant: vanilla" in result.stdout and f"rank: {RANK}, min_rank: {MIN_RANK}" in result.stdout


# -------------------------------------------------------------------------------------------------------------
# bad input


def test_unknown_layouts_are_named(tmp_path, capsys):
    save_file({"model.layer.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    save_file({"unet.a.lora_A.weight": torch.zeros(2, 2)}, str(tmp_path / "lora.safetensors"))
    (tmp_path / "empty").mkdir()
    for command in ("import-official", "inspect"):
        extra = [tmp_path / f"out-{command}"] if command == "import-official" else []
        assert_refused(capsys, command, tmp_path / "other.safetensors", *extra, match="Known layouts")
        assert_refused(capsys, command, tmp_path / "lora.safetensors", *extra, match="standard LoRA")
        assert_refused(capsys, command, tmp_path / "empty", *extra, match="Known layouts")
    assert_refused(capsys, "export-lora", tmp_path / "empty", tmp_path / "x", match="Known layouts")
    assert_refused(capsys, "import-official", tmp_path / "missing", tmp_path / "y", match="No such checkpoint")
    assert not any((tmp_path / name).exists() for name in ("out-import-official", "x", "y"))


def test_training_run_folder_lists_its_checkpoints(attention_shapes, tmp_path, capsys):
    run = tmp_path / "run"
    tensors = official_tensors(attention_shapes, "vanilla")
    write_official_run(run, tensors, hparams_for("vanilla"), step=800)
    (run / "checkpoint-200").mkdir()
    assert_refused(capsys, "import-official", run, tmp_path / "out", match="checkpoint-200, checkpoint-800")


def test_contradicting_variant_is_refused(attention_shapes, tmp_path, capsys):
    checkpoint = write_official_run(
        tmp_path / "run", official_tensors(attention_shapes, "ortho"), hparams_for("ortho", trainer_type="lora")
    )
    assert_refused(capsys, "import-official", checkpoint, tmp_path / "out", match="hold ortho factors")
    clean = write_official_run(tmp_path / "run2", official_tensors(attention_shapes, "ortho"), hparams_for("ortho"))
    assert_refused(
        capsys, "import-official", clean, tmp_path / "out", "--variant", "vanilla", match="hold ortho factors"
    )
    assert not (tmp_path / "out").exists()


def test_inconsistent_shapes_are_refused(attention_shapes, tmp_path, capsys):
    tensors = official_tensors(attention_shapes, "vanilla")
    key = next(k for k in tensors if k.endswith("to_v_lora.up.weight"))
    tensors[key] = tensors[key][:, :-1].clone()
    checkpoint = write_official_run(tmp_path / "run", tensors, hparams_for("vanilla"))
    assert_refused(capsys, "import-official", checkpoint, tmp_path / "out", match="not the factors of one")

    wider = write_official_run(
        tmp_path / "run2", official_tensors(attention_shapes, "vanilla"), hparams_for("vanilla")
    )
    assert_refused(capsys, "import-official", wider, tmp_path / "out", "--rank", 16, match="has rank 8, but rank 16")

    lam = official_tensors(attention_shapes, "ortho")
    lam[next(k for k in lam if k.endswith("lambda_layer"))] = torch.ones(RANK)
    flat = write_official_run(tmp_path / "run3", lam, hparams_for("ortho"))
    assert_refused(capsys, "import-official", flat, tmp_path / "out", match="(1, R)")
    assert not (tmp_path / "out").exists()


def test_bad_hparams_are_refused(attention_shapes, tmp_path, capsys):
    checkpoint = write_official_run(
        tmp_path / "run", official_tensors(attention_shapes, "vanilla"), hparams_for("vanilla")
    )
    hparams = tmp_path / "run" / "logs" / "hparams.yml"
    hparams.write_text("- just\n- a list\n")
    assert_refused(capsys, "import-official", checkpoint, tmp_path / "out", match="must be a mapping")
    hparams.write_text("lora_rank: [unclosed\n")
    assert_refused(capsys, "import-official", checkpoint, tmp_path / "out", match="not valid YAML")
    hparams.write_text(yaml.dump(hparams_for("vanilla", min_rank="three")))
    assert_refused(capsys, "import-official", checkpoint, tmp_path / "out", match="`min_rank` must be int")
    hparams.write_text(yaml.dump(hparams_for("vanilla", trainer_type="tucker_lora")))
    assert_refused(capsys, "import-official", checkpoint, tmp_path / "out", match="unknown trainer_type")


def test_pickle_files_are_refused(attention_shapes, tmp_path, capsys):
    torch.save({"a": torch.zeros(1)}, tmp_path / "pytorch_lora_weights.bin")
    assert_refused(capsys, "import-official", tmp_path / "pytorch_lora_weights.bin", tmp_path / "o", match="pickle")
    assert_refused(capsys, "import-official", tmp_path, tmp_path / "o", match="pickle")
    assert_refused(capsys, "inspect", tmp_path / "pytorch_lora_weights.bin", match="pickle")
    assert_refused(capsys, "export-lora", tmp_path / "adapter.pt", tmp_path / "o", match="pickle")
    assert_refused(capsys, "export-official", tmp_path / "adapter.ckpt", tmp_path / "o", match="pickle")
    assert not (tmp_path / "o").exists()


def test_existing_outputs_are_kept_unless_overwrite(attention_shapes, tmp_path, capsys):
    ours = import_checkpoint(tmp_path, attention_shapes, "vanilla", capsys)
    checkpoint = tmp_path / "run-vanilla" / "checkpoint-100"
    before = (ours / tl.WEIGHT_NAME).read_bytes()
    assert_refused(capsys, "import-official", checkpoint, ours, match="--overwrite")
    assert run_cli(capsys, "import-official", checkpoint, ours, "--overwrite", "--min-rank", 4)[0] == 0
    assert (ours / tl.WEIGHT_NAME).read_bytes() != before

    (tmp_path / "lora.safetensors").write_bytes(b"keep")
    assert_refused(capsys, "export-lora", ours, tmp_path / "lora.safetensors", match="--overwrite")
    assert (tmp_path / "lora.safetensors").read_bytes() == b"keep"
    assert run_cli(capsys, "export-lora", ours, tmp_path / "lora.safetensors", "--overwrite")[0] == 0

    official = tmp_path / "official"
    (official / "logs").mkdir(parents=True)
    (official / "logs" / "hparams.yml").write_text("keep: 1\n")
    assert_refused(capsys, "export-official", ours, official, match="--overwrite")
    assert sorted(p.name for p in official.iterdir()) == ["logs"]
    assert (official / "logs" / "hparams.yml").read_text() == "keep: 1\n"
    assert run_cli(capsys, "export-official", ours, official, "--overwrite")[0] == 0
    assert yaml.safe_load((official / "logs" / "hparams.yml").read_text())["min_rank"] == 4
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]  # no temporary files left behind


def test_export_lora_rejects_bad_ranks_and_timesteps(attention_shapes, tmp_path, capsys):
    ours = import_checkpoint(tmp_path, attention_shapes, "vanilla", capsys)
    assert_refused(capsys, "export-lora", ours, tmp_path / "a", "--rank", RANK + 1, match="ranks are 1..8")
    assert_refused(capsys, "export-lora", ours, tmp_path / "a", "--timestep", 1001, match="outside the schedule")
    assert_refused(capsys, "import-official", ours / tl.WEIGHT_NAME, tmp_path / "a", match="already a T-LoRA file")
    assert not (tmp_path / "a").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["export-lora", str(ours), str(tmp_path / "a"), "--rank", "2", "--timestep", "5"])
    assert exit_info.value.code == 2


def test_outputs_get_the_usual_modes(attention_shapes, tmp_path, capsys):
    previous = os.umask(0o022)
    try:
        ours = import_checkpoint(tmp_path, attention_shapes, "vanilla", capsys)
        stale = tmp_path / ".official.0a1b2c.tmp"  # a staging folder a killed export left behind
        stale.mkdir()
        assert run_cli(capsys, "export-official", ours, tmp_path / "official")[0] == 0
    finally:
        os.umask(previous)
    assert stat.S_IMODE((ours / tl.WEIGHT_NAME).stat().st_mode) == 0o644
    for path in (tmp_path / "official", tmp_path / "official" / "logs"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o755, path
    assert stat.S_IMODE((tmp_path / "official" / "logs" / "hparams.yml").stat().st_mode) == 0o644
    assert not stale.exists()


def test_a_folder_with_both_layouts_is_refused_naming_both(attention_shapes, tmp_path, capsys):
    ours = import_checkpoint(tmp_path, attention_shapes, "vanilla", capsys)
    checkpoint = tmp_path / "run-vanilla" / "checkpoint-100"
    shutil.copy(ours / tl.WEIGHT_NAME, checkpoint / tl.WEIGHT_NAME)
    commands = (["inspect"], ["export-lora", tmp_path / "x"], ["import-official", tmp_path / "y"])
    for command in ([name, checkpoint, *rest] for name, *rest in commands):
        assert_refused(
            capsys,
            *command,
            match="holds both pytorch_tlora_weights.safetensors (this package's T-LoRA) and "
            "pytorch_lora_weights.safetensors",
        )
    assert run_cli(capsys, "inspect", checkpoint / tl.WEIGHT_NAME)[0] == 0


def test_paths_may_start_with_a_tilde_and_never_be_empty(attention_shapes, tmp_path, capsys, monkeypatch):
    ours = import_checkpoint(tmp_path, attention_shapes, "vanilla", capsys)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert run_cli(capsys, "export-lora", f"~/{ours.name}", "~/lora-out")[0] == 0
    assert len(list((tmp_path / "lora-out").glob("*.safetensors"))) == 1
    for argv in (["inspect", ""], ["export-lora", ours, ""]):
        with pytest.raises(SystemExit) as stopped:
            main([str(part) for part in argv])
        assert stopped.value.code == 2
        assert "must not be empty" in capsys.readouterr().err
