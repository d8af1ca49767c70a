#!/usr/bin/env python
"""Train a toy CLIP on the toy world: the judge of the miniature experiment.

    python scripts/train_toy_clip.py OUT_DIR [--steps N] [--threads N]

`scripts/evaluate.py` scores text alignment and concept fidelity with a CLIP model (`--clip_model`) and a
ViT's CLS token (`--dino_model`). OpenAI's CLIP knows nothing useful about 64 px toy pictures, so this script
trains a small one contrastively on world pictures and their captions and writes what those options load:

    OUT_DIR/            CLIPModel + tokenizer + image processor   (--clip_model OUT_DIR)
    OUT_DIR/vision/     its vision tower alone, CLIPVisionModel   (--dino_model OUT_DIR/vision)

Captions are varied so that partial descriptions mean something too, and so that every attribute has to be
learnt: in a batch of full captions, colour and context alone almost always tell the pictures apart and the
shape is never needed. So each step uses one caption form for its whole batch, in turn: the full caption
("a red star on the beach"), the shape alone ("a star"), the object ("a red star"), the shape in its context
("a star on the beach") and the context alone, with "toy" standing for any object ("a toy on the beach",
which is what the experiment's text-alignment score compares "a sks toy on the beach" pictures with).
Pictures that share a caption in a batch are all positives of it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from scripts import toy_world  # noqa: E402
from scripts.toy_training import train_phase, world_batch  # noqa: E402

GENERIC_OBJECT = "toy"
MAX_TEXT_TOKENS = 32
EMA_DECAY = 0.998  # the saved model is the average of about its last 500 steps
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


CAPTION_FORMS = ("full", "shape", "object", "shape in context", "context")


def caption_form(scene: toy_world.Scene, form: str) -> str:
    """The caption of `scene` in one of `CAPTION_FORMS`."""
    where = toy_world.context_phrase(scene.context)
    return {
        "full": toy_world.caption(scene),
        "shape": f"a {scene.shape}",
        "object": f"a {scene.colour} {scene.shape}",
        "shape in context": f"a {scene.shape} {where}",
        "context": f"a {GENERIC_OBJECT} {where}",
    }[form]


def build_clip(seed: int):
    from transformers import CLIPConfig, CLIPModel

    from scripts.tiny_tokenizers import CLIP_EOS_TOKEN, build_clip_tokenizer

    tokenizer = build_clip_tokenizer(pad_token=CLIP_EOS_TOKEN)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_TEXT_TOKENS,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            image_size=toy_world.IMAGE_SIZE,
            patch_size=8,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
        ),
        projection_dim=64,
    )
    torch.manual_seed(seed)
    tokenizer.model_max_length = MAX_TEXT_TOKENS
    return CLIPModel(config), tokenizer


def build_image_processor():
    from transformers import CLIPImageProcessor

    size = toy_world.IMAGE_SIZE
    return CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )  # fmt: skip


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """[-1, 1] pictures -> what the image processor gives CLIP (same mean and std)."""
    mean = torch.tensor(CLIP_MEAN)[None, :, None, None]
    std = torch.tensor(CLIP_STD)[None, :, None, None]
    return ((pixels + 1) / 2 - mean) / std


def train_clip(model, tokenizer, checkpoint: Path, steps: int, seed: int, batch_size: int = 64) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)

    def loss_at_step(step: int):
        pixels, scenes = world_batch(seed + 11, step, batch_size)
        form = CAPTION_FORMS[step % len(CAPTION_FORMS)]
        captions = [caption_form(scene, form) for scene in scenes]
        tokens = tokenizer(captions, padding=True, truncation=True, return_tensors="pt")
        image = model.visual_projection(model.vision_model(pixel_values=normalise(pixels)).pooler_output)
        text = model.text_projection(
            model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
        )
        logits = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T * model.logit_scale.exp()
        # Several pictures can share a caption (a caption fits several pictures): all of them are positives.
        same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
        targets = same / same.sum(dim=1, keepdim=True)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2

    train_phase("clip", checkpoint, model, optimizer, steps, loss_at_step, ema_decay=EMA_DECAY)


def save_clip(out: Path, model, tokenizer) -> None:
    from transformers import CLIPVisionModel

    processor = build_image_processor()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)
    vision = CLIPVisionModel(model.config.vision_config)
    # transformers 5 flattened CLIPVisionModel (no vision_model submodule): load into whichever holds the tower.
    getattr(vision, "vision_model", vision).load_state_dict(model.vision_model.state_dict())
    vision.save_pretrained(out / "vision", safe_serialization=True)
    processor.save_pretrained(out / "vision")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write (checkpoints go inside)")
    parser.add_argument("--steps", type=int, default=4000, help="training steps, batch 64 (default 4000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the weights (default 0)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.threads < 1:
        parser.error("--steps and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    out = Path(args.out_dir)
    model, tokenizer = build_clip(args.seed)
    train_clip(model, tokenizer, out / "checkpoints" / "clip.safetensors", args.steps, args.seed)
    save_clip(out, model, tokenizer)
    print(f"Saved the toy CLIP to {out} (vision tower alone in {out / 'vision'})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
