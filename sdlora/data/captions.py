"""Caption rules applied each time an image is used: trigger word, tag shuffling, caption dropout."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class CaptionRules:
    trigger: str = ""
    shuffle_tags: bool = False
    keep_tags: int = 0
    dropout: float = 0.0


def split_tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


def with_trigger(caption: str, trigger: str) -> str:
    if not trigger:
        return caption
    tags = split_tags(caption)
    if tags and tags[0] == trigger:
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def make_caption(caption: str, rules: CaptionRules, rng: random.Random) -> str:
    """The caption the text encoder sees this time. The trigger always stays first."""
    if rules.dropout and rng.random() < rules.dropout:
        return ""
    if rules.shuffle_tags:
        tags = split_tags(caption)
        if rules.trigger and tags and tags[0] == rules.trigger:
            tags = tags[1:]
        head, tail = tags[: rules.keep_tags], tags[rules.keep_tags :]
        rng.shuffle(tail)
        caption = ", ".join(head + tail)
    return with_trigger(caption, rules.trigger)
