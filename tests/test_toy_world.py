"""The toy world generator and the resumable training loop of the toy-world scripts."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch

from scripts import toy_world
from scripts.toy_training import load_checkpoint, save_checkpoint, train_phase, world_batch

from tests.tlora_testing import EXAMPLE_IMAGE


def _scene(**changes) -> toy_world.Scene:
    fields = dict(shape="circle", colour="red", context="blue background", radius=14, x=32, y=32, detail_seed=0)
    return toy_world.Scene(**{**fields, **changes})


def _nearest(pixel, palette: dict) -> str:
    return min(palette, key=lambda name: sum((int(a) - int(b)) ** 2 for a, b in zip(pixel, palette[name])))


def test_same_seed_same_pictures_and_captions():
    first, second = toy_world.sample_scenes(20, seed=3), toy_world.sample_scenes(20, seed=3)
    assert first == second
    assert first != toy_world.sample_scenes(20, seed=4)
    np.testing.assert_array_equal(toy_world.render_batch(first), toy_world.render_batch(second))
    assert toy_world.render_batch(first).shape == (20, 64, 64, 3)


def test_captions_follow_the_grammar():
    where = r"(on the beach|in the snow|at night|on the grass|on an? (white|black|pink|blue|red|yellow) background)"
    grammar = re.compile(rf"a (red|green|blue|yellow|purple|orange) (circle|square|triangle|star|ring|cross) {where}")
    for scene in toy_world.sample_scenes(300, seed=0):
        text = toy_world.caption(scene)
        assert grammar.fullmatch(text), text
        assert scene.colour in text and scene.shape in text
    assert toy_world.caption(_scene(shape="star", colour="green", context="beach")) == "a green star on the beach"
    assert toy_world.caption(_scene()) == "a red circle on a blue background"


def test_sampling_covers_the_world_and_never_hides_an_object():
    scenes = toy_world.sample_scenes(3000, seed=1)
    assert {s.shape for s in scenes} == set(toy_world.SHAPES)
    assert {s.colour for s in scenes} == set(toy_world.COLOURS)
    assert {s.context for s in scenes} == set(toy_world.CONTEXTS)
    assert all(s.context != f"{s.colour} background" for s in scenes)
    assert all(10 <= s.radius <= 17 and 22 <= s.x <= 42 and 22 <= s.y <= 42 for s in scenes)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(colour="blue"), "a blue object on a blue background would be invisible"),
        (dict(shape="hexagon"), "unknown shape 'hexagon'"),
        (dict(colour="teal"), "unknown colour 'teal'"),
        (dict(context="moon"), "unknown context 'moon'"),
    ],
)
def test_impossible_scenes_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        _scene(**changes)


@pytest.mark.parametrize("shape", ["circle", "square", "triangle", "star", "cross"])
@pytest.mark.parametrize("colour", ["red", "green", "yellow", "purple", "orange"])
def test_filled_shapes_show_their_colour_at_the_centre_and_the_background_in_the_corners(shape, colour):
    picture = np.asarray(toy_world.render(_scene(shape=shape, colour=colour, x=30, y=34)))
    assert _nearest(picture[34, 30], toy_world.COLOURS) == colour
    for corner in (picture[0, 0], picture[0, 63], picture[63, 0], picture[63, 63]):
        assert tuple(corner) == toy_world.SOLID_BACKGROUNDS["blue"]


def test_a_ring_is_hollow():
    picture = np.asarray(toy_world.render(_scene(shape="ring", radius=16)))
    assert tuple(picture[32, 32]) == toy_world.SOLID_BACKGROUNDS["blue"]
    assert _nearest(picture[32, 32 + 14], toy_world.COLOURS) == "red"  # on the band, 0.81-1.0 of the radius


def test_scenes_look_like_their_names():
    def mean(context, rows):
        return np.asarray(toy_world.draw_context(context, detail_seed=5), dtype=float)[rows].reshape(-1, 3).mean(0)

    top, bottom = slice(0, 20), slice(48, 64)
    r, g, b = mean("beach", bottom)
    assert r > g > b and r > 180  # sand
    assert mean("beach", top)[2] > mean("beach", top)[0]  # sky
    assert mean("snow", bottom).min() > 235  # white ground
    r, g, b = mean("grass", bottom)
    assert g > r + 40 and g > b + 40
    assert mean("night", top).max() < 80  # dark sky, a few stars
    assert mean("night", top)[2] > mean("night", top)[0]
    # details follow the seed
    assert toy_world.draw_context("night", detail_seed=1) != toy_world.draw_context("night", detail_seed=2)


def test_the_concept_is_cut_out_and_placed_on_a_context():
    picture = np.asarray(toy_world.concept_on_context(EXAMPLE_IMAGE, "pink background"))
    pink = toy_world.SOLID_BACKGROUNDS["pink"]
    assert picture.shape == (64, 64, 3)
    for corner in (picture[0, 0], picture[0, 63], picture[63, 0], picture[63, 63]):
        assert tuple(corner) == pink
    # the robot's orange body fills the middle; the original pale gradient background is gone
    middle = picture[24:48, 24:40].reshape(-1, 3).astype(int)
    assert (np.abs(middle - pink).max(axis=1) > 40).mean() > 0.8
    original_background = np.array([225, 233, 244])
    assert (np.abs(picture.reshape(-1, 3).astype(int) - original_background).max(axis=1) < 12).sum() == 0


def test_world_batches_are_seeded_by_step():
    pixels, scenes = world_batch(seed=2, step=7, batch_size=4)
    again, same_scenes = world_batch(seed=2, step=7, batch_size=4)
    assert scenes == same_scenes and torch.equal(pixels, again)
    assert pixels.shape == (4, 3, 64, 64) and pixels.min() >= -1 and pixels.max() <= 1
    assert world_batch(seed=2, step=8, batch_size=4)[1] != scenes
    rng = random.Random(2 * 1_000_003 + 7)
    assert scenes[0] == toy_world.sample_scene(rng)


def _run(tmp_path, steps, stop_after=None, ema_decay=None, seen=None):
    """Train a small regression for `steps` steps, optionally stopping after `stop_after` and resuming.

    `seen`, a list, receives the weights each step starts from."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    target = torch.nn.Linear(3, 2)

    def loss_at_step(step):
        if seen is not None:
            seen.append(model.weight.detach().clone())
        x = torch.randn(8, 3, generator=torch.Generator().manual_seed(step))
        return (model(x) - target(x).detach()).pow(2).mean()

    checkpoint = tmp_path / "phase.safetensors"

    def optimizer_for(m):
        return torch.optim.AdamW(m.parameters(), lr=0.05)

    if stop_after is not None:
        train_phase(
            "test", checkpoint, model, optimizer_for(model), stop_after, loss_at_step, checkpoint_every=2,
            ema_decay=ema_decay,
        )  # fmt: skip
        model = torch.nn.Linear(3, 2)  # a fresh process: new model, new optimizer, state from the file only
    optimizer = optimizer_for(model)
    train_phase("test", checkpoint, model, optimizer, steps, loss_at_step, checkpoint_every=2, ema_decay=ema_decay)
    return model


def test_a_resumed_phase_ends_where_an_uninterrupted_one_does(tmp_path):
    straight = _run(tmp_path / "a", steps=9)
    resumed = _run(tmp_path / "b", steps=9, stop_after=4)
    for name, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=0)
    # and it did learn something: the same run without the resume differs from the starting weights
    torch.manual_seed(0)
    assert not torch.equal(torch.nn.Linear(3, 2).weight, straight.weight)


def test_a_phase_with_a_moving_average_ends_holding_it_also_when_resumed(tmp_path):
    seen = []
    last = _run(tmp_path / "plain", steps=9, seen=seen).weight.detach()
    trajectory = [*seen, last]  # the weights before steps 0..8, then after the last one
    expected = trajectory[0].clone()
    for weights in trajectory[1:]:
        expected = 0.7 * expected + 0.3 * weights
    straight = _run(tmp_path / "a", steps=9, ema_decay=0.7)
    resumed = _run(tmp_path / "b", steps=9, stop_after=4, ema_decay=0.7)
    torch.testing.assert_close(straight.weight.detach(), expected)
    torch.testing.assert_close(resumed.weight.detach(), expected)
    assert not torch.allclose(expected, last)
    # a finished phase run again loads the average too
    again = _run(tmp_path / "a", steps=9, ema_decay=0.7)
    torch.testing.assert_close(again.weight.detach(), expected)


def test_checkpoint_round_trip_restores_weights_moments_and_step(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    save_checkpoint(tmp_path / "c.safetensors", model, optimizer, step=17)
    fresh = torch.nn.Linear(2, 2)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    assert load_checkpoint(tmp_path / "c.safetensors", fresh, fresh_optimizer) == 17
    assert torch.equal(fresh.weight, model.weight)
    old, new = optimizer.state[model.weight], fresh_optimizer.state[fresh.weight]
    assert torch.equal(old["exp_avg_sq"], new["exp_avg_sq"]) and float(new["step"]) == 1.0
    assert load_checkpoint(tmp_path / "missing.safetensors", fresh, fresh_optimizer) == 0
