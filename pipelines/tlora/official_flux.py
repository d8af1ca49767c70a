"""The checkpoint layout of the T-LoRA authors' FLUX.1 training code, and its translation to and from this package.

Their FLUX trainer gives every attention module of the transformer a processor holding seven LoRA layers and saves
the processors' state dict with `torch.save`:

    <run>/checkpoint-N/lora.pt        a torch pickle of {key: tensor}
    <run>/logs/hparams.yml            the training arguments: `rank`, `min_rank`, `tlora` (false: no rank masks), ...

Keys are `<block>.attn.processor.<p>_lora.<down|up>.weight`, `<block>` being `transformer_blocks.i` (double-stream)
or `single_transformer_blocks.j`, and `<p>` one of

    to_q  to_k  to_v  to_out (our to_out.0)  to_q_proj (our add_q_proj)  to_k_proj  to_v_proj

Every processor holds all seven: 14 tensors per block, 798 on FLUX.1-dev. A single-stream block has neither an
output projection nor a text stream, so four of its adapters are never applied (their `up` stays zero); the
authors' inference still loads the state dict strictly and needs them. The forward is `up(down(x) * mask)` with
scale 1 and r(t) = floor((T - t) (R - r_min) / T) + r_min, T = 1000, t the scheduler timestep: Vanilla T-LoRA
with schedule exponent 1, which is what an import yields.

This package writes no pickles: an export holds the same 798 keys in `checkpoint-N/lora.safetensors` (README:
how the authors' inference reads it). Everything here works on tensors and plain dicts; reading and writing files
is left to `convert.py`.
"""

from __future__ import annotations

import re

import torch

from .config import TLoraConfig, TLoraConfigError
from .families import FLUX
from .file_format import KEY_INFIX, TLoraFileError, layer_key_parts
from .limits import quote
from .official_format import (
    OFFICIAL_NUM_TRAIN_TIMESTEPS,
    ScheduleSettings,
    _check_rank,
    _typed,
    target_modules_of,
)

FLUX_WEIGHT_NAME = "lora.pt"
FLUX_EXPORT_WEIGHT_NAME = "lora.safetensors"
BLOCK_KINDS = ("transformer_blocks", "single_transformer_blocks")
# their projection name <-> our module name inside a block's `attn`
PROJECTIONS = {
    "to_q": "to_q",
    "to_k": "to_k",
    "to_v": "to_v",
    "to_out": "to_out.0",
    "to_q_proj": "add_q_proj",
    "to_k_proj": "add_k_proj",
    "to_v_proj": "add_v_proj",
}
# the adapters a single-stream block applies; its other four exist only in the file
SINGLE_BLOCK_PROJECTIONS = ("to_q", "to_k", "to_v")
PARAMETERS = {"down.weight": "down", "up.weight": "up"}

_KEY_PATTERN = re.compile(
    r"^(?P<kind>transformer_blocks|single_transformer_blocks)\.(?P<index>\d+)\.attn\.processor\."
    r"(?P<projection>to_q|to_k|to_v|to_out|to_q_proj|to_k_proj|to_v_proj)_lora\.(?P<param>down\.weight|up\.weight)$"
)
_BLOCK_PROCESSOR = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.\d+\.attn\.processor\.")
_OUR_MODULE = re.compile(
    r"^(?P<kind>transformer_blocks|single_transformer_blocks)\.(?P<index>\d+)\.attn\.(?P<name>.+)$"
)
KEY_FORM = (
    "'<transformer_blocks.i|single_transformer_blocks.j>.attn.processor."
    "<to_q|to_k|to_v|to_out|to_q_proj|to_k_proj|to_v_proj>_lora.<down|up>.weight'"
)


def is_flux_checkpoint(keys) -> bool:
    """Whether the keys name the processors of FLUX transformer blocks (SD-XL's sit inside UNet blocks)."""
    return any(_BLOCK_PROCESSOR.match(key) for key in keys)


def flux_official_to_tlora_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """The authors' tensors -> (our tensors keyed `<path>.tlora.<down|up>`, number of never-applied adapters left
    out), values unchanged."""
    if not state_dict:
        raise TLoraFileError("The checkpoint holds no tensors.")
    converted, unused = {}, 0
    for key, tensor in state_dict.items():
        match = _KEY_PATTERN.match(key)
        if match is None:
            raise TLoraFileError(
                f"Unexpected key {quote(key)}: the authors' FLUX checkpoints hold only {KEY_FORM} keys."
            )
        if match["kind"] == "single_transformer_blocks" and match["projection"] not in SINGLE_BLOCK_PROJECTIONS:
            unused += match["param"] == "up.weight"
            continue
        path = f"{match['kind']}.{match['index']}.attn.{PROJECTIONS[match['projection']]}"
        converted[f"{path}{KEY_INFIX}{PARAMETERS[match['param']]}"] = tensor
    return converted, unused


def _their_key(kind: str, index: int, projection: str, parameter: str) -> str:
    return f"{kind}.{index}.attn.processor.{projection}_lora.{parameter}"


def tlora_to_flux_official_state_dict(
    state_dict: dict[str, torch.Tensor], config: TLoraConfig
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Our tensors (already validated) -> (all 14 tensors of every block in the authors' names, notes).

    Adapters the file lacks, including the four a single-stream block never applies, are written as zeros so
    the authors' strict loader accepts the file and they change nothing. A `lora_alpha` scale is folded into
    the up factors (their processors have none); with scale 1 the values are copied bit for bit.
    """
    if config.variant != "vanilla":
        raise TLoraFileError(
            "The authors' FLUX code has plain LoRA factors only (Vanilla T-LoRA); this adapter is "
            f"{config.variant!r}. Export it as a standard LoRA with export-lora instead."
        )
    their_projection = {ours: theirs for theirs, ours in PROJECTIONS.items()}
    converted, blocks = {}, {kind: -1 for kind in BLOCK_KINDS}
    for key, tensor in state_dict.items():
        path, name = layer_key_parts(key)
        match = _OUR_MODULE.match(path)
        projection = None if match is None else their_projection.get(match["name"])
        if projection is None or (
            match["kind"] == "single_transformer_blocks" and projection not in SINGLE_BLOCK_PROJECTIONS
        ):
            raise TLoraFileError(
                f"Module {path!r} has no adapter in the authors' FLUX layout, which adapts to_q, to_k, to_v, "
                "to_out.0 and add_q/k/v_proj of the double-stream blocks and to_q, to_k, to_v of the single-stream "
                "blocks."
            )
        if name == "up" and config.scale != 1.0:
            tensor = tensor * config.scale
        blocks[match["kind"]] = max(blocks[match["kind"]], int(match["index"]))
        their_name = {ours: theirs for theirs, ours in PARAMETERS.items()}[name]
        converted[_their_key(match["kind"], int(match["index"]), projection, their_name)] = tensor

    shapes = {(tuple(t.shape), t.dtype) for key, t in converted.items() if key.endswith("down.weight")}
    if len(shapes) != 1:
        raise TLoraFileError(
            "The authors' FLUX processors give every projection the same size and rank; this adapter's down "
            f"factors differ: {sorted(shape for shape, _ in shapes)}."
        )
    ((rank, hidden), dtype) = shapes.pop()
    zero_shapes = {"down.weight": (rank, hidden), "up.weight": (hidden, rank)}
    complete, filled = {}, 0
    for kind, last in blocks.items():
        for index in range(last + 1):
            for projection in PROJECTIONS:
                keys = {parameter: _their_key(kind, index, projection, parameter) for parameter in zero_shapes}
                used = kind == "transformer_blocks" or projection in SINGLE_BLOCK_PROJECTIONS
                filled += used and keys["up.weight"] not in converted
                for parameter, key in keys.items():
                    # a tensor of its own each: safetensors refuses to write tensors that share memory
                    zero = torch.zeros(zero_shapes[parameter], dtype=dtype)
                    complete[key] = converted.get(key, zero)
    notes = [
        f"{blocks['transformer_blocks'] + 1} double-stream and {blocks['single_transformer_blocks'] + 1} "
        f"single-stream blocks, {len(complete)} tensors; the single-stream blocks' to_out and *_proj adapters, "
        "which the authors' processors never apply, are zeros"
    ]
    if filled:
        notes.append(f"{filled} projections without an adapter in this file are written as zeros (no update)")
    if config.schedule_exponent != 1.0:
        notes.append(
            f"the authors' FLUX schedule is linear; this adapter's exponent {config.schedule_exponent:g} is lost there"
        )
    if config.num_train_timesteps != OFFICIAL_NUM_TRAIN_TIMESTEPS:
        notes.append(
            f"the authors' FLUX code uses T = {OFFICIAL_NUM_TRAIN_TIMESTEPS}; this adapter's schedule assumes "
            f"T = {config.num_train_timesteps}, so its ranks will differ there"
        )
    return complete, notes


def flux_settings_from_hparams(hparams: dict, source: str) -> ScheduleSettings:
    """The schedule from the authors' FLUX hparams.yml (`rank`, `min_rank`, `tlora`)."""
    masked = hparams.get("tlora")
    if masked is not None and not isinstance(masked, bool):
        raise TLoraFileError(f"{source}: `tlora` must be true or false, got {quote(masked)}.")
    settings = ScheduleSettings(
        rank=_typed(hparams, "rank", int, source),
        min_rank=_typed(hparams, "min_rank", int, source),
        masked=masked,
        base_model=_typed(hparams, "pretrained_model_name_or_path", str, source),
    )
    settings.sources = {
        name: source for name, value in vars(settings).items() if value is not None and name != "sources"
    }
    return settings


def resolve_flux_config(
    shapes: dict[str, tuple[int, int, int]], settings: ScheduleSettings, hparams_source: str
) -> tuple[TLoraConfig, list[str]]:
    """The config of an imported FLUX checkpoint, with notes on what was inferred.

    Unlike SD-XL imports, the rank is never guessed from the tensors: the run's hparams.yml (or --rank) must say it,
    so a checkpoint paired with the wrong run's settings is caught by the shape check.
    """
    notes = []
    if settings.variant not in (None, "vanilla"):
        raise TLoraFileError(
            f"The authors' FLUX checkpoints hold plain LoRA factors (vanilla), but {settings.sources['variant']} "
            f"says {quote(settings.variant)}."
        )
    if settings.rank is None:
        raise TLoraConfigError(
            f"The rank of the FLUX run is unknown: {hparams_source} has no `rank`. Give it with --rank (or point "
            "--hparams at the run's logs/hparams.yml)."
        )
    _check_rank(settings.rank, shapes, settings.sources["rank"])
    min_rank = settings.min_rank
    if settings.masked is False and settings.sources.get("min_rank") != "command line":
        min_rank = settings.rank
        notes.append(f"`tlora: false`: the run trained without rank masks, so min_rank is set to {settings.rank}")
    if min_rank is None:
        raise TLoraConfigError(
            f"The minimum rank of the FLUX run is unknown: {hparams_source} has no `min_rank`. Give it with "
            "--min-rank (or point --hparams at the run's logs/hparams.yml)."
        )
    exponent = 1.0 if settings.schedule_exponent is None else float(settings.schedule_exponent)
    config = TLoraConfig.for_family(
        FLUX.name,
        rank=settings.rank,
        min_rank=min_rank,
        schedule_exponent=exponent,
        num_train_timesteps=OFFICIAL_NUM_TRAIN_TIMESTEPS,
        target_modules=target_modules_of(shapes, FLUX.default_target_modules),
        base_model=settings.base_model,
    )
    return config, notes


def flux_hparams_for(config: TLoraConfig) -> dict:
    """hparams.yml entries that the authors' FLUX inference reads for `config`."""
    hparams = {"tlora": config.is_masked, "rank": config.rank, "min_rank": config.min_rank}
    if config.base_model:
        hparams["pretrained_model_name_or_path"] = config.base_model
    return hparams
