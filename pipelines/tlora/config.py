"""Configuration of a T-LoRA adapter: what is stored in the `tlora_config` metadata of a file."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

from .families import FAMILIES
from .limits import MAX_RANK, finite_number, load_json, quote

FORMAT_NAME = "tlora"
FORMAT_VERSION = 1

VARIANTS = ("ortho", "vanilla")
INIT_PICKS = ("last", "principal", "middle")
INIT_SOURCES = ("random", "weight")
DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")


class TLoraConfigError(ValueError):
    """An adapter configuration that cannot describe a valid T-LoRA adapter."""


@dataclass
class TLoraConfig:
    """Settings of one T-LoRA adapter.

    Args:
        rank: maximum rank `R` (the rank used at timestep 0).
        min_rank: rank `r_min` at the highest noise level. `min_rank == rank` disables masking (plain LoRA or
            Ortho-LoRA). Defaults to `rank // 2`, the paper's recommendation.
        variant: `"ortho"` (T-LoRA, the paper's main method) or `"vanilla"` (plain LoRA factors, masked).
        schedule_exponent: exponent `e` of the rank schedule (`alpha_rank_scale` in the authors' code).
        num_train_timesteps: `T`, the training scheduler's number of timesteps.
        lora_alpha: when set, the adapter output is scaled by `lora_alpha / rank`; `None` means scale 1.
        init: how the factors were initialised, `"<source>-<pick>"` for ortho (e.g. `"random-last"`) and
            `"normal"` for vanilla.
        target_modules: module names (or dotted suffixes of module paths) that receive an adapter.
        base_model: name of the base model the adapter was trained on, if known.
        model_family: the denoiser family the adapter belongs to (`"sd"`, `"sdxl"`, `"flux"`, `"sd3"`; see
            `families.py`); None for files written before families existed (their key prefix decides).
    """

    rank: int = 64
    min_rank: int | None = None
    variant: str = "ortho"
    schedule_exponent: float = 1.0
    num_train_timesteps: int = 1000
    lora_alpha: float | None = None
    init: str = "random-last"
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    base_model: str | None = None
    model_family: str | None = None

    def __post_init__(self):
        if self.min_rank is None:
            self.min_rank = max(1, self.rank // 2) if isinstance(self.rank, int) else self.rank
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        self.validate()

    def validate(self) -> None:
        def fail(message):
            raise TLoraConfigError(f"Invalid T-LoRA config: {message}")

        def is_integer(value):
            return isinstance(value, int) and not isinstance(value, bool)

        if not is_integer(self.rank) or not 1 <= self.rank <= MAX_RANK:
            fail(f"`rank` must be an integer from 1 to {MAX_RANK}, got {quote(self.rank)}.")
        if not is_integer(self.min_rank) or self.min_rank < 1:
            fail(f"`min_rank` must be an integer >= 1, got {quote(self.min_rank)}.")
        if self.min_rank > self.rank:
            fail(f"`min_rank` ({self.min_rank}) must not exceed `rank` ({self.rank}).")
        if self.variant not in VARIANTS:
            fail(f"`variant` must be one of {VARIANTS}, got {quote(self.variant)}.")
        if not is_integer(self.num_train_timesteps) or self.num_train_timesteps < 1:
            fail(f"`num_train_timesteps` must be an integer >= 1, got {quote(self.num_train_timesteps)}.")
        try:
            finite_number(self.schedule_exponent, "`schedule_exponent`", 0)
            if self.lora_alpha is not None:
                finite_number(self.lora_alpha, "`lora_alpha` (or None)", 0, exclusive=True)
        except ValueError as error:
            fail(str(error))
        if not isinstance(self.init, str):
            fail(f"`init` must be a string, got {quote(self.init)}.")
        modules = self.target_modules
        if not isinstance(modules, list) or not modules or not all(isinstance(t, str) and t for t in modules):
            fail(f"`target_modules` must be a non-empty list of module names, got {quote(self.target_modules)}.")
        if self.base_model is not None and not isinstance(self.base_model, str):
            fail(f"`base_model` must be a string or None, got {quote(self.base_model)}.")
        family = self.model_family
        if family is not None and (not isinstance(family, str) or family not in FAMILIES):
            fail(f"`model_family` must be one of {tuple(FAMILIES)} or None, got {quote(self.model_family)}.")

    @classmethod
    def for_family(cls, family: str, **settings) -> "TLoraConfig":
        """A config with the family's defaults (variant, target projections, `model_family`) unless given."""
        described = FAMILIES[family] if family in FAMILIES else None
        if described is None:
            raise TLoraConfigError(f"Unknown model family {family!r}; known: {', '.join(FAMILIES)}.")
        settings.setdefault("variant", described.default_variant)
        settings.setdefault("target_modules", list(described.default_target_modules))
        if settings["variant"] == "vanilla":
            settings.setdefault("init", "normal")
        return cls(model_family=family, **settings)

    @property
    def scale(self) -> float:
        """The adapter's own output scale, before the user's scale."""
        return 1.0 if self.lora_alpha is None else self.lora_alpha / self.rank

    @property
    def is_masked(self) -> bool:
        return self.min_rank < self.rank

    def to_dict(self) -> dict:
        data = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **asdict(self)}
        if data["model_family"] is None:
            # a config that does not know its family is stored exactly as before families existed
            del data["model_family"]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "TLoraConfig":
        """Build a config from a `tlora_config` object, rejecting unknown formats and versions."""
        if not isinstance(data, dict):
            raise TLoraConfigError(f"`tlora_config` must be a JSON object, got {type(data).__name__}.")
        if data.get("format", FORMAT_NAME) != FORMAT_NAME:
            raise TLoraConfigError(f"`tlora_config` has format {quote(data.get('format'))}, expected {FORMAT_NAME!r}.")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise TLoraConfigError(
                f"Unsupported T-LoRA format_version {quote(version)}: this version of the loader reads version "
                f"{FORMAT_VERSION}. Upgrade the package to read newer files."
            )
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        try:
            return cls(**kwargs)
        except TypeError as error:
            raise TLoraConfigError(f"Invalid T-LoRA config: {error}") from None

    @classmethod
    def from_json(cls, text: str) -> "TLoraConfig":
        try:
            data = load_json(text, "`tlora_config` metadata")
        except ValueError as error:
            raise TLoraConfigError(str(error)) from None
        return cls.from_dict(data)
