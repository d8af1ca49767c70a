"""The checkpoint layout of the T-LoRA authors' SD-XL training code, and its translation to and from this package.

Their trainer saves the UNet's attention processors with diffusers' `save_attn_procs`:

    <run>/checkpoint-N/pytorch_lora_weights.safetensors     tensors only, no settings
    <run>/logs/hparams.yml                                  the training arguments, a flat YAML mapping

Tensor keys are `<proc>.processor.<to_q|to_k|to_v|to_out>_lora.<param>`, where `<proc>` is the attention module
(`...transformer_blocks.0.attn1`) and `to_out` is our `to_out.0`. Their parameter names map to ours as follows
(their lambdas are `(1, R)`, ours `(R,)`):

    vanilla ("lora"):        down.weight, up.weight
    ortho ("ortho_lora"):    q_layer.weight, p_layer.weight, lambda_layer, base_q.weight, base_p.weight, base_lambda

The schedule lives in hparams.yml: `lora_rank`, `min_rank`, `alpha_rank_scale` (our `schedule_exponent`),
`trainer_type` (the factorisation: `lora`, `ortho_lora`, or `lortho_lora` for the SVD of the layer weight) and
`sig_type` (which singular triplets initialised the ortho factors). `trainer_class` says whether the masked trainer
ran: `sdxl_tlora` masks, `sdxl_lora` trains and samples at full rank whatever `min_rank` says.

Everything here works on tensors and plain dicts; reading and writing files is left to `convert.py`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import yaml

from .config import DEFAULT_TARGET_MODULES, TLoraConfig, TLoraConfigError
from .file_format import KEY_INFIX, TLoraFileError, layer_key_parts
from .limits import MAX_NESTING, check_nesting, check_text_size, quote

OFFICIAL_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# hparams.yml holds a few dozen training arguments; PyYAML parses in pure Python, about a megabyte a second
MAX_HPARAMS_CHARS = 1 << 18
HPARAMS_NAME = "hparams.yml"
LOGS_DIR = "logs"

# their projection name <-> our module name
PROJECTIONS = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
# their parameter name -> our file name (file_format.PARAMETER_NAMES), per variant
PARAMETERS = {
    "vanilla": {"down.weight": "down", "up.weight": "up"},
    "ortho": {
        "q_layer.weight": "down",
        "p_layer.weight": "up",
        "lambda_layer": "lambda",
        "base_q.weight": "down_base",
        "base_p.weight": "up_base",
        "base_lambda": "lambda_base",
    },
}
LAMBDA_NAMES = ("lambda", "lambda_base")

# trainer_type -> (variant, source of the ortho init)
TRAINER_TYPES = {"lora": ("vanilla", None), "ortho_lora": ("ortho", "random"), "lortho_lora": ("ortho", "weight")}
SIG_TYPES = ("last", "principal", "middle")
DEFAULT_SIG_TYPE = "last"  # their trainer's default
MASKED_TRAINER_CLASS = "sdxl_tlora"
UNMASKED_TRAINER_CLASS = "sdxl_lora"
# The authors' code takes T from the SD-XL scheduler and applies the adapters with scale 1.
OFFICIAL_NUM_TRAIN_TIMESTEPS = 1000
# Written when an export is not told otherwise: DreamBooth's customary rare token, a neutral class word, and the
# base model of the authors' SD-XL code.
DEFAULT_PLACEHOLDER_TOKEN = "sks"
DEFAULT_CLASS_NAME = "object"
DEFAULT_BASE_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"

_KEY_PATTERN = re.compile(r"^(?P<module>.+)\.processor\.(?P<projection>to_q|to_k|to_v|to_out)_lora\.(?P<param>.+)$")


def is_official_key(key: str) -> bool:
    return _KEY_PATTERN.match(key) is not None


def _variant_of_parameters(names: set[str]) -> str:
    for variant, parameters in PARAMETERS.items():
        if names <= parameters.keys():
            return variant
    unknown = sorted(names - PARAMETERS["vanilla"].keys() - PARAMETERS["ortho"].keys())
    if unknown:
        raise TLoraFileError(
            f"Unknown parameter names {unknown} in the authors' checkpoint; expected "
            f"{sorted(PARAMETERS['vanilla'])} (LoRA factors) or {sorted(PARAMETERS['ortho'])} (Ortho-LoRA factors)."
        )
    raise TLoraFileError(
        "The checkpoint mixes LoRA factors (down/up) and Ortho-LoRA factors (q_layer/p_layer/lambda_layer); a "
        "checkpoint holds one kind."
    )


def official_to_tlora_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]]:
    """The authors' tensors -> (variant, our tensors keyed `<path>.tlora.<name>`), values unchanged.

    The variant comes from the parameter names: the keys, not any setting, say which factorisation was trained.
    """
    if not state_dict:
        raise TLoraFileError("The checkpoint holds no tensors.")
    parsed = []
    for key in state_dict:
        match = _KEY_PATTERN.match(key)
        if match is None:
            raise TLoraFileError(
                f"Unexpected key {quote(key)}: the authors' checkpoints hold only "
                "'<module>.processor.<to_q|to_k|to_v|to_out>_lora.<param>' keys."
            )
        parsed.append((key, match))
    variant = _variant_of_parameters({match["param"] for _, match in parsed})
    converted = {}
    for key, match in parsed:
        name = PARAMETERS[variant][match["param"]]
        tensor = state_dict[key]
        if name in LAMBDA_NAMES:
            if tensor.ndim != 2 or tensor.shape[0] != 1:
                raise TLoraFileError(
                    f"{quote(key)} has shape {tuple(tensor.shape)}; the authors store lambdas as (1, R)."
                )
            tensor = tensor.reshape(-1)
        path = f"{match['module']}.{PROJECTIONS[match['projection']]}"
        converted[f"{path}{KEY_INFIX}{name}"] = tensor
    return variant, converted


def tlora_to_official_state_dict(state_dict: dict[str, torch.Tensor], config: TLoraConfig) -> dict[str, torch.Tensor]:
    """Our tensors (keys `[unet.]<path>.tlora.<name>`, already validated) -> the authors' tensors.

    Their processors have no output scale, so a `lora_alpha` scale is folded into the up factors (into both
    branches for ortho, which keeps the update exact). With scale 1 the values are copied bit for bit.
    """
    their_parameter = {ours: theirs for theirs, ours in PARAMETERS[config.variant].items()}
    their_projection = {ours: theirs for theirs, ours in PROJECTIONS.items()}
    converted = {}
    for key, tensor in state_dict.items():
        path, name = layer_key_parts(key)
        module, _, projection = path.rpartition(".to_")
        projection = "to_" + projection
        if not module or projection not in their_projection:
            raise TLoraFileError(
                f"Module {quote(path)} is not an attention projection (to_q, to_k, to_v, to_out.0); the authors' "
                "layout holds adapters of those only."
            )
        if name in ("up", "up_base") and config.scale != 1.0:
            tensor = tensor * config.scale
        if name in LAMBDA_NAMES:
            tensor = tensor.reshape(1, -1)
        converted[f"{module}.processor.{their_projection[projection]}_lora.{their_parameter[name]}"] = tensor
    return converted


def missing_projections(official_keys) -> dict[str, list[str]]:
    """Attention modules of the checkpoint that lack some of the four projections their processors always have."""
    present: dict[str, set[str]] = {}
    for key in official_keys:
        match = _KEY_PATTERN.match(key)
        present.setdefault(match["module"], set()).add(match["projection"])
    return {
        module: sorted(PROJECTIONS.keys() - found) for module, found in present.items() if found != PROJECTIONS.keys()
    }


class _HparamsLoader(yaml.SafeLoader):
    """Safe YAML loading that reads unknown tags (e.g. `!!python/tuple` from `yaml.dump`) as plain data instead of
    failing; nothing is ever constructed from a tag. Nesting is bounded: PyYAML composes nested nodes by
    recursion, so a deeply nested file would otherwise end in a `RecursionError` (flow brackets are counted before
    parsing; this bounds nesting by indentation)."""

    def compose_node(self, parent, index):
        self.nesting = getattr(self, "nesting", 0) + 1
        if self.nesting > MAX_NESTING:
            raise yaml.YAMLError(f"nested deeper than {MAX_NESTING} levels")
        try:
            return super().compose_node(parent, index)
        finally:
            self.nesting -= 1


def _construct_plain(loader, _suffix, node):
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


_HparamsLoader.add_multi_constructor("", _construct_plain)


def parse_hparams(text: str, source: str = "hparams.yml") -> dict:
    """The training arguments from the text of an hparams.yml file."""
    try:
        check_text_size(text, source, MAX_HPARAMS_CHARS)
        # PyYAML's scanner takes quadratic time in the depth of flow brackets, before any composing
        check_nesting(text, source)
    except ValueError as error:
        raise TLoraFileError(str(error)) from None
    try:
        data = yaml.load(text, Loader=_HparamsLoader)  # a SafeLoader subclass: constructs plain data only
    except yaml.YAMLError as error:
        raise TLoraFileError(f"{source} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise TLoraFileError(f"{source} must be a mapping of training arguments, got {type(data).__name__}.")
    return data


def format_hparams(hparams: dict) -> str:
    return yaml.safe_dump(hparams, sort_keys=True, default_flow_style=False)


@dataclass
class ScheduleSettings:
    """Settings of an import, from hparams.yml and/or the command line (command line wins)."""

    rank: int | None = None
    min_rank: int | None = None
    schedule_exponent: float | None = None
    variant: str | None = None
    init_source: str | None = None  # "random" | "weight", from trainer_type
    sig_type: str | None = None
    masked: bool | None = None  # from trainer_class
    base_model: str | None = None
    sources: dict[str, str] = field(default_factory=dict)  # setting -> where it came from


def _typed(hparams: dict, key: str, kind, source: str):
    value = hparams.get(key)
    if value is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TLoraFileError(f"{source}: `{key}` must be {kind.__name__}, got {quote(value)}.")
    return value


def settings_from_hparams(hparams: dict, source: str) -> ScheduleSettings:
    settings = ScheduleSettings(
        rank=_typed(hparams, "lora_rank", int, source),
        min_rank=_typed(hparams, "min_rank", int, source),
        schedule_exponent=_typed(hparams, "alpha_rank_scale", float, source),
        sig_type=_typed(hparams, "sig_type", str, source),
        base_model=_typed(hparams, "pretrained_model_name_or_path", str, source),
    )
    trainer_type = _typed(hparams, "trainer_type", str, source)
    if trainer_type is not None:
        if trainer_type not in TRAINER_TYPES:
            raise TLoraFileError(
                f"{source}: unknown trainer_type {quote(trainer_type)}; known: {', '.join(TRAINER_TYPES)}."
            )
        settings.variant, settings.init_source = TRAINER_TYPES[trainer_type]
    trainer_class = _typed(hparams, "trainer_class", str, source)
    if trainer_class is not None:
        settings.masked = trainer_class != UNMASKED_TRAINER_CLASS
    if settings.sig_type is not None and settings.sig_type not in SIG_TYPES:
        raise TLoraFileError(f"{source}: unknown sig_type {quote(settings.sig_type)}; known: {', '.join(SIG_TYPES)}.")
    settings.sources = {
        name: source for name, value in vars(settings).items() if value is not None and name != "sources"
    }
    return settings


def merge_settings(base: ScheduleSettings, overrides: dict) -> ScheduleSettings:
    """`base` with every non-None entry of `overrides` (command-line values) replacing it."""
    merged = ScheduleSettings(**{k: v for k, v in vars(base).items() if k != "sources"}, sources=dict(base.sources))
    for name, value in overrides.items():
        if value is not None:
            setattr(merged, name, value)
            merged.sources[name] = "command line"
    return merged


def module_shapes(tlora_state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[int, int, int]]:
    """`{module path: (in_features, out_features, rank)}` read from the down and up factors."""
    downs, ups = {}, {}
    for key, tensor in tlora_state_dict.items():
        path, name = layer_key_parts(key)
        if name == "down":
            downs[path] = tensor
        elif name == "up":
            ups[path] = tensor
    shapes = {}
    for path in sorted(downs.keys() | ups.keys()):
        if path not in downs or path not in ups:
            raise TLoraFileError(f"Module {quote(path)} lacks its {'up' if path in downs else 'down'} factor.")
        down, up = downs[path], ups[path]
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise TLoraFileError(
                f"Module {quote(path)}: down {tuple(down.shape)} and up {tuple(up.shape)} are not the factors of one "
                "low-rank product."
            )
        shapes[path] = (down.shape[1], up.shape[0], down.shape[0])
    return shapes


def _check_rank(rank: int, shapes: dict[str, tuple[int, int, int]], rank_source: str) -> None:
    widest = max(min(in_features, out_features) for in_features, out_features, _ in shapes.values())
    if rank > widest:
        raise TLoraFileError(
            f"Rank {rank} (from {rank_source}) is larger than any module of the checkpoint can hold (the widest "
            f"allows {widest}); check --rank / lora_rank."
        )
    for path, (in_features, out_features, layer_rank) in shapes.items():
        expected = min(rank, in_features, out_features)
        if layer_rank != expected:
            raise TLoraFileError(
                f"Module {quote(path)} has rank {layer_rank}, but rank {rank} (from {rank_source}) gives a "
                f"{in_features}->{out_features} projection rank {expected}. The tensors do not match the settings; "
                "check --rank / lora_rank."
            )


def target_modules_of(paths, candidates=DEFAULT_TARGET_MODULES) -> list[str]:
    """The family's target projections (`candidates`) that some module of `paths` is."""
    paths = list(paths)
    return [name for name in candidates if any(path.endswith("." + name) for path in paths)]


def resolve_config(
    variant: str, shapes: dict[str, tuple[int, int, int]], settings: ScheduleSettings
) -> tuple[TLoraConfig, list[str]]:
    """Build the config of an imported checkpoint; returns it with notes on what was inferred.

    Raises `TLoraFileError` when settings contradict the tensors and `TLoraConfigError` when a schedule setting is
    missing, naming the flag that supplies it.
    """
    notes = []
    if settings.variant is not None and settings.variant != variant:
        raise TLoraFileError(
            f"The tensors hold {variant} factors, but {settings.sources['variant']} says {settings.variant!r} "
            f"(trainer_type / --variant). The keys decide the variant; fix or drop the contradicting setting."
        )
    rank = settings.rank
    if rank is None:
        rank = max(r for _, _, r in shapes.values())
        notes.append(f"rank {rank} taken from the tensor shapes (no lora_rank / --rank)")
    _check_rank(rank, shapes, settings.sources.get("rank", "the tensor shapes"))

    min_rank = settings.min_rank
    if settings.masked is False and settings.sources.get("min_rank") != "command line":
        min_rank = rank
        notes.append(f"trainer_class {UNMASKED_TRAINER_CLASS!r} trains without rank masks: min_rank set to {rank}")
    if min_rank is None:
        raise TLoraConfigError(
            "The minimum rank of the schedule is unknown: no hparams.yml with `min_rank` was found. Give it with "
            "--min-rank (or point --hparams at the run's logs/hparams.yml)."
        )
    exponent = settings.schedule_exponent
    if exponent is None:
        exponent = 1.0
        notes.append("schedule exponent 1.0 assumed (no alpha_rank_scale / --schedule-exponent), as in the paper")

    if variant == "vanilla":
        init = "normal"
    elif settings.init_source is not None:
        init = f"{settings.init_source}-{settings.sig_type or DEFAULT_SIG_TYPE}"
    else:
        init = "unknown"
    config = TLoraConfig(
        rank=rank,
        min_rank=min_rank,
        variant=variant,
        schedule_exponent=float(exponent),
        num_train_timesteps=OFFICIAL_NUM_TRAIN_TIMESTEPS,
        lora_alpha=None,
        init=init,
        target_modules=target_modules_of(shapes),
        base_model=settings.base_model,
    )
    return config, notes


def hparams_for(
    config: TLoraConfig,
    *,
    output_dir: str,
    placeholder_token: str = DEFAULT_PLACEHOLDER_TOKEN,
    class_name: str = DEFAULT_CLASS_NAME,
    revision: str | None = None,
) -> dict:
    """hparams.yml entries that the authors' inference code reads for `config`.

    Their inference also reads where the run lives (`output_dir`, holding the checkpoint-N folders), the base
    model and its `revision`, and the concept's `placeholder_token` and `class_name`, which it puts in its
    prompts; it stops with a KeyError when one is missing.
    """
    if config.variant == "vanilla":
        trainer_type, sig_type = "lora", DEFAULT_SIG_TYPE
    else:
        # "ortho_lora" whatever the init: their inference builds "lortho_lora" processors only with the base
        # weights at hand, which it never passes, while the forward math of both is the same.
        trainer_type, sig_type = "ortho_lora", config.init.partition("-")[2]
        sig_type = sig_type if sig_type in SIG_TYPES else DEFAULT_SIG_TYPE
    hparams = {
        "lora_rank": config.rank,
        "min_rank": config.min_rank,
        "alpha_rank_scale": config.schedule_exponent,
        "trainer_type": trainer_type,
        "sig_type": sig_type,
        "trainer_class": MASKED_TRAINER_CLASS,
        "output_dir": output_dir,
        "pretrained_model_name_or_path": config.base_model or DEFAULT_BASE_MODEL,
        "revision": revision,
        "placeholder_token": placeholder_token,
        "class_name": class_name,
    }
    return hparams
