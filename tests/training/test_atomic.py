"""Temporaries of killed writers are cleaned up; those of a writer still running are not."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from lib_lora.atomic import TMP_MARK, atomic_write_text, cleanup_stale_temps, tmp_name


def test_cleanup_skips_temps_of_live_writers(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "sub").mkdir()
        live_tmp = tmp_path / f".a.json{TMP_MARK}{live.pid}-abcd1234"
        dead_tmp = tmp_path / f".b.json{TMP_MARK}{dead.pid}-abcd1234"
        deep_tmp = tmp_path / "sub" / f".c.json{TMP_MARK}{dead.pid}-abcd1234"
        own_tmp = tmp_name(tmp_path / "d.json")  # this process: it is starting, so none of ours is live
        odd_tmp = tmp_path / f".e.json{TMP_MARK}nopid"
        for p in (live_tmp, dead_tmp, deep_tmp, own_tmp, odd_tmp):
            p.write_text("x")
        atomic_write_text(tmp_path / "kept.json", "{}")
        assert set(cleanup_stale_temps(tmp_path)) == {dead_tmp, own_tmp, odd_tmp}
        assert live_tmp.exists() and deep_tmp.exists() and (tmp_path / "kept.json").exists()
        assert cleanup_stale_temps(tmp_path, recursive=True) == [deep_tmp]
        assert live_tmp.exists()
    finally:
        live.kill()
        live.wait()
    assert cleanup_stale_temps(tmp_path) == [live_tmp]
