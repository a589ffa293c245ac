"""Does the style stay tied to its trigger? The demo's rim LoRA trained four ways: with its captions' rare word
`rimstyle` as the trigger (a token the toy base never learned), or with a new token `<rim>` whose embedding trains
with the LoRA (pivotal tuning, --train-embedding); each without and with regularisation images (the same scenes,
unstyled, captioned without the trigger: `sdlora.toy.examples` renders them). Each is measured at weight 1 with
the trigger in every prompt and with no trigger at all. Regularisation images fill half of every epoch, so those
runs train twice the steps: every run sees the style's images equally often.

    .venv/bin/python benchmarks/trigger_toy.py [--out benchmarks/results/trigger_toy.json]

About 15 minutes on 2 CPU cores. To try a setting on one row: `--only "new token + regularisation" --steps 400
--set prior_loss_weight=0.1 --out /tmp/try.json` (`--set` takes any train option by name, repeatable; `--vectors N`
gives the new token N vectors).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from options import add_sampler, parse_sets

from sdlora.config import DemoConfig
from sdlora.demo import EXAMPLES, measure, train_style
from sdlora.engine import BlendItem, Engine
from sdlora.safefiles import atomic_write_bytes
from sdlora.toy.examples import write_examples
from sdlora.toy.render import STYLES

TOKEN = "<rim>"


def with_token(src: Path, dst: Path, word: str, token: str) -> Path:
    """A copy of an example folder whose captions say `token` where they said `word`."""
    shutil.copytree(src, dst)
    for caption in dst.rglob("*.txt"):
        caption.write_text(caption.read_text(encoding="utf-8").replace(word, token), encoding="utf-8")
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "trigger_toy.json")
    ap.add_argument("--only", help="Run just this row (its name in the table).")
    ap.add_argument("--steps", type=int, help="Steps for the chosen row(s) (default: the demo's, doubled with "
                                              "regularisation images).")
    ap.add_argument("--vectors", type=int, default=1, help="Vectors of the new token (--train-embedding <rim>:N).")
    ap.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE",
                    help="Any train option by name, e.g. prior_loss_weight=0.1 (repeatable).")
    add_sampler(ap)
    args = ap.parse_args()
    options = parse_sets(args.set)
    cfg = DemoConfig(sampler=args.sampler)
    report: dict = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} CPU, "
                    f"{torch.get_num_threads()} threads, torch {torch.__version__}",
                    "command": " ".join(["python benchmarks/trigger_toy.py", *sys.argv[1:]]), "style": cfg.style, "sampler": cfg.sampler,
                    "runs": {}}
    word = STYLES[cfg.style]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_examples(tmp / "reg", plain=True)
        reg = tmp / "reg" / f"{cfg.style}-plain"
        tokened = with_token(EXAMPLES / cfg.style, tmp / "tokened", word, TOKEN)
        runs = [("rare word", word, None, None, ()), ("rare word + regularisation", word, reg, None, ()),
                ("new token", TOKEN, None, tokened, (f"{TOKEN}:{args.vectors}",)),
                ("new token + regularisation", TOKEN, reg, tokened, (f"{TOKEN}:{args.vectors}",))]
        for name, trigger, reg_data, data, train_embedding in runs:
            if args.only and name != args.only:
                continue
            steps = args.steps or cfg.steps * (2 if reg_data else 1)
            started = time.time()
            result = train_style(cfg.style, replace(cfg, steps=steps), tmp / name.replace(" ", "-"),
                                 reg_data=reg_data, data=data, train_embedding=train_embedding, options=options)
            seconds = time.time() - started
            engine = Engine("toy", lora_files=[result.adapter])
            row: dict = {"trigger": trigger, "steps": steps, "options": options, "train_seconds": round(seconds, 1),
                         "vectors": args.vectors if train_embedding else 0}
            for prompt, words in (("with the trigger", trigger), ("without the trigger", "")):
                m = measure(engine, lambda w, r=result: [BlendItem(r.adapter.stem, w)] if w else [], [cfg.style],
                            cfg, [0.0, 1.0], trigger=words)
                row[prompt] = {"style_score": m["style_score"][cfg.style], "color_accuracy": m["color_accuracy"],
                               "shape_accuracy": m["shape_accuracy"], "weights": [0.0, 1.0]}
            report["runs"][name] = row
            print(name, json.dumps(row), flush=True)
    r = report["runs"].get("new token + regularisation")
    report["targets"] = {} if r is None else {
        "with regularisation: style with the trigger at least 0.8": r["with the trigger"]["style_score"][1] >= 0.8,
        "with regularisation: style without the trigger at most 0.2": r["without the trigger"]["style_score"][1] <= 0.2,
        # (as the demo holds them: a LoRA that breaks trigger-less images also scores no style there)
        "with regularisation: colour at least 0.85 and shape at least 0.75, with and without the trigger": all(
            r[p]["color_accuracy"][1] >= 0.85 and r[p]["shape_accuracy"][1] >= 0.75
            for p in ("with the trigger", "without the trigger"))}
    atomic_write_bytes(args.out, json.dumps(report, indent=2).encode())
    print(json.dumps(report["targets"]))


if __name__ == "__main__":
    main()
