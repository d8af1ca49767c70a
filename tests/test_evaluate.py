"""Tests for scripts/evaluate.py and scripts/eval_metrics.py: metric functions, prompt sets, adapters,
an end-to-end run on the tiny SD-XL with tiny random CLIP and DINO models, resuming and bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from scripts import evaluate
from scripts.eval_metrics import MASK_FILL, apply_mask, cosine_matrix, image_similarity, text_similarity

from tests.tlora_testing import run_script

TINY_VISION = dict(
    image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4
)
CONCEPT = "sks dog"
USER_PROMPTS = {
    "base_prompt": "a photo of {}",
    "num_complex": 1,
    "mine": ["a red {}", "a {} wearing a hat on the beach at sunset"],
}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """A tiny random CLIPModel with the tiny SD-XL's tokenizer and a 32 px image processor."""
    from transformers import CLIPConfig, CLIPModel

    from scripts.tiny_tokenizers import CLIP_EOS_TOKEN, CLIP_MAX_LENGTH, build_clip_tokenizer

    folder = tmp_path_factory.mktemp("tiny-clip")
    tokenizer = build_clip_tokenizer(pad_token=CLIP_EOS_TOKEN)
    text_config = dict(
        vocab_size=len(tokenizer),
        max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{k: v for k, v in TINY_VISION.items() if k not in ("image_size", "patch_size")},
    )
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text_config, vision_config=TINY_VISION, projection_dim=16)).save_pretrained(
        folder
    )
    tokenizer.save_pretrained(folder)
    # Written as JSON so that the test does not depend on which image processor class transformers picks.
    processor = {
        "image_processor_type": "CLIPImageProcessor",
        "size": {"shortest_edge": 32},
        "crop_size": {"height": 32, "width": 32},
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return folder


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory) -> Path:
    """A tiny random ViTModel (the architecture of facebook/dino-vits16) with a 32 px image processor."""
    from transformers import ViTConfig, ViTModel

    folder = tmp_path_factory.mktemp("tiny-dino")
    torch.manual_seed(1)
    ViTModel(ViTConfig(**TINY_VISION)).save_pretrained(folder)
    processor = {"image_processor_type": "ViTImageProcessor", "size": {"height": 32, "width": 32}}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return folder


@pytest.fixture(scope="module")
def adapter_files(tiny_sdxl_dir, tmp_path_factory) -> dict[str, Path]:
    """A T-LoRA adapter, a standard (PEFT) LoRA, and a T-LoRA file with one tensor of the wrong shape."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    import pipelines.tlora as tl

    root = tmp_path_factory.mktemp("adapters")
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet").requires_grad_(False)
    config = tl.TLoraConfig(rank=4, min_rank=2)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for adapter in tl.inject_tlora(unet, config, generator=generator).values():
            adapter.up.add_(0.5 * torch.randn(adapter.up.shape, generator=generator))
    state_dict = tl.get_tlora_state_dict(unet)
    files = {"tlora": tl.save_tlora_weights(root / "dog-tlora", state_dict, config)}

    key = next(k for k in state_dict if k.endswith(".tlora.down"))
    wrong = dict(state_dict, **{key: torch.zeros(4, 7)})
    files["foreign"] = tl.save_tlora_file(wrong, config, root / "other-model.safetensors")
    tl.remove_tlora(unet)

    torch.manual_seed(0)
    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=list(config.target_modules), init_lora_weights=False)
    )
    StableDiffusionXLPipeline.save_lora_weights(root / "dog-lora", unet_lora_layers=get_peft_model_state_dict(unet))
    files["lora"] = root / "dog-lora" / "pytorch_lora_weights.safetensors"
    return files


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, example_image_path) -> dict[str, Path]:
    """A real-image folder, a mask folder for it and a user prompt file (1 contextual + 1 complex prompt)."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "real").mkdir()
    (root / "masks").mkdir()
    image = Image.open(example_image_path).convert("RGB").resize((96, 96))
    image.save(root / "real" / "dog.png")
    mask = Image.new("L", image.size, 0)
    mask.paste(255, (24, 24, 72, 72))
    mask.save(root / "masks" / "dog.png")
    (root / "prompts.json").write_text(json.dumps(USER_PROMPTS))
    return {"real": root / "real", "masks": root / "masks", "prompts": root / "prompts.json"}


def cli(tiny_sdxl_dir, clip_dir, dino_dir, inputs, output_dir, adapters, *extra) -> list[str]:
    argv = [
        "--pretrained_model_name_or_path", str(tiny_sdxl_dir),
        "--real_images", str(inputs["real"]),
        "--concept", CONCEPT,
        "--prompts", str(inputs["prompts"]),
        "--images_per_prompt", "2",
        "--base_prompt_images", "2",
        "--num_inference_steps", "2",
        "--resolution", "64",
        "--output_dir", str(output_dir),
        "--clip_model", str(clip_dir),
        "--dino_model", str(dino_dir),
        "--device", "cpu",
    ]  # fmt: skip
    for adapter in adapters:
        argv += ["--adapter", str(adapter)]
    return argv + list(extra)


@pytest.fixture(scope="module")
def evaluation(tiny_sdxl_dir, clip_dir, dino_dir, adapter_files, inputs, tmp_path_factory):
    """One run of the script over a T-LoRA and a standard LoRA; returns (argv, output dir)."""
    output_dir = tmp_path_factory.mktemp("evaluation")
    adapters = [f"tlora={adapter_files['tlora'].parent}", adapter_files["lora"]]
    argv = cli(tiny_sdxl_dir, clip_dir, dino_dir, inputs, output_dir, adapters, "--masks", str(inputs["masks"]))
    assert evaluate.main(argv) == 0
    return argv, output_dir


def run_cli_error(argv, capsys) -> str:
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    # libraries may log warnings first; the error is the last line
    assert err.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in err
    return err


# --------------------------------------------------------------------------- metric functions


def test_image_similarity_on_crafted_embeddings():
    e1, e2 = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 2.0, 0.0]])
    assert image_similarity(e1, 3 * e1) == pytest.approx(1.0)  # cosine ignores the norm
    assert image_similarity(e1, e2) == pytest.approx(0.0)
    assert image_similarity(e1, -e1) == pytest.approx(-1.0)
    # mean over all pairs: (1 + 0) / 2
    assert image_similarity(e1, torch.cat([e1, e2])) == pytest.approx(0.5)
    gen = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    expected = (2**-0.5 + 2**-0.5 + 1.0 + 0.0) / 4
    assert image_similarity(gen, torch.cat([e1, e2])) == pytest.approx(expected)
    assert cosine_matrix(gen, torch.cat([e1, e2, e1])).shape == (2, 3)


def test_text_similarity_scores_matched_pairs_only():
    images = torch.eye(3)
    assert text_similarity(images, torch.eye(3)) == pytest.approx(1.0)
    # off-diagonal agreement does not count: each image is compared with its own text only
    assert text_similarity(images, torch.eye(3)[[1, 2, 0]]) == pytest.approx(0.0)
    assert text_similarity(images, torch.stack([-images[0], images[1], images[2]])) == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "a, b",
    [
        (torch.zeros(2, 3), torch.zeros(2, 4)),
        (torch.zeros(0, 3), torch.zeros(1, 3)),
        (torch.zeros(3), torch.zeros(1, 3)),
    ],
)
def test_similarity_rejects_bad_shapes(a, b):
    with pytest.raises(ValueError):
        image_similarity(a, b)


def test_text_similarity_needs_one_text_per_image():
    with pytest.raises(ValueError, match="one text per image"):
        text_similarity(torch.ones(2, 3), torch.ones(3, 3))


def test_apply_mask_greys_out_the_background():
    image = Image.new("RGB", (4, 2), (255, 0, 0))
    mask = Image.new("L", (4, 2), 0)
    mask.putpixel((1, 1), 255)
    masked = apply_mask(image, mask)
    assert masked.getpixel((1, 1)) == (255, 0, 0)
    assert masked.getpixel((0, 0)) == MASK_FILL
    with pytest.raises(ValueError, match="mask size"):
        apply_mask(image, Image.new("L", (2, 2)))


# --------------------------------------------------------------------------- prompts, seeds, adapters


def test_real_images_are_scored_upright_as_the_trainer_sees_them(tmp_path):
    """A phone photo stores its pixels sideways and says so in EXIF; the real image must be read upright."""
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.new("RGB", (40, 20), "blue").save(path, exif=exif)
    [(found, image)] = evaluate.load_real_images([str(tmp_path)], masks=None)
    assert found == path and image.size == (20, 40) and image.mode == "RGB"


def test_paper_prompt_sets_split_contextual_and_complex():
    for name in ("live", "object"):
        prompts = evaluate.load_prompt_set(name, None)
        assert prompts.base == "a photo of {}"
        assert (len(prompts.contextual), len(prompts.complex)) == (25, 6)
    live = evaluate.load_prompt_set("live", None)
    assert live.contextual[0] == "a chocolate-colored {}" and live.complex[0].startswith("a {} in a chief outfit")
    plan = evaluate.plan_prompts(live, images_per_prompt=5, base_prompt_images=15, max_prompts=2)
    assert [(p.group, p.num_images) for p in plan] == [("base", 15)] + [("contextual", 5)] * 2 + [("complex", 5)] * 2
    # folders keep the prompt's place in the file
    assert [p.folder[:3] for p in plan] == ["00-", "01-", "02-", "26-", "27-"]
    assert len({p.folder for p in evaluate.plan_prompts(live, 1, 1, None)}) == 32


def test_image_seeds_are_deterministic_and_distinct():
    seeds = {evaluate.image_seed(0, template, i) for template in ("a red {}", "a {}") for i in range(3)}
    assert len(seeds) == 6 and all(0 <= s < 2**63 for s in seeds)
    assert evaluate.image_seed(0, "a red {}", 1) == evaluate.image_seed(0, "a red {}", 1)
    assert evaluate.image_seed(1, "a red {}", 1) != evaluate.image_seed(0, "a red {}", 1)


def test_adapter_arguments_detect_kind_and_name(adapter_files):
    tlora = evaluate.parse_adapter(str(adapter_files["tlora"].parent))
    assert (tlora.name, tlora.kind, tlora.path) == ("dog-tlora", "tlora", adapter_files["tlora"])
    assert tlora.tlora_config["rank"] == 4 and tlora.tlora_config["min_rank"] == 2
    lora = evaluate.parse_adapter(f"baseline={adapter_files['lora']}")
    assert (lora.name, lora.kind) == ("baseline", "lora")
    assert evaluate.parse_adapter("none") == evaluate.AdapterSpec("base", "base", None)
    assert evaluate.parse_adapter("sdxl=none").name == "sdxl"
    with pytest.raises(evaluate.EvaluationError, match="several adapters are named dog-tlora"):
        evaluate.parse_adapters([str(adapter_files["tlora"]), str(adapter_files["tlora"].parent)])


# --------------------------------------------------------------------------- end to end


def test_metrics_json(evaluation):
    _, output_dir = evaluation
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert list(metrics["adapters"]) == ["tlora", "dog-lora"]
    assert metrics["settings"]["class_word"] == "dog" and metrics["settings"]["mask_fill"] == list(MASK_FILL)
    for name, kind in (("tlora", "tlora"), ("dog-lora", "lora")):
        row = metrics["adapters"][name]
        assert row["kind"] == kind
        for key in evaluate.METRIC_KEYS:
            assert isinstance(row[key], float) and -1.0 <= row[key] <= 1.0, (name, key, row[key])
        assert row["counts"] == {
            "real_images": 1,
            "base_prompt_images": 2,
            "contextual_prompts": 1,
            "complex_prompts": 1,
            "contextual_images": 2,
            "complex_images": 2,
        }
        per_prompt = row["TS_per_prompt"]
        assert list(per_prompt) == USER_PROMPTS["mine"]
        # one image set per group here, so the group means are the per-prompt means, and TS their mean
        assert row["TS_contextual"] == pytest.approx(per_prompt["a red {}"])
        assert row["TS"] == pytest.approx((row["TS_contextual"] + row["TS_complex"]) / 2)
    assert metrics["adapters"]["tlora"]["tlora_config"]["rank"] == 4
    assert metrics["adapters"]["dog-lora"]["tlora_config"] is None
    assert metrics["adapters"]["tlora"]["IS"] != metrics["adapters"]["dog-lora"]["IS"]


def test_metrics_markdown_has_one_row_per_adapter(evaluation):
    _, output_dir = evaluation
    metrics = json.loads((output_dir / "metrics.json").read_text())
    lines = (output_dir / "metrics.md").read_text().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| adapter |"))
    assert lines[header] == "| adapter | kind | IS | DINO-IS | TS | TS contextual | TS complex |"
    rows = [line.split(" | ") for line in lines[header + 2 : header + 4]]
    assert [row[0] for row in rows] == ["| tlora", "| dog-lora"]
    assert rows[0][2] == f"{metrics['adapters']['tlora']['IS']:.3f}"
    assert not lines[header + 4].startswith("|")


def test_images_and_contact_sheets(evaluation):
    _, output_dir = evaluation
    for name in ("tlora", "dog-lora"):
        pngs = sorted(p.relative_to(output_dir / name).as_posix() for p in (output_dir / name).rglob("*.png"))
        assert pngs == [
            "00-a-photo-of-concept/0.png",
            "00-a-photo-of-concept/1.png",
            "01-a-red-concept/0.png",
            "01-a-red-concept/1.png",
            "02-a-concept-wearing-a-hat-on-the-beach-at-sunset/0.png",
            "02-a-concept-wearing-a-hat-on-the-beach-at-sunset/1.png",
            "contact_sheet.png",
        ]
        assert Image.open(output_dir / name / "01-a-red-concept" / "0.png").size == (64, 64)
        sheet = Image.open(output_dir / name / "contact_sheet.png")
        # four rows (real images, base prompt, two prompts) of 64 px thumbnails under their labels
        assert sheet.width == evaluate.SHEET_MIN_WIDTH
        assert 4 * 64 < sheet.height < 4 * 64 + 4 * 80
    assert json.loads((output_dir / "tlora" / "generation.json").read_text())["concept"] == CONCEPT


def test_rerun_regenerates_only_missing_or_broken_images(evaluation):
    argv, output_dir = evaluation
    prompt_dir = output_dir / "tlora" / "01-a-red-concept"
    deleted, broken = prompt_dir / "0.png", prompt_dir / "1.png"
    originals = {path: Image.open(path).convert("RGB").tobytes() for path in (deleted, broken)}
    untouched = [p for p in output_dir.rglob("*.png") if p not in originals and p.name != "contact_sheet.png"]
    mtimes = {path: path.stat().st_mtime_ns for path in untouched}
    deleted.unlink()
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")

    assert evaluate.main(argv) == 0
    assert {path: path.stat().st_mtime_ns for path in untouched} == mtimes
    # the same seeds give the same images, generated alone or in another run
    assert {path: Image.open(path).convert("RGB").tobytes() for path in originals} == originals


def test_rerun_with_other_settings_refuses_to_mix_images(evaluation, capsys):
    argv, _ = evaluation
    argv = [("sks cat" if value == CONCEPT else value) for value in argv] + ["--class_word", "cat"]
    err = run_cli_error(argv, capsys)
    assert "other settings" in err and "'sks dog' then, 'sks cat' now" in err


def without_adapter(argv: list[str], adapter: str) -> list[str]:
    at = argv.index(adapter)
    return argv[: at - 1] + argv[at + 1 :]


def test_rerun_with_fewer_adapters_keeps_the_earlier_rows(evaluation):
    argv, output_dir = evaluation
    before = json.loads((output_dir / "metrics.json").read_text())
    assert evaluate.main(without_adapter(argv, argv[argv.index("--adapter", argv.index("--adapter") + 1) + 1])) == 0
    after = json.loads((output_dir / "metrics.json").read_text())
    assert list(after["adapters"]) == ["tlora", "dog-lora"]
    assert after["adapters"]["dog-lora"] == before["adapters"]["dog-lora"]
    assert "| dog-lora | lora |" in (output_dir / "metrics.md").read_text()


def test_rerun_with_fewer_adapters_and_other_settings_is_refused_before_generating(evaluation, capsys):
    argv, output_dir = evaluation
    argv = without_adapter(argv, argv[argv.index("--adapter", argv.index("--adapter") + 1) + 1])
    masks = argv.index("--masks")
    argv = argv[:masks] + argv[masks + 2 :]  # without masks, IS changes
    before = (output_dir / "metrics.json").read_bytes()
    err = run_cli_error(argv, capsys)
    assert "metrics.json holds results for dog-lora scored with other settings (masks: " in err
    assert (output_dir / "metrics.json").read_bytes() == before


# --------------------------------------------------------------------------- bad inputs


def test_adapter_for_another_model_fails_before_generating(
    tiny_sdxl_dir, clip_dir, dino_dir, adapter_files, inputs, tmp_path, capsys
):
    adapters = [adapter_files["tlora"], f"other={adapter_files['foreign']}"]
    err = run_cli_error(cli(tiny_sdxl_dir, clip_dir, dino_dir, inputs, tmp_path, adapters), capsys)
    assert "adapter 'other'" in err and "Shape mismatch" in err and ".tlora.down" in err
    assert not list(tmp_path.rglob("*.png"))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--real_images": "missing-folder"}, "--real_images: missing-folder does not exist"),
        ({"--prompts": "animals"}, "unknown prompt set 'animals'"),
        ({"--clip_model": "no/such-clip"}, "--clip_model"),
        ({"--adapter": "missing.safetensors"}, "--adapter: missing.safetensors does not exist"),
        ({"--concept": "sks"}, "--class_word"),
    ],
)
def test_bad_inputs_are_clear_errors(
    change, message, tiny_sdxl_dir, clip_dir, dino_dir, adapter_files, inputs, tmp_path, capsys
):
    argv = cli(tiny_sdxl_dir, clip_dir, dino_dir, inputs, tmp_path, [adapter_files["tlora"]])
    for flag, value in change.items():
        argv[argv.index(flag) + 1] = value
    assert message in run_cli_error(argv, capsys)


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--guidance_scale", "nan", "argument --guidance_scale: must be a finite number, got 'nan'"),
        ("--guidance_scale", "inf", "argument --guidance_scale: must be a finite number, got 'inf'"),
        ("--output_dir", "", "argument --output_dir: must not be empty"),
        ("--output_dir", "{file}/sub", "argument --output_dir: {file} is a file, so {file}/sub cannot be a folder"),
        ("--output_dir", "{file}", "argument --output_dir: {file} is a file"),
        ("--real_images", "", "argument --real_images: must not be empty"),
        ("--pretrained_model_name_or_path", " ", "argument --pretrained_model_name_or_path: must not be empty"),
    ],
)
def test_bad_flag_values_stop_at_parsing(flag, value, message, tmp_path, capsys):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    argv = ["--pretrained_model_name_or_path", "m", "--adapter", "none", "--real_images", "r", "--concept", CONCEPT]
    argv += ["--output_dir", str(tmp_path / "out"), "--guidance_scale", "5"]
    argv[argv.index(flag) + 1] = value.format(file=file)
    with pytest.raises(SystemExit) as stopped:
        evaluate.build_parser().parse_args(argv)
    assert stopped.value.code == 2
    assert message.format(file=file) in capsys.readouterr().err
    assert file.read_text() == "mine"


@pytest.mark.parametrize("value", ["x=", "x= ", ""])
def test_an_empty_adapter_path_is_never_the_current_folder(value, tmp_path, monkeypatch, adapter_files):
    monkeypatch.chdir(adapter_files["tlora"].parent)  # a folder that does hold an adapter
    with pytest.raises(evaluate.EvaluationError, match="no path given"):
        evaluate.parse_adapter(value)


def test_paths_starting_with_a_tilde_are_expanded(adapter_files, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(adapter_files["tlora"].parent.parent))
    adapter = evaluate.parse_adapter("mine=~/dog-tlora")
    assert (adapter.name, adapter.path) == ("mine", adapter_files["tlora"])
    argv = ["--pretrained_model_name_or_path", "~/m", "--adapter", "none", "--real_images", "~/r", "--concept", "a b"]
    args = evaluate.build_parser().parse_args([*argv, "--output_dir", "~/out", "--masks", "~/masks"])
    home = str(adapter_files["tlora"].parent.parent)
    assert (args.output_dir, args.real_images, args.masks) == (f"{home}/out", [f"{home}/r"], f"{home}/masks")
    assert args.pretrained_model_name_or_path == f"{home}/m"


def test_a_folder_with_two_kinds_of_weights_is_refused(adapter_files, tmp_path):
    folder = tmp_path / "both"
    folder.mkdir()
    for source in (adapter_files["tlora"], adapter_files["lora"]):
        (folder / source.name).write_bytes(source.read_bytes())
    with pytest.raises(
        evaluate.EvaluationError,
        match="holds both pytorch_tlora_weights.safetensors .* and pytorch_lora_weights.safetensors",
    ):
        evaluate.parse_adapter(str(folder))
    assert evaluate.parse_adapter(str(folder / "pytorch_lora_weights.safetensors")).kind == "lora"


def test_results_with_nan_are_never_written_as_bare_nan(tmp_path):
    with pytest.raises(evaluate.EvaluationError, match="NaN or infinite; nothing was written"):
        evaluate.write_json(tmp_path / "metrics.json", {"adapters": {"a": {"IS": float("nan")}}})
    assert not list(tmp_path.iterdir())


def test_command_line_exit_code_and_message(tmp_path):
    argv = ["--pretrained_model_name_or_path", "x", "--adapter", "none", "--concept", CONCEPT, "--output_dir"]
    result = run_script("scripts/evaluate.py", *argv, tmp_path, "--real_images", "nowhere", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: --real_images: nowhere does not exist"
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- FLUX.1


@pytest.fixture(scope="module")
def flux_tlora_file(tiny_flux_dir, tmp_path_factory) -> Path:
    """A FLUX T-LoRA adapter (vanilla, the authors' projections) with a clearly visible update."""
    from diffusers import FluxTransformer2DModel

    import pipelines.tlora as tl

    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux_dir, subfolder="transformer")
    config = tl.TLoraConfig.for_family("flux", rank=4, min_rank=2)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for adapter in tl.inject_tlora(transformer.requires_grad_(False), config, generator=generator).values():
            adapter.up.add_(0.5 * torch.randn(adapter.up.shape, generator=generator))
    folder = tmp_path_factory.mktemp("flux-adapters") / "dog-flux-tlora"
    layers = tl.get_tlora_state_dict(transformer)
    return tl.save_tlora_weights(folder, transformer_tlora_layers=layers, tlora_config=config)


def without(argv: list[str], flag: str) -> list[str]:
    index = argv.index(flag)
    return argv[:index] + argv[index + 2 :]


def test_flux_base_model_with_the_family_sampling_defaults(
    tiny_flux_dir, clip_dir, dino_dir, flux_tlora_file, inputs, tmp_path
):
    argv = cli(tiny_flux_dir, clip_dir, dino_dir, inputs, tmp_path, [f"tlora={flux_tlora_file}", "base=none"])
    assert evaluate.main(without(argv, "--num_inference_steps")) == 0

    settings = json.loads((tmp_path / "metrics.json").read_text())["settings"]
    assert (settings["model_family"], settings["num_inference_steps"], settings["guidance_scale"]) == ("flux", 28, 3.5)
    generated = json.loads((tmp_path / "tlora" / "generation.json").read_text())
    assert (generated["num_inference_steps"], generated["guidance_scale"]) == (28, 3.5)
    tlora_image = Image.open(tmp_path / "tlora" / "01-a-red-concept" / "0.png")
    base_image = Image.open(tmp_path / "base" / "01-a-red-concept" / "0.png")
    assert tlora_image.size == (64, 64)
    # same seed, so the images differ only through the adapter
    assert tlora_image.tobytes() != base_image.tobytes()


def test_flux_family_resolution_and_foreign_adapters_are_refused(
    tiny_flux_dir, clip_dir, dino_dir, adapter_files, flux_tlora_file, inputs, tmp_path, capsys
):
    argv = cli(tiny_flux_dir, clip_dir, dino_dir, inputs, tmp_path, [adapter_files["tlora"]])
    err = run_cli_error(argv, capsys)
    assert "cannot be loaded into" in err and "`unet`" in err and "has a `transformer`" in err
    assert not list(tmp_path.rglob("*.png"))

    argv = cli(tiny_flux_dir, clip_dir, dino_dir, inputs, tmp_path, [flux_tlora_file])
    argv[argv.index("--resolution") + 1] = "72"
    assert "must be a multiple of 16 for FLUX.1" in run_cli_error(argv, capsys)

    (tmp_path / "other-model").mkdir()
    (tmp_path / "other-model" / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    argv = cli(tmp_path / "other-model", clip_dir, dino_dir, inputs, tmp_path, [flux_tlora_file])
    assert "is a KandinskyPipeline, which T-LoRA does not adapt" in run_cli_error(argv, capsys)
