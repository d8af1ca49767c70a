"""Tests of the training package on its own: how it is layered (it builds on the plugin, the plugin stands
alone), reading images, the dataset's crops and flips and the seeded sample order."""

from __future__ import annotations

import ast
import importlib.machinery
import subprocess
import sys
import types

import numpy as np
import pytest
from accelerate.state import PartialState
from PIL import Image

import train_tlora_sdxl as train
from training.data import DreamBoothDataset, ImageRecord, ShuffledStreamSampler, load_instance_records, make_record
from training.errors import InputError
from training.images import open_image

from tests.tlora_testing import REPO_ROOT

PROMPT = "a photo of sks toy"


pytestmark = pytest.mark.usefixtures("cpu_accelerate")


def _imported_modules(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names


def test_the_plugin_imports_neither_the_training_package_nor_accelerate():
    """diffusers itself needs accelerate only for some loaders; the plugin must add no such need."""
    plugin = sorted((REPO_ROOT / "pipelines" / "tlora").glob("*.py"))
    assert len(plugin) > 5
    for path in plugin:
        roots = {name.split(".")[0] for name in _imported_modules(path)}
        assert not roots & {"training", "accelerate"}, path


def test_the_image_loader_imports_without_accelerate():
    """The evaluation reads images through `training.images`; that must not drag in the training stack."""
    code = "import sys\nsys.modules['accelerate'] = None\nfrom training.images import open_image\nprint('ok')\n"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


# --------------------------------------------------------------------------- images and data


def test_dataset_name_reads_images_and_captions(monkeypatch):
    rows = {
        "image": [Image.new("RGB", (80, 64), "red"), Image.new("L", (64, 64), 200)],
        "text": ["a red sks toy", None],
    }
    fake = types.ModuleType("datasets")
    fake.__spec__ = importlib.machinery.ModuleSpec("datasets", None)
    fake.load_dataset = lambda name, config, cache_dir: {"train": _Table(rows)}
    monkeypatch.setitem(sys.modules, "datasets", fake)
    PartialState()
    args = train.parse_args(["--pretrained_model_name_or_path", "m", "--dataset_name", "user/toys", "--caption_column",
                             "text", "--instance_prompt", PROMPT, "--resolution", "64"])  # fmt: skip
    records = load_instance_records(args)
    assert [r.prompt for r in records] == ["a red sks toy", PROMPT]
    assert [r.image.size for r in records] == [(80, 64), (64, 64)] and records[1].image.mode == "RGB"
    args.caption_column = "caption"
    with pytest.raises(InputError, match="--caption_column 'caption' is not a column"):
        load_instance_records(args)
    fake.load_dataset = lambda name, config, cache_dir: {"train": _Table({"image": []})}
    with pytest.raises(InputError, match="--dataset_name user/toys has no images"):
        load_instance_records(args)


class _Table:
    """The part of a `datasets.Dataset` that the script uses."""

    def __init__(self, columns):
        self.columns = columns
        self.column_names = list(columns)

    def __len__(self):
        return len(next(iter(self.columns.values())))

    def __getitem__(self, column):
        return self.columns[column]


@pytest.fixture
def accelerate_logging():
    PartialState()  # accelerate's logger needs its state


def test_images_of_every_kind_become_rgb(tmp_path, accelerate_logging):
    gray = tmp_path / "gray.png"
    Image.new("L", (8, 8), 100).save(gray)
    transparent = tmp_path / "rgba.png"
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(transparent)
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 257 * 200, dtype=np.uint16)).save(deep)
    palette = tmp_path / "palette.png"
    Image.new("P", (8, 8), 0).save(palette, transparency=0)

    assert np.asarray(open_image(gray, "gray"))[0, 0].tolist() == [100, 100, 100]
    assert np.asarray(open_image(transparent, "rgba"))[0, 0].tolist() == [255, 255, 255]
    assert Image.open(deep).mode.startswith("I")
    assert np.asarray(open_image(deep, "deep"))[0, 0].tolist() == [200, 200, 200]
    assert np.asarray(open_image(palette, "palette"))[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied(tmp_path, accelerate_logging):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.new("RGB", (40, 20), "blue").save(path, exif=exif)
    assert open_image(path, "rotated").size == (20, 40)


def test_small_images_are_upscaled_with_a_warning(tmp_path, accelerate_logging, caplog):
    path = tmp_path / "small.png"
    Image.new("RGB", (32, 48), "green").save(path)
    record = make_record(path, str(path), 64, PROMPT)
    assert record.image.size == (64, 96) and record.original_size == (48, 32)
    assert "small.png is 32x48 px, smaller than --resolution 64" in caplog.text


def _wide_record() -> ImageRecord:
    image = Image.new("RGB", (100, 64))
    image.paste((255, 0, 0), (0, 0, 10, 64))  # a red stripe along the left edge
    return ImageRecord("wide", image, (320, 500), PROMPT)


def test_center_crop_conditioning():
    args = types.SimpleNamespace(repeats=1, resolution=64, center_crop=True, random_flip=False)
    dataset = DreamBoothDataset([_wide_record()], [], [PROMPT], args, seed=0)
    example = dataset.example(0, np.random.default_rng(0))
    assert example["time_ids"] == (320, 500, 0, 18, 64, 64)  # original size, crop top/left, target size
    pixels = example["pixel_values"]
    assert pixels.shape == (3, 64, 64) and pixels.min() == -1 and pixels.max() <= 1
    assert not dataset.random_augmentation


def test_random_crop_and_flip_match_their_conditioning():
    """The crop position in the conditioning is where the image SD-XL sees was cut, also after a flip."""
    columns = np.tile((np.arange(100, dtype=np.uint8) * 2)[None, :, None], (64, 1, 3))  # pixel value = 2 x column
    record = ImageRecord("ramp", Image.fromarray(columns), (64, 100), PROMPT)
    args = types.SimpleNamespace(repeats=1, resolution=64, center_crop=False, random_flip=True)
    dataset = DreamBoothDataset([record], [], [PROMPT], args, seed=0)
    assert dataset.random_augmentation
    flips = set()
    for seed in range(20):
        example = dataset.example(0, np.random.default_rng(seed))
        shown = np.round((example["pixel_values"][0, 0] + 1) * 127.5 / 2).astype(int)  # original column of each pixel
        flipped = shown[0] > shown[-1]
        assert np.array_equal(np.abs(np.diff(shown)), np.ones(63, dtype=int))
        # Distance from the left edge of what SD-XL sees to the edge of the original image on that side.
        assert example["time_ids"][3] == (99 - shown[0] if flipped else shown[0])
        flips.add(bool(flipped))
    assert flips == {True, False}


def test_stream_sampler_passes_over_every_image_and_is_reproducible():
    sampler = ShuffledStreamSampler(dataset_size=5, length=12, seed=3)
    items = list(sampler)
    assert [position for _, position in items] == list(range(12))
    assert sorted(index for index, _ in items[:5]) == list(range(5))
    assert sorted(index for index, _ in items[5:10]) == list(range(5))
    assert items == list(ShuffledStreamSampler(5, 12, seed=3))
    assert items != list(ShuffledStreamSampler(5, 12, seed=4))
