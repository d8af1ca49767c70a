"""The file ComfyUI's T-LoRA node loads, and the node settings that reproduce an adapter's rank schedule.

The "Load T-LoRA (Bypass)" node of the ComfyUI-T-LoRA custom nodes reads one safetensors file from
`models/loras` with the T-LoRA authors' key layout (`<attention>.processor.to_q_lora.down.weight`, ...; see
`official_format`), vanilla (`down`/`up`) or ortho (`q_layer`/`p_layer`/`lambda_layer` and the frozen `base_*`),
applied with scale 1. It takes the schedule from its inputs, not from the file, and at each step computes

    r = int(((max_timestep - t) / max_timestep) ** alpha * (max_rank - min_rank)) + min_rank

which is this package's r(t) with alpha = schedule_exponent and max_timestep = T. Its defaults (min_rank 1,
max_rank and max_timestep inferred) differ from an adapter trained with min_rank R/2, which would run 1 component
instead of R/2 at high noise; so the export names the settings, prints them and stores them in the file.

ComfyUI's stock LoraLoader knows nothing of the schedule: it reads a vanilla file of this layout as an unmasked,
full-rank LoRA and skips every key of an ortho file, leaving the model unchanged.
"""

from __future__ import annotations

import json

from .config import TLoraConfig
from .file_format import TLoraFileError
from .lora_export import describe_export

NODE_TITLE = "Load T-LoRA (Bypass)"
NODE_PACKAGE = "ComfyUI-T-LoRA"
METADATA_KEY = "tlora_comfyui_node"
LOADERS = ("tlora-node", "stock")
# the node's input ranges; settings outside them cannot be entered
NODE_RANK_LIMIT = 4096
NODE_ALPHA_RANGE = (0.05, 8.0)
NODE_TIMESTEP_LIMIT = 200000


def node_settings(config: TLoraConfig) -> dict:
    """The node inputs that reproduce the adapter's schedule."""
    settings = {
        "strength_model": 1.0,
        "max_rank": config.rank,
        "min_rank": config.min_rank,
        "alpha": config.schedule_exponent,
        "max_timestep": config.num_train_timesteps,
    }
    low, high = NODE_ALPHA_RANGE
    problems = []
    if config.rank > NODE_RANK_LIMIT:
        problems.append(f"rank {config.rank} exceeds the node's max_rank limit {NODE_RANK_LIMIT}")
    if not low <= config.schedule_exponent <= high:
        problems.append(
            f"schedule exponent {config.schedule_exponent:g} is outside the node's alpha range {low}..{high}"
        )
    if config.num_train_timesteps > NODE_TIMESTEP_LIMIT:
        problems.append(
            f"T = {config.num_train_timesteps} exceeds the node's max_timestep limit {NODE_TIMESTEP_LIMIT}"
        )
    if problems:
        raise TLoraFileError(
            f"The {NODE_TITLE!r} node cannot reproduce this adapter's schedule: {'; '.join(problems)}. Export a "
            "standard LoRA frozen at one rank instead (`export-lora --for comfyui`)."
        )
    return settings


def node_file_name(adapter_name: str, config: TLoraConfig) -> str:
    """A name that says, in ComfyUI's LoRA list, what the file is and which node settings it needs."""
    return f"{adapter_name}_tlora-node_{config.variant}_r{config.rank}-min{config.min_rank}.safetensors"


def describe_settings(settings: dict) -> str:
    values = ", ".join(f"{name} {value:g}" for name, value in settings.items())
    return f"In ComfyUI, load it with the {NODE_TITLE!r} node ({NODE_PACKAGE} custom nodes) set to: {values}."


def node_metadata(settings: dict, config: TLoraConfig) -> dict[str, str]:
    record = {"node": NODE_TITLE, "node_package": NODE_PACKAGE, "settings": settings, "tlora_config": config.to_dict()}
    return {"format": "pt", METADATA_KEY: json.dumps(record, sort_keys=True)}


def check_loader(loader: str, config: TLoraConfig) -> list[str]:
    """Notes for a file meant for `loader`; refuses what that loader cannot represent."""
    if loader not in LOADERS:
        raise ValueError(f"Unknown ComfyUI loader {loader!r}; choose one of {', '.join(LOADERS)}.")
    if loader == "tlora-node":
        return []
    if config.variant == "ortho":
        raise TLoraFileError(
            "ComfyUI's stock LoraLoader cannot load a T-LoRA (ortho) adapter: it skips q_layer/p_layer/lambda keys "
            f"and leaves the model unchanged. Use the {NODE_TITLE!r} node ({NODE_PACKAGE}) with this export "
            "(--loader tlora-node), or freeze a standard LoRA for the stock loader with `export-lora --for comfyui`."
        )
    return [
        "ComfyUI's stock LoraLoader reads this file as a standard LoRA without masks. "
        f"{describe_export(config, config.rank)} For the timestep masks, load it with the {NODE_TITLE!r} node."
    ]
