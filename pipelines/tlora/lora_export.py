"""Freezing a T-LoRA adapter at one rank into a standard LoRA that tools without timestep masks can load.

A T-LoRA update at a fixed rank `k` is an ordinary low-rank product:

    vanilla:  s * U[:, :k] D[:k]                                          (rank k)
    ortho:    s * [P[:, :k] * lam[:k], -P0[:, :k] * lam0[:k]] [Q[:k]; Q0[:k]]      (rank 2k)

with `s` the adapter's own scale (`lora_alpha / rank`), folded into the up factor so the LoRA has scale 1.
The result equals the T-LoRA exactly at the timesteps whose scheduled rank is `k` and only approximates it at
the others: what is lost is the timestep dependence itself.

Two key layouts (`TOOL_FORMATS` says which tool reads which):
- "diffusers": PEFT keys `<denoiser>.<module path>.lora_A.weight` / `.lora_B.weight` (`unet.` or `transformer.`,
  see `families.py`), as written by `StableDiffusionXLPipeline.save_lora_weights` or
  `FluxPipeline.save_lora_weights`; no alphas, so diffusers uses scale 1.
- "kohya": `lora_unet_<module>.lora_down.weight` / `.lora_up.weight` / `.alpha` (alpha = rank, scale 1) with the
  module names kohya's sd-scripts give SD-XL, those of the original (SGM) UNet (`input_blocks_4_1_...`), as in
  kohya-trained SD-XL LoRAs; diffusers' `load_lora_weights` maps them back to its own module paths. SD-XL only.
"""

from __future__ import annotations

import re

import torch

from .config import TLoraConfig
from .families import SDXL, ModelFamily
from .file_format import TLoraFileError, layer_key_parts
from .schedule import rank_schedule

FORMATS = ("diffusers", "kohya")
# The layout each tool reads. ComfyUI's LoraLoader, A1111 and kohya's sd-scripts skip PEFT keys (the LoRA would
# silently do nothing); diffusers' `load_lora_weights` reads both, so the kohya layout is the default.
TOOL_FORMATS = {"comfyui": "kohya", "a1111": "kohya", "kohya": "kohya", "diffusers": "diffusers"}
DEFAULT_TOOL = "comfyui"
# SD-XL's UNet has two resnet/attention layers per down block and three per up block; the original UNet numbers
# its layers consecutively, with a downsampler after each down block.
SDXL_LAYERS_PER_BLOCK = 2

_BLOCK_ATTENTION = re.compile(
    r"^(?P<kind>down_blocks|up_blocks)\.(?P<block>\d+)\.attentions\.(?P<layer>\d+)\.(?P<rest>.+)$"
)
_MID_ATTENTION = re.compile(r"^mid_block\.attentions\.0\.(?P<rest>.+)$")


def rank_at_timestep(config: TLoraConfig, timestep: float) -> int:
    schedule = (config.rank, config.min_rank, config.num_train_timesteps, config.schedule_exponent)
    return int(rank_schedule(float(timestep), *schedule))


def exact_timesteps(config: TLoraConfig, rank: int) -> tuple[int, int] | None:
    """The first and last training timestep (0..T-1) whose scheduled rank is `rank`, or None if there is none.

    The schedule is monotone, so these bound one contiguous range.
    """
    timesteps = torch.arange(config.num_train_timesteps)
    ranks = rank_schedule(
        timesteps, config.rank, config.min_rank, config.num_train_timesteps, config.schedule_exponent
    )
    hits = timesteps[ranks == rank]
    return None if hits.numel() == 0 else (int(hits[0]), int(hits[-1]))


def _group(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        path, name = layer_key_parts(key)
        grouped.setdefault(path, {})[name] = tensor
    return grouped


def _freeze_module(tensors: dict[str, torch.Tensor], variant: str, rank: int, scale: float):
    """(down, up) of one module at `rank` active components, computed in at least float32."""
    dtype = tensors["down"].dtype
    compute = torch.promote_types(dtype, torch.float32)
    t = {name: tensor.to(compute) for name, tensor in tensors.items()}
    k = min(rank, t["down"].shape[0])
    if variant == "vanilla":
        down, up = t["down"][:k], t["up"][:, :k]
    else:
        down = torch.cat((t["down"][:k], t["down_base"][:k]))
        up = torch.cat((t["up"][:, :k] * t["lambda"][:k], -t["up_base"][:, :k] * t["lambda_base"][:k]), dim=1)
    return down.to(dtype).contiguous(), (up * scale).to(dtype).contiguous()


def freeze_tlora(
    state_dict: dict[str, torch.Tensor], config: TLoraConfig, rank: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`{module path: (down, up)}` of the plain LoRA equal to the adapter when `rank` components are active.

    `state_dict` holds our (validated) tensors, keys `[unet.]<path>.tlora.<name>`.
    """
    if not 1 <= rank <= config.rank:
        raise TLoraFileError(f"Cannot freeze at rank {rank}: the adapter's ranks are 1..{config.rank}.")
    return {
        path: _freeze_module(tensors, config.variant, rank, config.scale)
        for path, tensors in sorted(_group(state_dict).items())
    }


def peft_state_dict(frozen: dict[str, tuple[torch.Tensor, torch.Tensor]], prefix: str) -> dict[str, torch.Tensor]:
    """diffusers' LoRA keys: `<denoiser attribute>.<module path>.lora_A.weight` / `.lora_B.weight`."""
    tensors = {}
    for path, (down, up) in frozen.items():
        tensors[f"{prefix}{path}.lora_A.weight"] = down
        tensors[f"{prefix}{path}.lora_B.weight"] = up
    return tensors


def sgm_module_path(path: str) -> str:
    """A diffusers SD-XL UNet path -> the original UNet's path, as kohya names SD-XL LoRA modules."""
    stride = SDXL_LAYERS_PER_BLOCK + 1
    match = _BLOCK_ATTENTION.match(path)
    if match is not None:
        block, layer = int(match["block"]), int(match["layer"])
        if match["kind"] == "down_blocks" and layer < SDXL_LAYERS_PER_BLOCK:
            return f"input_blocks.{1 + block * stride + layer}.1.{match['rest']}"
        if match["kind"] == "up_blocks" and layer < stride:
            return f"output_blocks.{block * stride + layer}.1.{match['rest']}"
    match = _MID_ATTENTION.match(path)
    if match is not None:
        return f"middle_block.1.{match['rest']}"
    raise TLoraFileError(
        f"Module {path!r} has no place in SD-XL's UNet layout, so it has no kohya name; export it with "
        "--for diffusers."
    )


def kohya_state_dict(frozen: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    tensors = {}
    for path, (down, up) in frozen.items():
        name = "lora_unet_" + sgm_module_path(path).replace(".", "_")
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        # alpha equal to the rank makes kohya's scale alpha / rank exactly 1
        tensors[f"{name}.alpha"] = torch.tensor(float(down.shape[0]), dtype=down.dtype)
    return tensors


def lora_state_dict(
    frozen: dict[str, tuple[torch.Tensor, torch.Tensor]], lora_format: str, family: ModelFamily = SDXL
) -> dict[str, torch.Tensor]:
    if lora_format == "diffusers":
        return peft_state_dict(frozen, family.key_prefix)
    if lora_format == "kohya":
        if family.name != SDXL.name:
            raise TLoraFileError(
                f"The kohya layout here names SD-XL UNet modules; this adapter is for {family.display_name}. Export "
                "it with --for diffusers."
            )
        return kohya_state_dict(frozen)
    raise ValueError(f"Unknown LoRA format {lora_format!r}; choose one of {', '.join(FORMATS)}.")


def describe_export(config: TLoraConfig, rank: int) -> str:
    """What the frozen LoRA reproduces, for the command's output and the file's metadata."""
    lora_rank = rank if config.variant == "vanilla" else 2 * rank
    head = f"Standard LoRA (rank {lora_rank}) frozen from a T-LoRA adapter at {rank} of {config.rank} components"
    last = config.num_train_timesteps - 1
    exact = exact_timesteps(config, rank)
    if exact == (0, last):
        return f"{head}; the adapter uses this rank at every timestep, so the LoRA equals it exactly."
    if exact is None:
        where = "exact at none of them (the schedule never uses this rank)"
    elif exact[0] == exact[1]:
        where = f"exact at timestep {exact[0]} only"
    else:
        where = f"exact at timesteps {exact[0]}..{exact[1]}"
    return (
        f"{head}: an approximation without timestep masking. Of the timesteps 0..{last} it is {where}; at the "
        f"others the T-LoRA uses other ranks (it ranges over {config.min_rank}..{config.rank})."
    )
