"""Errors that speak to users: one sentence that says what went wrong and what to do."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from pathlib import Path


class UserError(Exception):
    """A problem the user can fix. `str(err)` is shown as is, without a traceback."""


class UnsafeNameError(UserError):
    """A name or path that would leave its folder or clobber something."""


class ModelLoadError(UserError):
    """A base model that is missing, truncated, of an unsupported kind or unsafe to load."""


class DatasetError(UserError):
    """A dataset that cannot be trained on (no images, bad layout...)."""


class Cancelled(Exception):
    """Raised by a step when its progress object reports cancellation."""


# ------------------------------------------------------------------ failed file operations
# Why a file operation failed and what to do, by errno: one table for every step and both hosts.
_ERRNO_WORDS = {
    "ENOSPC": ("the disk is full", "free some disk space"),
    "EDQUOT": ("the disk quota is used up", "free some space in your quota"),
    "EFBIG": ("the file is larger than this file system allows", "choose a folder on another disk"),
    "EROFS": ("the file system is read-only", "choose a folder you can write to"),
    "EACCES": ("permission was denied", "fix the folder's permissions or choose another folder"),
    "EPERM": ("the operation is not permitted", "fix the folder's permissions or choose another folder"),
    "ENAMETOOLONG": ("the path is longer than this system allows", "use a shorter folder or file name"),
    "ELOOP": ("a symbolic link in the path points back to itself", "fix or remove that link"),
    "ENOENT": ("it does not exist", "check the path"),
    "ENOTDIR": ("a part of the path is a file, not a folder", "check the path"),
    "EISDIR": ("it is a folder, not a file", "give the path of a file"),
    "EIO": ("the disk reported a read/write error", "check the disk, or use another one"),
    "EMFILE": ("too many files are open", "close other programs"),
}
# torch.save reports a failed write from C++ without an errno; safetensors carries it in its text.
_TORCH_WRITE = ("inline_container.cc", "PytorchStreamWriter failed", "file write failed", "iostream error")
_RUST_OS_CODE = re.compile(r"Os \{ code: (\d+)")


def _errno_of(err: BaseException) -> int | None:
    if isinstance(err, OSError) and err.errno is not None:
        return err.errno
    m = _RUST_OS_CODE.search(str(err))
    return int(m[1]) if m else None


def is_file_error(err: BaseException) -> bool:
    """An OSError, or torch's / safetensors' wrapping of a failed read or write."""
    if isinstance(err, OSError):
        return True
    text = str(err)
    if isinstance(err, RuntimeError) and any(s in text for s in _TORCH_WRITE):
        return True
    return type(err).__name__ == "SafetensorError" and _RUST_OS_CODE.search(text) is not None


def file_reason(err: BaseException, folder: str | os.PathLike | None = None) -> tuple[str, str]:
    """(why, what to do) for a failed file operation, in plain words."""
    code = _errno_of(err)
    name = errno.errorcode.get(code, "") if code is not None else ""
    if name in _ERRNO_WORDS:
        return _ERRNO_WORDS[name]
    if code is None and folder is not None:  # torch's write errors: look at the disk ourselves
        with contextlib.suppress(OSError):
            if shutil.disk_usage(_existing(Path(folder))).free < (64 << 20):
                return _ERRNO_WORDS["ENOSPC"]
        return ("the write failed (the disk may be full)", "free some disk space or choose another folder")
    why = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return why, "check the path and the disk"


def _existing(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def file_error(err: BaseException, path: str | os.PathLike | None = None, doing: str = "write",
               then: str = "then try again") -> UserError:
    """One sentence for a failed file operation: what, why, what to do.

    `path` defaults to the file the error names; a path longer than a screen line is shortened,
    since the sentence is about the path being too long, not its text."""
    path = path if path is not None else getattr(err, "filename", None)
    folder = Path(path).parent if path is not None else None
    why, todo = file_reason(err, folder)
    where = f" {_short(str(path))}" if path is not None else " a file"  # a failed flush names none
    return UserError(f"Could not {doing}{where}: {why}; {todo}, {then}.")


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else f"{text[:60]}…{text[-60:]} ({len(text)} characters)"


def shown(value: object, limit: int = 40) -> str:
    """A value as a message quotes it: its repr, cut short (a field may hold 100k characters)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:30]}… ({len(text)} characters)"
