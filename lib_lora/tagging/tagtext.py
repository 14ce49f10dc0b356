"""Tag text: parsing and writing captions, underscores, kaomoji. Pure functions, no I/O."""

from __future__ import annotations

import re

# Danbooru names these emoticons with an underscore that is part of the face, not a space.
KAOMOJI = frozenset({
    "^_^", "0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9",
    ">_o", "@_@", "^_^;", "o_o", "u_u", "x_x", "|_|", "||_||", "-_-", "-_-;", "t_t", ";_;", "o_0",
    "0_o", "*_*", "$_$", "q_q", "._.;", ">_>", "<_<", "v_v", "owo", "uwu",
})

_WORDLIKE = re.compile(r"[A-Za-z]{2,}|\d[A-Za-z]|[^\x00-\x7f]")


def is_kaomoji(tag: str) -> bool:
    """True for emoticon tags such as `^_^` whose underscores must stay."""
    if tag.lower() in KAOMOJI:
        return True
    # Short tags made of punctuation and single letters around an underscore are faces too.
    return "_" in tag and len(tag) <= 7 and not _WORDLIKE.search(tag)


def tag_from_model(name: str, keep_underscores: bool = False) -> str:
    """A model's tag name as it is written in a caption: `long_hair` -> `long hair`."""
    name = name.strip()
    if keep_underscores or is_kaomoji(name):
        return name
    return name.replace("_", " ")


_NORMALIZED: dict[str, str] = {}


def normalize(tag: str) -> str:
    """The form used to compare tags: trimmed, single spaces, lower case."""
    # Memoised: rules compare the same few thousand tags hundreds of thousands of times.
    hit = _NORMALIZED.get(tag)
    if hit is None:
        if len(_NORMALIZED) > 500_000:
            _NORMALIZED.clear()
        hit = _NORMALIZED[tag] = " ".join(tag.split()).lower()
    return hit


def parse_caption(text: str) -> list[str]:
    """Tags of a caption's first line (what trainers read), in order, blanks dropped."""
    first = text.splitlines()[0] if text else ""
    return [t for t in (" ".join(part.split()) for part in first.split(",")) if t]


def format_caption(tags: list[str]) -> str:
    return ", ".join(tags)


def dedupe(tags: list[str]) -> list[str]:
    """Tags in order without exact repeats (compared case-insensitively)."""
    seen: set[str] = set()
    out = []
    for t in tags:
        key = normalize(t)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def put_first(tags: list[str], tag: str) -> list[str]:
    """`tag` moved (or added) to the front, once."""
    key = normalize(tag)
    return [tag] + [t for t in tags if normalize(t) != key]
