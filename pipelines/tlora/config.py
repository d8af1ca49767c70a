"""Configuration of a T-LoRA adapter: what is stored in the `tlora_config` metadata of a file."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

from .families import FAMILIES

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
        self.target_modules = list(self.target_modules)
        self.validate()

    def validate(self) -> None:
        def fail(message):
            raise TLoraConfigError(f"Invalid T-LoRA config: {message}")

        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            fail(f"`rank` must be an integer >= 1, got {self.rank!r}.")
        if not isinstance(self.min_rank, int) or isinstance(self.min_rank, bool) or self.min_rank < 1:
            fail(f"`min_rank` must be an integer >= 1, got {self.min_rank!r}.")
        if self.min_rank > self.rank:
            fail(f"`min_rank` ({self.min_rank}) must not exceed `rank` ({self.rank}).")
        if self.variant not in VARIANTS:
            fail(f"`variant` must be one of {VARIANTS}, got {self.variant!r}.")
        if not isinstance(self.schedule_exponent, (int, float)) or not self.schedule_exponent >= 0:
            fail(f"`schedule_exponent` must be a number >= 0, got {self.schedule_exponent!r}.")
        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 1:
            fail(f"`num_train_timesteps` must be an integer >= 1, got {self.num_train_timesteps!r}.")
        if self.lora_alpha is not None and (not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0):
            fail(f"`lora_alpha` must be a positive number or None, got {self.lora_alpha!r}.")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            fail(f"`target_modules` must be a non-empty list of module names, got {self.target_modules!r}.")
        if self.model_family is not None and self.model_family not in FAMILIES:
            fail(f"`model_family` must be one of {tuple(FAMILIES)} or None, got {self.model_family!r}.")

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
            raise TLoraConfigError(f"`tlora_config` has format {data.get('format')!r}, expected {FORMAT_NAME!r}.")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise TLoraConfigError(
                f"Unsupported T-LoRA format_version {version!r}: this version of the loader reads version "
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
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise TLoraConfigError(f"`tlora_config` metadata is not valid JSON: {error}") from None
        return cls.from_dict(data)
