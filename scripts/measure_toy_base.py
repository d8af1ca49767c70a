#!/usr/bin/env python
"""Does the toy base model draw what toy prompts ask for? Zero-shot recognition with the toy CLIP.

    python scripts/measure_toy_base.py --model outputs/toy-base --clip_model outputs/toy-clip \
        --output_dir outputs/toy-base-check [--count 120]

For `--count` random world captions the base model generates one picture each; the toy CLIP then names the
picture's shape, colour and context by comparing it with every caption that differs from the asked one in that
attribute only ("a red star on the beach" against "a red circle on the beach", "a red ring ..."). The same is
done on the world's own pictures of those captions, which gives the judge's ceiling. Chance is one over the
number of candidates (1/6 for shape and colour, about 1/10 for context).

Writes `report.json`, `report.md` and `samples.png` (the first 24 generations under their prompts).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from scripts import toy_world  # noqa: E402
from scripts.arguments import bounded_float  # noqa: E402
from scripts.eval_metrics import ClipEmbedder, cosine_matrix  # noqa: E402

ATTRIBUTES = ("shape", "colour", "context")


def candidates(scene: toy_world.Scene, attribute: str) -> tuple[list[str], int]:
    """Captions that differ from the scene's in `attribute` only (impossible combinations left out), and the
    index of the true one."""
    options = {"shape": toy_world.SHAPES, "colour": tuple(toy_world.COLOURS), "context": toy_world.CONTEXTS}
    texts, truth = [], None
    for option in options[attribute]:
        fields = dict(shape=scene.shape, colour=scene.colour, context=scene.context)
        fields[attribute] = option
        if fields["context"] == f"{fields['colour']} background":
            continue
        if option == getattr(scene, attribute):
            truth = len(texts)
        texts.append(f"a {fields['colour']} {fields['shape']} {toy_world.context_phrase(fields['context'])}")
    return texts, truth


def recognition(clip: ClipEmbedder, images: list[Image.Image], scenes: list[toy_world.Scene]) -> dict:
    """Accuracy per attribute, of all three at once, and the chance level of each."""
    image_embeds = clip.image_embeddings(images)
    hits = {attribute: [] for attribute in ATTRIBUTES}
    chance = {attribute: [] for attribute in ATTRIBUTES}
    for row, scene in enumerate(scenes):
        for attribute in ATTRIBUTES:
            texts, truth = candidates(scene, attribute)
            scores = cosine_matrix(image_embeds[row : row + 1], clip.text_embeddings(texts))[0]
            hits[attribute].append(int(scores.argmax()) == truth)
            chance[attribute].append(1 / len(texts))
    report = {attribute: sum(hits[attribute]) / len(scenes) for attribute in ATTRIBUTES}
    report["all three"] = sum(all(hits[a][i] for a in ATTRIBUTES) for i in range(len(scenes))) / len(scenes)
    report["chance"] = {attribute: sum(chance[attribute]) / len(scenes) for attribute in ATTRIBUTES}
    return report


@torch.no_grad()
def generate(model: str, prompts: list[str], steps: int, guidance: float, seed: int) -> list[Image.Image]:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    images = []
    for start in range(0, len(prompts), 24):
        generator = torch.Generator().manual_seed(seed + start)
        batch = prompts[start : start + 24]
        size = toy_world.IMAGE_SIZE
        images += pipe(
            batch, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance, generator=generator
        ).images
    return images


def sample_sheet(images: list[Image.Image], prompts: list[str], columns: int = 6, cell: int = 128) -> Image.Image:
    rows = (len(images) + columns - 1) // columns
    label = 28
    sheet = Image.new("RGB", (columns * cell, rows * (cell + label)), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
        x, y = index % columns * cell, index // columns * (cell + label)
        sheet.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (x, y + label))
        words = prompt.removeprefix("a ").split(" ", 2)
        draw.text((x + 3, y + 2), " ".join(words[:2]), fill="black")
        draw.text((x + 3, y + 14), words[2] if len(words) > 2 else "", fill="black")
    return sheet


def markdown(report: dict) -> str:
    lines = ["| pictures | shape | colour | context | all three |", "|---|---|---|---|---|"]
    for name in ("base model", "world (judge's ceiling)"):
        row = report[name]
        lines.append(f"| {name} | " + " | ".join(f"{row[a]:.0%}" for a in (*ATTRIBUTES, "all three")) + " |")
    chance = report["base model"]["chance"]
    lines.append("| chance | " + " | ".join(f"{chance[a]:.0%}" for a in ATTRIBUTES) + " | |")
    settings = report["settings"]
    lines.append(
        f"\n{settings['count']} random world captions, one picture each, {settings['steps']} Euler steps, "
        f"guidance {settings['guidance_scale']}; judged zero-shot by the toy CLIP."
    )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the toy base model folder")
    parser.add_argument("--clip_model", required=True, help="the toy CLIP folder (train_toy_clip.py)")
    parser.add_argument("--output_dir", required=True, help="where report.json, report.md, samples.png go")
    parser.add_argument("--count", type=int, default=120, help="captions to test (default 120)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    parser.add_argument(
        "--guidance_scale", type=bounded_float(0), default=5.0, help="classifier-free guidance (default 5)"
    )
    parser.add_argument("--seed", type=int, default=1234, help="seed of the captions and the noise")
    args = parser.parse_args(argv)
    if args.count < 1 or args.steps < 1:
        parser.error("--count and --steps must be at least 1")

    scenes = toy_world.sample_scenes(args.count, args.seed)
    prompts = [toy_world.caption(scene) for scene in scenes]
    generated = generate(args.model, prompts, args.steps, args.guidance_scale, args.seed)
    clip = ClipEmbedder.load(args.clip_model)
    report = {
        "base model": recognition(clip, generated, scenes),
        "world (judge's ceiling)": recognition(clip, [toy_world.render(scene) for scene in scenes], scenes),
        "settings": {"count": args.count, "steps": args.steps, "guidance_scale": args.guidance_scale,
                     "seed": args.seed, "model": args.model, "clip_model": args.clip_model},
    }  # fmt: skip
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "report.md").write_text(markdown(report), encoding="utf-8")
    sample_sheet(generated[:24], prompts[:24]).save(out / "samples.png")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
