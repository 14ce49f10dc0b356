"""Atomic writes: a temporary file in the target folder, fsync, then rename.

A reader (the WebUI scanning models/Lora, a resumed run) therefore sees either the old file
or the complete new one, never a partial file, even after kill -9 or a full disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

TMP_MARK = ".fastlora-tmp-"


def tmp_name(target: Path) -> Path:
    # Hidden and clearly ours, so `cleanup_stale_temps` can find leftovers of a killed run.
    return target.with_name(f".{target.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not supported on every platform/filesystem
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it is renamed onto `target`.

    On any exception the temporary file is removed and `target` is left as it was.
    With overwrite=False an existing target raises FileExistsError before anything is written.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite and target.exists():
        raise FileExistsError(target)
    tmp = tmp_name(target)
    try:
        yield tmp
        if tmp.exists():
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        if not overwrite:
            # Hard-link then unlink: fails instead of replacing if the target appeared meanwhile.
            os.link(tmp, target)
            os.unlink(tmp)
        else:
            os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def writable_folder(folder: str | os.PathLike, what: str) -> Path:
    """Create `folder` if needed and prove a file can be written in it; UserError saying why not.

    Asked before long work, so a read-only, full or over-long output path is found in seconds."""
    from lib_lora.errors import file_error

    folder = Path(folder)
    probe = tmp_name(folder / "write-check")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as fh:
            fh.write(b"\0")
    except OSError as err:
        raise file_error(err, folder, f"write {what} to the folder",
                         then="then start again (nothing was trained yet)") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return folder


def atomic_write_bytes(target: str | os.PathLike, data: bytes, overwrite: bool = True) -> Path:
    with atomic_path(target, overwrite=overwrite) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
    return Path(target)


def atomic_write_text(target: str | os.PathLike, text: str, overwrite: bool = True) -> Path:
    return atomic_write_bytes(target, text.encode("utf-8"), overwrite=overwrite)


def atomic_write_json(target: str | os.PathLike, obj: object, overwrite: bool = True) -> Path:
    return atomic_write_text(target, json.dumps(obj, indent=2, ensure_ascii=False) + "\n", overwrite=overwrite)


def cleanup_stale_temps(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Remove temporary files left by a killed writer. Returns what was removed.

    Temporaries of another process that is still running (a second run writing into the same
    folder) are left alone: their names carry the writer's pid (see `tmp_name`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = f"**/.*{TMP_MARK}*" if recursive else f".*{TMP_MARK}*"
    removed = []
    for p in folder.glob(pattern):
        pid_part = p.name.split(TMP_MARK, 1)[1].split("-", 1)[0]
        if pid_part.isdigit() and int(pid_part) != os.getpid() and _alive(int(pid_part)):
            continue
        with contextlib.suppress(OSError):
            p.unlink()
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
