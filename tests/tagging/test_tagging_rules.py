"""The tag rules: the tutorial's example, protected tags, implications, aliases, presets."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from lib_lora.errors import UserError
from lib_lora.tagging import rules
from lib_lora.tagging.rules import (
    PRESETS,
    apply_blacklist,
    load_data,
    remove_duplicates,
    remove_implied,
    remove_intrinsic,
    replace_tags,
    run_preset,
)

from .conftest import FIXTURES

EXAMPLE = json.loads((FIXTURES / "tag_edit_example.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def data() -> rules.TagData:
    return load_data()


def test_tutorial_example_person_preset(data: rules.TagData) -> None:
    diff = run_preset(EXAMPLE["auto"], "person", data, trigger="ZhangNaYing")
    after = set(diff.after)
    for tag in EXAMPLE["rules_must_remove"]:
        assert tag not in after, tag
    for tag in EXAMPLE["rules_must_keep"]:
        assert tag in after, tag
    assert diff.after[0] == "ZhangNaYing"
    reasons = dict(diff.removed)
    assert reasons["hat"] == "implied by 'baseball cap'"
    assert reasons["hand on own face"] == "implied by 'hand on own cheek'"
    assert "intrinsic" in reasons["lips"]
    # Nothing outside the tutorial's own removals and the judgment calls is touched.
    assert set(reasons) <= set(EXAMPLE["removed_by_tutorial"]) | set(EXAMPLE["either"])


def test_tutorial_example_character_preset_too(data: rules.TagData) -> None:
    after = set(run_preset(EXAMPLE["auto"], "character", data).after)
    assert not after & set(EXAMPLE["rules_must_remove"])
    assert set(EXAMPLE["rules_must_keep"]) <= after


def test_shipped_tables_are_big_enough(data: rules.TagData) -> None:
    assert data.n_implications >= 500
    assert len(data.aliases) >= 80
    for specific, general in [("baseball cap", "hat"), ("hand on own cheek", "hand on own face"),
                              ("white shirt", "shirt"), ("katana", "weapon"), ("black cat", "animal")]:
        assert general in data.implies[specific]
    # The tutorial keeps `jewelry` beside `necklace`: no implication may remove it.
    assert not any("jewelry" in g for g in data.implies.values())


@pytest.mark.parametrize("preset", list(PRESETS))
def test_rules_never_remove_gender_expression_or_colour(data: rules.TagData, preset: str) -> None:
    """Protected tags survive every preset, mixed with every tag the rules know how to remove."""
    protected = sorted(data.gender | data.expressions) + [
        "blue headwear", "red lips", "white shirt", "brown eyes", "blonde hair", "grey background", "black-framed eyewear",
        "pink lips", "white background", "light blue hair", "multicolored hair"]
    removable = sorted(data.face_parts | data.character_marks | data.style | data.objects | data.meta)
    specifics = sorted(data.implies)
    generals = sorted({g for gs in data.implies.values() for g in gs})
    rng = random.Random(1234)
    for _ in range(300):
        tags = rng.sample(protected, 8) + rng.sample(removable, 6) + rng.sample(specifics, 4) + rng.sample(generals, 6)
        rng.shuffle(tags)
        diff = run_preset(tags, preset, data, trigger="trig")
        removed = {t for t, _ in diff.removed}
        assert not removed & set(protected), removed & set(protected)
        assert diff.after[0] == "trig"


def test_protected_even_from_user_implications(tmp_path: Path) -> None:
    extra = tmp_path / "imp.txt"
    extra.write_text("# mine\nsmile > 1girl\ngrin > smile\nmy hat > blue headwear\nmy hat > beanie\n", encoding="utf-8")
    data = load_data(implications_file=extra)
    diff = remove_implied(["1girl", "smile", "grin", "my hat", "blue headwear", "beanie"], data)
    assert [t for t, _ in diff.removed] == ["beanie"]
    bad = tmp_path / "bad.txt"
    bad.write_text("no arrow here\n", encoding="utf-8")
    with pytest.raises(UserError, match="line 1"):
        load_data(implications_file=bad)


def test_implied_chain_and_case(data: rules.TagData) -> None:
    diff = remove_implied(["Katana", "sword", "weapon", "holding sword", "holding weapon", "holding"], data)
    assert list(diff.after) == ["Katana", "holding sword"]


def test_duplicates_and_aliases(data: rules.TagData) -> None:
    diff = remove_duplicates(["smile", "Smile", "jewellery", "jewelry", "hand on cheek", "1girl"], data)
    assert list(diff.after) == ["smile", "jewelry", "hand on own cheek", "1girl"]
    assert ("jewellery", "alias of 'jewelry'") in diff.removed
    assert diff.added == ("hand on own cheek",)


def test_intrinsic_keeps_expressions(data: rules.TagData) -> None:
    tags = ["lips", "parted lips", "teeth", "clenched teeth", "nose", "nose blush", "open mouth", "mouth", "red lips"]
    after = remove_intrinsic(tags, data).after
    assert list(after) == ["parted lips", "clenched teeth", "nose blush", "open mouth", "red lips"]
    assert "fang" in remove_intrinsic(["fang", "smile"], data, character=True).removed[0]
    assert remove_intrinsic(["fang"], data).after == ("fang",)


def test_blacklist_whitelist_replace(data: rules.TagData) -> None:
    assert list(apply_blacklist(["1girl", "smile", "dog"], ["dog", "smile", "1girl"], data).after) == ["1girl"]
    diff = run_preset(["1girl", "lips", "hat", "baseball cap", "dog"], "person", data,
                      blacklist=["dog"], whitelist=["lips"], replace={"baseball cap": "blue baseball cap"})
    # lips is whitelisted; the renamed cap no longer implies `hat`, so `hat` stays; dog is blacklisted.
    assert list(diff.after) == ["1girl", "lips", "hat", "blue baseball cap"]
    assert list(replace_tags(["a", "b", "c"], {"b": "x", "c": ""}).after) == ["a", "x"]


def test_style_and_object_presets(data: rules.TagData) -> None:
    style = run_preset(["1girl", "watercolor (medium)", "sketch", "lips", "absurdres", "smile"], "style", data)
    assert list(style.after) == ["1girl", "lips", "smile"]
    obj = run_preset(["no humans", "still life", "cup", "teacup", "table", "lips"], "object", data)
    assert list(obj.after) == ["teacup", "table", "lips"]
    for p in PRESETS.values():
        assert p.explanation and "\n" not in p.explanation


def test_dataset_diff_format_and_totals(data: rules.TagData) -> None:
    diff = rules.diff_captions({"a.png": EXAMPLE["auto"], "b.png": ["1girl", "smile"], "c.png": []}, "person", "Zed")
    removed, added = diff.totals()
    assert removed["lips"] == 1 and added["Zed"] == 2
    assert "c.png" not in diff.diffs  # an image without caption is left alone
    text = diff.format()
    assert "a.png: -" in text and "preset person: 2 of 2 captions change" in text


def test_unknown_preset() -> None:
    with pytest.raises(UserError, match="Unknown tag preset"):
        run_preset(["a"], "landscape")


@pytest.mark.parametrize("preset", list(PRESETS))
def test_fast_path_equals_stepwise_composition(data: rules.TagData, preset: str) -> None:
    """run_preset (one pass) gives what the rule functions give one after another."""
    pool = sorted(data.face_parts | data.meta | data.style | data.objects | set(data.aliases) | data.gender)
    pool += sorted(data.implies)[:300] + sorted({g for gs in data.implies.values() for g in gs}) + ["Smile", "smile", "x y"]
    rng = random.Random(99)
    for i in range(400):
        tags = rng.sample(pool, rng.randint(0, 30))
        tags += rng.sample(tags, min(len(tags), 2))  # exact duplicates
        kw = {"trigger": rng.choice([None, "trig", "hat"]), "blacklist": rng.sample(pool, 3) if i % 3 == 0 else (),
              "whitelist": rng.sample(pool, 3) if i % 4 == 0 else ()}
        fast = run_preset(tags, preset, data, **kw)
        slow = rules.run_preset_stepwise(tags, preset, data, **kw)
        assert fast.after == slow.after, tags
        assert set(fast.added) == set(slow.added)
        assert {t for t, _ in fast.removed} == {t for t, _ in slow.removed}
