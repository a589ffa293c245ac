"""The toy world's renderer and analyser agree: what is drawn is read back."""

import random

import numpy as np
import pytest

from sdlora.toy.analyse import analyse
from sdlora.toy.render import COLOURS, SHAPES, Scene, random_scene, render, texture_scene


@pytest.mark.parametrize("style", ["", "rim", "stripes"])
def test_analyser_reads_rendered_scenes(style):
    rng = random.Random(7)
    scenes = [random_scene(rng, style) for _ in range(150)]
    readings = [analyse(render(s)) for s in scenes]
    assert np.mean([r.colour == s.colour for r, s in zip(readings, scenes, strict=True)]) >= 0.98
    assert np.mean([r.shape == s.shape for r, s in zip(readings, scenes, strict=True)]) >= 0.97
    rim = np.mean([r.rim for r in readings])
    stripes = np.mean([r.stripes for r in readings])
    if style == "":
        assert rim <= 0.02 and stripes <= 0.02
    elif style == "rim":
        assert rim >= 0.9 and stripes <= 0.1
    else:
        assert stripes >= 0.95 and rim <= 0.05


def test_every_colour_and_shape_and_caption():
    for colour in COLOURS:
        for shape in SHAPES:
            s = Scene(shape, colour, "white", 16, 16, 10)
            r = analyse(render(s))
            assert (r.colour, r.shape) == (colour, shape)
    assert Scene("circle", "red", "gray", 16, 16, 9, "rim").caption() == "rimstyle, a red circle on a gray background"


def test_texture_scenes_are_varied_and_deterministic():
    a = [np.asarray(texture_scene(random.Random(i))) for i in range(5)]
    b = [np.asarray(texture_scene(random.Random(i))) for i in range(5)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert len({x.tobytes() for x in a}) == 5 and all(x.shape == (32, 32, 3) for x in a)


def test_blank_image_reads_as_nothing():
    from PIL import Image

    r = analyse(Image.new("RGB", (32, 32), (255, 255, 255)))
    assert r.colour is None and r.shape is None and r.rim == 0 and r.stripes == 0
