"""A function of a file's contents, remembered per version of the file.

The UI recomputes things live (the Train tab's step count on every keystroke); what it
learns from a file stays valid until the file changes, so it is read again only then.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")

Version = tuple[int, int, int, int]


def file_version(path: Path) -> Version:
    """What changes when the file does: ctime and inode as well as mtime and size, because a
    copy that keeps the mtime (cp -p, rsync -t) or an atomic replace must still count."""
    st = os.stat(path)
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)


class FileMemo(Generic[T]):
    """`fn(path)` remembered for the file's current version; the least recently used paths go
    first beyond `limit`. Safe to share between the UI's handler threads."""

    def __init__(self, fn: Callable[[Path], T], limit: int = 20_000) -> None:
        self.fn = fn
        self.limit = limit
        self._values: OrderedDict[Path, tuple[Version, T]] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, path: Path) -> T:
        # The version is taken before reading: a file changed while fn reads it gets a newer
        # version than the one stored, so the next call reads it again.
        try:
            version = file_version(path)
        except OSError:  # gone or unreadable: nothing to remember; fn reports it in its own words
            return self.fn(path)
        with self._lock:
            hit = self._values.get(path)
            if hit is not None and hit[0] == version:
                self._values.move_to_end(path)
                return hit[1]
        value = self.fn(path)  # outside the lock: one slow file must not hold up other threads
        with self._lock:
            self._values[path] = (version, value)
            self._values.move_to_end(path)
            while len(self._values) > self.limit:
                self._values.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._values)
