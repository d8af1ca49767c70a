"""Loading and saving T-LoRA adapters on diffusers pipelines.

`TLoraLoaderMixin` gives a pipeline `load_tlora_weights`, `unload_tlora_weights`, `set_tlora_scale`,
`save_tlora_weights` and `tlora_state_dict`, in the style of diffusers' `StableDiffusionXLLoraLoaderMixin` and
`FluxLoraLoaderMixin`. The instance methods are plain functions of a pipeline (anything with a `unet` or a
`transformer` of a known model family, see `families.py`), so they also serve pipelines this package does not
register.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)
from torch import nn

from .config import TLoraConfig
from .families import denoiser_of, family_mismatch, family_of_denoiser
from .file_format import (
    WEIGHT_NAME,
    TLoraFileError,
    adapter_state_dict,
    config_from_metadata,
    key_prefix,
    read_tlora_file,
    refuse_pickle,
    save_tlora_file,
    split_state_dict,
)
from .injection import get_router, get_tlora_adapters, inject_tlora, projection_shapes, remove_tlora
from .limits import finite_number


def _resolve_weight_file(
    source: str | os.PathLike,
    weight_name: str | None,
    subfolder: str | None,
    revision: str | None,
    token: str | bool | None,
    cache_dir: str | os.PathLike | None,
    local_files_only: bool | None,
    force_download: bool,
) -> Path:
    """A local file, a file inside a local folder, or a file downloaded from a Hub repository."""
    weight_name = weight_name or WEIGHT_NAME
    refuse_pickle(weight_name)
    source_path = Path(source).expanduser()
    if source_path.is_file():
        return source_path
    if source_path.is_dir():
        candidate = source_path / (subfolder or "") / weight_name
        if candidate.is_file():
            return candidate
        present = sorted(p.name for p in candidate.parent.glob("*.safetensors")) if candidate.parent.is_dir() else []
        raise FileNotFoundError(
            f"No {weight_name!r} in {candidate.parent}. Safetensors files there: {present or 'none'}; pass "
            "`weight_name=` to pick one."
        )
    if str(source).startswith((".", "/", "~")) or str(source).count("/") > 1 or str(source).endswith(".safetensors"):
        raise FileNotFoundError(f"No such T-LoRA file or folder: {source}")
    try:
        return Path(
            hf_hub_download(
                str(source),
                weight_name,
                subfolder=subfolder,
                revision=revision,
                token=token,
                cache_dir=cache_dir,
                local_files_only=bool(local_files_only),
                force_download=force_download,
            )
        )
    except HFValidationError:
        raise FileNotFoundError(f"{source!r} is neither a local path nor a valid Hub repository id.") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"Hub repository {source!r} was not found (or needs a `token=`).") from None
    except LocalEntryNotFoundError:  # a subclass of EntryNotFoundError: test it first
        raise FileNotFoundError(
            f"{source!r} is not a local path, and {weight_name!r} could not be fetched from the Hub (offline, or "
            "not cached)."
        ) from None
    except EntryNotFoundError:
        raise FileNotFoundError(f"Hub repository {source!r} has no file {weight_name!r}.") from None


def tlora_state_dict(
    pretrained_model_name_or_path_or_dict,
    weight_name: str | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    force_download: bool = False,
    tlora_config: TLoraConfig | dict | str | None = None,
) -> tuple[dict[str, torch.Tensor], TLoraConfig]:
    """Read an adapter's tensors and config without touching any model."""
    if isinstance(pretrained_model_name_or_path_or_dict, dict):
        return dict(pretrained_model_name_or_path_or_dict), config_from_metadata(tlora_config)
    path = _resolve_weight_file(
        pretrained_model_name_or_path_or_dict,
        weight_name,
        subfolder,
        revision,
        token,
        cache_dir,
        local_files_only,
        force_download,
    )
    state_dict, config = read_tlora_file(path)
    return state_dict, config if tlora_config is None else config_from_metadata(tlora_config)


def _denoiser(pipeline_or_denoiser) -> nn.Module:
    if isinstance(pipeline_or_denoiser, nn.Module):
        return pipeline_or_denoiser
    return denoiser_of(pipeline_or_denoiser)[0]


def _check_grouped(denoiser: nn.Module, state_dict: dict[str, torch.Tensor], config: TLoraConfig) -> dict:
    family = family_of_denoiser(denoiser)
    mismatch = family_mismatch(config.model_family, family)
    if mismatch:
        raise TLoraFileError(mismatch)
    return split_state_dict(state_dict, config, projection_shapes(denoiser), family)


def load_tlora_into_denoiser(
    denoiser: torch.nn.Module,
    state_dict: dict[str, torch.Tensor],
    config: TLoraConfig,
    adapter_name: str = "default",
    num_train_timesteps: int | None = None,
) -> None:
    """Check `state_dict` against the denoiser (a UNet or a transformer), then attach it as `adapter_name`.

    Nothing on the denoiser changes unless every check passes.
    """
    grouped = _check_grouped(denoiser, state_dict, config)
    if num_train_timesteps is not None and num_train_timesteps != config.num_train_timesteps:
        warnings.warn(
            f"The T-LoRA adapter's schedule assumes num_train_timesteps={config.num_train_timesteps}, but the "
            f"pipeline's scheduler has {num_train_timesteps}; the active ranks will not match those of training.",
            stacklevel=3,
        )
    _copy_into(inject_tlora(denoiser, config, adapter_name, paths=list(grouped), initialize=False), grouped)


# the SD/SD-XL name, as diffusers' `load_lora_into_unet`
load_tlora_into_unet = load_tlora_into_denoiser


def set_tlora_state_dict(
    denoiser: torch.nn.Module, state_dict: dict[str, torch.Tensor], adapter_name: str = "default"
) -> None:
    """Copy saved tensors into the adapter already attached as `adapter_name`, keeping its parameter objects
    (an optimizer or DDP holds references to them), as when resuming training."""
    grouped = _check_grouped(denoiser, state_dict, get_tlora_config(denoiser, adapter_name))
    adapters = get_tlora_adapters(denoiser, adapter_name)
    if set(grouped) != set(adapters):
        different = sorted(set(grouped) ^ set(adapters))[0]
        raise TLoraFileError(
            f"The state dict and the attached adapter {adapter_name!r} adapt different modules (e.g. {different!r})."
        )
    _copy_into(adapters, grouped)


def _copy_into(adapters: dict, grouped: dict[str, dict[str, torch.Tensor]]) -> None:
    with torch.no_grad():
        for path, tensors in grouped.items():
            for attribute, tensor in tensors.items():
                getattr(adapters[path], attribute).copy_(tensor)


def load_tlora_weights(
    pipeline,
    pretrained_model_name_or_path_or_dict,
    weight_name: str | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    adapter_name: str = "default",
    tlora_config: TLoraConfig | dict | str | None = None,
    force_download: bool = False,
) -> None:
    """Load a T-LoRA adapter into the pipeline's denoiser (`pipeline.unet` or `pipeline.transformer`).

    Args:
        pretrained_model_name_or_path_or_dict: a `.safetensors` file, a folder holding
            `pytorch_tlora_weights.safetensors` (or `weight_name`), a Hub repository id, or an in-memory state
            dict (then `tlora_config` is required).
        adapter_name: loading again under the same name replaces that adapter; another name adds a second
            adapter whose update is summed with the first.
        tlora_config: the config of an in-memory state dict (a `TLoraConfig`, a dict or JSON); for a file it
            overrides the file's metadata.
    """
    state_dict, config = tlora_state_dict(
        pretrained_model_name_or_path_or_dict,
        weight_name=weight_name,
        subfolder=subfolder,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        force_download=force_download,
        tlora_config=tlora_config,
    )
    denoiser, family = denoiser_of(pipeline)
    mismatch = family_mismatch(config.model_family, family)
    if mismatch:
        raise TLoraFileError(f"{mismatch} Got {type(pipeline).__name__}.")
    scheduler = getattr(pipeline, "scheduler", None)
    timesteps = getattr(getattr(scheduler, "config", None), "num_train_timesteps", None)
    load_tlora_into_denoiser(denoiser, state_dict, config, adapter_name, num_train_timesteps=timesteps)


def unload_tlora_weights(pipeline, adapter_name: str | None = None) -> None:
    """Remove one T-LoRA adapter, or all of them (the default); afterwards the denoiser computes exactly what it
    computed before loading."""
    denoiser = _denoiser(pipeline)
    router = get_router(denoiser)
    if adapter_name is not None and (router is None or adapter_name not in router.configs):
        raise ValueError(f"No T-LoRA adapter named {adapter_name!r} is loaded.")
    remove_tlora(denoiser, adapter_name)


def set_tlora_scale(pipeline, scale: float, adapter_name: str | None = None) -> None:
    """Multiply the update of one adapter (or all) by `scale`; 0 gives the base model's output."""
    router = get_router(_denoiser(pipeline))
    names = [] if router is None else list(router.configs) if adapter_name is None else [adapter_name]
    if not names or any(name not in router.configs for name in names):
        raise ValueError(f"No T-LoRA adapter {'is loaded' if adapter_name is None else repr(adapter_name)}.")
    scale = finite_number(scale, "The T-LoRA scale")
    for name in names:
        router.scales[name] = scale


def get_tlora_config(pipeline_or_denoiser, adapter_name: str = "default") -> TLoraConfig:
    router = get_router(_denoiser(pipeline_or_denoiser))
    if router is None or adapter_name not in router.configs:
        raise KeyError(f"No T-LoRA adapter named {adapter_name!r} is loaded.")
    return router.configs[adapter_name]


def get_tlora_state_dict(pipeline_or_denoiser, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors keyed `<path>.tlora.<param>`, for `save_tlora_weights(unet_tlora_layers=...)` (or
    `transformer_tlora_layers=`)."""
    denoiser = _denoiser(pipeline_or_denoiser)
    config = get_tlora_config(denoiser, adapter_name)
    return adapter_state_dict(get_tlora_adapters(denoiser, adapter_name), config.variant)


def save_tlora_weights(
    save_directory: str | os.PathLike,
    unet_tlora_layers: dict[str, torch.Tensor] | None = None,
    tlora_config: TLoraConfig | dict | str | None = None,
    is_main_process: bool = True,
    weight_name: str | None = None,
    transformer_tlora_layers: dict[str, torch.Tensor] | None = None,
) -> Path | None:
    """Write the layers of a UNet (`unet_tlora_layers`) or a transformer (`transformer_tlora_layers`) and their
    config to `save_directory/weight_name` (atomically)."""
    if (unet_tlora_layers is None) == (transformer_tlora_layers is None):
        raise ValueError("Pass exactly one of `unet_tlora_layers` and `transformer_tlora_layers`.")
    config = config_from_metadata(tlora_config)
    attribute = "unet" if transformer_tlora_layers is None else "transformer"
    if key_prefix(config) != attribute + ".":
        raise TLoraFileError(
            f"The layers are a `{attribute}`'s but the config's model_family {config.model_family!r} has a "
            f"`{key_prefix(config)[:-1]}`; set `model_family` to the adapter's family."
        )
    if not is_main_process:
        return None
    if os.path.isfile(save_directory):
        raise NotADirectoryError(f"Cannot save T-LoRA weights into {save_directory}: it is a file.")
    weight_name = weight_name or WEIGHT_NAME
    if not weight_name.endswith(".safetensors"):
        raise TLoraFileError(f"T-LoRA weights are saved as safetensors; got weight_name={weight_name!r}.")
    layers = unet_tlora_layers if transformer_tlora_layers is None else transformer_tlora_layers
    return save_tlora_file(layers, config, Path(save_directory) / weight_name)


def fuse_tlora(pipeline, *args, **kwargs):
    """T-LoRA cannot be fused: its rank changes with every timestep, and weights fused into the denoiser would
    freeze one rank. To get a standard LoRA at one rank, use `scripts/convert_tlora.py export-lora`."""
    raise NotImplementedError(fuse_tlora.__doc__)


class TLoraLoaderMixin:
    """Adds T-LoRA loading and saving to a pipeline with a `unet` or a `transformer` (and a `scheduler`)."""

    tlora_weight_name = WEIGHT_NAME

    load_tlora_weights = load_tlora_weights
    unload_tlora_weights = unload_tlora_weights
    set_tlora_scale = set_tlora_scale
    fuse_tlora = fuse_tlora
    tlora_state_dict = staticmethod(tlora_state_dict)

    @classmethod
    def save_tlora_weights(
        cls,
        save_directory: str | os.PathLike,
        unet_tlora_layers: dict[str, torch.Tensor] | None = None,
        tlora_config: TLoraConfig | dict | str | None = None,
        is_main_process: bool = True,
        weight_name: str | None = None,
        transformer_tlora_layers: dict[str, torch.Tensor] | None = None,
    ) -> Path | None:
        """Save T-LoRA layers (from `get_tlora_state_dict(pipe)`), like `save_lora_weights`."""
        return save_tlora_weights(
            save_directory,
            unet_tlora_layers,
            tlora_config,
            is_main_process,
            weight_name,
            transformer_tlora_layers=transformer_tlora_layers,
        )


def register(pipeline_classes) -> list[type]:
    """Give each class the mixin's methods it does not define yet; safe to call more than once."""
    registered = []
    for cls in pipeline_classes:
        for name, value in vars(TLoraLoaderMixin).items():
            if name.startswith("__") or hasattr(cls, name):
                continue
            setattr(cls, name, value)
        registered.append(cls)
    return registered
