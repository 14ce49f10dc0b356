"""The edit session: bulk edits, filters, undo/redo journaled on disk, byte-exact restores."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from PIL import Image

from lib_lora.errors import UserError
from lib_lora.tagging.session import STATE_DIR, EditSession


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def ds(tmp_path: Path) -> Path:
    d = tmp_path / "10_test"
    d.mkdir()
    captions = {
        "a": b"1girl, smile, long hair, hat, baseball cap",
        "b": b"1girl, open mouth, short hair, shirt\n",            # trailing newline kept
        "c": b"\xef\xbb\xbf1boy, glasses, smile\r\nsecond line stays\r\n",  # BOM + CRLF + extra line
        "d": b"1girl,solo,  red dress ,necklace,jewelry",          # odd spacing
        "e": None,                                                   # no caption yet
        "f": "1girl, 微笑, hand on own cheek".encode(),
    }
    for stem, data in captions.items():
        Image.new("RGB", (8, 8), (10, 20, 30)).save(d / f"{stem}.png")
        if data is not None:
            (d / f"{stem}.txt").write_bytes(data)
    return d


def test_load_and_frequencies(ds: Path) -> None:
    s = EditSession(ds)
    assert s.captions["d.png"] == ["1girl", "solo", "red dress", "necklace", "jewelry"]
    assert s.captions["c.png"] == ["1boy", "glasses", "smile"]
    assert s.captions["e.png"] == []
    freq = dict(s.frequencies())
    assert freq["1girl"] == 4 and freq["smile"] == 2
    assert s.frequencies()[0] == ("1girl", 4)
    assert s.display("long hair") == "long hair (长发)"
    assert s.display("zzz unknown") == "zzz unknown"


def test_filters(ds: Path) -> None:
    s = EditSession(ds)
    assert s.filter(all_of=["1girl", "smile"]) == ["a.png"]
    assert s.filter(any_of=["1boy", "red dress"]) == ["c.png", "d.png"]
    assert s.filter(all_of=["1girl"], none_of=["smile"]) == ["b.png", "d.png", "f.png"]
    assert s.filter(any_of=["hair"], substring=True) == ["a.png", "b.png"]
    # Chinese: 长发 is long hair; 帽 matches hat / baseball cap by substring.
    assert s.filter(all_of=["长发"]) == ["a.png"]
    assert s.filter(any_of=["帽"], substring=True) == ["a.png"]


def test_bulk_edits_then_undo_restores_bytes(ds: Path) -> None:
    before = snapshot(ds)
    s = EditSession(ds)
    assert s.add("straw", names=["a.png", "e.png"]) == 2
    assert s.remove(["smile"]) == 2
    assert s.replace("long hair", "very long hair, hair ornament") == 1
    assert s.replace(r"^(.*) hair$", r"\1-hair", regex=True, names=s.filter(all_of=["1girl"])) == 2
    assert s.move_to_front("shirt") == 1
    assert s.set_tags("d.png", "1girl, red dress") == 1
    assert (ds / "e.txt").read_text(encoding="utf-8") == "straw"
    assert (ds / "c.txt").read_bytes() == b"\xef\xbb\xbf1boy, glasses\r\nsecond line stays\r\n"
    assert (ds / "b.txt").read_bytes() == b"shirt, 1girl, open mouth, short-hair\n"
    assert len(s.history()) == 6
    # A new session (the editor was closed) can still undo everything.
    s2 = EditSession(ds)
    while s2.undo():
        pass
    assert snapshot(ds) == before
    # ...and redo it all.
    while s2.redo():
        pass
    assert s2.captions == s.captions


def test_random_edit_sequences_undo_byte_for_byte(ds: Path) -> None:
    rng = random.Random(7)
    vocab = ["1girl", "smile", "hat", "shirt", "new tag", "帽子", "long hair", "x_x"]
    original = snapshot(ds)
    s = EditSession(ds)
    states = [snapshot(ds)]
    for _ in range(40):
        names = rng.sample(s.names(), rng.randint(1, 4))
        op = rng.choice(["add", "remove", "replace", "front", "set", "regex", "undo"])
        if op == "add":
            s.add(rng.sample(vocab, 2), names=names, front=rng.random() < 0.5)
        elif op == "remove":
            s.remove(rng.sample(vocab, 2), names=names)
        elif op == "replace":
            s.replace(rng.choice(vocab), rng.choice(vocab), names=names)
        elif op == "front":
            s.move_to_front(rng.choice(vocab), names=names)
        elif op == "set":
            s.set_tags(names[0], rng.sample(vocab, 3))
        elif op == "regex":
            s.replace(r"a", "A", regex=True, names=names)
        else:
            if s.undo():
                states.pop()
            continue
        if snapshot(ds) != states[-1]:
            states.append(snapshot(ds))
    while len(states) > 1:
        assert snapshot(ds) == states[-1]
        assert s.undo() is not None
        states.pop()
    assert snapshot(ds) == original
    assert s.undo() is None


def test_corrupt_caption_is_reported_and_untouched(ds: Path) -> None:
    (ds / "g.png").write_bytes((ds / "a.png").read_bytes())
    (ds / "g.txt").write_bytes(b"1girl, \xff\xfe caf\xe9")   # latin-1, not UTF-8
    (ds / "h.png").write_bytes((ds / "a.png").read_bytes())
    (ds / "h.txt").write_bytes(b"\x00\x01\x02binary")
    s = EditSession(ds)
    assert any("g.txt" in p and "UTF-8" in p for p in s.problems)
    assert any("h.txt" in p and "binary" in p for p in s.problems)
    assert "g.png" not in s.captions and "h.png" not in s.captions
    s.add("extra")
    s.remove("1girl")
    s.set_trigger("Zed")
    assert (ds / "g.txt").read_bytes() == b"1girl, \xff\xfe caf\xe9"
    assert (ds / "h.txt").read_bytes() == b"\x00\x01\x02binary"
    with pytest.raises(UserError, match="No editable caption"):
        s.set_tags("g.png", "x")


def test_trigger_is_pinned(ds: Path) -> None:
    s = EditSession(ds)
    s.set_trigger("Zed")
    assert all(tags[0] == "Zed" for tags in s.captions.values())
    s.remove("Zed")                       # the pinned trigger survives a remove
    s.move_to_front("1girl")
    s.add("first", front=True)
    assert all(tags[0] == "Zed" for tags in s.captions.values())
    assert EditSession(ds).trigger == "Zed"
    with pytest.raises(UserError, match="comma"):
        s.set_trigger("a, b")


def test_changed_outside_is_not_overwritten(ds: Path) -> None:
    s = EditSession(ds)
    s.add("added")
    (ds / "a.txt").write_text("edited by hand", encoding="utf-8")
    with pytest.raises(UserError, match="changed outside the editor"):
        s.undo()
    assert (ds / "a.txt").read_text(encoding="utf-8") == "edited by hand"
    assert s.undo(force=True) == "add added"


def test_crash_mid_step_is_rolled_back(ds: Path) -> None:
    before = snapshot(ds)
    s = EditSession(ds)
    s.add("kept")
    after_first = snapshot(ds)
    # Simulate a crash: a journaled step marked pending with half of its files written.
    s.add("lost")
    journal = ds / STATE_DIR / "journal"
    state = json.loads((journal / "state.json").read_text())
    state.update(position=1, pending=2)
    (journal / "state.json").write_text(json.dumps(state))
    (ds / "b.txt").write_bytes(after_first["b.txt"])  # this file had not been written yet
    s2 = EditSession(ds)
    assert snapshot(ds) == after_first
    assert [h[1] for h in s2.history()] == ["add kept"]
    s2.undo()
    assert snapshot(ds) == before


def test_originals_kept_until_accept(ds: Path) -> None:
    before = snapshot(ds)
    s = EditSession(ds)
    s.add("one")
    s.remove("1girl")
    s.undo()
    assert s.originals()["a.png"] == before["a.txt"]
    assert s.originals()["e.png"] is None
    assert s.revert_to_original() == 6
    assert snapshot(ds) == before
    s.undo()  # the revert itself can be undone
    assert (ds / "a.txt").read_text(encoding="utf-8").endswith("one")
    s.accept()
    assert s.history() == [] and not s.can_undo() and s.undo() is None
    assert (ds / "a.txt").read_text(encoding="utf-8").endswith("one")


def test_new_edit_discards_redo(ds: Path) -> None:
    s = EditSession(ds)
    s.add("x")
    s.add("y")
    s.undo()
    assert s.can_redo()
    s.add("z")
    assert not s.can_redo()
    assert [h[1] for h in s.history()] == ["add x", "add z"]


def test_bulk_path_many_files(tmp_path: Path) -> None:
    """More than 16 files take the one-flush bulk writer; same guarantees, no temporary files left."""
    d = tmp_path / "5_many"
    d.mkdir()
    px = tmp_path / "px.png"
    Image.new("RGB", (1, 1)).save(px)
    for i in range(40):
        (d / f"{i:02d}.png").write_bytes(px.read_bytes())
        if i % 5:
            (d / f"{i:02d}.txt").write_text(f"1girl, tag{i % 3}, smile", encoding="utf-8")
    before = snapshot(d)
    s = EditSession(d)
    assert s.add("bulk") == 40
    assert s.remove("smile") == 32
    assert all((d / f"{i:02d}.txt").read_text(encoding="utf-8").endswith("bulk") for i in range(40))
    assert not [p for p in d.iterdir() if "fastlora-tmp" in p.name]
    s.undo()
    s.undo()
    assert snapshot(d) == before
