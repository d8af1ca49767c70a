"""Moving adapters between this package's format, the T-LoRA authors' checkpoints and standard LoRA files.

    import_official   authors' checkpoint-N folder (+ logs/hparams.yml)  ->  pytorch_tlora_weights.safetensors
    export_official   our file  ->  OUT/checkpoint-N/<weights> + OUT/logs/hparams.yml
    export_lora       our file  ->  a standard LoRA (kohya or diffusers keys, per tool) frozen at one rank
    export_comfyui    our file  ->  the one file ComfyUI's T-LoRA node loads, plus the node settings to use
    inspect_adapter   either layout  ->  a summary of its settings and schedule
    add_loader_files  our file's folder  +=  pipeline.py and tlora_*.py, for diffusers' `custom_pipeline=`

The authors have two layouts, one per model family: SD-XL (`official_format.py`, safetensors) and FLUX.1
(`official_flux.py`, `lora.pt`, a torch pickle read here with weights-only unpickling and nothing else). Which one a
checkpoint is follows from its keys; the family of our files from their `model_family`.

Each command reads its input, checks it completely, then writes its output under a temporary name that is renamed
when complete (a folder is built beside its destination), so a failure never leaves a partial file. It returns a
`ConversionResult` whose notes say what was inferred or lost. `scripts/convert_tlora.py` is the command line.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from .comfyui_export import check_loader, describe_settings, node_file_name, node_metadata, node_settings
from .config import TLoraConfig, TLoraConfigError
from .families import FLUX, SDXL, ModelFamily
from .file_format import (
    METADATA_KEY,
    TENSOR_DTYPES,
    WEIGHT_NAME,
    TLoraFileError,
    family_of_config,
    read_safetensors,
    refuse_pickle,
    remove_stale_temporaries,
    save_tlora_file,
    split_state_dict,
    temporary_sibling,
    write_atomically,
)
from .limits import MAX_PICKLE_BYTES, check_pickle_nesting, load_json, quote
from .loader import tlora_state_dict
from .lora_export import DEFAULT_TOOL, TOOL_FORMATS, describe_export, freeze_tlora, lora_state_dict, rank_at_timestep
from .official_flux import (
    FLUX_EXPORT_WEIGHT_NAME,
    FLUX_WEIGHT_NAME,
    flux_hparams_for,
    flux_official_to_tlora_state_dict,
    flux_settings_from_hparams,
    is_flux_checkpoint,
    resolve_flux_config,
    tlora_to_flux_official_state_dict,
)
from .official_format import (
    DEFAULT_BASE_MODEL,
    DEFAULT_CLASS_NAME,
    DEFAULT_PLACEHOLDER_TOKEN,
    HPARAMS_NAME,
    LOGS_DIR,
    MAX_HPARAMS_CHARS,
    OFFICIAL_NUM_TRAIN_TIMESTEPS,
    OFFICIAL_WEIGHT_NAME,
    ScheduleSettings,
    format_hparams,
    hparams_for,
    is_official_key,
    merge_settings,
    missing_projections,
    module_shapes,
    official_to_tlora_state_dict,
    parse_hparams,
    resolve_config,
    settings_from_hparams,
    tlora_to_official_state_dict,
)
from .remote_code import PIPELINE_FILE, describe_loader_files, pipeline_class_name, write_loader_files

# diffusers' default weight name: `pipe.load_lora_weights(folder)` finds it without `weight_name=`
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
EXPORT_METADATA_KEY = "tlora_export"
INSPECT_TIMESTEPS = (0, 250, 500, 750, 999)
OUR_LAYOUT = "T-LoRA (this package)"
KNOWN_LAYOUTS = (
    "Known layouts: this package's T-LoRA file (pytorch_tlora_weights.safetensors with `tlora_config` metadata, "
    "or a folder holding it); the T-LoRA authors' SD-XL checkpoint (a checkpoint-N folder, or its "
    "pytorch_lora_weights.safetensors, with keys '<module>.processor.to_q_lora.<param>' and the settings in "
    "<run>/logs/hparams.yml); the authors' FLUX checkpoint (checkpoint-N/lora.pt, or lora.safetensors as exported "
    "here, with keys 'transformer_blocks.0.attn.processor.to_q_lora.down.weight', settings in <run>/logs/hparams.yml)."
)


@dataclass
class ConversionResult:
    outputs: list[Path]
    config: TLoraConfig
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# writing


def _check_free(paths: list[Path], overwrite: bool) -> None:
    existing = [str(path) for path in paths if path.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"Output already exists: {', '.join(existing)}. Pass --overwrite to replace it.")


def _write_folder(out_dir: Path, files: dict[str, Callable[[Path], None]], overwrite: bool) -> list[Path]:
    """Build `files` (relative path -> writer) in a staging folder beside `out_dir`, then move them in.

    A new `out_dir` appears in one rename; into an existing folder each file is renamed into place.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder.")
    targets = [out_dir / relative for relative in files]
    _check_free(targets, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)
    staging = temporary_sibling(out_dir)
    staging.mkdir()  # the usual mode (0777 less the umask); `mkdtemp` would give 0700
    try:
        for relative, write in files.items():
            write_atomically(staging / relative, write)  # for its file modes: safetensors writes 0600
        if not out_dir.exists():
            os.rename(staging, out_dir)
        else:
            for relative in files:
                (out_dir / relative).parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / relative, out_dir / relative)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return targets


# ---------------------------------------------------------------------------------------------------------------
# reading


def _refuse_pickle_in(folder: Path) -> None:
    """Name a pickled weights file that sits where safetensors were expected."""
    for candidate in sorted(folder.glob("*_weights.bin")):
        refuse_pickle(candidate)


def _checkpoint_sort_key(folder: Path):
    step = folder.name.removeprefix("checkpoint-")
    return (0, int(step), "") if step.isdigit() else (1, 0, folder.name)


def refuse_both_layouts(folder: Path) -> None:
    """A folder holding a file of each layout is ambiguous: which one was meant is not ours to guess."""
    if (folder / WEIGHT_NAME).is_file() and (folder / OFFICIAL_WEIGHT_NAME).is_file():
        raise TLoraFileError(
            f"{folder} holds both {WEIGHT_NAME} (this package's T-LoRA) and {OFFICIAL_WEIGHT_NAME} (the authors' "
            "layout, or a standard LoRA); pass the file you mean instead of the folder."
        )


def locate_official_weights(path: str | os.PathLike) -> Path:
    """The weights file of an authors' checkpoint given as the file itself or its checkpoint-N folder."""
    path = Path(path).expanduser()
    if path.suffix != Path(FLUX_WEIGHT_NAME).suffix:  # the authors' FLUX `.pt`, read weights-only, is the exception
        refuse_pickle(path)
    if path.is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"No such checkpoint file or folder: {path}")
    refuse_both_layouts(path)
    for name in (OFFICIAL_WEIGHT_NAME, FLUX_EXPORT_WEIGHT_NAME, FLUX_WEIGHT_NAME):
        if (path / name).is_file():
            return path / name
    _refuse_pickle_in(path)
    checkpoints = sorted((p for p in path.glob("checkpoint-*") if p.is_dir()), key=_checkpoint_sort_key)
    if checkpoints:
        raise TLoraFileError(
            f"{path} is a training run folder; pass one of its checkpoints: {', '.join(p.name for p in checkpoints)}."
        )
    raise TLoraFileError(f"{path} holds no {OFFICIAL_WEIGHT_NAME} or {FLUX_WEIGHT_NAME}. {KNOWN_LAYOUTS}")


def _foreign_layout(path: Path, tensors: dict, metadata: dict) -> TLoraFileError:
    if METADATA_KEY in metadata:
        return TLoraFileError(f"{path} is already a T-LoRA file of this package; there is nothing to import.")
    if EXPORT_METADATA_KEY in metadata:
        try:
            record = load_json(metadata[EXPORT_METADATA_KEY], f"the `{EXPORT_METADATA_KEY}` metadata")
        except ValueError:
            record = None  # the layout is known from the key alone
        description = record.get("description", "") if isinstance(record, dict) else ""
        return TLoraFileError(
            f"{path} is a standard LoRA (no timestep schedule), exported from a T-LoRA: {description}"
        )
    if any(marker in key for key in tensors for marker in ("lora_A", "lora_down", ".lora.down")):
        return TLoraFileError(f"{path} is a standard LoRA (no timestep schedule), not a T-LoRA. {KNOWN_LAYOUTS}")
    return TLoraFileError(f"{path} is not in a known adapter layout. {KNOWN_LAYOUTS}")


def find_hparams(weights: Path, hparams: str | os.PathLike | None = None) -> Path | None:
    """`hparams` if given (it must exist), else `<run>/logs/hparams.yml` of `<run>/checkpoint-N/<weights>`."""
    if hparams is not None:
        hparams = Path(hparams).expanduser()
        if not hparams.is_file():
            raise FileNotFoundError(f"No such hparams file: {hparams}")
        return hparams
    candidate = weights.resolve().parent.parent / LOGS_DIR / HPARAMS_NAME
    return candidate if candidate.is_file() else None


# how torch's weights-only unpickler names the first object it refused (a name from the file: cut short)
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S{1,200})")


def _check_torch_archive(path: Path) -> None:
    """Refuse, before torch reads it, a file that is not the zip archive `torch.save` writes (the legacy format is
    refused too), or whose pickle stream is too long or nests too deep (see `limits.check_pickle_nesting`)."""
    try:
        with zipfile.ZipFile(path) as archive:
            entry = next((info for info in archive.infolist() if info.filename.endswith("/data.pkl")), None)
            if entry is None:
                raise TLoraFileError(f"{path} is a zip archive without data.pkl, not a torch file.")
            if entry.file_size > MAX_PICKLE_BYTES:  # refused unread
                raise TLoraFileError(
                    f"{path}: its data.pkl is {entry.file_size:,} bytes; at most {MAX_PICKLE_BYTES:,} are read."
                )
            stream = archive.read(entry)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as error:
        raise TLoraFileError(
            f"{path} is not a readable torch file: not the zip archive torch.save writes (truncated or damaged, or "
            f"a plain or legacy-format pickle, which is never read): {quote(str(error) or type(error).__name__)}"
        ) from None
    try:
        check_pickle_nesting(stream, f"{path}: its data.pkl")
    except ValueError as error:
        raise TLoraFileError(str(error)) from None


def read_weights_only_pickle(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a torch pickle such as the authors' FLUX `lora.pt`, unpickled weights-only: tensors and plain
    containers, never code. Anything needing more is refused, as is anything but a flat `{name: tensor}` dict of
    dense floating-point tensors. Sizes that do not fit the stored data are refused by torch itself."""
    _check_torch_archive(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = _UNSUPPORTED_GLOBAL.search(str(error))
        what = f"a {found[1]} object" if found else "objects other than tensors"
        raise TLoraFileError(
            f"{path} needs more than weights-only unpickling (it holds {what}), so it is not loaded: full unpickling "
            "can run arbitrary code."
        ) from None
    except Exception as error:  # noqa: BLE001  the unpickler lets through whatever a damaged stream provokes
        detail = next(iter(str(error).splitlines()), "") or ("empty file" if path.stat().st_size == 0 else "")
        raise TLoraFileError(
            f"{path} is not a readable torch file (truncated or damaged?): {quote(detail or type(error).__name__)}"
        ) from None
    if not isinstance(data, dict):
        raise TLoraFileError(f"{path} holds a {type(data).__name__}; the authors' checkpoints are dicts of tensors.")
    wrong = [quote(key) for key, value in data.items() if not isinstance(key, str) or not torch.is_tensor(value)]
    if wrong:
        raise TLoraFileError(
            f"{path}: entries {', '.join(wrong[:5])} are not named tensors; the authors' checkpoints hold only "
            "tensors."
        )
    for key, tensor in data.items():
        if tensor.layout != torch.strided or tensor.dtype not in TENSOR_DTYPES:
            kind = f"dtype {tensor.dtype}" if tensor.layout == torch.strided else f"layout {tensor.layout}"
            raise TLoraFileError(
                f"{path}: tensor {quote(key)} has {kind}; the authors' checkpoints hold dense tensors of "
                f"{', '.join(str(dtype).removeprefix('torch.') for dtype in TENSOR_DTYPES)}."
            )
    return data


def read_official_weights(weights: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of an authors' weights file in either format."""
    if weights.suffix == Path(FLUX_WEIGHT_NAME).suffix:
        return read_weights_only_pickle(weights), {}
    return read_safetensors(weights)


def _read_hparams_text(path: Path) -> str:
    if path.stat().st_size > MAX_HPARAMS_CHARS:  # refused unread
        raise TLoraFileError(
            f"{path} is {path.stat().st_size:,} bytes; an hparams.yml is a short list of settings (at most "
            f"{MAX_HPARAMS_CHARS:,} bytes are read)."
        )
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise TLoraFileError(f"{path} is not a UTF-8 text file: {error}") from None


@dataclass
class OfficialCheckpoint:
    """An authors' checkpoint translated to our tensor names, with the settings found for it."""

    weights: Path
    family: ModelFamily
    variant: str
    state_dict: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, int, int]]
    settings: ScheduleSettings
    hparams: Path | None
    notes: list[str] = field(default_factory=list)

    def resolve_config(self) -> tuple[TLoraConfig, list[str]]:
        """The adapter's config and what was inferred, by the rules of the checkpoint's family."""
        if self.family is FLUX:
            hparams = str(self.hparams) if self.hparams else "no hparams.yml was found and the command line"
            config, notes = resolve_flux_config(self.shapes, self.settings, hparams)
        else:
            config, notes = resolve_config(self.variant, self.shapes, self.settings)
        return config, [*self.notes, *notes]

    def describe_source(self) -> str:
        return f"settings read from {self.hparams}" if self.hparams else "no hparams.yml found"


def read_official_checkpoint(
    path: str | os.PathLike, hparams: str | os.PathLike | None = None, overrides: dict | None = None
) -> OfficialCheckpoint:
    weights = locate_official_weights(path)
    tensors, metadata = read_official_weights(weights)
    notes = []
    if tensors and is_flux_checkpoint(tensors):
        family, variant = FLUX, "vanilla"
        state_dict, unused = flux_official_to_tlora_state_dict(tensors)
        if unused:
            notes.append(f"{unused} single-stream-block adapters that the authors' processors never apply left out")
        read_settings = flux_settings_from_hparams
    elif tensors and all(is_official_key(key) for key in tensors):
        family, read_settings = SDXL, settings_from_hparams
        variant, state_dict = official_to_tlora_state_dict(tensors)
    else:
        raise _foreign_layout(weights, tensors, metadata)
    hparams_path = find_hparams(weights, hparams)
    settings = ScheduleSettings()
    if hparams_path is not None:
        source = str(hparams_path)
        settings = read_settings(parse_hparams(_read_hparams_text(hparams_path), source), source)
    settings = merge_settings(settings, overrides or {})
    shapes = module_shapes(state_dict)
    return OfficialCheckpoint(weights, family, variant, state_dict, shapes, settings, hparams_path, notes)


def _validate(state_dict: dict[str, torch.Tensor], config: TLoraConfig) -> None:
    """The core file checks (keys, completeness, shapes for the config's rank, finite values)."""
    shapes = {
        path: (in_features, out_features) for path, (in_features, out_features, _) in module_shapes(state_dict).items()
    }
    split_state_dict(state_dict, config, shapes, family_of_config(config))


def read_adapter(source: str | os.PathLike) -> tuple[dict[str, torch.Tensor], TLoraConfig]:
    """A T-LoRA file of this package (or a folder holding one), checked."""
    source = Path(source).expanduser()
    refuse_pickle(source)
    if not source.exists():
        raise FileNotFoundError(f"No such T-LoRA file or folder: {source}")
    if source.is_dir():
        refuse_both_layouts(source)
    if source.is_dir() and not (source / WEIGHT_NAME).is_file():
        _refuse_pickle_in(source)
        raise TLoraFileError(f"{source} holds no {WEIGHT_NAME}. {KNOWN_LAYOUTS}")
    state_dict, config = tlora_state_dict(source)
    _validate(state_dict, config)
    return state_dict, config


# ---------------------------------------------------------------------------------------------------------------
# commands


def import_official(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    hparams: str | os.PathLike | None = None,
    rank: int | None = None,
    min_rank: int | None = None,
    schedule_exponent: float | None = None,
    variant: str | None = None,
    base_model: str | None = None,
    overwrite: bool = False,
) -> ConversionResult:
    """Convert an authors' checkpoint to `out_dir/pytorch_tlora_weights.safetensors`, with the loader files.

    The tensors decide the variant; the schedule comes from `hparams` (default `<run>/logs/hparams.yml`), with
    any argument given here taking precedence.
    """
    out_dir = Path(out_dir).expanduser()
    target = out_dir / WEIGHT_NAME
    _check_free([target], overwrite)
    overrides = {
        "rank": rank,
        "min_rank": min_rank,
        "schedule_exponent": schedule_exponent,
        "variant": variant,
        "base_model": base_model,
    }
    official = read_official_checkpoint(checkpoint, hparams, overrides)
    config, notes = official.resolve_config()
    _validate(official.state_dict, config)
    save_tlora_file(official.state_dict, config, target)
    loader = write_loader_files(out_dir, family_of_config(config), overwrite=overwrite)
    return ConversionResult([target, *loader], config, [official.describe_source(), *notes])


def export_official(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    step: int = 0,
    placeholder_token: str = DEFAULT_PLACEHOLDER_TOKEN,
    class_name: str = DEFAULT_CLASS_NAME,
    overwrite: bool = False,
) -> ConversionResult:
    """Write our adapter in the authors' layout of its family: `out_dir/checkpoint-<step>/<weights>` and
    `out_dir/logs/hparams.yml`.

    `placeholder_token` and `class_name` are the concept's words, which the authors' SD-XL inference puts in its
    prompts.
    """
    if step < 0:
        raise ValueError(f"The checkpoint step must be >= 0, got {step}.")
    for name, value in (("placeholder token", placeholder_token), ("class name", class_name)):
        if not value.strip():
            raise ValueError(f"The {name} must not be empty.")
    state_dict, config = read_adapter(source)
    family = family_of_config(config)
    if family is FLUX:
        tensors, notes = tlora_to_flux_official_state_dict(state_dict, config)
        if config.scale != 1.0:
            notes.append(f"adapter scale {config.scale:g} (lora_alpha / rank) folded into the up factors")
        weights = (FLUX_EXPORT_WEIGHT_NAME, tensors)
        hparams = flux_hparams_for(config)
        return _write_official_run(Path(out_dir).expanduser(), step, weights, hparams, config, notes, overwrite)
    if family.denoiser_attribute != SDXL.denoiser_attribute:
        raise TLoraFileError(f"The T-LoRA authors published no checkpoint layout for {family.display_name}.")
    tensors = tlora_to_official_state_dict(state_dict, config)
    hparams = hparams_for(
        config, output_dir=str(Path(out_dir).resolve()), placeholder_token=placeholder_token, class_name=class_name
    )
    notes = [
        f"hparams: trainer_type {hparams['trainer_type']!r}, sig_type {hparams['sig_type']!r}, placeholder_token "
        f"{placeholder_token!r}, class_name {class_name!r}"
    ]
    if not config.base_model:
        notes.append(f"the adapter names no base model: pretrained_model_name_or_path {DEFAULT_BASE_MODEL!r} written")
    if config.init.startswith("weight-"):
        notes.append(f"init {config.init!r} (SVD of the base weights) is written as trainer_type 'ortho_lora'")
    if config.scale != 1.0:
        notes.append(f"adapter scale {config.scale:g} (lora_alpha / rank) folded into the up factors")
    if config.num_train_timesteps != OFFICIAL_NUM_TRAIN_TIMESTEPS:
        notes.append(
            f"the authors' code takes T from the SD-XL scheduler ({OFFICIAL_NUM_TRAIN_TIMESTEPS}); this adapter's "
            f"schedule assumes T = {config.num_train_timesteps}, so its ranks will differ there"
        )
    for module, projections in sorted(missing_projections(tensors).items()):
        notes.append(f"{module} has no adapter on {', '.join(projections)}; the authors' loader expects all four")
    weights = (OFFICIAL_WEIGHT_NAME, tensors)
    return _write_official_run(Path(out_dir).expanduser(), step, weights, hparams, config, notes, overwrite)


def _write_official_run(
    out_dir: Path,
    step: int,
    weights: tuple[str, dict[str, torch.Tensor]],
    hparams: dict,
    config: TLoraConfig,
    notes: list[str],
    overwrite: bool,
) -> ConversionResult:
    """`out_dir/checkpoint-<step>/<weights name>` (safetensors, never a pickle) and `out_dir/logs/hparams.yml`."""
    name, tensors = weights
    files = {
        f"checkpoint-{step}/{name}": lambda path: save_file(tensors, str(path), metadata={"format": "pt"}),
        f"{LOGS_DIR}/{HPARAMS_NAME}": lambda path: path.write_text(format_hparams(hparams)),
    }
    outputs = _write_folder(out_dir, files, overwrite)
    return ConversionResult(outputs, config, notes)


def adapter_name(source: str | os.PathLike) -> str:
    """A name for files exported from an adapter: its folder's name, or the file's own name."""
    source = Path(source).resolve()
    if source.is_dir():
        return source.name
    return source.parent.name if source.name == WEIGHT_NAME else source.stem


def _export_target(out: Path, default_name: str) -> Path:
    """`out` if it names a .safetensors file, else `out/default_name`."""
    refuse_pickle(out)
    if out.suffix == ".safetensors":
        return out
    if out.is_file():
        raise FileExistsError(f"{out} is a file; give a .safetensors path or a folder.")
    return out / default_name


def export_lora(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    timestep: float | None = None,
    rank: int | None = None,
    tool: str | None = None,
    overwrite: bool = False,
) -> ConversionResult:
    """Freeze the adapter at the rank of `timestep`, or at `rank` (default: full rank), as a standard LoRA in the
    layout `tool` reads (default: ComfyUI for SD-XL adapters; diffusers for the other families, whose kohya
    module names this package does not write).

    `out` is a `.safetensors` file or a folder, which receives `pytorch_lora_weights.safetensors` for diffusers
    and `<adapter>_lora-rank<K>.safetensors` for the other tools (and for diffusers in a folder that holds a
    T-LoRA file).
    """
    if timestep is not None and rank is not None:
        raise ValueError("Give a timestep or a rank to freeze at, not both.")
    if tool is not None and tool not in TOOL_FORMATS:
        raise ValueError(f"Unknown tool {tool!r}; choose one of {', '.join(TOOL_FORMATS)}.")
    state_dict, config = read_adapter(source)
    tool = tool or (DEFAULT_TOOL if family_of_config(config) is SDXL else "diffusers")
    if timestep is not None:
        if not 0 <= timestep <= config.num_train_timesteps:
            raise ValueError(f"Timestep {timestep} is outside the schedule's range 0..{config.num_train_timesteps}.")
        rank = rank_at_timestep(config, timestep)
    elif rank is None:
        rank = config.rank
    lora_format = TOOL_FORMATS[tool]
    lora_rank = rank if config.variant == "vanilla" else 2 * rank
    tool_name = f"{adapter_name(source)}_lora-rank{lora_rank}.safetensors"
    out = Path(out).expanduser()
    # diffusers' standard name, except beside a T-LoRA file: a folder holding both layouts is ambiguous to read
    beside_adapter = (out / WEIGHT_NAME).is_file()
    name = LORA_WEIGHT_NAME if lora_format == "diffusers" and not beside_adapter else tool_name
    target = _export_target(out, name)
    _check_free([target], overwrite)
    tensors = lora_state_dict(freeze_tlora(state_dict, config, rank), lora_format, family_of_config(config))
    description = describe_export(config, rank)
    record = {"description": description, "rank": rank, "timestep": timestep, "tlora_config": config.to_dict()}
    metadata = {"format": "pt", EXPORT_METADATA_KEY: json.dumps(record, sort_keys=True)}
    write_atomically(target, lambda path: save_file(tensors, str(path), metadata=metadata))
    return ConversionResult([target], config, [f"{lora_format} layout, for {tool}", description])


def export_comfyui(
    source: str | os.PathLike, out: str | os.PathLike, *, loader: str = "tlora-node", overwrite: bool = False
) -> ConversionResult:
    """Write the one file ComfyUI's T-LoRA node loads (the authors' key layout, scale folded in), with the node
    settings that reproduce the schedule in its metadata and in the notes.

    `out` is a `.safetensors` file or a folder (which receives `<adapter>_tlora-node_<variant>_r<R>-min<r>
    .safetensors`). `loader="stock"` is for ComfyUI's stock LoraLoader, which reads vanilla files unmasked and
    cannot read ortho ones (refused).
    """
    state_dict, config = read_adapter(source)
    if config.model_family not in (None, "sd", "sdxl"):
        raise TLoraFileError(
            f"The ComfyUI node export writes UNet (SD, SD-XL) adapters; this one is for {config.model_family!r}."
        )
    notes = check_loader(loader, config)
    settings = node_settings(config)
    target = _export_target(Path(out), node_file_name(adapter_name(source), config))
    _check_free([target], overwrite)
    tensors = tlora_to_official_state_dict(state_dict, config)
    metadata = node_metadata(settings, config)
    write_atomically(target, lambda path: save_file(tensors, str(path), metadata=metadata))
    if config.scale != 1.0:
        notes.append(f"adapter scale {config.scale:g} (lora_alpha / rank) folded into the up factors")
    return ConversionResult([target], config, [describe_settings(settings), *notes])


def add_loader_files(
    adapter_dir: str | os.PathLike, *, family: str | None = None, overwrite: bool = False
) -> ConversionResult:
    """Write the loader files (`pipeline.py`, `tlora_*.py`) into the folder of a T-LoRA file."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise NotADirectoryError(f"{adapter_dir} is not a folder; give the folder that holds {WEIGHT_NAME}.")
    if not (adapter_dir / WEIGHT_NAME).is_file():
        raise TLoraFileError(f"{adapter_dir} holds no {WEIGHT_NAME}. {KNOWN_LAYOUTS}")
    _, config = tlora_state_dict(adapter_dir)  # the file and its config, of any model family
    family = family or family_of_config(config)
    outputs = write_loader_files(adapter_dir, family, overwrite=overwrite)
    stock, _ = pipeline_class_name(family)
    note = (
        f"{PIPELINE_FILE} defines a {stock} with load_tlora_weights: DiffusionPipeline.from_pretrained(BASE, "
        f"custom_pipeline={str(adapter_dir)!r} or the Hub repo holding these files, trust_remote_code=True)"
    )
    return ConversionResult(outputs, config, [note])


def _parameter_counts(state_dict: dict[str, torch.Tensor]) -> tuple[int, int]:
    trained = sum(t.numel() for key, t in state_dict.items() if not key.endswith("_base"))
    return trained, sum(t.numel() for key, t in state_dict.items() if key.endswith("_base"))


@dataclass
class _Inspected:
    layout: str
    family: ModelFamily
    state_dict: dict[str, torch.Tensor]
    config: TLoraConfig | None  # None when the schedule is unknown
    notes: list[str]


def _read_for_inspection(path: Path, hparams) -> _Inspected:
    """What `inspect` shows of `path`, in either layout."""
    if path.is_dir():
        refuse_both_layouts(path)
    weights = path / WEIGHT_NAME if path.is_dir() and (path / WEIGHT_NAME).is_file() else path
    is_pickle = weights.suffix == Path(FLUX_WEIGHT_NAME).suffix
    if weights.is_file() and not is_pickle and METADATA_KEY in read_safetensors(weights, with_tensors=False)[1]:
        state_dict, config = read_adapter(weights)
        return _Inspected(OUR_LAYOUT, family_of_config(config), state_dict, config, [])
    official = read_official_checkpoint(path, hparams)
    layout, notes = "T-LoRA authors' checkpoint", [official.describe_source()]
    try:
        config, inferred = official.resolve_config()
    except TLoraConfigError as error:
        return _Inspected(layout, official.family, official.state_dict, None, [*notes, f"schedule unknown: {error}"])
    _validate(official.state_dict, config)
    return _Inspected(layout, official.family, official.state_dict, config, [*notes, *inferred])


def inspect_adapter(path: str | os.PathLike, hparams: str | os.PathLike | None = None) -> dict:
    """A summary of an adapter in either layout: settings, sizes and the rank used at a few timesteps."""
    path = Path(path).expanduser()
    inspected = _read_for_inspection(path, hparams)
    config, state_dict = inspected.config, inspected.state_dict
    shapes = module_shapes(state_dict)
    trained, frozen = _parameter_counts(state_dict)
    info = {
        "path": str(path),
        "layout": inspected.layout,
        "model_family": inspected.family.name,
        "family": f"{inspected.family.display_name} ({inspected.family.denoiser_class})",
        "modules": len(shapes),
        "layer_ranks": sorted({rank for _, _, rank in shapes.values()}),
        "trained_parameters": trained,
        "frozen_parameters": frozen,
        "notes": inspected.notes,
        "config": None if config is None else config.to_dict(),
        "ranks_at_timesteps": None,
    }
    if config is not None:
        info["ranks_at_timesteps"] = {t: rank_at_timestep(config, t) for t in INSPECT_TIMESTEPS}
    if path.is_dir() and inspected.layout == OUR_LAYOUT:
        info["loader_files"] = describe_loader_files(path)
    return info


def format_inspection(info: dict) -> str:
    lines = [f"file: {info['path']}", f"layout: {info['layout']}", f"model family: {info['family']}"]
    config = info["config"]
    if config is not None:
        scale = "1" if config["lora_alpha"] is None else f"{config['lora_alpha'] / config['rank']:g}"
        lines += [
            f"variant: {config['variant']}",
            f"rank: {config['rank']}, min_rank: {config['min_rank']}",
            (
                f"schedule: r(t) = floor(((T - t) / T) ** {config['schedule_exponent']:g} * ({config['rank']} - "
                f"{config['min_rank']})) + {config['min_rank']}, T = {config['num_train_timesteps']}"
            ),
            f"scale: {scale}",
            f"init: {config['init']}",
            f"base model: {config['base_model'] or 'unknown'}",
            f"target modules: {', '.join(config['target_modules'])}",
        ]
    lines += [
        f"adapted modules: {info['modules']} (layer ranks: {', '.join(map(str, info['layer_ranks']))})",
        f"parameters: {info['trained_parameters']:,} trained, {info['frozen_parameters']:,} frozen",
    ]
    if info["ranks_at_timesteps"] is not None:
        ranks = ", ".join(f"t={t}: {r}" for t, r in info["ranks_at_timesteps"].items())
        lines.append(f"rank by timestep: {ranks}")
    if "loader_files" in info:
        lines.append(f"loader files: {info['loader_files']}")
    lines += [f"note: {note}" for note in info["notes"]]
    return "\n".join(lines)
