#!/usr/bin/env python
"""T-LoRA at full size on one GPU, in one prepared run: training memory and speed, inference speed, torch.compile.

    python scripts/gpu_check.py [--budget-s S] [--out DIR] [--wheels DIR] [--compile-backend NAME]
    python scripts/gpu_check.py --smoke [--out DIR]

Why one script: time on a GPU machine is short and the machine planned for is offline, so everything a user
asks first (does SD-XL training fit my card, how long is a step, is inference slower than with a LoRA, does
`torch.compile` work) is measured in one go, from random full-size weights initialised on the GPU (on a CPU
that takes minutes). Nothing is downloaded: when diffusers or bitsandbytes is missing, it is installed from the
wheels in `--wheels` (`make gpu-wheels` downloads them beforehand).

Measurements, most important first; each configuration is skipped with a note when the time left in the budget
would not hold it:
  1. SD-XL training, 1024 px, batch 1, rank 64, fp16 autocast, gradient checkpointing, 8-bit AdamW: PEFT LoRA,
     Vanilla T-LoRA and T-LoRA (ortho); median s/step of 10 steps after warm-up and the peak CUDA allocation,
     and the time to create the T-LoRA (ortho) adapters (one SVD per adapted projection, 560 of them).
  2. SD-XL inference, 1024 px, fp16, classifier-free guidance: ms per denoising step with no adapter, Vanilla
     T-LoRA and T-LoRA (each with rank masks and with inactive components skipped, see `set_rank_routing`),
     PEFT LoRA r64 and r128.
  3. Training as in 1, without gradient checkpointing and with fp32 AdamW.
  4. FLUX.1 (FLUX.1-dev's architecture), bf16: ms per denoising step with no adapter, Vanilla T-LoRA and PEFT
     LoRA of rank 32; a training step's time and peak memory with an NF4 and a bf16 base (rank 32, 1024 px,
     gradient checkpointing, 8-bit AdamW).
  5. Inference as in 2 with `pipe.unet = torch.compile(pipe.unet)`: compile time, ms/step, compiled graphs
     after warm-up and after timing (equal: nothing recompiled as the rank changed), graph breaks;
     T-LoRA first, then no adapter, Vanilla T-LoRA and the LoRAs while the budget lasts.

The JSON (`<out>/gpu-<device>-<date>.json`) is rewritten after every measurement and the Markdown table beside it
when the run ends, also when it is cut short (SIGTERM, Ctrl-C or the budget's hard stop): what was measured is
kept. `--smoke` runs the same code on the tiny random fixture on the CPU, so the tests keep these paths working.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

REQUIRED = {"diffusers": "diffusers", "bitsandbytes": "bitsandbytes"}  # import name: wheel name
GIGABYTE = 2**30
HARD_STOP_GRACE_S = 50  # after the budget: default 400 + 50 s, so that a run ends within 8 minutes
INSTALL_FOLDER = "installed"  # under --wheels: packages installed from the wheels, on sys.path for this run


@dataclass(frozen=True)
class Setup:
    """Sizes and repeats of one run."""

    size: str  # scripts/benchmark.py size: "full" or a fixture size
    device: str
    dtype: str
    resolution: int
    rank: int
    min_rank: int
    train_steps: int  # timed optimizer steps per configuration, after warm-up
    infer_steps: int  # denoising steps per timed pipeline call
    infer_repeats: int
    compile_backend: str
    compiled: tuple[str, ...]  # inference configurations also timed compiled
    budget_s: float
    flux_dtype: str
    flux_rank: int
    threads: int | None = None  # torch's CPU threads; None: torch's default


FULL = Setup(
    size="full",
    device="cuda",
    dtype="fp16",
    resolution=1024,
    rank=64,
    min_rank=32,
    train_steps=10,
    infer_steps=10,
    infer_repeats=5,
    compile_backend="inductor",
    compiled=("ortho", "none", "vanilla", "lora64", "lora128"),  # in this order while the budget lasts
    budget_s=400,
    flux_dtype="bf16",
    flux_rank=32,
)
SMOKE = replace(
    FULL,
    size="tiny",
    device="cpu",
    dtype="fp32",
    resolution=64,
    rank=8,
    min_rank=4,
    train_steps=2,
    infer_steps=2,
    infer_repeats=1,
    compile_backend="eager",  # dynamo's tracing and guards without a code generator: the paths, not the speed
    compiled=("ortho",),
    budget_s=600,
    flux_dtype="fp32",
    flux_rank=8,
    # the tiny models gain nothing from a second thread, and on a busy machine OpenMP's waiting threads slow their
    # small matmuls down many times over
    threads=1,
)


class TimeUp(BaseException):
    """Raised by SIGTERM or the budget's hard stop so that the results gathered so far are written; a
    BaseException, like KeyboardInterrupt, so that the handler of a failed section does not swallow it."""


def _stop(signum, frame):
    raise TimeUp(signal.Signals(signum).name)


# --------------------------------------------------------------------------- packages


def ensure_packages(wheels: Path) -> list[str]:
    """Install the missing ones of diffusers and bitsandbytes from the wheels in `wheels`, offline, into
    `wheels/installed` (added to sys.path): nothing of the machine's own Python is changed. Returns notes."""
    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    target = wheels / INSTALL_FOLDER
    if missing and target.is_dir():
        sys.path.insert(0, str(target))
        missing = [name for name in missing if importlib.util.find_spec(name) is None]
    if not missing:
        return []
    if not any(wheels.glob("*.whl")):
        raise SystemExit(
            f"error: {', '.join(missing)} not installed and no wheels in {wheels}; run `make gpu-wheels` on a "
            "machine with network access and bring the folder along"
        )
    print(f"installing {', '.join(missing)} from {wheels}", flush=True)
    # --no-deps: the dependencies (torch, huggingface_hub, safetensors, numpy, ...) come with transformers and
    # cannot be fetched offline anyway; an import below names any that does not fit
    command = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--find-links", str(wheels)]
    command += ["--target", str(target), *(REQUIRED[name] for name in missing)]
    child = subprocess.run(command, capture_output=True, text=True)
    if child.returncode != 0:
        raise SystemExit(f"error: pip could not install {', '.join(missing)} from {wheels}:\n{child.stderr[-3000:]}")
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    for name in missing:
        __import__(name)
    return [f"installed {', '.join(missing)} from {wheels}"]


# --------------------------------------------------------------------------- results


class Results:
    """Everything measured so far; the JSON is rewritten after each measurement."""

    def __init__(self, path: Path, header: dict):
        self.path = path
        self.data = {**header, "complete": False, "rows": [], "notes": [], "targets": []}

    def add(self, row: dict) -> None:
        self.data["rows"].append(row)
        self.save()
        print(f"  {row['section']}: {row['label']}: {describe(row)}", flush=True)

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        self.save()
        print(f"  note: {text}", flush=True)

    def rows(self, section: str) -> dict[str, dict]:
        return {row["name"]: row for row in self.data["rows"] if row["section"] == section}

    def save(self) -> None:
        benchmark.write_json(self.path, self.data)


def describe(row: dict) -> str:
    parts = []
    if "median_s" in row:
        unit = row.get("unit", "s/step")
        parts.append(f"{row['median_s'] * 1000:.1f} ms/step" if unit == "ms/step" else f"{row['median_s']:.3f} s/step")
    if "peak_gb" in row:
        parts.append(f"peak {row['peak_gb']:.2f} GB")
    if "seconds" in row:
        parts.append(f"{row['seconds']:.1f} s")
    if "compile_s" in row:
        parts.append(
            f"compile {row['compile_s']:.1f} s, graphs {row['graphs_after_warmup']} -> "
            f"{row['graphs_after_timing']}, graph breaks {row['graph_breaks']}"
        )
    return ", ".join(parts)


class Budget:
    """Wall-clock budget: a configuration starts only if the last one of its kind would still fit."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds
        self.last: dict[str, float] = {}

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def allows(self, kind: str, first_guess: float) -> bool:
        return self.remaining() > self.last.get(kind, first_guess)

    def took(self, kind: str, seconds: float) -> None:
        self.last[kind] = seconds


def free_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def run_args(setup: Setup, family: str, checkpointing: bool, use_8bit_adam: bool) -> argparse.Namespace:
    """The settings scripts/benchmark.py's TrainStep reads, for `family` in this run."""
    from scripts.make_tiny_pipeline import default_resolution

    dtype, rank, min_rank = family_settings(setup, family)
    return argparse.Namespace(
        family=family,
        size=setup.size,
        device=setup.device,
        dtype=dtype,
        resolution=setup.resolution if family == "sdxl" else default_resolution(family, setup.size),
        rank=rank,
        min_rank=min_rank,
        gradient_checkpointing=checkpointing,
        use_8bit_adam=use_8bit_adam,
    )


def median_step(run, steps: int, device: str) -> tuple[float, list[float]]:
    """Seconds per call of `run`: a warm-up call, then the median of `steps` timed calls."""
    samples = benchmark.interleaved_times({"run": run}, steps, device)["run"]
    return statistics.median(samples), samples


def time_training(step, setup: Setup) -> dict:
    """Median s/step of a training step after warm-up, and the peak memory since `restart_peak_memory`."""
    step()  # optimizer state and kernel selection; the timing adds a second warm-up call
    median, samples = median_step(step, setup.train_steps, setup.device)
    return {"median_s": median, "samples_s": samples, "peak_gb": benchmark.peak_memory(setup.device) / GIGABYTE}


# --------------------------------------------------------------------------- SD-XL training


def train_section(results: Results, budget: Budget, setup: Setup, checkpointing: bool) -> None:
    section = "train" if checkpointing else "train-plain"
    args = run_args(setup, "sdxl", checkpointing=checkpointing, use_8bit_adam=checkpointing)
    options = "gradient checkpointing, 8-bit AdamW" if checkpointing else "no checkpointing, AdamW"
    print(f"SD-XL training, {setup.resolution} px, batch 1, rank {setup.rank}, {setup.dtype}, {options}", flush=True)
    for adapter in benchmark.train_adapters(setup.rank):
        if not budget.allows(section, first_guess=30):
            results.note(f"{section}: {adapter.label} skipped: not enough time left in the budget")
            continue
        start = time.monotonic()
        unet, scheduler = benchmark.build_base_unet(setup.size, setup.device, benchmark.DTYPES[setup.dtype])
        projections = len(benchmark.tl.injection.find_target_projections(unet, benchmark.TARGET_MODULES))
        # counted from the frozen model on: the fp32 copy it was initialised in is gone by now
        benchmark.restart_peak_memory(setup.device)
        step = benchmark.TrainStep(unet, scheduler, adapter, args)
        row = {"section": section, "name": adapter.name, "label": adapter.label, "options": options}
        results.add(row | time_training(step, setup))
        if adapter.variant == "ortho" and checkpointing:
            label = f"T-LoRA (ortho) R={setup.rank}: create the adapters ({projections} SVDs)"
            results.add({"section": "ortho-init", "name": "ortho-init", "label": label, "seconds": step.attach_s})
        del step, unet
        free_memory(setup.device)
        budget.took(section, time.monotonic() - start)


# --------------------------------------------------------------------------- SD-XL inference


def inference_runners(pipe, adapter, call: dict, device: str) -> dict:
    """Timed callables of one loaded pipeline by row name; T-LoRA rows once with masks and once skipping the
    inactive components."""

    def runner(routing: str | None):
        def run():
            if routing is not None:
                benchmark.tl.set_rank_routing(benchmark.tl.denoiser_of(pipe)[0], routing)
            pipe(**call, generator=torch.Generator(device).manual_seed(benchmark.SEED))

        return run

    if adapter.kind != "tlora":
        return {adapter.name: (adapter.label, runner(None))}
    return {
        f"{adapter.name}:{routing}": (f"{adapter.label}, rank {routing}", runner(routing))
        for routing in ("mask", "skip")
    }


def family_settings(setup: Setup, family: str) -> tuple[str, int, int]:
    """(dtype, rank, min rank) of `family` in this run: SD-XL in fp16 at rank 64, FLUX.1 in bf16 at rank 32."""
    if family == "flux":
        return setup.flux_dtype, setup.flux_rank, max(1, setup.flux_rank // 2)
    return setup.dtype, setup.rank, setup.min_rank


def pipeline_setup(setup: Setup, family: str):
    """scripts/benchmark.py's (base denoiser, stock-pipeline factory, timed call's arguments) for `family`."""
    from scripts.make_tiny_pipeline import default_resolution

    dtype, _, _ = family_settings(setup, family)
    args = argparse.Namespace(
        family=family,
        size=setup.size,
        device=setup.device,
        steps=setup.infer_steps,
        resolution=default_resolution(family, setup.size),
    )
    return benchmark.inference_setup(args, benchmark.DTYPES[dtype])


def infer_section(results: Results, budget: Budget, setup: Setup, workdir: Path, family: str = "sdxl") -> None:
    section = "infer" if family == "sdxl" else f"{family}-infer"
    dtype, rank, min_rank = family_settings(setup, family)
    print(f"{family} inference, {dtype}, rank {rank}, eager", flush=True)
    base, make_pipeline, call = pipeline_setup(setup, family)
    runners, labels = {}, {}
    for adapter in benchmark.infer_adapters(rank, family):
        if not budget.allows(section, first_guess=20):
            results.note(f"{section}: {adapter.label} skipped: not enough time left in the budget")
            continue
        start = time.monotonic()
        pipe = make_pipeline()
        benchmark.attach_for_inference(pipe, adapter, min_rank, workdir / f"{section}-{adapter.name}")
        for name, (label, run) in inference_runners(pipe, adapter, call, setup.device).items():
            runners[name], labels[name] = run, label
        budget.took(section, time.monotonic() - start)
    del base, make_pipeline
    # all rounds together; the time of one round is known only after the first
    times = benchmark.interleaved_times(runners, setup.infer_repeats, setup.device) if runners else {}
    for name, samples in times.items():
        row = {"section": section, "name": name, "label": labels[name], "unit": "ms/step"}
        row |= {"median_s": statistics.median(samples) / setup.infer_steps}
        row |= {"samples_s": [sample / setup.infer_steps for sample in samples]}
        results.add(row)
    del runners
    free_memory(setup.device)


class CountingBackend:
    """A torch.compile backend that counts the graphs it is given and hands them to a named backend."""

    def __init__(self, name: str):
        self.backend = torch._dynamo.lookup_backend(name)
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return self.backend(graph_module, example_inputs)


def graph_breaks() -> int:
    return sum(torch._dynamo.utils.counters["graph_break"].values())


def compiled_section(results: Results, budget: Budget, setup: Setup, workdir: Path) -> None:
    print(f"SD-XL inference, torch.compile (backend {setup.compile_backend})", flush=True)
    base, make_pipeline, call = pipeline_setup(setup, "sdxl")
    for adapter in benchmark.infer_adapters(setup.rank):
        if adapter.name not in setup.compiled:
            continue
        if not budget.allows("compiled", first_guess=90):
            results.note(f"compiled: {adapter.label} skipped: not enough time left in the budget")
            continue
        start = time.monotonic()
        torch._dynamo.reset()
        breaks_before = graph_breaks()
        pipe = make_pipeline()
        benchmark.attach_for_inference(pipe, adapter, setup.min_rank, workdir / f"compiled-{adapter.name}")
        backend = CountingBackend(setup.compile_backend)
        pipe.unet = torch.compile(pipe.unet, backend=backend)

        def run(pipe=pipe):
            pipe(**call, generator=torch.Generator(setup.device).manual_seed(benchmark.SEED))

        compile_start = time.perf_counter()
        run()
        benchmark.synchronize(setup.device)
        compile_s = time.perf_counter() - compile_start
        graphs_after_warmup = backend.graphs
        median, samples = median_step(run, setup.infer_repeats, setup.device)
        row = {"section": "compiled", "name": adapter.name, "label": f"{adapter.label}, compiled", "unit": "ms/step"}
        row |= {"median_s": median / setup.infer_steps, "samples_s": [s / setup.infer_steps for s in samples]}
        row |= {"compile_s": compile_s, "graphs_after_warmup": graphs_after_warmup}
        row |= {"graphs_after_timing": backend.graphs, "graph_breaks": graph_breaks() - breaks_before}
        results.add(row)
        del pipe, run
        free_memory(setup.device)
        budget.took("compiled", time.monotonic() - start)
    del base
    free_memory(setup.device)


# --------------------------------------------------------------------------- other families and notes


def flux_train_section(results: Results, budget: Budget, setup: Setup) -> None:
    """The training step of train_tlora_flux.py's default variant, Vanilla T-LoRA, on an NF4 and a full base."""
    from training.quantization import quantize_linear_layers

    args = run_args(setup, "flux", checkpointing=True, use_8bit_adam=True)
    dtype = benchmark.DTYPES[args.dtype]
    (adapter,) = [adapter for adapter in benchmark.infer_adapters(args.rank, "flux") if adapter.name == "vanilla"]
    print(f"FLUX.1 training, rank {args.rank}, gradient checkpointing, 8-bit AdamW", flush=True)
    for base in ("nf4", args.dtype):
        label = f"{adapter.label}, {base} base"
        if not budget.allows("flux-train", first_guess=90):
            results.note(f"flux-train: {label} skipped: not enough time left in the budget")
            continue
        start = time.monotonic()
        transformer, scheduler = benchmark.build_base_flux(setup.size, setup.device, dtype)
        if base == "nf4":
            quantize_linear_layers(transformer, "nf4", setup.device, compute_dtype=dtype)
        free_memory(setup.device)
        benchmark.restart_peak_memory(setup.device)
        step = benchmark.TrainStep(transformer, scheduler, adapter, args)
        row = {"section": "flux-train", "name": base, "label": label, "options": "gradient checkpointing, 8-bit AdamW"}
        results.add(row | time_training(step, setup))
        del step, transformer
        free_memory(setup.device)
        budget.took("flux-train", time.monotonic() - start)


def xformers_note(results: Results) -> None:
    if importlib.util.find_spec("xformers") is None:
        results.note(
            "xformers: not measured: not installed, and no wheel is brought along (xformers wheels are built for "
            "one torch version each; tests/test_injection.py covers the processor swap on the CPU)"
        )
    else:
        results.note("xformers: installed but not part of this check")


# --------------------------------------------------------------------------- targets and table


def targets(results: Results, setup: Setup) -> list[dict]:
    """The figures to reach, each with its value, or "not measured" when a row is missing."""
    train, infer = results.rows("train"), results.rows("infer")
    lora = f"lora{setup.rank}"

    def target(text, measure, value, limit):
        # the limits are for the full-size models; a smoke run's ratios judge nothing
        passed = None if value is None or setup.size != "full" else value <= limit
        return {"target": text, "measure": measure, "value": value, "limit": limit, "passed": passed}

    def ratio(rows, top, bottom):
        return rows[top]["median_s"] / rows[bottom]["median_s"] if top in rows and bottom in rows else None

    ortho_peak = train["ortho"]["peak_gb"] if "ortho" in train else None
    flux_train = results.rows("flux-train")
    flux_nf4_peak = flux_train["nf4"]["peak_gb"] if "nf4" in flux_train else None
    return [
        target("T-LoRA training peak memory (fp16, checkpointing, 8-bit Adam)", "GB", ortho_peak, 16.0),
        target("T-LoRA training step vs PEFT LoRA of the same rank", "ratio", ratio(train, "ortho", lora), 1.10),
        target(
            "Vanilla T-LoRA inference vs PEFT LoRA of the same rank (masks)",
            "ratio",
            ratio(infer, "vanilla:mask", lora),
            1.0,
        ),
        target("T-LoRA inference vs no adapter (masks)", "ratio", ratio(infer, "ortho:mask", "none"), 1.10),
        target("T-LoRA inference vs no adapter (skipping)", "ratio", ratio(infer, "ortho:skip", "none"), 1.10),
        target("FLUX.1 NF4 training step peak memory, rank 32, 1024 px", "GB", flux_nf4_peak, 20.0),
    ]


def markdown(data: dict) -> str:
    environment = data["environment"]
    lines = [
        f"# T-LoRA GPU check: {environment.get('gpu', environment['device'])}, {data['date']}",
        "",
        f"Commit {data['commit']}, torch {environment['torch']}, diffusers {environment['diffusers']}, "
        f"{'complete' if data['complete'] else 'cut short: ' + str(data.get('stopped', 'unknown'))}.",
        "",
        "| section | configuration | time | peak memory | notes |",
        "|---|---|---|---|---|",
    ]
    for row in data["rows"]:
        time_cell = ""
        if "median_s" in row:
            time_cell = describe({"median_s": row["median_s"], "unit": row.get("unit", "s/step")})
        elif "seconds" in row:
            time_cell = f"{row['seconds']:.1f} s"
        peak = f"{row['peak_gb']:.2f} GB" if "peak_gb" in row else ""
        notes = row.get("options", "")
        if "compile_s" in row:
            notes = (
                f"compile {row['compile_s']:.0f} s, graphs {row['graphs_after_warmup']} -> "
                f"{row['graphs_after_timing']}, graph breaks {row['graph_breaks']}"
            )
        lines.append(f"| {row['section']} | {row['label']} | {time_cell} | {peak} | {notes} |")
    lines += ["", "| target | value | limit | met |", "|---|---|---|---|"]
    for target in data["targets"]:
        value = "not measured" if target["value"] is None else f"{target['value']:.3f} {target['measure']}"
        met = {True: "yes", False: "no", None: "not measured" if target["value"] is None else "not judged"}[
            target["passed"]
        ]
        lines.append(f"| {target['target']} | {value} | {target['limit']} | {met} |")
    if data["notes"]:
        lines += ["", *[f"- {note}" for note in data["notes"]]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- run


def import_project() -> None:
    """Import the plugin and scripts/benchmark.py, which need diffusers: only after `ensure_packages`."""
    global benchmark
    import diffusers
    import transformers

    from scripts import benchmark

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def current_commit() -> str:
    try:
        child = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return child.stdout.strip() if child.returncode == 0 else "unknown"


def device_slug(setup: Setup) -> str:
    name = torch.cuda.get_device_name() if setup.device.startswith("cuda") else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def run(setup: Setup, out: Path, wheels: Path) -> dict:
    budget = Budget(setup.budget_s)  # counted from here: installing and importing packages take part of it
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGALRM, _stop)
    # the hard stop: a measurement that overruns its estimate is cut short, and what came before kept
    signal.alarm(int(setup.budget_s + HARD_STOP_GRACE_S))
    if setup.threads is not None:
        torch.set_num_threads(setup.threads)
    notes = ensure_packages(wheels)
    import_project()
    # torch, diffusers and transformers leave half a million objects that live as long as the process; frozen, they
    # are no longer walked by each of the collections between configurations (about 0.3 s apiece on a CPU)
    gc.collect()
    gc.freeze()
    import diffusers

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    path = out / f"gpu-{device_slug(setup)}-{date}.json"
    environment = benchmark.environment(setup.device) | {"diffusers": diffusers.__version__}
    header = {"check": "gpu", "date": date, "commit": current_commit(), "setup": asdict(setup)}
    results = Results(path, header | {"environment": environment})
    for text in notes:
        results.note(text)
    print(f"writing {path}", flush=True)

    try:
        with tempfile.TemporaryDirectory() as tmp:
            sections = (
                ("train", lambda: train_section(results, budget, setup, checkpointing=True)),
                ("infer", lambda: infer_section(results, budget, setup, Path(tmp))),
                ("train-plain", lambda: train_section(results, budget, setup, checkpointing=False)),
                ("flux-infer", lambda: infer_section(results, budget, setup, Path(tmp), family="flux")),
                ("flux-train", lambda: flux_train_section(results, budget, setup)),
                ("compiled", lambda: compiled_section(results, budget, setup, Path(tmp))),
            )
            for name, measure in sections:
                try:
                    measure()
                except Exception as error:  # noqa: BLE001 - one failed section (out of memory, say) spares the rest
                    traceback.print_exc()
                    first_line = (str(error).splitlines() or [""])[0][:300]
                    results.note(f"{name}: failed: {type(error).__name__}: {first_line}")
                    free_memory(setup.device)
        xformers_note(results)
        results.data["complete"] = True
    except (TimeUp, KeyboardInterrupt) as stop:
        results.data["stopped"] = str(stop) or type(stop).__name__
        print(f"stopped ({results.data['stopped']}); keeping what was measured", flush=True)
    finally:
        gc.unfreeze()  # a caller's later collections see them again
        signal.alarm(0)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        results.data["targets"] = targets(results, setup)
        results.save()
        table = markdown(results.data)
        benchmark.write_atomically(path.with_suffix(".md"), lambda temporary: temporary.write_text(table))
    print(table, flush=True)
    print(f"wrote {path} and {path.with_suffix('.md')}", flush=True)
    return results.data


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="the tiny fixture on the CPU: the code paths only")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench", help="results folder (default bench/)")
    parser.add_argument("--wheels", type=Path, default=REPO_ROOT / ".whl", help="wheels folder (default .whl/)")
    parser.add_argument("--budget-s", type=float, help=f"seconds for all measurements (default {FULL.budget_s:.0f})")
    parser.add_argument("--compile-backend", help=f"torch.compile backend (default {FULL.compile_backend})")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup = SMOKE if args.smoke else FULL
    if args.budget_s is not None:
        if args.budget_s <= 0:
            parser.error(f"--budget-s must be positive, got {args.budget_s}")
        setup = replace(setup, budget_s=args.budget_s)
    if args.compile_backend is not None:
        setup = replace(setup, compile_backend=args.compile_backend)
    if setup.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device is visible to this torch build; on a CPU, --smoke runs the code paths")
    run(setup, args.out, args.wheels)
    return 0


if __name__ == "__main__":
    sys.exit(main())
