"""The adapter's model card (`OUTPUT_DIR/README.md`): Hub metadata, how to load the adapter (with diffusers alone
first) and which file serves which tool, the rank schedule, validation grid and loss curve, the training settings
and the validation images. What differs between model families comes in one `CardFacts`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

import pipelines.tlora as tl
from pipelines.tlora.file_format import write_atomically

from .adapter import method_name
from .card_assets import CardExtras, files_section, images_section, usage_section


@dataclass(frozen=True)
class License:
    """The licence an adapter carries from its base model, as the card's metadata and text state it."""

    id: str | None  # the Hub's licence id ("other" with a name and link for custom licences); None: not stated
    name: str | None = None
    link: str | None = None
    note: str = ""  # a paragraph on the licence, where its terms matter to users


@dataclass(frozen=True)
class CardFacts:
    """What a model card says about the model family."""

    model_name: str  # e.g. "Stable Diffusion XL"
    pipeline_class: str  # the stock diffusers pipeline that loads the adapter
    license: License  # of a base model not in `base_model_licenses`
    tags: tuple[str, ...]
    torch_dtype: str  # for the usage example, e.g. "torch.float16"
    # the flag holding the sampling guidance of validation and the usage example ("guidance_scale" for SD-XL;
    # FLUX.1 trains with guidance 1 and samples with --validation_guidance_scale)
    sampling_guidance_flag: str = "guidance_scale"
    # Hub ids of the family's base models whose licences differ (FLUX.1 [dev] and [schnell]), lower case
    base_model_licenses: dict[str, License] = field(default_factory=dict)

    def license_of(self, base_model: str) -> License:
        """The licence of an adapter of `base_model` (a Hub id or a local folder)."""
        return self.base_model_licenses.get(base_model.lower(), self.license)


def _is_hub_id(name: str) -> bool:
    return not Path(name).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None


def write_model_card(
    args,
    config: tl.TLoraConfig,
    facts: CardFacts,
    validation_paths: list[list[Path]],
    repo_id: str | None,
    steps: int,
    extra_settings: dict[str, str] | None = None,
    extras: CardExtras | None = None,
) -> Path:
    output_dir = Path(args.output_dir)
    base = args.pretrained_model_name_or_path
    method = method_name(config)
    images = [
        (prompt, path)
        for prompt, paths in zip(args.validation_prompt or [], validation_paths, strict=True)
        for path in paths
    ]
    widget = [{"text": prompt, "output": {"url": path.relative_to(output_dir).as_posix()}} for prompt, path in images]
    # The Hub rejects a `base_model` that is not a Hub id, so a local base model is named in the text only.
    license = facts.license_of(base)
    card_data = ModelCardData(
        license=license.id,
        license_name=license.name,
        license_link=license.link,
        base_model=base if _is_hub_id(base) else None,
        tags=list(facts.tags),
        instance_prompt=args.instance_prompt,
        widget=widget or None,
    )
    adapter_location = repo_id or str(output_dir.resolve())
    batch = f"{args.train_batch_size} per device x {args.gradient_accumulation_steps} accumulation"
    prior = f'yes: "{args.class_prompt}", weight {args.prior_loss_weight}' if args.with_prior_preservation else "no"
    settings = {
        "method": f"{method} (variant `{config.variant}`)",
        "rank / min rank": f"{config.rank} / {config.min_rank}",
        "rank schedule exponent": config.schedule_exponent,
        "initialisation": config.init,
        "lora_alpha": config.lora_alpha if config.lora_alpha is not None else "none (scale 1)",
        "target modules": ", ".join(config.target_modules),
        "steps": steps,
        "optimizer, learning rate": f"{args.optimizer}, {args.learning_rate} ({args.lr_scheduler})",
        "batch size": batch,
        "resolution": args.resolution,
        "prior preservation": prior,
        **(extra_settings or {}),
        "seed": args.seed,
    }
    table = "\n".join(f"| {name} | {value} |" for name, value in settings.items())
    usage = usage_section(
        base,
        adapter_location,
        args.instance_prompt,
        # the settings of the card's images and rank-schedule plot
        f"num_inference_steps={args.num_inference_steps}, "
        f"guidance_scale={getattr(args, facts.sampling_guidance_flag)}",
        facts.pipeline_class,
        facts.torch_dtype,
        has_loader_files=extras is not None,
    )
    files = f"\nWhich file is for which tool:\n\n{files_section(extras.files)}" if extras and extras.files else ""
    pictures = f"## What it does\n\n{images_section(extras.assets)}\n\n" if extras and extras.assets else ""
    gallery = "\n".join(f"![{prompt}]({path.relative_to(output_dir).as_posix()})" for prompt, path in images)
    body = f"""
# {method} adapter for {facts.model_name}: `{args.instance_prompt}`

A {method} adapter for `{base}`, trained on one concept with DreamBooth-style fine-tuning.
T-LoRA ([Soboleva et al., 2025](https://arxiv.org/abs/2507.05964)) trains fewer rank components at high
diffusion timesteps, where fine-tuning on a single image overfits most.

## Trigger prompt

Use `{args.instance_prompt}` in your prompt.

## Usage

{usage}
{files}{license.note}
## Training settings

| setting | value |
|---|---|
{table}

{pictures}## Validation images

{gallery or "No validation prompt was given."}
"""
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")
    return write_atomically(output_dir / "README.md", lambda temporary: card.save(temporary))
