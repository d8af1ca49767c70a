"""The miniature experiment end to end at tiny settings: toy base and toy CLIP trained for a step or two, then
`scripts/toy_experiment.py` running the real trainer and evaluator on them."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pipelines.tlora.file_format import METADATA_KEY, read_safetensors
from scripts import toy_experiment, train_toy_base, train_toy_clip

from tests.tlora_testing import REPO_ROOT


@pytest.fixture(scope="module")
def toy_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy-models")
    base, clip = root / "toy-sdxl", root / "toy-clip"
    steps = ["--vae_steps", "2", "--unet_steps", "2", "--zero_snr_steps", "2", "--latent_pool", "16"]
    assert train_toy_base.main([str(base), *steps]) == 0
    assert train_toy_clip.main([str(clip), "--steps", "2"]) == 0
    return base, clip


def test_the_toy_models_load_where_the_project_loads_models(toy_models):
    from diffusers import StableDiffusionXLPipeline

    from scripts.eval_metrics import ClipEmbedder, DinoEmbedder

    base, clip = toy_models
    pipe = StableDiffusionXLPipeline.from_pretrained(base, dtype=torch.float32)
    assert pipe.vae_scale_factor == 4 and pipe.unet.config.sample_size == 16  # 64 px pictures
    assert pipe.vae.config.scaling_factor != 0.13025  # measured on the toy world, not SD-XL's
    # zero terminal SNR: the last training timestep keeps nothing of the picture, and sampling starts there
    from diffusers import DDPMScheduler

    assert DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod[-1] == 0
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    pipe.scheduler.set_timesteps(4)
    assert pipe.scheduler.timesteps[0] == 999
    image = pipe("a red star on the beach", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (64, 64, 3)
    # fp16 on disk keeps the shipped model small
    tensors, _ = read_safetensors(base / "unet" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float16}

    clip_embedder, vision = ClipEmbedder.load(str(clip)), DinoEmbedder.load(str(clip / "vision"))
    assert clip_embedder.text_embeddings(["a toy on the beach", "a red star"]).shape == (2, 64)
    picture = pipe.image_processor.numpy_to_pil(image[None])[0]
    assert vision.image_embeddings([picture]).shape == (1, 64)
    # the vision tower alone is the CLIP model's own: same CLS features
    pixels = clip_embedder.image_processor(images=[picture], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = clip_embedder.model.vision_model(pixel_values=pixels).last_hidden_state[:, 0]
    torch.testing.assert_close(vision.image_embeddings([picture]), expected)


def test_a_tiny_experiment_trains_every_method_and_writes_table_and_plot(toy_models, tmp_path):
    base, clip = toy_models
    out = tmp_path / "experiment"
    argv = [
        "--base_model", str(base), "--clip_model", str(clip), "--output_dir", str(out), "--ranks", "4",
        "--seeds", "0", "--steps", "2", "--images_per_prompt", "1", "--base_prompt_images", "1",
        "--num_inference_steps", "2",
    ]  # fmt: skip
    assert toy_experiment.main(argv) == 0

    expected = {
        "lora-r4": ("vanilla", 4), "vanilla-r4": ("vanilla", 2), "ortho-r4": ("ortho", 4), "tlora-r4": ("ortho", 2)
    }  # fmt: skip
    for name, (variant, min_rank) in expected.items():
        _, metadata = read_safetensors(out / "adapters" / "seed-0" / name / toy_experiment.ADAPTER_FILE)
        config = json.loads(metadata[METADATA_KEY])
        assert (config["variant"], config["rank"], config["min_rank"]) == (variant, 4, min_rank), name
        assert config["target_modules"] == list(toy_experiment.TARGET_MODULES), name

    results = json.loads((out / "results.json").read_text())
    assert list(results["rows"]) == [*expected, "base"]
    for row in results["rows"].values():
        for metric in ("IS", "DINO_IS", "TS"):
            mean, spread = row[metric]
            assert -1.0 <= mean <= 1.0 and math.isfinite(mean) and spread == 0.0  # one seed: no spread
        # one picture per contextual prompt: each prompt's share is 0 or 1, and the row's is their mean
        per_prompt = row["context_per_prompt"]
        assert list(per_prompt) == toy_experiment.TOY_PROMPTS["toy"]
        assert set(per_prompt.values()) <= {0.0, 1.0}
        assert row["context"] == [sum(per_prompt.values()) / len(per_prompt), 0.0]
    table = (out / "results.md").read_text()
    for method in ("LoRA", "Vanilla T-LoRA", "Ortho-LoRA", "T-LoRA"):
        assert f"| {method} | 4 |" in table
    assert "| base model | – |" in table
    assert table.startswith("| method | rank | IS (CLIP) | DINO-IS | TS | context |")
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "concept" / "robot.png").is_file()
    prompts = json.loads((out / "prompts.json").read_text())
    assert all(template.count("{}") == 1 for template in prompts["toy"])
    # every contextual prompt begins with the instance prompt, so "sks toy" reads the same in all of them
    assert prompts["base_prompt"].format("sks toy") == "a sks toy"
    assert all(template.format("sks toy").startswith("a sks toy ") for template in prompts["toy"])

    # a second run reuses the adapters instead of training them again
    adapter = out / "adapters" / "seed-0" / "tlora-r4" / toy_experiment.ADAPTER_FILE
    written = adapter.stat().st_mtime_ns
    assert toy_experiment.main(argv) == 0
    assert adapter.stat().st_mtime_ns == written


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--context", "moon"], "--context 'moon' is not a toy-world context"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--ranks", "0"], "--ranks must be at least 1"),
        (["--learning_rate", "nan"], "argument --learning_rate: must be a finite number > 0, got 'nan'"),
        (["--snr_gamma", "-5"], "argument --snr_gamma: must be a finite number > 0, got '-5'"),
    ],
)
def test_bad_experiment_settings_are_refused(tmp_path, capsys, extra, message):
    argv = ["--base_model", str(tmp_path), "--clip_model", str(tmp_path), "--output_dir", str(tmp_path / "o")]
    with pytest.raises(SystemExit):
        toy_experiment.parse_args(argv + extra)
    assert message in capsys.readouterr().err


def test_missing_models_say_how_to_build_them(tmp_path, capsys):
    with pytest.raises(SystemExit):
        toy_experiment.parse_args(["--base_model", str(tmp_path / "nope"), "--clip_model", str(tmp_path),
                                   "--output_dir", str(tmp_path / "o")])  # fmt: skip
    assert "make toy-base builds both models" in capsys.readouterr().err


def test_context_accuracy_counts_the_pictures_whose_context_the_judge_names_as_asked(tmp_path):
    from argparse import Namespace

    from scripts import toy_world

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(toy_experiment.TOY_PROMPTS))
    args = Namespace(clip_model=str(REPO_ROOT / "models" / "toy-clip"), images_per_prompt=2, base_prompt_images=1)
    on_pink = toy_world.concept_on_context(toy_experiment.CONCEPT_IMAGE, "pink background")

    def world_picture(context: str, index: int):
        colour = "green" if context == "red background" else "red"
        return toy_world.render(toy_world.Scene("star", colour, context, 14, 30 + index, 32, detail_seed=index))

    # evaluate.py's layout: one numbered folder per prompt, the base prompt's first
    folders = {name: tmp_path / name for name in ("as asked", "first as asked", "all on pink")}
    for number, template in enumerate(toy_experiment.TOY_PROMPTS["toy"], start=1):
        context = next(c for c in toy_world.CONTEXTS if template == f"a {{}} {toy_world.context_phrase(c)}")
        slug = template.replace("{}", "concept").replace(" ", "-")
        pictures = {
            "as asked": [world_picture(context, 0), world_picture(context, 1)],
            "first as asked": [world_picture(context, 0), on_pink],
            "all on pink": [on_pink, on_pink],
        }
        for name, images in pictures.items():
            (folders[name] / f"{number:02d}-{slug}").mkdir(parents=True)
            for index, image in enumerate(images):
                image.save(folders[name] / f"{number:02d}-{slug}" / f"{index}.png")

    accuracy = toy_experiment.context_accuracy(args, prompts, list(folders.values()))
    templates = toy_experiment.TOY_PROMPTS["toy"]
    assert accuracy == {
        folders["as asked"]: dict.fromkeys(templates, 1.0),
        folders["first as asked"]: dict.fromkeys(templates, 0.5),
        folders["all on pink"]: dict.fromkeys(templates, 0.0),
    }
