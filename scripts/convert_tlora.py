#!/usr/bin/env python
"""Convert T-LoRA adapters between this package's format, the T-LoRA authors' checkpoints and standard LoRA files.

Usage::

    python scripts/convert_tlora.py import-official CHECKPOINT_DIR OUT_DIR [--hparams PATH] [--rank R]
        [--min-rank R_MIN] [--schedule-exponent E] [--variant ortho|vanilla] [--base-model NAME] [--overwrite]
    python scripts/convert_tlora.py export-official IN OUT_DIR [--step N] [--placeholder-token TOKEN]
        [--class-name WORD] [--overwrite]
    python scripts/convert_tlora.py export-lora IN OUT [--timestep T | --rank K]
        [--for comfyui|a1111|kohya|diffusers] [--overwrite]
    python scripts/convert_tlora.py export-comfyui IN OUT [--loader tlora-node|stock] [--overwrite]
    python scripts/convert_tlora.py inspect FILE [--hparams PATH]
    python scripts/convert_tlora.py loader-files ADAPTER_DIR [--family sd|sdxl|flux|sd3] [--overwrite]

IN is a `pytorch_tlora_weights.safetensors` file or a folder holding one. Both of the authors' layouts are known:
SD-XL (`checkpoint-N/pytorch_lora_weights.safetensors`) and FLUX.1 (`checkpoint-N/lora.pt`, a torch pickle read
weights-only; exports write `lora.safetensors` instead). The model family comes from the keys and `model_family`.
Errors print `error: ...` and exit with status 2. The conversions themselves live in `pipelines.tlora.convert`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from pipelines.tlora import convert  # noqa: E402
from pipelines.tlora.comfyui_export import LOADERS  # noqa: E402
from pipelines.tlora.families import FAMILIES  # noqa: E402
from pipelines.tlora.lora_export import DEFAULT_TOOL, TOOL_FORMATS  # noqa: E402
from pipelines.tlora.official_format import DEFAULT_CLASS_NAME, DEFAULT_PLACEHOLDER_TOKEN  # noqa: E402
from scripts.arguments import finite_float, output_folder, path_text, positive_int  # noqa: E402


def _export_command(commands, name: str, help: str, description: str) -> argparse.ArgumentParser:
    """A subcommand reading our T-LoRA file (IN), with --overwrite for its outputs."""
    command = commands.add_parser(name, help=help, description=description)
    command.add_argument(
        "source", type=path_text, metavar="IN", help="pytorch_tlora_weights.safetensors or its folder"
    )
    command.add_argument("--overwrite", action="store_true")
    return command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convert_tlora.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    importer = commands.add_parser(
        "import-official",
        help="authors' checkpoint -> this package's T-LoRA file",
        description="Read <run>/checkpoint-N (and <run>/logs/hparams.yml) and write OUT_DIR/pytorch_tlora_weights."
        "safetensors. The tensors decide the variant and the model family; flags override hparams.yml. A FLUX "
        "lora.pt is read with torch.load(weights_only=True): tensors only, anything else is refused.",
    )
    importer.add_argument(
        "checkpoint",
        type=path_text,
        help="checkpoint-N folder or its weights (pytorch_lora_weights.safetensors, lora.pt)",
    )
    importer.add_argument("out_dir", type=output_folder)
    importer.add_argument("--hparams", type=path_text, help="hparams.yml (default: <run>/logs/hparams.yml)")
    importer.add_argument("--rank", type=positive_int, help="maximum rank (SD-XL: lora_rank; FLUX: rank)")
    importer.add_argument("--min-rank", type=positive_int, help="minimum rank of the schedule (min_rank)")
    importer.add_argument("--schedule-exponent", type=finite_float, help="schedule exponent (alpha_rank_scale)")
    importer.add_argument(
        "--variant", choices=("ortho", "vanilla"), help="expected variant (checked against the keys)"
    )
    importer.add_argument("--base-model", help="base model name recorded in the file")
    importer.add_argument("--overwrite", action="store_true")

    exporter = _export_command(
        commands,
        "export-official",
        help="T-LoRA file -> authors' layout",
        description="Write OUT_DIR/checkpoint-STEP/pytorch_lora_weights.safetensors (SD-XL) or lora.safetensors "
        "(FLUX, all 14 tensors of every block) and OUT_DIR/logs/hparams.yml.",
    )
    exporter.add_argument("out_dir", type=output_folder)
    exporter.add_argument("--step", type=int, default=0, help="checkpoint number in the folder name (default 0)")
    exporter.add_argument(
        "--placeholder-token",
        default=DEFAULT_PLACEHOLDER_TOKEN,
        help="the concept's token, written to hparams.yml for the authors' prompts "
        f"(default {DEFAULT_PLACEHOLDER_TOKEN!r})",
    )
    exporter.add_argument(
        "--class-name",
        default=DEFAULT_CLASS_NAME,
        help=f"the concept's class word, written to hparams.yml (default {DEFAULT_CLASS_NAME!r}; e.g. dog)",
    )

    lora = _export_command(
        commands,
        "export-lora",
        help="T-LoRA file -> standard LoRA frozen at one rank",
        description="Freeze the rank mask at one timestep or rank (default: full rank) and write a standard LoRA. "
        "The result has no timestep masking: it is exact only where the schedule uses that rank.",
    )
    lora.add_argument("out", type=path_text, metavar="OUT", help="a .safetensors file, or a folder")
    frozen_at = lora.add_mutually_exclusive_group()
    frozen_at.add_argument(
        "--timestep", type=finite_float, help="freeze at the rank the schedule uses at this timestep"
    )
    frozen_at.add_argument("--rank", type=positive_int, help="freeze at this many active components")
    lora.add_argument(
        "--for",
        dest="tool",
        choices=TOOL_FORMATS,
        help=f"the tool that loads it (default: {DEFAULT_TOOL} for SD-XL adapters, diffusers for the others). "
        "comfyui (LoraLoader), a1111 and kohya read kohya keys (lora_unet_<SD-XL module>.lora_down/up/alpha), "
        "which diffusers' load_lora_weights also reads; diffusers: "
        "PEFT keys (unet. or transformer.<module>.lora_A/B), which the other tools skip; FLUX.1 and SD 1.x adapters "
        "export --for diffusers only",
    )

    comfy = _export_command(
        commands,
        "export-comfyui",
        help="T-LoRA file -> the one file ComfyUI's 'Load T-LoRA (Bypass)' node loads, with its settings",
        description="Write one .safetensors for ComfyUI's models/loras in the layout the ComfyUI-T-LoRA nodes read, "
        "keeping the timestep masks; print the node settings (max_rank, min_rank, alpha, max_timestep) that "
        "reproduce the adapter's schedule and store them in the file's `tlora_comfyui_node` metadata.",
    )
    comfy.add_argument(
        "out", type=path_text, metavar="OUT", help="a .safetensors file, or a folder (e.g. models/loras)"
    )
    comfy.add_argument(
        "--loader",
        choices=LOADERS,
        default="tlora-node",
        help="tlora-node (default): the masked T-LoRA node; stock: ComfyUI's LoraLoader, which reads a vanilla "
        "file without masks and cannot read an ortho one (refused: use export-lora --for comfyui)",
    )

    loader = commands.add_parser(
        "loader-files",
        help="write pipeline.py and the runtime modules next to an adapter, for diffusers' custom_pipeline=",
        description="Write ADAPTER_DIR/pipeline.py and ADAPTER_DIR/tlora_*.py (this version's runtime modules), so "
        "that `DiffusionPipeline.from_pretrained(BASE, custom_pipeline=ADAPTER_DIR_OR_REPO, trust_remote_code=True)` "
        "gives a pipeline with `load_tlora_weights` without this project installed. Upload them with the adapter.",
    )
    loader.add_argument("adapter_dir", type=path_text, metavar="ADAPTER_DIR", help="folder holding the T-LoRA file")
    loader.add_argument(
        "--family",
        choices=sorted(FAMILIES),
        help="model family of the pipeline (default: the adapter's model_family; sdxl for files without one)",
    )
    loader.add_argument("--overwrite", action="store_true", help="replace same-named files not written by this tool")

    inspector = commands.add_parser("inspect", help="summarise an adapter in either layout")
    inspector.add_argument("path", type=path_text, metavar="FILE")
    inspector.add_argument("--hparams", type=path_text, help="hparams.yml of an authors' checkpoint")
    return parser


def _run(args) -> str:
    if args.command == "inspect":
        return convert.format_inspection(convert.inspect_adapter(args.path, hparams=args.hparams))
    if args.command == "loader-files":
        result = convert.add_loader_files(args.adapter_dir, family=args.family, overwrite=args.overwrite)
    elif args.command == "import-official":
        result = convert.import_official(
            args.checkpoint,
            args.out_dir,
            hparams=args.hparams,
            rank=args.rank,
            min_rank=args.min_rank,
            schedule_exponent=args.schedule_exponent,
            variant=args.variant,
            base_model=args.base_model,
            overwrite=args.overwrite,
        )
    elif args.command == "export-official":
        result = convert.export_official(
            args.source,
            args.out_dir,
            step=args.step,
            placeholder_token=args.placeholder_token,
            class_name=args.class_name,
            overwrite=args.overwrite,
        )
    elif args.command == "export-comfyui":
        result = convert.export_comfyui(args.source, args.out, loader=args.loader, overwrite=args.overwrite)
    else:
        result = convert.export_lora(
            args.source, args.out, timestep=args.timestep, rank=args.rank, tool=args.tool, overwrite=args.overwrite
        )
    config = result.config
    lines = [f"wrote {path}" for path in result.outputs]
    lines.append(f"{config.variant} T-LoRA, rank {config.rank}, min_rank {config.min_rank}")
    lines += [f"note: {note}" for note in result.notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(_run(args))
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
