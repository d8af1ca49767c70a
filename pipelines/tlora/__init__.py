"""T-LoRA for diffusers' pipelines: Stable Diffusion 1.x/2.x, SD-XL and FLUX.1.

Importing this package gives the stock pipelines of every supported model family `load_tlora_weights`,
`unload_tlora_weights`, `set_tlora_scale`, `save_tlora_weights`, `tlora_state_dict` and a refusing `fuse_tlora`:

    import pipelines.tlora
    pipe = StableDiffusionXLPipeline.from_pretrained(...)   # or FluxPipeline, StableDiffusionPipeline, ...
    pipe.load_tlora_weights("path/or/repo-id")

Modules, in the order of the method:
    schedule          the rank per timestep, r(t), and its mask
    layers            the adapter math (Vanilla T-LoRA and ortho T-LoRA)
    families          what differs between denoisers: attribute, timestep units, targets, pipelines
    injection         attaching adapters to a denoiser and routing each call's timesteps to them
    config            the settings stored with every adapter
    file_format       the safetensors layout, reading and checking
    loader            the pipeline API
    limits            bounds on what is read from files and flags: finite numbers, sizes, nesting
Interoperability with other tools' files:
    official_format   the T-LoRA authors' SD-XL checkpoints
    official_flux     the T-LoRA authors' FLUX.1 checkpoints (lora.pt, read weights-only)
    lora_export       standard LoRA files frozen at one rank (diffusers, kohya)
    comfyui_export    the one file ComfyUI's T-LoRA node loads, and its node settings
    convert           the conversion commands behind `scripts/convert_tlora.py`
    remote_code       loader files (pipeline.py + runtime modules) for diffusers' `custom_pipeline=`
    version           the package version, recorded in adapters and loader files
"""

import diffusers

from .config import DEFAULT_TARGET_MODULES, FORMAT_VERSION, TLoraConfig, TLoraConfigError
from .families import FAMILIES, ModelFamily, denoiser_of, family_of_denoiser, get_family
from .file_format import WEIGHT_NAME, TLoraFileError, read_tlora_file, save_tlora_file
from .injection import TLoraInjectionError, get_tlora_adapters, inject_tlora, remove_tlora, set_rank_routing
from .layers import OrthoTLoraAdapter, RankState, VanillaTLoraAdapter
from .loader import (
    TLoraLoaderMixin,
    fuse_tlora,
    get_tlora_config,
    get_tlora_state_dict,
    load_tlora_into_denoiser,
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
from .version import __version__

# Every pipeline of every family whose instances (also those made by AutoPipeline* or DiffusionPipeline) gain the
# API; a class missing from the installed diffusers is skipped.
REGISTERED_PIPELINES = register(
    getattr(diffusers, name)
    for family in FAMILIES.values()
    for name in family.pipeline_classes
    if hasattr(diffusers, name)
)


class TLoraStableDiffusionXLPipeline(TLoraLoaderMixin, diffusers.StableDiffusionXLPipeline):
    """`StableDiffusionXLPipeline` with the T-LoRA loader, for code that prefers a class to an import side effect."""


__all__ = [
    "__version__",
    "DEFAULT_TARGET_MODULES",
    "FAMILIES",
    "FORMAT_VERSION",
    "WEIGHT_NAME",
    "ModelFamily",
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
    "denoiser_of",
    "family_of_denoiser",
    "fuse_tlora",
    "get_tlora_adapters",
    "get_family",
    "get_tlora_config",
    "get_tlora_state_dict",
    "inject_tlora",
    "load_tlora_into_denoiser",
    "load_tlora_into_unet",
    "load_tlora_weights",
    "rank_mask",
    "rank_schedule",
    "read_tlora_file",
    "remove_tlora",
    "save_tlora_file",
    "save_tlora_weights",
    "set_rank_routing",
    "set_tlora_scale",
    "set_tlora_state_dict",
    "tlora_state_dict",
    "unload_tlora_weights",
]
