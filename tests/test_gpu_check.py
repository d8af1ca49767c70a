"""scripts/gpu_check.py on the CPU: `--smoke` runs every measurement on the tiny fixture, and a run cut short keeps
what it measured. The timings themselves are not judged here."""

from __future__ import annotations

import json

import pytest

from pipelines.tlora.injection import find_target_projections
from scripts import gpu_check
from scripts.make_tiny_pipeline import build_denoiser


def read_results(out) -> tuple[dict, str]:
    (path,) = out.glob("gpu-cpu-*.json")
    return json.loads(path.read_text()), path.with_suffix(".md").read_text()


def test_smoke_run_measures_every_section(tmp_path):
    assert gpu_check.main(["--smoke", "--out", str(tmp_path), "--wheels", str(tmp_path / "no-wheels")]) == 0
    data, table = read_results(tmp_path)

    assert data["complete"] and data["setup"]["size"] == "tiny"
    assert not [note for note in data["notes"] if ": failed:" in note]
    sections = {}
    for row in data["rows"]:
        sections.setdefault(row["section"], []).append(row["name"])
    assert sections == {
        "train": ["lora8", "vanilla", "ortho"],
        "ortho-init": ["ortho-init"],
        "infer": ["none", "vanilla:mask", "vanilla:skip", "ortho:mask", "ortho:skip", "lora8", "lora16"],
        "train-plain": ["lora8", "vanilla", "ortho"],
        "compiled": ["ortho"],
        "flux-infer": ["none", "vanilla:mask", "vanilla:skip", "lora8"],
        "flux-train": ["nf4", "fp32"],
    }
    for row in data["rows"]:
        assert row.get("median_s", 1) > 0 and row.get("peak_gb", 1) > 0
    (compiled,) = [row for row in data["rows"] if row["section"] == "compiled"]
    assert compiled["graphs_after_warmup"] == compiled["graphs_after_timing"] > 0
    assert compiled["graph_breaks"] == 0
    projections = find_target_projections(build_denoiser("sdxl", "tiny"), ["to_q", "to_k", "to_v", "to_out.0"])
    assert f"({len(projections)} SVDs)" in table
    # a smoke run's ratios are not held against the full-size limits
    assert {target["passed"] for target in data["targets"]} == {None}
    assert "| T-LoRA inference vs no adapter (masks) |" in table and "not judged" in table
    (flux_nf4,) = [t for t in data["targets"] if t["target"].startswith("FLUX.1 NF4")]
    assert flux_nf4["value"] == pytest.approx(next(r["peak_gb"] for r in data["rows"] if r["name"] == "nf4"))


def test_a_run_cut_short_keeps_what_it_measured(tmp_path, monkeypatch):
    def stopped(*args):
        raise gpu_check.TimeUp("SIGTERM")

    monkeypatch.setattr(gpu_check, "infer_section", stopped)
    assert gpu_check.main(["--smoke", "--out", str(tmp_path), "--wheels", str(tmp_path)]) == 0
    data, table = read_results(tmp_path)

    assert not data["complete"] and data["stopped"] == "SIGTERM"
    assert [row["section"] for row in data["rows"]] == ["train", "train", "train", "ortho-init"]
    assert "cut short: SIGTERM" in table
    assert "| Vanilla T-LoRA inference vs PEFT LoRA of the same rank (masks) | not measured |" in table


def test_a_short_budget_skips_configurations_with_a_note(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "infer_section", lambda *args, **kwargs: None)  # SD-XL and FLUX.1
    monkeypatch.setattr(gpu_check, "compiled_section", lambda *args: None)
    assert gpu_check.main(["--smoke", "--budget-s", "1", "--out", str(tmp_path), "--wheels", str(tmp_path)]) == 0
    data, _ = read_results(tmp_path)

    assert data["complete"] and data["rows"] == []
    skipped = [note for note in data["notes"] if "skipped: not enough time left" in note]
    # three configurations in each SD-XL training section, two FLUX.1 bases
    assert len(skipped) == 3 + 3 + 2 and skipped[0] == "train: LoRA r=8 skipped: not enough time left in the budget"


def test_missing_packages_without_wheels_are_named(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "REQUIRED", {"surely_not_installed_package": "surely-not-installed-package"})
    expected = "surely_not_installed_package not installed and no wheels in .*make gpu-wheels"
    with pytest.raises(SystemExit, match=expected):
        gpu_check.ensure_packages(tmp_path)
