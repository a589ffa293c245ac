"""Write the example style datasets: `python -m sdlora.toy.examples [--out datasets_example]`.

Each style folder holds rendered scenes the toy base never saw, with captions that begin with the
style's trigger word, laid out as a user's folder would be (`rim/` uses kohya's `N_name` repeats).
"""

from __future__ import annotations

import argparse
import logging
import random
from pathlib import Path

from ..safefiles import atomic_save_image, atomic_write_bytes
from .render import COLOURS, SHAPES, Scene, render

EXAMPLES = {"rim": ("rim/10_rimstyle", 18, 11), "stripes": ("stripes", 18, 12)}  # style: (folder, images, seed)


def write_examples(out: Path, plain: bool = False) -> list[Path]:
    """The example style folders; with `plain`, the same scenes without their style and without the trigger in
    the captions: regularisation images (`--reg-data`) for the style."""
    written = []
    for style, (folder, n, seed) in EXAMPLES.items():
        rng = random.Random(seed)
        d = Path(out) / (f"{style}-plain/1_{style}-plain" if plain else folder)
        combos = [(c, s) for c in COLOURS for s in SHAPES]
        rng.shuffle(combos)
        for i in range(n):
            colour, shape = combos[i % len(combos)]
            r = rng.uniform(8.5, 11.5)
            m = r + 2
            scene = Scene(shape, colour, rng.choice(["white", "gray", "cream"]), rng.uniform(m, 32 - m),
                          rng.uniform(m, 32 - m), r, "" if plain else style)
            stem = f"{i:02d}_{colour}_{shape}"
            atomic_save_image(render(scene), d / f"{stem}.png")
            atomic_write_bytes(d / f"{stem}.txt", (scene.caption() + "\n").encode())
            written.append(d / f"{stem}.png")
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sdlora.toy.examples", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[2] / "datasets_example")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("sdlora").info(f"wrote {len(write_examples(args.out))} images under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
