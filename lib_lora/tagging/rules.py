"""Tag rules: the tutorial's step-4 editing rules as pure functions over tag lists.

Every rule takes a caption's tags and returns a `TagDiff` (before, after, what was removed and
why, what was added); nothing here touches files except `preview_preset`/`apply_preset`,
which read captions through an `EditSession` (and write through it, journaled, for apply).
The word lists are data files in `lib_lora/tagging/data/`, editable by users.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lib_lora.errors import UserError
from lib_lora.tagging.tagtext import _NORMALIZED, normalize, put_first

if TYPE_CHECKING:
    from lib_lora.tagging.session import EditSession

DATA_DIR = Path(__file__).parent / "data"

REASON_META = "file metadata, not picture content"
REASON_INTRINSIC = "intrinsic feature (learned by the trigger word)"
REASON_STYLE = "names the style (learned by the trigger word)"
REASON_OBJECT = "generic object tag (the trigger word names it)"


# ------------------------------------------------------------------------------------------ data


def read_list(path: Path) -> list[str]:
    """One tag per line; `#` starts a comment line; blank lines ignored."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(normalize(line))
    return out


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """Lines `left > right` (comments and blanks ignored); a malformed line is a UserError."""
    pairs = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"Cannot read {path}: {err}. Give a UTF-8 text file with 'specific > general' lines.") from err
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        left, sep, right = line.partition(" > ")
        if not sep or not left.strip() or not right.strip():
            raise UserError(f"{path} line {n}: expected 'tag > tag', got {line!r}.")
        pairs.append((normalize(left), normalize(right)))
    return pairs


def implication_closure(pairs: Iterable[tuple[str, str]]) -> dict[str, frozenset[str]]:
    """specific -> every tag it implies, following chains (cycles are harmless)."""
    direct: dict[str, set[str]] = {}
    for a, b in pairs:
        if a != b:
            direct.setdefault(a, set()).add(b)
    closure: dict[str, frozenset[str]] = {}
    for start in direct:
        seen: set[str] = set()
        stack = list(direct[start])
        while stack:
            t = stack.pop()
            if t in seen or t == start:
                continue
            seen.add(t)
            stack.extend(direct.get(t, ()))
        closure[start] = frozenset(seen)
    return closure


@dataclass(frozen=True)
class TagData:
    """The word lists and tables the rules use (all tags normalised)."""

    face_parts: frozenset[str]
    character_marks: frozenset[str]
    gender: frozenset[str]
    expressions: frozenset[str]
    colour_words: frozenset[str]
    meta: frozenset[str]
    style: frozenset[str]
    objects: frozenset[str]
    backgrounds: frozenset[str]
    implies: dict[str, frozenset[str]]
    aliases: dict[str, str]
    n_implications: int = 0
    _protect_cache: dict[str, bool] = field(default_factory=dict, compare=False, repr=False)

    def is_colour(self, tag: str) -> bool:
        return any(w in self.colour_words for w in re.split(r"[\s\-_]+", normalize(tag)))

    def is_protected(self, tag: str) -> bool:
        """Gender tags, expressions and colours: no automatic rule removes them."""
        key = normalize(tag)
        hit = self._protect_cache.get(key)
        if hit is None:
            hit = key in self.gender or key in self.expressions or self.is_colour(key)
            self._protect_cache[key] = hit
        return hit


def load_data(implications_file: str | Path | None = None, aliases_file: str | Path | None = None) -> TagData:
    """The shipped lists, plus a user's implication/alias files when given."""
    return _load_data(str(implications_file or ""), str(aliases_file or ""))


@functools.lru_cache(maxsize=8)
def _load_data(implications_file: str, aliases_file: str) -> TagData:
    def lst(name: str) -> frozenset[str]:
        return frozenset(read_list(DATA_DIR / name))

    pairs = read_pairs(DATA_DIR / "implications.txt")
    if implications_file:
        pairs += read_pairs(Path(implications_file))
    aliases = dict(read_pairs(DATA_DIR / "aliases.txt"))
    if aliases_file:
        aliases.update(read_pairs(Path(aliases_file)))
    return TagData(
        face_parts=lst("face_parts.txt"), character_marks=lst("character_marks.txt"), gender=lst("gender.txt"),
        expressions=lst("expressions.txt"), colour_words=lst("colours.txt"), meta=lst("meta_tags.txt"),
        style=lst("style_tags.txt"), objects=lst("object_tags.txt"), backgrounds=lst("backgrounds.txt"),
        implies=implication_closure(pairs), aliases=aliases, n_implications=len(set(pairs)),
    )


# ----------------------------------------------------------------------------------------- diffs


@dataclass(frozen=True)
class TagDiff:
    """One caption's change: `removed` holds (tag, reason) pairs, `added` the new tags."""

    before: tuple[str, ...]
    after: tuple[str, ...]
    removed: tuple[tuple[str, str], ...] = ()
    added: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return self.before != self.after

    def then(self, nxt: TagDiff) -> TagDiff:
        """This diff followed by `nxt` (whose `before` is this one's `after`)."""
        added_now = {normalize(t) for t in nxt.added}
        removed_keys = {normalize(t) for t, _ in nxt.removed}
        removed = [r for r in self.removed if normalize(r[0]) not in added_now] + [
            r for r in nxt.removed if normalize(r[0]) not in {normalize(a) for a in self.added}
        ]
        added = [a for a in self.added if normalize(a) not in removed_keys] + [
            a for a in nxt.added if normalize(a) not in {normalize(t) for t, _ in self.removed}
        ]
        return TagDiff(self.before, nxt.after, tuple(removed), tuple(added))


def _diff(before: list[str], after: list[str], reasons: dict[str, str]) -> TagDiff:
    after_keys = {normalize(t) for t in after}
    before_keys = {normalize(t) for t in before}
    removed = tuple((t, reasons.get(normalize(t), "removed")) for t in before if normalize(t) not in after_keys)
    added = tuple(t for t in after if normalize(t) not in before_keys)
    return TagDiff(tuple(before), tuple(after), removed, added)


def unchanged(tags: list[str]) -> TagDiff:
    return TagDiff(tuple(tags), tuple(tags))


# ----------------------------------------------------------------------------------------- rules


def remove_duplicates(tags: list[str], data: TagData) -> TagDiff:
    """Exact repeats go; an alias becomes its tag, or goes when the tag is already there."""
    out: list[str] = []
    seen: set[str] = set()
    reasons: dict[str, str] = {}
    for t in tags:
        key = normalize(t)
        canon = data.aliases.get(key)
        if canon is not None and canon != key:
            reasons[key] = f"alias of '{canon}'"
            if canon in seen or any(normalize(x) == canon for x in tags):
                continue
            t, key = canon, canon
        if key in seen:
            continue
        seen.add(key)
        out.append(t)
    return _diff(tags, out, reasons) if out != tags else unchanged(tags)


def remove_listed(tags: list[str], listed: frozenset[str] | set[str], reason: str, data: TagData,
                  keep: Iterable[str] = ()) -> TagDiff:
    """Remove the tags in `listed`, except protected ones (gender, expression, colour) and `keep`."""
    keep_keys = {normalize(k) for k in keep}
    out, reasons = [], {}
    for t in tags:
        key = normalize(t)
        if key in listed and key not in keep_keys and not data.is_protected(key):
            reasons[key] = reason
        else:
            out.append(t)
    return _diff(tags, out, reasons) if reasons else unchanged(tags)


def remove_intrinsic(tags: list[str], data: TagData, character: bool = False, keep: Iterable[str] = ()) -> TagDiff:
    """Face parts that belong to the person (lips, nose, ...); with character=True also drawn marks."""
    listed = data.face_parts | data.character_marks if character else data.face_parts
    return remove_listed(tags, listed, REASON_INTRINSIC, data, keep)


def remove_implied(tags: list[str], data: TagData, keep: Iterable[str] = ()) -> TagDiff:
    """A less specific tag goes when a more specific one implies it (`baseball cap` drops `hat`)."""
    keys = [normalize(t) for t in tags]
    implied_by: dict[str, str] = {}
    for k in keys:
        for general in data.implies.get(k, ()):
            implied_by.setdefault(general, k)
    if not implied_by:
        return unchanged(tags)
    keep_keys = {normalize(k) for k in keep}
    out, reasons = [], {}
    for t, k in zip(tags, keys, strict=True):
        src = implied_by.get(k)
        if src is not None and k not in keep_keys and not data.is_protected(k):
            reasons[k] = f"implied by '{src}'"
        else:
            out.append(t)
    return _diff(tags, out, reasons) if reasons else unchanged(tags)


def apply_blacklist(tags: list[str], blacklist: Iterable[str], data: TagData, keep: Iterable[str] = ()) -> TagDiff:
    """The user's blacklist: removed whatever they are, except gender tags and `keep` (the whitelist)."""
    black = {normalize(b) for b in blacklist} - {normalize(k) for k in keep} - data.gender
    out = [t for t in tags if normalize(t) not in black]
    return _diff(tags, out, {b: "blacklisted" for b in black}) if len(out) != len(tags) else unchanged(tags)


def replace_tags(tags: list[str], mapping: dict[str, str]) -> TagDiff:
    """Rename tags in place (`{'old': 'new'}`); an empty new name removes the tag."""
    table = {normalize(k): v.strip() for k, v in mapping.items()}
    out: list[str] = []
    reasons = {}
    for t in tags:
        new = table.get(normalize(t))
        if new is None:
            out.append(t)
        else:
            reasons[normalize(t)] = f"replaced by '{new}'" if new else "replaced by nothing"
            if new and normalize(new) not in {normalize(x) for x in out}:
                out.append(new)
    return _diff(tags, out, reasons) if out != tags else unchanged(tags)


def pin_trigger(tags: list[str], trigger: str | None) -> TagDiff:
    """The trigger word first (added if missing)."""
    if not trigger or not trigger.strip():
        return unchanged(tags)
    out = put_first(tags, trigger.strip())
    return _diff(tags, out, {}) if out != tags else unchanged(tags)


# --------------------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Preset:
    name: str
    explanation: str
    intrinsic: bool = False
    character_marks: bool = False
    style: bool = False
    objects: bool = False


PRESETS: dict[str, Preset] = {
    "person": Preset(
        "person",
        "Removes face parts that belong to the person (lips, nose, eyelashes, moles) and tags implied by a more "
        "precise one (hat when baseball cap); keeps expressions, hair/eye colours, clothes, accessories and background.",
        intrinsic=True,
    ),
    "character": Preset(
        "character",
        "Like person, plus drawn marks that define the character (fang, facial mark, pointy ears), so the trigger "
        "word learns them; outfits, colours and expressions stay promptable.",
        intrinsic=True, character_marks=True,
    ),
    "style": Preset(
        "style",
        "Removes the tags that name the style or medium (realistic, sketch, watercolor) so the trigger word carries "
        "the style; keeps every content tag and only drops implied duplicates.",
        style=True,
    ),
    "object": Preset(
        "object",
        "Removes generic 'a picture of a thing' tags (still life, object focus, no humans) and implied duplicates; "
        "the trigger word names the object, everything around it stays described.",
        objects=True,
    ),
    "none": Preset("none", "Only the basics: exact and alias duplicates, file-meta tags, your blacklist and the trigger word."),
}


_LISTED: dict[tuple[Preset, int], tuple[TagData, dict[str, str]]] = {}


def _listed(p: Preset, data: TagData) -> dict[str, str]:
    """Every tag the preset's list rules remove, with its reason (later lists win, as in run_preset_stepwise)."""
    hit = _LISTED.get((p, id(data)))
    if hit is not None and hit[0] is data:
        return hit[1]
    out = dict.fromkeys(data.meta, REASON_META)
    if p.intrinsic:
        out.update(dict.fromkeys(data.face_parts | data.character_marks if p.character_marks else data.face_parts,
                                 REASON_INTRINSIC))
    if p.style:
        out.update(dict.fromkeys(data.style, REASON_STYLE))
    if p.objects:
        out.update(dict.fromkeys(data.objects, REASON_OBJECT))
    if len(_LISTED) > 64:
        _LISTED.clear()
    _LISTED[(p, id(data))] = (data, out)
    return out


def run_preset(tags: list[str], preset: str | Preset, data: TagData | None = None, trigger: str | None = None,
               blacklist: Iterable[str] = (), whitelist: Iterable[str] = (),
               replace: dict[str, str] | None = None) -> TagDiff:
    """All of a preset's rules on one caption, as one diff.

    The same result as running the rule functions one after another (`run_preset_stepwise`,
    checked by the tests), in one pass over the tags: 10,000 captions take well under 0.5 s."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    data = data or load_data()
    if replace:
        return run_preset_stepwise(tags, p, data, trigger, blacklist, whitelist, replace)
    keep = {normalize(k) for k in whitelist}
    if trigger:
        keep.add(normalize(trigger))
    black = {normalize(b) for b in blacklist} - keep - data.gender
    listed = _listed(p, data)
    aliases, protected = data.aliases, data.is_protected
    reasons: dict[str, str] = {}
    # 1. exact and alias duplicates
    memo = _NORMALIZED
    keys = [memo.get(t) or normalize(t) for t in tags]
    present = set(keys)
    seen: set[str] = set()
    cur: list[tuple[str, str]] = []
    for t, k in zip(tags, keys, strict=True):
        canon = aliases.get(k)
        if canon is not None and canon != k:
            reasons[k] = f"alias of '{canon}'"
            if canon in seen or canon in present:
                continue
            t, k = canon, canon
        if k not in seen:
            seen.add(k)
            cur.append((t, k))
    # 2. listed tags (meta, intrinsic, style, object), never protected ones
    kept = []
    for t, k in cur:
        why = listed.get(k)
        if why is not None and k not in keep and not protected(k):
            reasons[k] = why
        else:
            kept.append((t, k))
    # 3. tags implied by a more specific one that is still there
    if p.name != "none":
        implies = data.implies
        implied_by: dict[str, str] = {}
        for _, k in kept:
            for general in implies.get(k, ()):
                implied_by.setdefault(general, k)
        if implied_by:
            rest = []
            for t, k in kept:
                src = implied_by.get(k)
                if src is not None and k not in keep and not protected(k):
                    reasons[k] = f"implied by '{src}'"
                else:
                    rest.append((t, k))
            kept = rest
    # 4. blacklist, 5. trigger first
    final = [(t, k) for t, k in kept if k not in black]
    if len(final) != len(kept):
        reasons.update(dict.fromkeys(black, "blacklisted"))
    if trigger and trigger.strip():
        tk = normalize(trigger)
        final = [(trigger.strip(), tk)] + [(t, k) for t, k in final if k != tk]
    after = [t for t, _ in final]
    if after == tags:
        return unchanged(tags)
    after_keys = {k for _, k in final}
    removed = tuple((t, reasons.get(k, "removed")) for t, k in zip(tags, keys, strict=True) if k not in after_keys)
    added = tuple(t for t, k in final if k not in present)
    return TagDiff(tuple(tags), tuple(after), removed, added)


def run_preset_stepwise(tags: list[str], preset: str | Preset, data: TagData | None = None, trigger: str | None = None,
                        blacklist: Iterable[str] = (), whitelist: Iterable[str] = (),
                        replace: dict[str, str] | None = None) -> TagDiff:
    """A preset as the plain composition of the rule functions (the reference for run_preset)."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    data = data or load_data()
    keep = [*whitelist, *([trigger] if trigger else [])]
    diff = unchanged(tags)

    def step(result: TagDiff) -> None:
        nonlocal diff
        if result.changed:
            diff = diff.then(result)

    step(remove_duplicates(list(diff.after), data))
    if replace:
        step(replace_tags(list(diff.after), replace))
    step(remove_listed(list(diff.after), data.meta, REASON_META, data, keep))
    if p.intrinsic:
        step(remove_intrinsic(list(diff.after), data, character=p.character_marks, keep=keep))
    if p.style:
        step(remove_listed(list(diff.after), data.style, REASON_STYLE, data, keep))
    if p.objects:
        step(remove_listed(list(diff.after), data.objects, REASON_OBJECT, data, keep))
    if p.name != "none":
        step(remove_implied(list(diff.after), data, keep))
    step(apply_blacklist(list(diff.after), blacklist, data, keep))
    step(pin_trigger(list(diff.after), trigger))
    return diff


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"Unknown tag preset {name!r}; choose one of {', '.join(PRESETS)}.") from None


# ------------------------------------------------------------------------------- dataset level


@dataclass
class DatasetDiff:
    """A preset's effect on a whole folder: one TagDiff per caption file name."""

    preset: str
    diffs: dict[str, TagDiff]
    problems: list[str] = field(default_factory=list)

    @property
    def changed(self) -> dict[str, TagDiff]:
        return {k: d for k, d in self.diffs.items() if d.changed}

    def totals(self) -> tuple[Counter, Counter]:
        """(removed tag -> images, added tag -> images)."""
        removed: Counter = Counter()
        added: Counter = Counter()
        for d in self.diffs.values():
            removed.update({t for t, _ in d.removed})
            added.update(set(d.added))
        return removed, added

    def format(self, max_images: int | None = None) -> str:
        lines = []
        changed = self.changed
        for i, (name, d) in enumerate(sorted(changed.items())):
            if max_images is not None and i >= max_images:
                lines.append(f"... and {len(changed) - max_images} more images")
                break
            parts = [f"-{t} ({why})" for t, why in d.removed] + [f"+{t}" for t in d.added]
            lines.append(f"{name}: " + "; ".join(parts))
        removed, added = self.totals()
        lines.append(f"preset {self.preset}: {len(changed)} of {len(self.diffs)} captions change; "
                     f"{sum(removed.values())} tags removed, {sum(added.values())} added.")
        if removed:
            lines.append("removed: " + ", ".join(f"{t} x{n}" for t, n in removed.most_common(20)))
        if added:
            lines.append("added: " + ", ".join(f"{t} x{n}" for t, n in added.most_common(20)))
        lines.extend(f"skipped: {p}" for p in self.problems)
        return "\n".join(lines)


def diff_captions(captions: dict[str, list[str]], preset: str, trigger: str | None = None,
                  data: TagData | None = None, **kw: object) -> DatasetDiff:
    """A preset over many captions in memory (no I/O). Images without a caption are left alone."""
    data = data or load_data()
    p = get_preset(preset)
    return DatasetDiff(preset, {name: run_preset(tags, p, data, trigger, **kw) for name, tags in captions.items() if tags})


def preview_preset(image_dir: str | Path, preset: str, trigger: str | None = None, **kw: object) -> DatasetDiff:
    """What the preset would change in a folder's captions; nothing is written."""
    from lib_lora.tagging.session import EditSession

    session = EditSession(image_dir)
    return _session_diff(session, preset, trigger, kw)


def _session_diff(session: EditSession, preset: str, trigger: str | None, kw: dict) -> DatasetDiff:
    data = load_data(kw.pop("implications_file", None), kw.pop("aliases_file", None))
    if trigger and session.trigger and normalize(session.trigger) != normalize(trigger):
        kw = {**kw, "replace": {**(kw.get("replace") or {}), session.trigger: trigger}}  # a renamed trigger
    diff = diff_captions(session.captions, preset, trigger, data, **kw)
    diff.problems = list(session.problems)
    return diff


def apply_preset(image_dir: str | Path, preset: str, trigger: str | None = None, **kw: object) -> DatasetDiff:
    """Apply the preset to a folder's captions, as one undoable step of its edit journal."""
    from lib_lora.tagging.session import EditSession

    session = EditSession(image_dir)
    diff = _session_diff(session, preset, trigger, kw)
    if trigger:
        session.set_trigger(trigger, apply=False)
    session.apply_diff(diff, label=f"preset {preset}" + (f" (trigger {trigger})" if trigger else ""))
    return diff
