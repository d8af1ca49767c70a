"""Every reader of user files fed malformed and adversarial inputs: a clear error, in bounded memory.

Readers: the adapter file (read and loaded into the tiny UNet), the authors' checkpoint folder, its hparams.yml,
the authors' FLUX `lora.pt` (a torch pickle), the training run's loss history, the loader files of an adapter folder
and the evaluator's prompt file. Each case is a file as a hostile or damaged source could make it (truncated,
deeply nested, claiming huge sizes, wrong dtypes, wrong JSON or YAML types). A case passes when the reader
raises the package's own error type (the command-line tools print it as one `error:` line and exit with 2)
whose message matches, without a `RecursionError`, and while Python allocates less than `PYTHON_BYTES` and the
process grows less than `PROCESS_BYTES` (generous bounds: the failures they catch are gigabytes).
"""

from __future__ import annotations

import io
import json
import pickle
import resource
import struct
import tracemalloc
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import pipelines.tlora as tl
from pipelines.tlora import convert
from pipelines.tlora.remote_code import describe_loader_files, write_loader_files
from scripts import convert_tlora, evaluate
from training.card_assets import read_loss_history

PYTHON_BYTES = 64 << 20
PROCESS_BYTES = 512 << 20
PACKAGE_ERRORS = (tl.TLoraFileError, tl.TLoraConfigError, tl.TLoraInjectionError)

# one attention module of the tiny SD-XL UNet (64 wide), as the authors' keys and ours name it
MODULE = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
PROJECTIONS = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
RANK, WIDTH = 4, 64


def raw_safetensors(header, data: bytes = b"") -> bytes:
    """A safetensors file byte by byte: 8-byte little-endian header length, JSON header, data."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def within_bounds(read, error_types, message: str) -> None:
    """`read()` must raise one of `error_types` matching `message`, within the memory bounds."""
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tracemalloc.start()
    try:
        with pytest.raises(error_types, match=message):
            read()
        _, python_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start
    assert python_peak < PYTHON_BYTES, f"Python allocated {python_peak:,} bytes"
    assert grown < PROCESS_BYTES, f"the process grew by {grown:,} bytes"


# --------------------------------------------------------------------------- the adapter file


def adapter_tensors(dtype=torch.float32) -> dict[str, torch.Tensor]:
    tensors = {}
    for projection in PROJECTIONS.values():
        key = f"unet.{MODULE}.{projection}.tlora"
        tensors[f"{key}.down"] = torch.randn(RANK, WIDTH).to(dtype)
        tensors[f"{key}.up"] = torch.randn(WIDTH, RANK).to(dtype)
    return tensors


def adapter_config(**changes) -> str:
    config = tl.TLoraConfig(rank=RANK, min_rank=2, variant="vanilla", init="normal").to_dict()
    return json.dumps({**config, **changes})


def valid_adapter_bytes(tmp_path: Path) -> bytes:
    path = tmp_path / "valid.safetensors"
    save_file(adapter_tensors(), str(path), metadata={"tlora_config": adapter_config()})
    return path.read_bytes()


def _with_config(text):
    def make(tmp_path):
        path = tmp_path / "adapter.safetensors"
        save_file(adapter_tensors(), str(path), metadata={"tlora_config": text})
        return path.read_bytes()

    return make


def _with_tensors(dtype):
    def make(tmp_path):
        path = tmp_path / "adapter.safetensors"
        save_file(adapter_tensors(dtype), str(path), metadata={"tlora_config": adapter_config()})
        return path.read_bytes()

    return make


ADAPTER_FILES = {
    "empty file": (lambda tmp_path: b"", "not a readable safetensors file"),
    "truncated in the data": (lambda tmp_path: valid_adapter_bytes(tmp_path)[:-100], "not a readable safetensors"),
    "truncated in the header": (lambda tmp_path: valid_adapter_bytes(tmp_path)[:50], "not a readable safetensors"),
    "header length of 2**60 bytes": (lambda tmp_path: struct.pack("<Q", 2**60) + b"{}", "header too large"),
    "header nested 10000 deep": (
        lambda tmp_path: raw_safetensors(b'{"__metadata__":' + b"[" * 10_000 + b"]" * 10_000 + b"}"),
        "not a readable safetensors file",
    ),
    "header a JSON list": (lambda tmp_path: raw_safetensors([1, 2]), "not a readable safetensors file"),
    "tensor claiming 2**80 elements": (
        lambda tmp_path: raw_safetensors(
            {"unet.x.tlora.down": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}}, bytes(16)
        ),
        "not a readable safetensors file",
    ),
    "data offsets past the end": (
        lambda tmp_path: raw_safetensors(
            {"unet.x.tlora.down": {"dtype": "F32", "shape": [4], "data_offsets": [0, 2**62]}}, bytes(16)
        ),
        "not a readable safetensors file",
    ),
    "metadata value not a string": (
        lambda tmp_path: raw_safetensors({"__metadata__": {"tlora_config": {"rank": 4}}}),
        "not a readable safetensors file",
    ),
    "tlora_config nested 10000 deep": (_with_config("[" * 10_000 + "]" * 10_000), "nests deeper than 32"),
    "tlora_config of 5 million characters": (_with_config(" " * 5_000_000 + "{}"), "at most 4,194,304 are read"),
    "tlora_config truncated": (_with_config(adapter_config()[:40]), "not valid JSON"),
    "tlora_config a string": (_with_config('"ortho"'), "must be a JSON object, got str"),
    "tlora_config with NaN": (
        _with_config(adapter_config().replace('"schedule_exponent": 1.0', '"schedule_exponent": NaN')),
        "holds NaN",
    ),
    "rank of 10**12": (_with_config(adapter_config(rank=10**12)), "`rank` must be an integer from 1 to 65536"),
    "rank as a string": (_with_config(adapter_config(rank="4")), "`rank` must be an integer"),
    "rank as a list of 100000": (_with_config(adapter_config(rank=[0] * 10**5)), r"got \[0, 0, 0, 0, 0, 0, \.\.\.\]"),
    "target_modules an object": (_with_config(adapter_config(target_modules={"to_q": 1})), "`target_modules` must be"),
    "model_family a list": (_with_config(adapter_config(model_family=["sdxl"])), "`model_family` must be one of"),
    "format_version a string": (_with_config(adapter_config(format_version="1")), "Unsupported T-LoRA format_version"),
    "integer tensors": (_with_tensors(torch.int32), "has dtype torch.int32; expected one of torch.float32"),
    "boolean tensors": (_with_tensors(torch.bool), "has dtype torch.bool"),
    "float8 tensors": (_with_tensors(torch.float8_e4m3fn), "has dtype torch.float8_e4m3fn"),
}


@pytest.fixture(scope="module")
def tiny_unet(tiny_sdxl_dir):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")


@pytest.mark.parametrize("case", list(ADAPTER_FILES))
def test_adapter_file(case, tmp_path, tiny_unet):
    make, message = ADAPTER_FILES[case]
    path = tmp_path / "adapter.safetensors"
    path.write_bytes(make(tmp_path))

    def read_and_load():
        tl.load_tlora_into_unet(tiny_unet, *tl.tlora_state_dict(path))

    within_bounds(read_and_load, PACKAGE_ERRORS, message)
    assert tl.injection.get_router(tiny_unet) is None


def test_a_valid_adapter_file_loads(tmp_path, tiny_unet):
    """The cases above differ from a file that loads: the errors come from the damage, not the set-up."""
    path = tmp_path / "adapter.safetensors"
    path.write_bytes(valid_adapter_bytes(tmp_path))
    tl.load_tlora_into_unet(tiny_unet, *tl.tlora_state_dict(path))
    assert len(tl.get_tlora_adapters(tiny_unet)) == len(PROJECTIONS)
    tl.remove_tlora(tiny_unet)


# --------------------------------------------------------------------------- the authors' checkpoint and hparams.yml


def authors_tensors(dtype=torch.float32, rank=RANK) -> dict[str, torch.Tensor]:
    tensors = {}
    for theirs in PROJECTIONS:
        prefix = f"{MODULE}.processor.{theirs}_lora"
        tensors[f"{prefix}.down.weight"] = torch.randn(rank, WIDTH).to(dtype)
        tensors[f"{prefix}.up.weight"] = torch.randn(WIDTH, rank).to(dtype)
    return tensors


HPARAMS = {"lora_rank": RANK, "min_rank": 2, "alpha_rank_scale": 1.0, "trainer_type": "lora"}


def write_run(run: Path, weights: bytes | None = None, hparams: str | bytes | None = None) -> Path:
    checkpoint = run / "checkpoint-10"
    checkpoint.mkdir(parents=True)
    if weights is None:
        save_file(authors_tensors(), str(checkpoint / "pytorch_lora_weights.safetensors"))
    else:
        (checkpoint / "pytorch_lora_weights.safetensors").write_bytes(weights)
    (run / "logs").mkdir()
    text = yaml.safe_dump(HPARAMS) if hparams is None else hparams
    (run / "logs" / "hparams.yml").write_bytes(text if isinstance(text, bytes) else text.encode())
    return checkpoint


def _authors_weights(dtype=torch.float32, **changes):
    def make(tmp_path):
        path = tmp_path / "weights.safetensors"
        save_file({**authors_tensors(dtype), **changes}, str(path))
        return path.read_bytes()

    return make


def _truncated_weights(tmp_path):
    return _authors_weights()(tmp_path)[:-64]


def _hparams(**changes):
    return yaml.safe_dump({**HPARAMS, **changes})


BILLION_LAUGHS = "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(8)
)

AUTHORS_CHECKPOINTS = {
    "weights truncated": ({"weights": _truncated_weights}, "not a readable safetensors file"),
    "weights with integer tensors": ({"weights": _authors_weights(torch.int64)}, "dtype torch.int64"),
    "weights with float8 tensors": ({"weights": _authors_weights(torch.float8_e4m3fn)}, "dtype torch.float8"),
    "lambda of the wrong shape": (
        {"weights": _authors_weights(**{f"{MODULE}.processor.to_q_lora.lambda_layer": torch.ones(3, 3)})},
        "mixes LoRA factors",
    ),
    "hparams nested 200000 deep": ({"hparams": "a: " + "[" * 200_000}, "nests deeper than 32 levels"),
    "hparams indented 500 deep": (
        {"hparams": "a:\n" + "".join(" " * i + "-\n" for i in range(1, 500))},
        "not valid YAML: nested deeper than 32 levels",
    ),
    "hparams not UTF-8": ({"hparams": b"lora_rank: \xff\xfe 4\n"}, "not a UTF-8 text file"),
    "hparams of 5 MB": ({"hparams": "# " + "x" * 5_000_000 + "\n"}, "an hparams.yml is a short list of settings"),
    "hparams of a million elements": (
        {"hparams": "lora_rank: [" + "1, " * 1_000_000 + "1]\n"},
        "an hparams.yml is a short list of settings",
    ),
    "hparams a list": ({"hparams": "- 1\n- 2\n"}, "must be a mapping of training arguments, got list"),
    "hparams truncated": ({"hparams": "lora_rank: [4,\n"}, "not valid YAML"),
    "lora_rank of 10**12": ({"hparams": _hparams(lora_rank=10**12)}, "Rank 1000000000000 .* larger than any module"),
    "lora_rank a string": ({"hparams": _hparams(lora_rank="4")}, "`lora_rank` must be int, got '4'"),
    "lora_rank a long list": (
        {"hparams": "lora_rank: [" + "1, " * 1000 + "1]\n"},
        r"`lora_rank` must be int, got \[1, 1, 1, 1, 1, 1, \.\.\.\]\.$",
    ),
    "min_rank a billion-laughs alias": (
        {"hparams": BILLION_LAUGHS + "min_rank: *i\nlora_rank: 4\n"},
        r"`min_rank` must be int, got \[\[\[\.\.\.\], (\[\.\.\.\], ){5}\.\.\.\],",
    ),
    "alpha_rank_scale NaN": (
        {"hparams": _hparams(alpha_rank_scale=float("nan"))},
        "`schedule_exponent` must be a finite",
    ),
    "trainer_type of 10000 characters": (
        {"hparams": _hparams(trainer_type="x" * 10_000)},
        r"unknown trainer_type 'x{100,240}\.\.\.x{100,240}'; known",
    ),
}


@pytest.mark.parametrize("case", list(AUTHORS_CHECKPOINTS))
def test_authors_checkpoint(case, tmp_path):
    files, message = AUTHORS_CHECKPOINTS[case]
    weights = files["weights"](tmp_path) if "weights" in files else None
    checkpoint = write_run(tmp_path / "run", weights, files.get("hparams"))
    out = tmp_path / "imported"
    within_bounds(lambda: convert.import_official(checkpoint, out), PACKAGE_ERRORS, message)
    assert not out.exists()


@pytest.mark.parametrize("case", ["weights truncated", "hparams nested 200000 deep", "lora_rank of 10**12"])
def test_authors_checkpoint_on_the_command_line(case, tmp_path, capsys):
    files, message = AUTHORS_CHECKPOINTS[case]
    weights = files["weights"](tmp_path) if "weights" in files else None
    checkpoint = write_run(tmp_path / "run", weights, files.get("hparams"))
    for command in (["import-official", str(checkpoint), str(tmp_path / "out")], ["inspect", str(checkpoint)]):
        assert convert_tlora.main(command) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err


def test_a_valid_authors_checkpoint_imports(tmp_path):
    checkpoint = write_run(tmp_path / "run")
    result = convert.import_official(checkpoint, tmp_path / "imported")
    assert (result.config.rank, result.config.min_rank, result.config.variant) == (RANK, 2, "vanilla")


# --------------------------------------------------------------------------- the authors' FLUX lora.pt

FLUX_KEY = "transformer_blocks.0.attn.processor.to_q_lora.down.weight"


def _saved(make_object):
    def make(tmp_path):
        path = tmp_path / "saved.pt"
        torch.save(make_object(), path)
        return path.read_bytes()

    return make


def _with_data_pickle(stream: bytes):
    """A torch zip archive whose data.pkl is `stream`, as a hostile writer could make it."""

    def make(tmp_path):
        archive = _saved(lambda: {FLUX_KEY: torch.zeros(2)})(tmp_path)
        with zipfile.ZipFile(io.BytesIO(archive)) as source:
            entries = {info.filename: source.read(info) for info in source.infolist()}
        entries[next(name for name in entries if name.endswith("/data.pkl"))] = stream
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as target:
            for name, data in entries.items():
                target.writestr(name, data)
        return out.getvalue()

    return make


def _legacy_format(tmp_path):
    torch.save({FLUX_KEY: torch.zeros(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    return (tmp_path / "legacy.pt").read_bytes()


class _Rebuilt:
    """Pickles as a tensor of `size` over a storage of `numel` floats: sizes the stored data cannot back."""

    def __init__(self, numel: int, size: tuple):
        self.numel, self.size = numel, size

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (_StorageId(self.numel), 0, self.size, (1,), False, OrderedDict())


class _StorageId:
    def __init__(self, numel: int):
        self.numel = numel


class _TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        return ("storage", torch.FloatStorage, "0", "cpu", obj.numel) if isinstance(obj, _StorageId) else None


def _claimed_sizes(numel: int, size: tuple):
    stream = io.BytesIO()
    _TorchPickler(stream, protocol=2).dump({FLUX_KEY: _Rebuilt(numel, size)})
    return _with_data_pickle(stream.getvalue())


def _truncated_pt(tmp_path):
    return _saved(lambda: {FLUX_KEY: torch.zeros(64)})(tmp_path)[:-100]


class _Global:
    def __reduce__(self):
        return print, ("unpickled",)


FLUX_PICKLES = {
    "empty": (lambda tmp_path: b"", "not a readable torch file"),
    "truncated": (_truncated_pt, "not a readable torch file"),
    "legacy format": (_legacy_format, "a plain or legacy-format pickle, which is never read"),
    "a plain pickle with a GLOBAL": (
        lambda tmp_path: pickle.dumps({FLUX_KEY: _Global()}),
        "a plain or legacy-format pickle, which is never read",
    ),
    "a torch file with a GLOBAL": (
        _saved(lambda: {FLUX_KEY: _Global()}),
        "needs more than weights-only unpickling \\(it holds a print object\\)",
    ),
    "a list": (_saved(lambda: [torch.zeros(2)]), "holds a list; the authors' checkpoints are dicts"),
    "nested dicts": (_saved(lambda: {"a": {FLUX_KEY: torch.zeros(2)}}), "entries 'a' are not named tensors"),
    "a key of a million characters": (
        _saved(lambda: {FLUX_KEY: torch.zeros(2), "k" * 1_000_000: torch.zeros(2)}),
        r"Unexpected key 'k{100,240}\.\.\.k{100,240}': the authors'",
    ),
    "an unhashable key": (_with_data_pickle(b"\x80\x02}]K\x01s."), "not a readable torch file .*unhashable"),
    "a key nested a million deep": (
        _with_data_pickle(b"\x80\x02}N" + b"\x85" * 1_000_000 + b"K\x01s."),
        "data.pkl nests deeper than 32 levels",
    ),
    "a data.pkl of 2 MB": (_with_data_pickle(b"\x80\x02]" + b"Na" * 1_000_000 + b"."), "at most 1,048,576 are read"),
    "integer tensors": (_saved(lambda: {FLUX_KEY: torch.zeros(2, dtype=torch.int64)}), "has dtype torch.int64"),
    "float8 tensors": (_saved(lambda: {FLUX_KEY: torch.zeros(2).to(torch.float8_e4m3fn)}), "dtype torch.float8"),
    "a sparse tensor": (_saved(lambda: {FLUX_KEY: torch.zeros(2).to_sparse()}), "has layout torch.sparse_coo"),
    "a size beyond its storage": (_claimed_sizes(2, (1000,)), "not a readable torch file"),
    "a storage of 10**12 elements": (_claimed_sizes(10**12, (10**12,)), "not a readable torch file"),
}


@pytest.mark.parametrize("case", list(FLUX_PICKLES))
def test_authors_flux_checkpoint(case, tmp_path):
    make, message = FLUX_PICKLES[case]
    checkpoint = tmp_path / "run" / "checkpoint-500"
    checkpoint.mkdir(parents=True)
    (checkpoint / "lora.pt").write_bytes(make(tmp_path))
    out = tmp_path / "imported"
    within_bounds(lambda: convert.import_official(checkpoint / "lora.pt", out), PACKAGE_ERRORS, message)
    assert not out.exists()


# --------------------------------------------------------------------------- the evaluator's prompt file

GOOD_PROMPTS = {"base_prompt": "a photo of {}", "num_complex": 1, "mine": ["a red {}", "a {} on a hill"]}

PROMPT_FILES = {
    "empty": (b"", "not valid JSON"),
    "truncated": (json.dumps(GOOD_PROMPTS).encode()[:30], "not valid JSON"),
    "not UTF-8": (b'{"mine": ["\xff {}"]}', "cannot read the prompt file"),
    "nested 10000 deep": (b"[" * 10_000 + b"]" * 10_000, "nests deeper than 32 levels"),
    "5 million characters": (b" " * 5_000_000 + b"{}", "at most 4,194,304 are read"),
    "a list": (b'["a {}"]', "holds no prompt list"),
    "a prompt that is a number": (json.dumps({"mine": [1, "a {}"]}).encode(), "1 must be a string with exactly one"),
    "a prompt of a million characters": (
        json.dumps({"mine": ["x" * 1_000_000]}).encode(),
        r"'x{100,240}\.\.\.x{100,240}' must be a string with exactly one",
    ),
    "a nested prompt": (json.dumps({"mine": [[[["a {}"]]]]}).encode(), r"\[\[\[\.\.\.\]\]\] must be a string"),
    "num_complex NaN": (b'{"mine": ["a {}"], "num_complex": NaN}', "holds NaN"),
    "num_complex a string": (json.dumps({**GOOD_PROMPTS, "num_complex": "1"}).encode(), "num_complex must be an"),
    "num_complex of 10**30": (json.dumps({**GOOD_PROMPTS, "num_complex": 10**30}).encode(), "num_complex must be"),
    "base_prompt a list": (json.dumps({**GOOD_PROMPTS, "base_prompt": ["a {}"]}).encode(), "base_prompt"),
    "an empty list": (json.dumps({"mine": []}).encode(), "the prompt list 'mine' is empty"),
}


@pytest.mark.parametrize("case", list(PROMPT_FILES))
def test_prompt_file(case, tmp_path):
    content, message = PROMPT_FILES[case]
    path = tmp_path / "prompts.json"
    path.write_bytes(content)
    within_bounds(lambda: evaluate.load_prompt_set(str(path), None), evaluate.EvaluationError, message)


def test_a_valid_prompt_file_reads(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(GOOD_PROMPTS))
    prompts = evaluate.load_prompt_set(str(path), None)
    assert (prompts.contextual, prompts.complex) == (("a red {}",), ("a {} on a hill",))


# --------------------------------------------------------------------------- files a training run or a tool reads back

LOSS_HISTORIES = {
    "a line cut short by a crash": ("step,loss\n1,0.5\n2,0.25\n3", [(1, 0.5), (2, 0.25)], 1),
    "a line of 10 MB": ("step,loss\n1,0.5\n" + "9" * 10_000_000 + "\n2,0.25\n", [(1, 0.5), (2, 0.25)], 1),
    "a NaN and a text loss": ("step,loss\n1,nan\n2,inf\n3,x\n4,0.1\n", [(4, 0.1)], 3),
    "not UTF-8": (b"step,loss\n1,0.5\n\xff\xfe,0.1\n".decode("latin-1"), [(1, 0.5)], 1),
}


@pytest.mark.parametrize("case", list(LOSS_HISTORIES))
def test_loss_history(case, tmp_path):
    """The loss history only draws the card's curve: damaged lines are left out with a warning, never a crash."""
    text, rows, skipped = LOSS_HISTORIES[case]
    path = tmp_path / "loss.csv"
    path.write_bytes(text.encode("latin-1"))
    tracemalloc.start()
    try:
        with pytest.warns(UserWarning, match=f"{skipped} damaged lines left out"):
            assert read_loss_history(path) == rows
        _, python_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert python_peak < PYTHON_BYTES


LOADER_FILES = {
    "a pipeline.py of 10 MB on one line": (b"x" * 10_000_000, "pipeline.py was not written by pipelines.tlora"),
    "a pipeline.py not UTF-8": (b"\xff\xfe" * 1000, "pipeline.py was not written by pipelines.tlora"),
    "the marker without a version": (b"# Generated by pipelines.tlora", "written by pipelines.tlora (no version)"),
}


@pytest.mark.parametrize("case", list(LOADER_FILES))
def test_loader_files_of_an_adapter_folder(case, tmp_path):
    """`inspect` describes, and writing the loader files refuses to replace, a pipeline.py of any content."""
    content, description = LOADER_FILES[case]
    (tmp_path / "pipeline.py").write_bytes(content)
    tracemalloc.start()
    try:
        assert description in describe_loader_files(tmp_path)
        if not content.startswith(b"# Generated"):
            with pytest.raises(FileExistsError, match="pipeline.py exist and were not written by pipelines.tlora"):
                write_loader_files(tmp_path)
        _, python_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert python_peak < PYTHON_BYTES
    assert (tmp_path / "pipeline.py").read_bytes() == content or content.startswith(b"# Generated")
