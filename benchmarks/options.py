"""Shared options of the toy benchmarks: `--set OPTION=VALUE` (train options by name, the values read as numbers or
booleans) and `--sampler` (of the measured images; the demo's by default, recorded in each result)."""

from __future__ import annotations

import argparse

from sdlora.config import DemoConfig
from sdlora.schedulers import SCHEDULERS


def add_sampler(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--sampler", default=DemoConfig().sampler, choices=list(SCHEDULERS), metavar="NAME",
                    help=f"Sampler of the measured images (default: the demo's, {DemoConfig().sampler}).")


def parse_sets(pairs: list[str]) -> dict:
    return {k.strip(): _value(v.strip()) for k, v in (p.split("=", 1) for p in pairs)}


def _value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)
