"""Embeddings and similarity scores for `scripts/evaluate.py`.

Scoring functions are pure: they take embedding matrices (one row per image or text) and return a float.
Embedding extraction lives in two small classes, `ClipEmbedder` and `DinoEmbedder`, that wrap a
transformers model with its preprocessing; they return float32 CPU tensors, not normalised.

    image_similarity(gen, real)   mean cosine similarity over all (generated, real) pairs       -> IS, DINO-IS
    text_similarity(images, texts) mean cosine similarity of row i of `images` with row i of `texts` -> TS
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

# Masked-out background is painted mid-grey: no colour the concept could be confused with, and close to
# the normalisation mean of CLIP and DINO, so it carries almost no signal after preprocessing.
MASK_FILL = (128, 128, 128)
# Mask pixels at or above this grey level mark the concept (kept); below it, background (replaced).
MASK_THRESHOLD = 128


def _check_matrix(name: str, embeds: torch.Tensor) -> None:
    if embeds.ndim != 2 or embeds.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (N, D) matrix, got shape {tuple(embeds.shape)}")


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, D) x (M, D) -> (N, M) cosine similarities, computed in float64."""
    _check_matrix("first embeddings", a)
    _check_matrix("second embeddings", b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"embedding widths differ: {a.shape[1]} vs {b.shape[1]}")
    return F.normalize(a.double(), dim=1) @ F.normalize(b.double(), dim=1).T


def image_similarity(gen_embeds: torch.Tensor, real_embeds: torch.Tensor) -> float:
    """Mean cosine similarity over every (generated image, real image) pair."""
    return cosine_matrix(gen_embeds, real_embeds).mean().item()


def text_similarity(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> float:
    """Mean cosine similarity of matched pairs: image `i` against the text it was generated for, row `i`."""
    if image_embeds.shape[0] != text_embeds.shape[0]:
        raise ValueError(
            f"text_similarity needs one text per image, got {image_embeds.shape[0]} images and "
            f"{text_embeds.shape[0]} texts"
        )
    return cosine_matrix(image_embeds, text_embeds).diagonal().mean().item()


def apply_mask(image: Image.Image, mask: Image.Image, fill=MASK_FILL) -> Image.Image:
    """Keep the concept (light mask pixels) and paint the background (dark mask pixels) with `fill`."""
    if mask.size != image.size:
        raise ValueError(f"mask size {mask.size} differs from image size {image.size}")
    keep = mask.convert("L").point(lambda value: 255 if value >= MASK_THRESHOLD else 0)
    return Image.composite(image.convert("RGB"), Image.new("RGB", image.size, fill), keep)


def _batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


class _Embedder:
    """A frozen model with its image processor; subclasses say which output is the embedding."""

    batch_size = 32

    def __init__(self, model, image_processor):
        self.model = model.eval().requires_grad_(False)
        self.image_processor = image_processor

    @property
    def _parameter(self) -> torch.Tensor:
        return next(self.model.parameters())

    def to(self, device) -> _Embedder:
        self.model.to(device)
        return self

    def _embed_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """One row per image (RGB PIL images of any size; the processor resizes them)."""
        rows = []
        for batch in _batches(list(images), self.batch_size):
            pixels = self.image_processor(images=[image.convert("RGB") for image in batch], return_tensors="pt")
            pixel_values = pixels["pixel_values"].to(self._parameter.device, self._parameter.dtype)
            rows.append(self._embed_pixels(pixel_values).float().cpu())
        return torch.cat(rows)


class ClipEmbedder(_Embedder):
    """CLIP image and text embeddings in the shared projection space (what CLIP's similarity uses)."""

    def __init__(self, model, image_processor, tokenizer):
        super().__init__(model, image_processor)
        self.tokenizer = tokenizer

    @classmethod
    def load(cls, name_or_path: str) -> ClipEmbedder:
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        return cls(
            CLIPModel.from_pretrained(name_or_path),
            AutoImageProcessor.from_pretrained(name_or_path),
            AutoTokenizer.from_pretrained(name_or_path),
        )

    def _embed_pixels(self, pixel_values):
        # Spelled out rather than get_image_features(), whose return type differs between transformers 4 and 5.
        return self.model.visual_projection(self.model.vision_model(pixel_values=pixel_values).pooler_output)

    @torch.inference_mode()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """One row per text; texts longer than CLIP's context are truncated."""
        max_length = self.model.config.text_config.max_position_embeddings
        rows = []
        for batch in _batches(list(texts), self.batch_size):
            tokens = self.tokenizer(
                list(batch), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            ).to(self._parameter.device)
            hidden = self.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            rows.append(self.model.text_projection(hidden.pooler_output).float().cpu())
        return torch.cat(rows)


class DinoEmbedder(_Embedder):
    """The CLS token of a self-supervised ViT (DINO, DINOv2): the image descriptor DINO scores use."""

    @classmethod
    def load(cls, name_or_path: str) -> DinoEmbedder:
        from transformers import AutoImageProcessor, AutoModel

        return cls(AutoModel.from_pretrained(name_or_path), AutoImageProcessor.from_pretrained(name_or_path))

    def _embed_pixels(self, pixel_values):
        return self.model(pixel_values=pixel_values).last_hidden_state[:, 0]
