"""T-LoRA adapter layers: the low-rank update added to one linear projection.

An adapter computes only the update `delta(x)`; the projection it belongs to still computes `W x + b`
itself (see `injection.py`). The rank mask arrives as a `RankState` built once per UNet call:
either a `(B, R)` mask (one row per sample) or, when every sample shares one timestep, the number of
active components, which lets the layers skip the masked-out components entirely.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config import TLoraConfig


@dataclass
class RankState:
    """The rank mask of one adapter for one UNet call."""

    mask: torch.Tensor | None = None  # (B, R) or (1, R); None when `active_rank` says it all
    active_rank: int | None = None  # set when all samples share one rank that is known on the host
    _paired_mask: torch.Tensor | None = field(default=None, repr=False)

    @property
    def paired_mask(self) -> torch.Tensor:
        # the folded ortho factors interleave trained and frozen components (see OrthoTLoraAdapter); computed
        # once per call, by hand rather than with functools.cached_property, whose lock torch.compile cannot trace
        if self._paired_mask is None:
            self._paired_mask = self.mask.repeat_interleave(2, dim=-1)
        return self._paired_mask


def _skip_inactive(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, active: int) -> torch.Tensor:
    """`up[:, :active] @ down[:active] @ x`, the update with the inactive components left out.

    The down product is computed a few rows wider, to a multiple of 8: GEMMs whose width is not a multiple of 8
    take slow paths (CPU kernels, tensor cores), and the extra rows cost less than that.
    """
    width = min(down.shape[0], -(-active // 8) * 8)
    return F.linear(F.linear(x, down[:width])[..., :active], up[:, :active])


def _broadcast_mask(mask: torch.Tensor, hidden: torch.Tensor, rank: int) -> torch.Tensor:
    """Shape a `(B, R)` mask to multiply `hidden` (`(B, ..., rank)`), keeping one row per sample."""
    mask = mask[:, :rank]
    batch = mask.shape[0]
    if batch != 1 and hidden.shape[0] != batch:
        raise ValueError(
            f"T-LoRA got {batch} timesteps for a projection input of batch size {hidden.shape[0]}; pass one "
            "timestep per sample or a single timestep for the whole batch."
        )
    return mask.view(batch, *([1] * (hidden.ndim - 2)), rank)


class TLoraAdapter(nn.Module):
    """Base class: the low-rank update of a projection `in_features -> out_features`."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = min(rank, in_features, out_features)

    def forward(self, x: torch.Tensor, state: RankState) -> torch.Tensor:
        raise NotImplementedError


class VanillaTLoraAdapter(TLoraAdapter):
    """Plain LoRA factors with the rank mask: `U (m(t) * (D x))`."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__(in_features, out_features, rank)
        self.down = nn.Parameter(torch.empty(self.rank, in_features))
        self.up = nn.Parameter(torch.zeros(out_features, self.rank))

    @torch.no_grad()
    def initialize(self, config: TLoraConfig, weight: torch.Tensor | None = None, generator=None) -> None:
        self.down.copy_(torch.randn(self.down.shape, generator=generator) / config.rank)
        self.up.zero_()

    def forward(self, x: torch.Tensor, state: RankState) -> torch.Tensor:
        x = x.to(self.down.dtype)
        if state.active_rank is not None:
            return _skip_inactive(x, self.down, self.up, min(state.active_rank, self.rank))
        hidden = F.linear(x, self.down)
        return F.linear(hidden * _broadcast_mask(state.mask, hidden, self.rank), self.up)


def _pick_components(num: int, rank: int, pick: str) -> slice:
    """Which `rank` of `num` singular triplets (sorted largest first) initialise an ortho adapter."""
    if pick == "principal":
        return slice(0, rank)
    if pick == "last":
        return slice(num - rank, num)
    if pick == "middle":
        start = (num - rank) // 2
        return slice(start, start + rank)
    raise ValueError(f"Unknown ortho init {pick!r}; expected 'last', 'principal' or 'middle'.")


def parse_ortho_init(init: str) -> tuple[str, str]:
    """`"random-last"` -> `("random", "last")`."""
    source, _, pick = init.partition("-")
    if source not in ("random", "weight") or pick not in ("last", "principal", "middle"):
        raise ValueError(
            f"Unknown ortho init {init!r}; expected '<source>-<pick>' with source 'random' or 'weight' and pick "
            "'last', 'principal' or 'middle' (e.g. 'random-last')."
        )
    return source, pick


class OrthoTLoraAdapter(TLoraAdapter):
    """Ortho-LoRA factors with the rank mask (the paper's T-LoRA):

        P (m(t) * lam * (Q x)) - P0 (m(t) * lam0 * (Q0 x))

    `P0, Q0, lam0` are frozen copies of the initial factors, so the update is exactly zero at initialisation.
    """

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__(in_features, out_features, rank)
        self.down = nn.Parameter(torch.zeros(self.rank, in_features))
        self.up = nn.Parameter(torch.zeros(out_features, self.rank))
        self.lam = nn.Parameter(torch.zeros(self.rank))
        self.register_buffer("down_base", torch.zeros(self.rank, in_features))
        self.register_buffer("up_base", torch.zeros(out_features, self.rank))
        self.register_buffer("lam_base", torch.zeros(self.rank))
        self._folded = None

    @torch.no_grad()
    def initialize(self, config: TLoraConfig, weight: torch.Tensor | None = None, generator=None) -> None:
        source, pick = parse_ortho_init(config.init)
        if source == "weight":
            if weight is None:
                raise ValueError("Ortho init from 'weight' needs the layer's weight.")
            matrix = weight.detach().float()
        else:
            matrix = torch.randn((self.out_features, self.in_features), generator=generator) / config.rank
        u, s, vh = torch.linalg.svd(matrix.to(self.down.device, torch.float32), full_matrices=False)
        idx = _pick_components(s.shape[0], self.rank, pick)
        for trained, frozen, value in (
            (self.up, self.up_base, u[:, idx]),
            (self.lam, self.lam_base, s[idx]),
            (self.down, self.down_base, vh[idx]),
        ):
            trained.copy_(value)
            frozen.copy_(value)

    def _fold(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Both branches as one rank-2R product, `lam` folded into the up factor, trained and frozen
        components interleaved so that the first `2k` rows/columns are the `k` active pairs."""
        down = torch.stack((self.down, self.down_base), dim=1).reshape(2 * self.rank, self.in_features)
        up = torch.stack((self.up * self.lam, -(self.up_base * self.lam_base)), dim=2)
        return down, up.reshape(self.out_features, 2 * self.rank)

    def _folded_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`_fold()`, cached until a parameter or buffer changes. A compiled graph folds on every call instead:
        the compiler cannot see tensor versions, and the fold is small next to the products it feeds."""
        if torch.compiler.is_compiling():
            return self._fold()
        tensors = (self.down, self.up, self.lam, self.down_base, self.up_base, self.lam_base)
        key = tuple((id(t), t._version) for t in tensors)
        if self._folded is None or self._folded[0] != key:
            self._folded = (key, *self._fold())
        return self._folded[1], self._folded[2]

    def _two_branch_update(self, x: torch.Tensor, state: RankState) -> torch.Tensor:
        """The paper's form, for training: the frozen branch is subtracted exactly, so the update is exactly
        zero at initialisation, and only the trained factors get gradients."""
        k = self.rank if state.active_rank is None else min(state.active_rank, self.rank)
        # training may keep the parameters in fp32 while `.to()` left the frozen buffers in the UNet's dtype
        down_base, up_base, lam_base = (t.to(x.dtype) for t in (self.down_base, self.up_base, self.lam_base))
        hidden, hidden_base = F.linear(x, self.down[:k]), F.linear(x, down_base[:k])
        if state.active_rank is None:
            mask = _broadcast_mask(state.mask, hidden, self.rank)
            hidden, hidden_base = hidden * mask, hidden_base * mask
        # lam scales the (small) up factor rather than the activations
        trained = F.linear(hidden, self.up[:, :k] * self.lam[:k])
        frozen = F.linear(hidden_base, up_base[:, :k] * lam_base[:k])
        return trained - frozen

    def forward(self, x: torch.Tensor, state: RankState) -> torch.Tensor:
        x = x.to(self.down.dtype)
        if torch.is_grad_enabled():
            return self._two_branch_update(x, state)
        down, up = self._folded_factors()
        if state.active_rank is not None:
            return _skip_inactive(x, down, up, 2 * min(state.active_rank, self.rank))
        hidden = F.linear(x, down)
        return F.linear(hidden * _broadcast_mask(state.paired_mask, hidden, 2 * self.rank), up)


ADAPTER_CLASSES = {"vanilla": VanillaTLoraAdapter, "ortho": OrthoTLoraAdapter}
