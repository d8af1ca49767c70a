"""The files beside a trained adapter that other tools load, and the model card's table of which is for which.

The loader files (`pipeline.py`, `tlora_*.py`) are always written: with them diffusers alone loads the adapter from
the output folder or its Hub repository. With --export_for_tools the trainer also writes the file ComfyUI's T-LoRA
node loads (masked) and a standard LoRA at full rank in kohya's layout (ComfyUI's LoraLoader, A1111, kohya,
diffusers' `load_lora_weights`), so that a Hub upload serves each tool without a conversion step.
"""

from __future__ import annotations

from pathlib import Path

import pipelines.tlora as tl
from pipelines.tlora.convert import export_comfyui, export_lora
from pipelines.tlora.remote_code import MODULE_PREFIX, PIPELINE_FILE, write_loader_files

# the families whose adapters ComfyUI's T-LoRA node loads and kohya's layout names
UNET_FAMILIES = ("sd", "sdxl")


def write_tool_files(output_dir: str | Path, family: str, with_exports: bool) -> dict[str, str]:
    """Write the loader files (and with `with_exports` the ComfyUI node file and the kohya LoRA) next to the
    adapter in `output_dir`; returns `{file name: what it is for}` for the card."""
    output_dir = Path(output_dir)
    write_loader_files(output_dir, family)
    files = {
        tl.WEIGHT_NAME: "the T-LoRA adapter, for diffusers: `load_tlora_weights` (see Usage)",
        f"{PIPELINE_FILE}, {MODULE_PREFIX}*.py": "loader files: diffusers' `custom_pipeline=` loads the adapter with "
        "nothing else installed",
    }
    if not with_exports:
        return files
    if family not in UNET_FAMILIES:
        static = export_lora(output_dir, output_dir, tool="diffusers", overwrite=True)
        files[static.outputs[0].name] = (
            "diffusers' `load_lora_weights(..., weight_name=...)` and other tools that read LoRAs in diffusers' "
            f"(PEFT) layout: a standard LoRA at full rank, without timestep masks. {static.notes[-1]}"
        )
        return files
    node = export_comfyui(output_dir, output_dir, overwrite=True)
    files[node.outputs[0].name] = f"ComfyUI with the ComfyUI-T-LoRA custom nodes, timestep masks kept. {node.notes[0]}"
    static = export_lora(output_dir, output_dir, tool="comfyui", overwrite=True)
    files[static.outputs[0].name] = (
        "ComfyUI's LoraLoader, A1111, kohya's sd-scripts, diffusers' `load_lora_weights`: a standard LoRA at full "
        f"rank, without timestep masks. {static.notes[-1]}"
    )
    return files
