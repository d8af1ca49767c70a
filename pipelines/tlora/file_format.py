"""The `pytorch_tlora_weights.safetensors` file format: tensor keys, metadata, reading and checking.

Keys are `<denoiser>.<module path>.tlora.<param>`, where `<denoiser>` is the pipeline attribute of the model
family's denoiser (`unet` or `transformer`, see `families.py`); the header metadata `tlora_config` holds the JSON
config.
All functions here are pure: they read and write tensors and files, never a model.
"""

from __future__ import annotations

import glob
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import FORMAT_VERSION, TLoraConfig, TLoraConfigError
from .families import FAMILIES, SDXL, ModelFamily, get_family
from .limits import quote
from .version import __version__

WEIGHT_NAME = "pytorch_tlora_weights.safetensors"
METADATA_KEY = "tlora_config"
# the version of this package that wrote the file, named when another version cannot read it
WRITER_KEY = "tlora_version"
KEY_PREFIXES = tuple(sorted({family.key_prefix for family in FAMILIES.values()}))
KEY_INFIX = ".tlora."
# float8 and the like hold no adapter this package writes, and torch cannot even check them for NaN
TENSOR_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

# file name of each tensor -> attribute of the adapter layer
PARAMETER_NAMES = {
    "vanilla": {"down": "down", "up": "up"},
    "ortho": {
        "down": "down",
        "up": "up",
        "lambda": "lam",
        "down_base": "down_base",
        "up_base": "up_base",
        "lambda_base": "lam_base",
    },
}


class TLoraFileError(ValueError):
    """A file or state dict that is not a valid T-LoRA adapter for this model."""


def refuse_pickle(path: str | os.PathLike) -> None:
    if str(path).lower().endswith(PICKLE_SUFFIXES):
        raise TLoraFileError(
            f"{path}: pickle-based weight files are not loaded (they can run arbitrary code). T-LoRA adapters are "
            "safetensors files. For a checkpoint of the T-LoRA authors' code (FLUX: checkpoint-N/lora.pt), convert "
            "the run with `python scripts/convert_tlora.py import-official CHECKPOINT_DIR OUT_DIR`; otherwise "
            "convert the file with a tool you trust first."
        )


def adapter_state_dict(adapters: dict, variant: str) -> dict[str, torch.Tensor]:
    """`{module path: adapter layer}` -> the denoiser's T-LoRA layers as tensors, keys `<path>.tlora.<param>`."""
    return {
        f"{path}{KEY_INFIX}{file_name}": getattr(adapter, attribute).detach()
        for path, adapter in adapters.items()
        for file_name, attribute in PARAMETER_NAMES[variant].items()
    }


def key_prefix(config: TLoraConfig) -> str:
    """The key prefix of the adapter's denoiser; `unet.` for files from before model families."""
    return family_of_config(config).key_prefix


def layer_key_parts(key: str) -> tuple[str, str]:
    """`[unet.|transformer.]<path>.tlora.<name>` -> (path, name); the denoiser prefix is optional."""
    prefix = next((prefix for prefix in KEY_PREFIXES if key.startswith(prefix)), "")
    path, _, name = key[len(prefix) :].rpartition(KEY_INFIX)
    return path, name


def family_of_config(config: TLoraConfig) -> ModelFamily:
    """The adapter's family; SD-XL for files from before model families (whose prefix is `unet.`)."""
    return SDXL if config.model_family is None else get_family(config.model_family)


def _other_prefix(key: str, prefix: str) -> str | None:
    return next((other for other in KEY_PREFIXES if other != prefix and key.startswith(other)), None)


def pack_layers(tlora_layers: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Prefix the denoiser's layers with `unet.` or `transformer.` as stored in a file (like diffusers'
    `pack_weights`)."""
    packed = {}
    for key, value in tlora_layers.items():
        other = _other_prefix(key, prefix)
        if other is not None:
            raise TLoraFileError(
                f"Key {key!r} belongs to a `{other[:-1]}`, but the adapter's config is for a "
                f"`{prefix[:-1]}` (see `model_family`)."
            )
        packed[key if key.startswith(prefix) else prefix + key] = value
    return packed


def temporary_sibling(path: Path) -> Path:
    """A fresh hidden name beside `path` to build it under: `.<name>.<random>.tmp`."""
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")


def remove_stale_temporaries(path: Path) -> None:
    """Remove the temporaries that killed writes of `path` left behind: a process killed before its rename cannot
    clean up after itself, so the next write of the same target does."""
    own_name = re.compile(rf"\.{re.escape(path.name)}\.\w+\.tmp")
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if not own_name.fullmatch(leftover.name):
            continue
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def write_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write through `write(temporary path)` in the same folder, then rename into place: an interrupted write
    never leaves a partial file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    temporary = temporary_sibling(path)
    # The usual mode is 0666 less the umask, which creating the file tells without changing the umask. It is set
    # again after writing because some writers (safetensors) recreate the file as 0600; `mkstemp` would also give
    # 0600, hiding adapters and results from every other user and service of the machine.
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    usual_mode = stat.S_IMODE(os.stat(temporary).st_mode)
    try:
        write(temporary)
        os.chmod(temporary, usual_mode)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


def save_tlora_file(state_dict: dict[str, torch.Tensor], config: TLoraConfig, path: str | os.PathLike) -> Path:
    """Write the adapter file (atomically)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in pack_layers(state_dict, key_prefix(config)).items()}
    metadata = {"format": "pt", METADATA_KEY: config.to_json(), WRITER_KEY: __version__}
    return write_atomically(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))


def _describe_foreign_keys(keys) -> str | None:
    """A hint for files that are adapters, but not T-LoRA files of this format."""
    keys = [key for key in keys if KEY_INFIX not in key]  # ".tlora.down" contains "lora.down"
    if any("_lora.q_layer" in k or "_lora.down.weight" in k or "_lora.lambda_layer" in k for k in keys):
        return (
            "It looks like a checkpoint of the T-LoRA authors' code; convert it with "
            "`python scripts/convert_tlora.py import-official CHECKPOINT_DIR OUT_DIR`."
        )
    if any(
        marker in k for k in keys for marker in ("lora_A", "lora_B", "lora_down", "lora_up", "lora.down", "lora.up")
    ):
        return "It looks like a standard LoRA; load it with `pipe.load_lora_weights(...)` instead."
    return None


def read_safetensors(
    path: str | os.PathLike, with_tensors: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header metadata) of a safetensors file; with `with_tensors=False` only the header is read.

    Pickle files are refused unread; a damaged file raises `TLoraFileError` naming it.
    """
    refuse_pickle(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()} if with_tensors else {}
            return tensors, handle.metadata() or {}
    except FileNotFoundError:
        raise
    except Exception as error:  # safetensors raises its own error types for damaged headers
        raise TLoraFileError(f"{path} is not a readable safetensors file: {error}") from None


def read_tlora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], TLoraConfig]:
    """Read a T-LoRA safetensors file: its tensors and its validated config."""
    state_dict, metadata = read_safetensors(path)
    if METADATA_KEY not in metadata:
        hint = _describe_foreign_keys(state_dict) or "Only files written by this package can be loaded."
        raise TLoraFileError(f"{path} has no `{METADATA_KEY}` metadata, so it is not a T-LoRA adapter. {hint}")
    try:
        config = TLoraConfig.from_json(metadata[METADATA_KEY])
    except TLoraConfigError as error:
        writer = metadata.get(WRITER_KEY, "a version before 0.1.0")
        raise TLoraFileError(
            f"{path}: {error} The file was written by pipelines.tlora {writer}; this loader is pipelines.tlora "
            f"{__version__}. Loader files that came with an adapter (pipeline.py and tlora_*.py, for "
            "`custom_pipeline=`) load the adapters of their own version: use those of the adapter's repository."
        ) from None
    return state_dict, config


def _expected_shapes(variant: str, rank: int, in_features: int, out_features: int) -> dict[str, tuple]:
    rank = min(rank, in_features, out_features)
    shapes = {"down": (rank, in_features), "up": (out_features, rank), "lambda": (rank,)}
    for name in ("down", "up", "lambda"):
        shapes[f"{name}_base"] = shapes[name]
    return {name: shapes[name] for name in PARAMETER_NAMES[variant]}


def split_state_dict(
    state_dict: dict[str, torch.Tensor],
    config: TLoraConfig,
    projection_shapes: dict[str, tuple[int, int]],
    family: ModelFamily = SDXL,
) -> dict[str, dict[str, torch.Tensor]]:
    """Check a state dict against the config and the model, and group it by module path.

    Args:
        state_dict: keys `<prefix><path>.tlora.<param>` (the prefix is optional).
        projection_shapes: `{module path: (in_features, out_features)}` of the model's linear layers.
        family: the model's family, whose denoiser attribute is the key prefix (`unet.` or `transformer.`).

    Returns:
        `{module path: {adapter attribute: tensor}}`.
    """
    if not state_dict:
        raise TLoraFileError("The T-LoRA state dict is empty.")
    prefix, label = family.key_prefix, family.denoiser_label
    names = PARAMETER_NAMES[config.variant]
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        other = _other_prefix(key, prefix)
        if other is not None:
            raise TLoraFileError(
                f"This adapter is for a `{other[:-1]}` (key {quote(key)}), but the model has a `{prefix[:-1]}`: it "
                "was made for another model family."
            )
        body = key[len(prefix) :] if key.startswith(prefix) else key
        path, infix, name = body.rpartition(KEY_INFIX)
        if infix and name not in names:
            raise TLoraFileError(
                f"Key {quote(key)} names an unknown T-LoRA parameter {quote(name)}: a {config.variant!r} adapter "
                f"has {', '.join(names)}. The file was written by another version or tool, or its variant is wrong."
            )
        if not infix:
            hint = _describe_foreign_keys(state_dict) or ""
            raise TLoraFileError(
                f"Unexpected key {quote(key)} for a {config.variant!r} T-LoRA adapter (expected "
                f"'{prefix}<module path>.tlora.<{'|'.join(names)}>'). {hint}".rstrip()
            )
        if path not in projection_shapes:
            raise TLoraFileError(
                f"Key {quote(key)} names module {quote(path)}, which is not a linear projection of this {label}; the "
                "adapter was made for a different base model."
            )
        grouped.setdefault(path, {})[names[name]] = tensor

    for path, tensors in grouped.items():
        missing = [name for name, attribute in names.items() if attribute not in tensors]
        if missing:
            raise TLoraFileError(f"Missing keys for module {quote(path)}: " + ", ".join(f"tlora.{m}" for m in missing))
        expected = _expected_shapes(config.variant, config.rank, *projection_shapes[path])
        for name, shape in expected.items():
            tensor = tensors[names[name]]
            if tuple(tensor.shape) != shape:
                raise TLoraFileError(
                    f"Shape mismatch for '{prefix}{path}.tlora.{name}': the file has {tuple(tensor.shape)}, this "
                    f"{label} with rank {config.rank} needs {shape}. The adapter was made for a different base model "
                    "or rank."
                )
            if tensor.dtype not in TENSOR_DTYPES:
                raise TLoraFileError(
                    f"'{prefix}{path}.tlora.{name}' has dtype {tensor.dtype}; expected one of "
                    f"{', '.join(map(str, TENSOR_DTYPES))}."
                )
            if not torch.isfinite(tensor).all():
                raise TLoraFileError(f"'{prefix}{path}.tlora.{name}' contains NaN or Inf values.")
    return grouped


def config_from_metadata(metadata: dict | str | None) -> TLoraConfig:
    """Accept a config given as a `TLoraConfig`, a dict or a JSON string."""
    if isinstance(metadata, TLoraConfig):
        return metadata
    if isinstance(metadata, str):
        return TLoraConfig.from_json(metadata)
    if isinstance(metadata, dict):
        data = dict(metadata)
        data.setdefault("format_version", FORMAT_VERSION)
        return TLoraConfig.from_dict(data)
    raise TLoraConfigError("An in-memory T-LoRA state dict needs its config: pass `tlora_config=`.")
