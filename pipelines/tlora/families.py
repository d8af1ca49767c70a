"""Model families: what differs between the denoisers T-LoRA adapts, described once.

The method is the same for every diffusion model. What differs is which pipeline attribute holds the denoiser,
how a pipeline hands it the timestep (and in which units), which projections the method adapts and which
pipeline classes call the denoiser. Everything else in this package (injection, file format, loader,
converters) and the scripts read those facts from one `ModelFamily` instead of hard-coding `unet`.

    family   denoiser (attribute)                     timestep the schedule sees
    sd       UNet2DConditionModel (`unet`)            2nd positional or `timestep=`, raw DDPM t
    sdxl     UNet2DConditionModel (`unet`)            the same
    flux     FluxTransformer2DModel (`transformer`)   `timestep=` keyword, sigma in [0, 1]: times 1000
    sd3      SD3Transformer2DModel (`transformer`)    `timestep=` keyword, raw t = 1000 sigma
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

UNET_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
# The T-LoRA authors' FLUX set: image- and text-stream projections of the double-stream blocks, and the
# single-stream blocks' q/k/v (their `to_out` does not exist and `proj_out` is the MLP merge).
TRANSFORMER_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj")


@dataclass(frozen=True)
class ModelFamily:
    """How one kind of diffusion model meets T-LoRA.

    Attributes:
        name: the family's id, stored as `model_family` in an adapter's `tlora_config`.
        display_name: for messages and model cards.
        denoiser_attribute: the pipeline attribute holding the denoiser; also the file key prefix.
        denoiser_class: diffusers class name of the denoiser.
        sample_argument: name of the denoiser's first (latent) argument, which carries the batch size.
        timestep_position: position of the timestep among the positional arguments, or None when pipelines
            always pass it as `timestep=`.
        timestep_scale: factor from the timestep a pipeline passes to the schedule's t in [0, T].
        default_target_modules: projections adapted when the user names none.
        default_variant: the variant the paper uses for this family.
        pipeline_classes: diffusers pipeline classes that call this denoiser and gain the T-LoRA API.
        base_model: the usual base checkpoint, for documentation and model cards.
    """

    name: str
    display_name: str
    denoiser_attribute: str
    denoiser_class: str
    sample_argument: str
    timestep_position: int | None
    timestep_scale: float
    default_target_modules: tuple[str, ...]
    default_variant: str
    pipeline_classes: tuple[str, ...]
    base_model: str

    @property
    def key_prefix(self) -> str:
        return self.denoiser_attribute + "."

    @property
    def denoiser_label(self) -> str:
        """The denoiser's name in messages: "UNet" or "transformer"."""
        return "UNet" if self.denoiser_attribute == "unet" else self.denoiser_attribute

    def call_timesteps(self, args: tuple, kwargs: dict):
        """The schedule's timesteps and the batch's latents from one denoiser call's arguments."""
        timesteps = kwargs.get("timestep")
        if timesteps is None and self.timestep_position is not None and len(args) > self.timestep_position:
            timesteps = args[self.timestep_position]
        sample = args[0] if args else kwargs.get(self.sample_argument)
        if timesteps is not None and self.timestep_scale != 1:
            # float32 at least: FLUX pipelines pass sigma in the latents' dtype (bf16), whose rounding the product
            # would amplify further
            timesteps = torch.as_tensor(timesteps)
            timesteps = timesteps.to(torch.promote_types(timesteps.dtype, torch.float32)) * self.timestep_scale
        return timesteps, sample


_UNET_PIPELINES = ("", "Img2Img", "Inpaint", "ControlNet", "ControlNetImg2Img", "ControlNetInpaint")

SD = ModelFamily(
    name="sd",
    display_name="Stable Diffusion 1.x/2.x",
    denoiser_attribute="unet",
    denoiser_class="UNet2DConditionModel",
    sample_argument="sample",
    timestep_position=1,
    timestep_scale=1.0,
    default_target_modules=UNET_TARGET_MODULES,
    default_variant="ortho",
    pipeline_classes=tuple(f"StableDiffusion{kind}Pipeline" for kind in _UNET_PIPELINES),
    base_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
)

# SD-XL's UNet is called as SD's: only the pipelines and the base model differ
SDXL = replace(
    SD,
    name="sdxl",
    display_name="Stable Diffusion XL",
    pipeline_classes=tuple(f"StableDiffusionXL{kind}Pipeline" for kind in _UNET_PIPELINES)
    + ("StableDiffusionXLPAGPipeline", "StableDiffusionXLPAGImg2ImgPipeline", "StableDiffusionXLPAGInpaintPipeline"),
    base_model="stabilityai/stable-diffusion-xl-base-1.0",
)

FLUX = ModelFamily(
    name="flux",
    display_name="FLUX.1",
    denoiser_attribute="transformer",
    denoiser_class="FluxTransformer2DModel",
    sample_argument="hidden_states",
    timestep_position=None,
    timestep_scale=1000.0,
    default_target_modules=TRANSFORMER_TARGET_MODULES,
    default_variant="vanilla",
    pipeline_classes=(
        "FluxPipeline",
        "FluxImg2ImgPipeline",
        "FluxInpaintPipeline",
        "FluxFillPipeline",
        "FluxKontextPipeline",
        "FluxKontextInpaintPipeline",
        "FluxControlPipeline",
        "FluxControlImg2ImgPipeline",
        "FluxControlInpaintPipeline",
        "FluxControlNetPipeline",
        "FluxControlNetImg2ImgPipeline",
        "FluxControlNetInpaintPipeline",
    ),
    base_model="black-forest-labs/FLUX.1-dev",
)

# SD3's MM-DiT is called as FLUX's, but with the raw timestep (1000 * sigma) rather than sigma
SD3 = replace(
    FLUX,
    name="sd3",
    display_name="Stable Diffusion 3",
    denoiser_class="SD3Transformer2DModel",
    timestep_scale=1.0,
    pipeline_classes=tuple(f"StableDiffusion3{kind}Pipeline" for kind in ("", "Img2Img", "Inpaint")),
    base_model="stabilityai/stable-diffusion-3.5-medium",
)

FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (SD, SDXL, FLUX, SD3)}


def get_family(name: str | ModelFamily) -> ModelFamily:
    if isinstance(name, ModelFamily):
        return name
    if name not in FAMILIES:
        raise ValueError(f"Unknown model family {name!r}; known: {', '.join(FAMILIES)}.")
    return FAMILIES[name]


def family_of_denoiser(denoiser: nn.Module) -> ModelFamily:
    """The family of a denoiser module (SD-XL and SD 1.x/2.x UNets differ by SD-XL's text-time embedding)."""
    # torch.compile wraps a module and keeps the original as `_orig_mod`
    denoiser = getattr(denoiser, "_orig_mod", denoiser)
    class_name = type(denoiser).__name__
    if class_name == SDXL.denoiser_class:
        config = getattr(denoiser, "config", None)
        return SDXL if getattr(config, "addition_embed_type", None) == "text_time" else SD
    for family in FAMILIES.values():
        if class_name == family.denoiser_class:
            return family
    raise ValueError(
        f"T-LoRA does not know the denoiser {class_name}; supported: "
        + ", ".join(f"{f.denoiser_class} ({f.display_name})" for f in FAMILIES.values())
    )


def denoiser_of(pipeline) -> tuple[nn.Module, ModelFamily]:
    """The pipeline's denoiser (`unet` or `transformer`) and its family."""
    for attribute in ("unet", "transformer"):
        denoiser = getattr(pipeline, attribute, None)
        if isinstance(denoiser, nn.Module):
            return denoiser, family_of_denoiser(denoiser)
    raise ValueError(f"{type(pipeline).__name__} has neither a `unet` nor a `transformer` for T-LoRA to adapt.")


def family_mismatch(adapter_family: str | None, family: ModelFamily) -> str | None:
    """Why an adapter made for `adapter_family` cannot go into a denoiser of `family`, or None when it can.

    Files without `model_family` (written before families existed) are checked by their keys and shapes instead.
    """
    if adapter_family is None or adapter_family == family.name:
        return None
    made_for = get_family(adapter_family)
    return (
        f"This T-LoRA adapter is for {made_for.display_name} (a `{made_for.denoiser_attribute}`, "
        f"{made_for.denoiser_class}); this model is {family.display_name} (a `{family.denoiser_attribute}`, "
        f"{family.denoiser_class}). Load it into a {made_for.display_name} pipeline such as "
        f"{made_for.pipeline_classes[0]}."
    )
