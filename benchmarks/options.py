"""`--set OPTION=VALUE` for the toy benchmarks: train options by name, the values read as numbers or booleans."""

from __future__ import annotations


def parse_sets(pairs: list[str]) -> dict:
    return {k.strip(): _value(v.strip()) for k, v in (p.split("=", 1) for p in pairs)}


def _value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)
