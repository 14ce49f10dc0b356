"""FileMemo: what the live step count remembers of each file, and when it forgets."""

from __future__ import annotations

import os
from pathlib import Path

from lib_lora.filememo import FileMemo


def test_a_file_is_read_again_only_when_it_changes(tmp_path: Path) -> None:
    reads: list[str] = []

    def read(path: Path) -> str:
        reads.append(path.name)
        return path.read_text() if path.exists() else "gone"

    memo = FileMemo(read)
    a = tmp_path / "a.txt"
    a.write_text("one")
    assert memo(a) == "one" and memo(a) == "one" and reads == ["a.txt"]
    # Same size, and the old mtime put back (as cp -p or rsync -t do): still a new version.
    st = a.stat()
    a.write_text("two")
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert memo(a) == "two" and reads == ["a.txt", "a.txt"]
    # Replaced by a rename (how atomic writers save).
    tmp = tmp_path / "a.tmp"
    tmp.write_text("six")
    tmp.replace(a)
    assert memo(a) == "six" and len(reads) == 3
    a.unlink()
    assert memo(a) == "gone" and memo(a) == "gone" and len(reads) == 5  # nothing to remember of a missing file


def test_the_least_recently_used_go_first(tmp_path: Path) -> None:
    reads: list[str] = []
    memo = FileMemo(lambda p: reads.append(p.name) or p.name, limit=2)
    files = [tmp_path / f"{i}.txt" for i in range(3)]
    for f in files:
        f.write_text(f.name)
    memo(files[0]), memo(files[1]), memo(files[0]), memo(files[2])  # 1 is the least recently used
    assert len(memo) == 2
    memo(files[0])
    memo(files[1])
    assert reads == ["0.txt", "1.txt", "2.txt", "1.txt"]
