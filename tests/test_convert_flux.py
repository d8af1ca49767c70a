"""Conversion of FLUX.1 adapters: the T-LoRA authors' FLUX checkpoints (`lora.pt` + `hparams.yml`), standard
diffusers FLUX LoRAs and `inspect`.

The authors' checkpoints are built here from their documented layout for every block of the tiny FLUX fixture:
14 tensors per block, the single-stream blocks' four never-applied adapters with `up = 0`, saved with `torch.save`
as their trainer does. The reference for the imported adapters is their forward math written out below: each
adapted projection's weight plus `up[:, :r] @ down[:r]`, with r = floor((T - t) (R - r_min) / T) + r_min for the
scheduler timestep t = 1000 * sigma, run through the plain transformer.
"""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import pipelines.tlora as tl

from tests.tlora_testing import add_random_tlora, assert_refused, flux_inputs, run_cli

RANK, MIN_RANK = 8, 3
BASE_MODEL = "black-forest-labs/FLUX.1-dev"
THEIR_PROJECTIONS = {
    "to_q": "to_q",
    "to_k": "to_k",
    "to_v": "to_v",
    "to_out": "to_out.0",
    "to_q_proj": "add_q_proj",
    "to_k_proj": "add_k_proj",
    "to_v_proj": "add_v_proj",
}
SINGLE_BLOCK_APPLIED = ("to_q", "to_k", "to_v")
# sigmas whose 1000-fold is exact in float32, so the authors' integer t and the pipeline's sigma agree
SIGMAS = (1.0, 0.75, 0.5, 0.25, 0.0)


@pytest.fixture(scope="module")
def flux_transformer(tiny_flux_dir):
    """The tiny FLUX fixture's transformer, never modified: tests adapt copies or a fresh `tiny_flux_pipe`."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(tiny_flux_dir, subfolder="transformer").eval()


def blocks(transformer) -> list[tuple[str, int]]:
    return [("transformer_blocks", i) for i in range(len(transformer.transformer_blocks))] + [
        ("single_transformer_blocks", j) for j in range(len(transformer.single_transformer_blocks))
    ]


def authors_tensors(transformer, seed: int = 0, rank: int = RANK) -> dict[str, torch.Tensor]:
    """A trained-looking authors' checkpoint: random factors, and `up = 0` on the adapters never applied."""
    generator = torch.Generator().manual_seed(seed)
    hidden = transformer.inner_dim
    tensors = {}
    for kind, index in blocks(transformer):
        for projection in THEIR_PROJECTIONS:
            prefix = f"{kind}.{index}.attn.processor.{projection}_lora."
            applied = kind == "transformer_blocks" or projection in SINGLE_BLOCK_APPLIED
            tensors[prefix + "down.weight"] = torch.randn((rank, hidden), generator=generator) / rank
            up = 0.1 * torch.randn((hidden, rank), generator=generator)
            tensors[prefix + "up.weight"] = up if applied else torch.zeros_like(up)
    return tensors


def authors_hparams(**changes) -> dict:
    hparams = {
        "tlora": True,
        "rank": RANK,
        "min_rank": MIN_RANK,
        "pretrained_model_name_or_path": BASE_MODEL,
        "learning_rate": 1.0,
        "optimizer": "prodigy",
        "placeholder_token": "sks",
    }
    hparams.update(changes)
    return {key: value for key, value in hparams.items() if value is not None}


def write_authors_run(run: Path, tensors, hparams: dict | None, step: int = 500) -> Path:
    """`<run>/checkpoint-<step>/lora.pt` (saved as their trainer does, with torch.save) + `<run>/logs/hparams.yml`."""
    checkpoint = run / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    torch.save(tensors, checkpoint / "lora.pt")
    if hparams is not None:
        (run / "logs").mkdir()
        (run / "logs" / "hparams.yml").write_text(yaml.safe_dump(hparams))
    return checkpoint


def authors_rank(t: float, rank: int = RANK, min_rank: int = MIN_RANK) -> int:
    return int((1000 - t) * (rank - min_rank) / 1000) + min_rank


@torch.no_grad()
def transformer_output(transformer, sigma: float, batch: int = 2) -> torch.Tensor:
    inputs = flux_inputs(transformer, batch)
    return transformer(**inputs, timestep=torch.full((batch,), sigma), return_dict=False)[0]


@torch.no_grad()
def authors_output(transformer, tensors: dict, sigma: float, active_rank: int) -> torch.Tensor:
    """The authors' forward: every applied adapter merged into its projection at `active_rank` components."""
    merged = copy.deepcopy(transformer)
    for kind, index in blocks(merged):
        attention = getattr(merged, kind)[index].attn
        for theirs, ours in THEIR_PROJECTIONS.items():
            if kind == "single_transformer_blocks" and theirs not in SINGLE_BLOCK_APPLIED:
                continue
            prefix = f"{kind}.{index}.attn.processor.{theirs}_lora."
            down, up = tensors[prefix + "down.weight"], tensors[prefix + "up.weight"]
            attention.get_submodule(ours).weight += up[:, :active_rank] @ down[:active_rank]
    return transformer_output(merged, sigma)


def import_run(tmp_path, capsys, tensors, hparams, name="run") -> Path:
    checkpoint = write_authors_run(tmp_path / name, tensors, hparams)
    out = tmp_path / f"{name}-imported"
    code, printed, err = run_cli(capsys, "import-official", checkpoint, out)
    assert code == 0, err
    return out


# -------------------------------------------------------------------------------------------------------------
# import-official


@pytest.mark.parametrize("masked", [True, False], ids=["tlora", "unmasked"])
def test_import_reproduces_the_authors_flux_forward(flux_transformer, tiny_flux_pipe, tmp_path, capsys, masked):
    tensors = authors_tensors(flux_transformer)
    checkpoint = write_authors_run(tmp_path / "run", tensors, authors_hparams(tlora=masked))
    code, printed, err = run_cli(capsys, "import-official", checkpoint, tmp_path / "ours")
    assert code == 0, err
    single_blocks = len(flux_transformer.single_transformer_blocks)
    assert f"{4 * single_blocks} single-stream-block adapters that the authors' processors never apply" in printed

    state_dict, config = tl.read_tlora_file(tmp_path / "ours" / tl.WEIGHT_NAME)
    expected_min_rank = MIN_RANK if masked else RANK
    assert (config.model_family, config.variant, config.rank, config.min_rank) == (
        "flux",
        "vanilla",
        RANK,
        expected_min_rank,
    )
    assert (config.schedule_exponent, config.num_train_timesteps, config.lora_alpha) == (1.0, 1000, None)
    assert config.target_modules == ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj"]
    assert config.base_model == BASE_MODEL
    assert all(key.startswith("transformer.") for key in state_dict)
    adapted = 7 * len(flux_transformer.transformer_blocks) + 3 * single_blocks
    assert len(state_dict) == 2 * adapted

    transformer = tiny_flux_pipe.transformer
    tiny_flux_pipe.load_tlora_weights(tmp_path / "ours")
    assert len(tl.get_tlora_adapters(transformer)) == adapted
    outputs = {}
    for sigma in SIGMAS:
        active_rank = authors_rank(1000 * sigma) if masked else RANK
        outputs[sigma] = transformer_output(transformer, sigma)
        torch.testing.assert_close(
            outputs[sigma], authors_output(flux_transformer, tensors, sigma, active_rank), atol=1e-5, rtol=0
        )
    # the adapter does something, and, when masked, something different per timestep
    assert (outputs[1.0] - transformer_output(flux_transformer, 1.0)).abs().max() > 1e-3
    assert ((outputs[1.0] - authors_output(flux_transformer, tensors, 1.0, RANK)).abs().max() > 1e-4) == masked


@pytest.mark.parametrize("masked", [True, False], ids=["tlora", "unmasked"])
def test_flux_official_round_trip_is_bitwise(flux_transformer, tmp_path, capsys, masked):
    tensors = authors_tensors(flux_transformer, seed=1)
    ours = import_run(tmp_path, capsys, tensors, authors_hparams(tlora=masked))
    code, printed, err = run_cli(capsys, "export-official", ours, tmp_path / "back", "--step", 9)
    assert code == 0, err
    assert "lora.safetensors" in printed and not list((tmp_path / "back").rglob("*.pt"))

    back = load_file(str(tmp_path / "back" / "checkpoint-9" / "lora.safetensors"))
    assert back.keys() == tensors.keys()  # all 14 per block, as the authors' strict loader needs
    for key, tensor in tensors.items():
        if ".single_transformer_blocks." in f".{key}" and not key.split(".processor.")[1].startswith(
            tuple(f"{p}_lora" for p in SINGLE_BLOCK_APPLIED)
        ):
            assert not back[key].any(), key  # never applied: written as zeros
        else:
            assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key
    hparams = yaml.safe_load((tmp_path / "back" / "logs" / "hparams.yml").read_text())
    assert hparams == {
        "tlora": masked,
        "rank": RANK,
        "min_rank": MIN_RANK if masked else RANK,
        "pretrained_model_name_or_path": BASE_MODEL,
    }

    code, _, err = run_cli(capsys, "import-official", tmp_path / "back" / "checkpoint-9", tmp_path / "again")
    assert code == 0, err
    first, first_config = tl.read_tlora_file(ours / tl.WEIGHT_NAME)
    again, again_config = tl.read_tlora_file(tmp_path / "again" / tl.WEIGHT_NAME)
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert again_config == first_config


def test_export_official_of_a_trained_flux_adapter(flux_transformer, tmp_path, capsys):
    """An adapter trained here (scale lora_alpha / R) exported for the authors' code computes the same update."""
    transformer = copy.deepcopy(flux_transformer)
    config = add_random_tlora(transformer, seed=3, rank=RANK, min_rank=MIN_RANK, lora_alpha=4.0, base_model=BASE_MODEL)
    tl.save_tlora_file(tl.get_tlora_state_dict(transformer), config, tmp_path / "ours.safetensors")

    code, printed, err = run_cli(capsys, "export-official", tmp_path / "ours.safetensors", tmp_path / "theirs")
    assert code == 0, err
    assert "scale 0.5" in printed
    exported = load_file(str(tmp_path / "theirs" / "checkpoint-0" / "lora.safetensors"))
    assert len(exported) == 14 * len(blocks(transformer))
    for sigma in (1.0, 0.5, 0.0):
        torch.testing.assert_close(
            authors_output(flux_transformer, exported, sigma, authors_rank(1000 * sigma)),
            transformer_output(transformer, sigma),
            atol=1e-5,
            rtol=0,
        )


# -------------------------------------------------------------------------------------------------------------
# export-lora, inspect


def test_export_lora_for_flux_loads_in_the_stock_pipeline(flux_transformer, tiny_flux_pipe, tmp_path, capsys):
    transformer = copy.deepcopy(flux_transformer)
    config = add_random_tlora(transformer, seed=5, rank=RANK, min_rank=MIN_RANK, lora_alpha=16.0)
    tl.save_tlora_file(tl.get_tlora_state_dict(transformer), config, tmp_path / "ours.safetensors")
    sigma = 0.5
    expected = transformer_output(transformer, sigma)
    elsewhere = transformer_output(transformer, 1.0)

    code, printed, err = run_cli(
        capsys, "export-lora", tmp_path / "ours.safetensors", tmp_path / "lora", "--timestep", 1000 * sigma
    )
    assert code == 0, err
    keys = load_file(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors")).keys()
    assert "transformer.transformer_blocks.0.attn.add_k_proj.lora_A.weight" in keys
    assert all(key.startswith("transformer.") for key in keys)

    base = tiny_flux_pipe.transformer
    tiny_flux_pipe.load_lora_weights(tmp_path / "lora")
    torch.testing.assert_close(transformer_output(base, sigma), expected, atol=1e-5, rtol=0)
    assert (transformer_output(base, 1.0) - elsewhere).abs().max() > 1e-4  # the timestep dependence is gone

    for tool in ("kohya", "comfyui"):  # the kohya layout names SD-XL modules
        assert_refused(
            capsys,
            "export-lora",
            tmp_path / "ours.safetensors",
            tmp_path / "k",
            "--for",
            tool,
            match="--for diffusers",
        )


def test_inspect_knows_the_flux_family(flux_transformer, tmp_path, capsys):
    ours = import_run(tmp_path, capsys, authors_tensors(flux_transformer), authors_hparams())
    expected_ranks = ", ".join(f"t={t}: {authors_rank(t)}" for t in (0, 250, 500, 750, 999))
    for path in (ours, tmp_path / "run" / "checkpoint-500", tmp_path / "run" / "checkpoint-500" / "lora.pt"):
        code, out, err = run_cli(capsys, "inspect", path)
        assert code == 0, err
        assert "model family: FLUX.1 (FluxTransformer2DModel)" in out, out
        assert f"rank by timestep: {expected_ranks}" in out and "variant: vanilla" in out


# -------------------------------------------------------------------------------------------------------------
# bad input


class NotATensor:
    """Pickled by reference to this test module: loading it needs code, which weights-only unpickling refuses."""


def _tensors_with(change):
    def build(transformer):
        tensors = authors_tensors(transformer)
        change(tensors)
        return tensors

    return build


def _first_key(tensors, ending="down.weight"):
    return next(k for k in tensors if k.endswith(ending))


BAD_CHECKPOINTS = [
    # (case, build tensors or None for the default, hparams changes, expected message)
    (
        "custom class",
        _tensors_with(lambda t: t.update(extra=NotATensor())),
        {},
        f"needs more than weights-only unpickling (it holds a {NotATensor.__module__}.NotATensor object)",
    ),
    ("non-tensor value", _tensors_with(lambda t: t.update(step=3)), {}, "are not named tensors"),
    (
        "unknown key",
        _tensors_with(
            lambda t: t.update({"transformer_blocks.0.attn.processor.to_x_lora.down.weight": torch.zeros(RANK, 32)})
        ),
        {},
        "Unexpected key",
    ),
    (
        "rank contradicts hparams",
        _tensors_with(
            lambda t: t.update(
                {k: v[:4] for k, v in t.items() if k.endswith("down.weight")}
                | {k: v[:, :4] for k, v in t.items() if k.endswith("up.weight")}
            )
        ),
        {},
        f"but rank {RANK}",
    ),
    (
        "factors do not pair",
        _tensors_with(lambda t: t.update({_first_key(t): torch.zeros(RANK - 1, 32)})),
        {},
        "are not the factors of one low-rank product",
    ),
    ("no rank", None, {"rank": None}, "has no `rank`"),
    ("no min_rank", None, {"min_rank": None}, "has no `min_rank`"),
    ("tlora not a bool", None, {"tlora": "yes"}, "`tlora` must be true or false"),
    ("min_rank above rank", None, {"min_rank": RANK + 1}, "must not exceed"),
]


@pytest.mark.parametrize("case, build, hparams, message", BAD_CHECKPOINTS, ids=[c[0] for c in BAD_CHECKPOINTS])
def test_bad_flux_checkpoints_are_refused(flux_transformer, tmp_path, capsys, case, build, hparams, message):
    tensors = authors_tensors(flux_transformer) if build is None else build(flux_transformer)
    checkpoint = write_authors_run(tmp_path / "run", tensors, authors_hparams(**hparams))
    assert_refused(capsys, "import-official", checkpoint, tmp_path / "out", match=message)
    assert_refused(capsys, "import-official", checkpoint / "lora.pt", tmp_path / "out", match=message)
    assert not (tmp_path / "out").exists()


def test_damaged_and_misplaced_flux_files_are_refused(flux_transformer, tiny_flux_pipe, tmp_path, capsys):
    checkpoint = write_authors_run(tmp_path / "run", authors_tensors(flux_transformer), authors_hparams())
    weights = checkpoint / "lora.pt"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert_refused(capsys, "import-official", checkpoint, tmp_path / "out", match="truncated or damaged")

    # a classic pickle stream (not torch's zip format) holding code is refused unread
    weights.write_bytes(pickle.dumps({"a": NotATensor()}))
    assert_refused(capsys, "import-official", checkpoint, tmp_path / "out", match="pickle, which is never read")

    # the authors' lora.pt is converted, never loaded as an adapter
    with pytest.raises(tl.TLoraFileError, match="import-official"):
        tiny_flux_pipe.load_tlora_weights(weights)


def test_foreign_families_are_refused(flux_transformer, tiny_flux_pipe, tmp_path, capsys):
    # an SD-XL (UNet) checkpoint of the authors, imported, does not go into a FLUX transformer
    unet_attention = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor"
    sdxl = {
        f"{unet_attention}.{p}_lora.{param}": torch.randn(shape)
        for p in ("to_q", "to_k", "to_v", "to_out")
        for param, shape in (("down.weight", (4, 32)), ("up.weight", (32, 4)))
    }
    run = tmp_path / "sdxl-run" / "checkpoint-1"
    run.mkdir(parents=True)
    save_file(sdxl, str(run / "pytorch_lora_weights.safetensors"))
    code, _, err = run_cli(capsys, "import-official", run, tmp_path / "sdxl", "--min-rank", 2)
    assert code == 0, err
    transformer = tiny_flux_pipe.transformer
    with pytest.raises(tl.TLoraFileError, match="for a `unet`.*has a `transformer`"):
        tiny_flux_pipe.load_tlora_weights(tmp_path / "sdxl")
    assert torch.equal(transformer_output(transformer, 0.5), transformer_output(flux_transformer, 0.5))

    # an ortho FLUX adapter has no place in the authors' FLUX code
    config = tl.TLoraConfig.for_family("flux", rank=4, min_rank=2, variant="ortho", init="random-last")
    tl.inject_tlora(transformer, config, generator=torch.Generator().manual_seed(0))
    tl.save_tlora_file(tl.get_tlora_state_dict(transformer), config, tmp_path / "ortho.safetensors")
    assert_refused(capsys, "export-official", tmp_path / "ortho.safetensors", tmp_path / "o", match="plain LoRA")
