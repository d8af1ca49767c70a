#!/usr/bin/env python
"""The T-LoRA paper's Table 1 in miniature: one concept image, LoRA vs Vanilla T-LoRA vs T-LoRA, on the toy base.

    python scripts/toy_experiment.py --base_model outputs/toy-base --clip_model outputs/toy-clip \
        --output_dir outputs/toy-experiment [--ranks 4 8 16] [--seeds 0 1 2] [--steps 300]

The claim under test: masking the high-noise ranks keeps an adapter trained on a single image from
overfitting to it, so prompts that put the concept somewhere else are followed better (text alignment) at
about the same concept fidelity. Every step uses the project's own command-line tools, as a user would:

1. The concept: the robot of `examples/concept.png`, cut out and placed on one toy-world context (default the
   pink background), 64 px: `OUTPUT_DIR/concept/robot.png`. The base model has never seen it.
2. For every method, rank and seed, `train_tlora_sdxl.py` trains on that one picture with the instance prompt
   "a sks toy" (`toy_world.CONCEPT_PROMPT` says why not the paper's "a photo of sks toy"):
       lora      --tlora_variant vanilla --min_rank R     (no mask: standard LoRA)
       vanilla   --tlora_variant vanilla --min_rank R/2   (Vanilla T-LoRA: masked, plain factors)
       ortho     --tlora_variant ortho   --min_rank R     (Ortho-LoRA: no mask, orthogonal factors)
       tlora     --tlora_variant ortho   --min_rank R/2   (T-LoRA: masked, orthogonal factors)
3. For every seed, `scripts/evaluate.py` generates "a sks toy" and the contextual prompts of
   `TOY_PROMPTS` for all adapters and the base model, and scores them with the toy CLIP (`--clip_model`,
   IS and TS) and its vision tower (`--dino_model`, DINO-IS). The toy CLIP also names the context of each
   contextual picture, zero-shot among all the world's contexts: the share it names as asked is "context", how
   often the concept is placed where the prompt says (TS is the mean similarity behind it).
4. Mean and standard deviation over seeds: `results.md`, `results.json` and `tradeoff.png` (concept fidelity
   against text alignment and against context, one point per method and rank).

Adapters and evaluations already on disk are reused, so an interrupted run continues where it stopped. The
runs are independent one-thread processes, `--jobs` of them at a time (default: one per core).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from scripts import toy_world  # noqa: E402
from scripts.arguments import bounded_float  # noqa: E402

CONCEPT_IMAGE = REPO_ROOT / "examples" / "concept.png"
TOY_PROMPTS = {
    "base_prompt": "a {}",  # toy_world.CONCEPT_PROMPT
    "num_complex": 0,
    "toy": [
        "a {} on the beach",
        "a {} in the snow",
        "a {} at night",
        "a {} on the grass",
        "a {} on a blue background",
        "a {} on a yellow background",
    ],
}
METHODS = {
    "lora": ("vanilla", lambda rank: rank),
    "vanilla": ("vanilla", lambda rank: max(1, rank // 2)),
    "ortho": ("ortho", lambda rank: rank),
    "tlora": ("ortho", lambda rank: max(1, rank // 2)),
}
BASE_ROW = "base"  # evaluate.py's row of the base model without an adapter
METHOD_NAMES = {
    "lora": "LoRA", "vanilla": "Vanilla T-LoRA", "ortho": "Ortho-LoRA", "tlora": "T-LoRA", BASE_ROW: "base model"
}  # fmt: skip
METRICS = ("IS", "DINO_IS", "TS", "context")
ADAPTER_FILE = "pytorch_tlora_weights.safetensors"
# The training recipe, which the demo uses too. It was set on LoRA alone (rank 8, seed 0), before any T-LoRA was
# trained: the shortest run whose "a sks toy" pictures take the concept's colours and face, with diffusers' min-SNR
# weighting (gamma 5). The target modules were added later, after one T-LoRA run (see TARGET_MODULES).
STEPS, LEARNING_RATE, SNR_GAMMA = 600, 3e-3, 5.0
# The toy UNet has transformer blocks at its 8x8 level only, and adapters of their attention projections alone (the
# paper's layers) learn the concept's colours and eyes but not its shape; with the blocks' feed-forward and in/out
# projections too they learn the robot.
TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base_model", required=True, help="the toy base model folder (train_toy_base.py)")
    parser.add_argument("--clip_model", required=True, help="the toy CLIP folder (train_toy_clip.py)")
    parser.add_argument("--output_dir", required=True, help="where adapters, evaluations and results go")
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(METHODS), help="methods")
    parser.add_argument("--ranks", nargs="+", type=int, default=[4, 8, 16], help="maximum ranks (default 4 8 16)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (default 0 1 2)")
    parser.add_argument("--steps", type=int, default=STEPS, help="training steps per adapter (default %(default)s)")
    positive = bounded_float(0, low_open=True)
    parser.add_argument("--learning_rate", type=positive, default=LEARNING_RATE, help="learning rate (%(default)s)")
    parser.add_argument("--snr_gamma", type=positive, default=SNR_GAMMA, help="min-SNR weighting (%(default)s)")
    parser.add_argument(
        "--target_modules", nargs="+", default=list(TARGET_MODULES), help="adapted layers (default: TARGET_MODULES)"
    )
    parser.add_argument("--context", default="pink background", help="the concept picture's context")
    parser.add_argument("--images_per_prompt", type=int, default=4, help="images per contextual prompt (4)")
    parser.add_argument(
        "--base_prompt_images", type=int, default=8, help=f'images of "{toy_world.CONCEPT_PROMPT}" (default 8)'
    )
    parser.add_argument("--num_inference_steps", type=int, default=20, help="denoising steps (default 20)")
    parser.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="trainings and evaluations run at once (one per core)"
    )
    args = parser.parse_args(argv)
    if args.context not in toy_world.CONTEXTS:
        contexts = ", ".join(toy_world.CONTEXTS)
        parser.error(f"--context {args.context!r} is not a toy-world context; use one of {contexts}")
    for name in ("steps", "images_per_prompt", "base_prompt_images", "num_inference_steps", "jobs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if min(args.ranks) < 1:
        parser.error(f"--ranks must be at least 1, got {args.ranks}")
    for folder, what in ((args.base_model, "--base_model"), (args.clip_model, "--clip_model")):
        if not Path(folder).is_dir():
            parser.error(f"{what} {folder} is not a folder (make toy-base builds both models)")
    return args


def environment() -> dict[str, str]:
    # One thread: the models are small and the machine is often shared; extra threads mostly wait.
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")


def run_tool(command: list[str], log: Path) -> None:
    """Run one of the project's scripts, its output in `log`; a failure names the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w", encoding="utf-8") as handle:
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=environment(), cwd=REPO_ROOT)
    if result.returncode != 0:
        tail = "".join(log.read_text(encoding="utf-8").splitlines(keepends=True)[-15:])
        raise RuntimeError(f"{command[1]} failed (exit {result.returncode}); log {log}:\n{tail}")


def adapter_name(method: str, rank: int) -> str:
    return f"{method}-r{rank}"


def train(args, concept: Path, method: str, rank: int, seed: int) -> Path:
    output = Path(args.output_dir) / "adapters" / f"seed-{seed}" / adapter_name(method, rank)
    if (output / ADAPTER_FILE).is_file():
        return output
    variant, min_rank = METHODS[method]
    command = [
        sys.executable, str(REPO_ROOT / "train_tlora_sdxl.py"),
        "--pretrained_model_name_or_path", args.base_model,
        "--instance_data_dir", str(concept),
        "--instance_prompt", toy_world.CONCEPT_PROMPT,
        "--resolution", str(toy_world.IMAGE_SIZE),
        "--rank", str(rank),
        "--min_rank", str(min_rank(rank)),
        "--tlora_variant", variant,
        "--learning_rate", str(args.learning_rate),
        "--snr_gamma", str(args.snr_gamma),
        "--target_modules", *args.target_modules,
        "--max_train_steps", str(args.steps),
        "--checkpointing_steps", str(args.steps),
        "--checkpoints_total_limit", "1",
        "--report_to", "none",
        "--mixed_precision", "no",
        "--seed", str(seed),
        "--output_dir", str(output),
    ]  # fmt: skip
    run_tool(command, output.parent / f"{output.name}.log")
    return output


def evaluate(args, concept: Path, prompts: Path, adapters: dict[str, Path], seed: int) -> dict:
    output = Path(args.output_dir) / "eval" / f"seed-{seed}"
    command = [
        sys.executable, str(REPO_ROOT / "scripts" / "evaluate.py"),
        "--pretrained_model_name_or_path", args.base_model,
        *[item for name, path in adapters.items() for item in ("--adapter", f"{name}={path}")],
        "--adapter", f"{BASE_ROW}=none",
        "--real_images", str(concept),
        "--concept", toy_world.CONCEPT,
        "--prompts", str(prompts),
        "--images_per_prompt", str(args.images_per_prompt),
        "--base_prompt_images", str(args.base_prompt_images),
        "--num_inference_steps", str(args.num_inference_steps),
        "--resolution", str(toy_world.IMAGE_SIZE),
        "--batch_size", "8",
        "--seed", str(seed),
        "--clip_model", args.clip_model,
        "--dino_model", str(Path(args.clip_model) / "vision"),
        "--device", "cpu",
        "--output_dir", str(output),
    ]  # fmt: skip
    run_tool(command, output.parent / f"seed-{seed}.log")
    metrics = json.loads((output / "metrics.json").read_text(encoding="utf-8"))
    accuracy = context_accuracy(args, prompts, [output / name for name in metrics["adapters"]])
    for name, scores in metrics["adapters"].items():
        scores["context_per_prompt"] = accuracy[output / name]
        # every prompt has the same number of pictures, so this is also the share of all of them
        scores["context"] = statistics.fmean(accuracy[output / name].values())
    return metrics


def context_accuracy(args, prompts: Path, folders: list[Path]) -> dict[Path, dict[str, float]]:
    """For each of evaluate.py's adapter folders and each contextual prompt template, the share of its pictures
    in which the toy CLIP names the asked context: zero-shot, against "a toy on the beach", "a toy on a red
    background", ... for every context of the world (the toy CLIP's captions of a context alone), so a picture
    of the concept on its own pink background counts as a miss."""
    from scripts.eval_metrics import ClipEmbedder, cosine_matrix
    from scripts.evaluate import image_path, load_prompt_set, plan_prompts
    from training.images import open_image

    clip = ClipEmbedder.load(args.clip_model)
    captions = clip.text_embeddings([f"a toy {toy_world.context_phrase(c)}" for c in toy_world.CONTEXTS])
    asked_in = {f"a {{}} {toy_world.context_phrase(c)}": c for c in toy_world.CONTEXTS}
    plan = plan_prompts(load_prompt_set(str(prompts), None), args.images_per_prompt, args.base_prompt_images, None)
    contextual = [prompt for prompt in plan if prompt.group == "contextual"]
    accuracy = {}
    for folder in folders:
        accuracy[folder] = {}
        for prompt in contextual:
            paths = [image_path(folder, prompt, index) for index in range(prompt.num_images)]
            images = [open_image(path, str(path)) for path in paths]
            named = cosine_matrix(clip.image_embeddings(images), captions).argmax(dim=1).tolist()
            asked = asked_in[prompt.template]
            accuracy[folder][prompt.template] = sum(toy_world.CONTEXTS[i] == asked for i in named) / len(named)
    return accuracy


def summarise(per_seed: dict[int, dict]) -> dict[str, dict]:
    """{row name: {metric: (mean, standard deviation), "context_per_prompt": {template: mean share}, "seeds": n}}
    over the seeds' evaluations."""
    rows: dict[str, dict[str, list[float]]] = {}
    per_prompt: dict[str, dict[str, list[float]]] = {}
    for metrics in per_seed.values():
        for name, scores in metrics["adapters"].items():
            for metric in METRICS:
                rows.setdefault(name, {}).setdefault(metric, []).append(scores[metric])
            for template, share in scores["context_per_prompt"].items():
                per_prompt.setdefault(name, {}).setdefault(template, []).append(share)
    return {
        name: {
            **{m: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0) for m, v in values.items()},
            "context_per_prompt": {template: statistics.fmean(v) for template, v in per_prompt[name].items()},
            "seeds": len(next(iter(values.values()))),
        }
        for name, values in rows.items()
    }


def row_label(name: str) -> tuple[str, str]:
    """("LoRA", "8") for "lora-r8"; ("base model", "–") for the base model's row."""
    if name == BASE_ROW:
        return METHOD_NAMES[BASE_ROW], "–"
    method, rank = name.rsplit("-r", 1)
    return METHOD_NAMES[method], rank


def results_markdown(summary: dict, settings: dict) -> str:
    lines = [
        "| method | rank | IS (CLIP) | DINO-IS | TS | context |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in summary.items():
        method, rank = row_label(name)
        scores = [f"{row[m][0]:.3f} ± {row[m][1]:.3f}" for m in METRICS if m != "context"]
        context = f"{100 * row['context'][0]:.0f}% ± {100 * row['context'][1]:.0f}"
        lines.append(f"| {method} | {rank} | {' | '.join(scores)} | {context} |")
    lines.append(
        f"\nMean ± standard deviation over {len(settings['seeds'])} seeds "
        f"({', '.join(map(str, settings['seeds']))}); "
        f"{settings['steps']} steps at lr {settings['learning_rate']} with min-SNR gamma {settings['snr_gamma']}, "
        f"min rank = rank / 2 for the T-LoRAs, adapting {' '.join(settings['target_modules'])}; "
        f'{settings["base_prompt_images"]} images of "{toy_world.CONCEPT_PROMPT}" (IS, DINO-IS against the one '
        f"concept picture) and {settings['images_per_prompt']} per contextual prompt (TS, {len(TOY_PROMPTS['toy'])} "
        f"prompts), {settings['num_inference_steps']} steps, judged by the toy CLIP; context: the share of the "
        f"contextual pictures whose context the toy CLIP names as asked ({len(toy_world.CONTEXTS)} contexts); "
        f"{settings['minutes']:.0f} min on this machine."
    )
    templates = TOY_PROMPTS["toy"]
    lines += [
        "\nContext named as asked, per contextual prompt (mean over the seeds):\n",
        f"| method | rank | {' | '.join(t.removeprefix('a {} ') for t in templates)} |",
        "|---|---:|" + "---:|" * len(templates),
    ]
    for name, row in summary.items():
        method, rank = row_label(name)
        shares = " | ".join(f"{100 * row['context_per_prompt'][t]:.0f}%" for t in templates)
        lines.append(f"| {method} | {rank} | {shares} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, panels = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120, sharey=True)
    markers = {"LoRA": "o", "Vanilla T-LoRA": "s", "Ortho-LoRA": "^", "T-LoRA": "D", "base model": "x"}
    for axes, metric, label in (
        (panels[0], "TS", "text alignment (TS, toy CLIP)"),
        (panels[1], "context", "context named as asked (toy CLIP, share of pictures)"),
    ):
        seen = set()
        for name, row in summary.items():
            method, rank = row_label(name)
            (x, x_sd), (image, image_sd) = row[metric], row["IS"]
            axes.errorbar(
                x, image, xerr=x_sd, yerr=image_sd, fmt=markers[method], color=f"C{list(markers).index(method)}",
                capsize=3, label=None if method in seen else method,
            )  # fmt: skip
            seen.add(method)
            if rank != "–":
                axes.annotate(f"r{rank}", (x, image), textcoords="offset points", xytext=(5, 4), fontsize=8)
        axes.set_xlabel(label)
        axes.grid(alpha=0.3)
    panels[0].set_ylabel("concept fidelity (IS, toy CLIP)")
    panels[0].legend(fontsize=8)
    figure.suptitle("One-image concept on the toy base: fidelity vs alignment")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main(argv=None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    out = Path(args.output_dir)
    concept = out / "concept" / "robot.png"
    concept.parent.mkdir(parents=True, exist_ok=True)
    toy_world.concept_on_context(CONCEPT_IMAGE, args.context).save(concept)
    prompts = out / "prompts.json"
    prompts.write_text(json.dumps(TOY_PROMPTS, indent=2) + "\n", encoding="utf-8")

    runs = [(seed, method, rank) for seed in args.seeds for method in args.methods for rank in args.ranks]

    def train_one(run):
        seed, method, rank = run
        print(f"[seed {seed}] training {adapter_name(method, rank)}", flush=True)
        return train(args, concept, method, rank, seed)

    def evaluate_one(seed):
        adapters = {adapter_name(m, r): trained[(s, m, r)] for s, m, r in runs if s == seed}
        print(f"[seed {seed}] evaluating {len(adapters)} adapters and the base model", flush=True)
        return evaluate(args, concept, prompts, adapters, seed)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        trained = dict(zip(runs, pool.map(train_one, runs)))
        per_seed = dict(zip(args.seeds, pool.map(evaluate_one, args.seeds)))

    minutes = (time.perf_counter() - began) / 60
    settings = {key: getattr(args, key) for key in vars(args)} | {"minutes": minutes}
    summary = summarise(per_seed)
    (out / "results.json").write_text(json.dumps({"settings": settings, "rows": summary}, indent=2) + "\n")
    markdown = results_markdown(summary, settings)
    (out / "results.md").write_text(markdown, encoding="utf-8")
    plot(summary, out / "tradeoff.png")
    print(markdown)
    print(f"Results: {out / 'results.md'}, plot: {out / 'tradeoff.png'} ({minutes:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
