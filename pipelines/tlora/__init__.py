"""T-LoRA for diffusers' Stable Diffusion XL pipelines.

Importing this package gives the stock SD-XL pipelines `load_tlora_weights`, `unload_tlora_weights`,
`set_tlora_scale`, `save_tlora_weights` and `tlora_state_dict`:

    import pipelines.tlora
    pipe = StableDiffusionXLPipeline.from_pretrained(...)
    pipe.load_tlora_weights("path/or/repo-id")

Modules, in the order of the method: `schedule` (rank per timestep), `layers` (adapter math), `injection`
(attaching adapters and routing timesteps), `file_format` (safetensors layout), `loader` (pipeline API),
`config` (the settings stored with every adapter).
"""

import diffusers

from .config import DEFAULT_TARGET_MODULES, FORMAT_VERSION, TLoraConfig, TLoraConfigError
from .file_format import WEIGHT_NAME, TLoraFileError, read_tlora_file, save_tlora_file
from .injection import TLoraInjectionError, get_tlora_adapters, inject_tlora, remove_tlora
from .layers import OrthoTLoraAdapter, RankState, VanillaTLoraAdapter
from .loader import (
    TLoraLoaderMixin,
    fuse_tlora,
    get_tlora_config,
    get_tlora_state_dict,
    load_tlora_into_unet,
    load_tlora_weights,
    register,
    save_tlora_weights,
    set_tlora_scale,
    set_tlora_state_dict,
    tlora_state_dict,
    unload_tlora_weights,
)
from .schedule import rank_mask, rank_schedule

# The SD-XL pipelines whose instances (also those made by AutoPipeline* or DiffusionPipeline) gain the API.
SDXL_PIPELINE_NAMES = (
    "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
    "StableDiffusionXLControlNetPipeline",
    "StableDiffusionXLControlNetImg2ImgPipeline",
    "StableDiffusionXLControlNetInpaintPipeline",
    "StableDiffusionXLPAGPipeline",
    "StableDiffusionXLPAGImg2ImgPipeline",
    "StableDiffusionXLPAGInpaintPipeline",
)

REGISTERED_PIPELINES = register(getattr(diffusers, name) for name in SDXL_PIPELINE_NAMES if hasattr(diffusers, name))


class TLoraStableDiffusionXLPipeline(TLoraLoaderMixin, diffusers.StableDiffusionXLPipeline):
    """`StableDiffusionXLPipeline` with the T-LoRA loader, for code that prefers a class to an import side effect."""


__all__ = [
    "DEFAULT_TARGET_MODULES",
    "FORMAT_VERSION",
    "WEIGHT_NAME",
    "OrthoTLoraAdapter",
    "RankState",
    "REGISTERED_PIPELINES",
    "TLoraConfig",
    "TLoraConfigError",
    "TLoraFileError",
    "TLoraInjectionError",
    "TLoraLoaderMixin",
    "TLoraStableDiffusionXLPipeline",
    "VanillaTLoraAdapter",
    "fuse_tlora",
    "get_tlora_adapters",
    "get_tlora_config",
    "get_tlora_state_dict",
    "inject_tlora",
    "load_tlora_into_unet",
    "load_tlora_weights",
    "rank_mask",
    "rank_schedule",
    "read_tlora_file",
    "remove_tlora",
    "save_tlora_file",
    "save_tlora_weights",
    "set_tlora_scale",
    "set_tlora_state_dict",
    "tlora_state_dict",
    "unload_tlora_weights",
]
