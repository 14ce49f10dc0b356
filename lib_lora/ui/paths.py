"""Which server folders the page may read and write.

On loopback the person at the page is the person at the machine, so any folder is fine. When
the app listens on other addresses, anyone who reaches the port could otherwise point a
folder input at /etc or a home directory, so folder inputs are limited to configured roots.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lib_lora.errors import UserError, file_error


@dataclass(frozen=True)
class FolderPolicy:
    roots: tuple[Path, ...] | None = None  # None: unrestricted (loopback)

    @classmethod
    def limited(cls, roots: list[str | Path]) -> FolderPolicy:
        return cls(tuple(Path(r).expanduser().resolve() for r in roots))

    @property
    def restricted(self) -> bool:
        return self.roots is not None

    def describe(self) -> str:
        if self.roots is None:
            return "any folder on this machine"
        return ", ".join(str(r) for r in self.roots)

    def check(self, text: str | os.PathLike | None, what: str = "folder", must_exist: bool = True) -> Path:
        """The folder as a resolved Path, or a UserError saying what is wrong."""
        if not isinstance(text, str | os.PathLike | None):  # the page's API accepts any JSON value
            raise UserError(f"The {what} must be text: type the path of a folder.")
        raw = str(text or "").strip().strip('"')
        if not raw:
            raise UserError(f"The {what} is empty: type the path of a folder.")
        try:
            return self._check(raw, what, must_exist)
        except OSError as err:  # a path over the system's length limit, a link loop...
            raise file_error(err, raw, f"use the {what}") from None

    def _check(self, raw: str, what: str, must_exist: bool) -> Path:
        path = Path(raw).expanduser()
        if self.roots is not None:
            if not path.is_absolute():
                path = self.roots[0] / path
            resolved = path.resolve()
            if not any(resolved == r or r in resolved.parents for r in self.roots):
                raise UserError(
                    f"The {what} {raw} is outside the folders this server may use ({self.describe()}); "
                    "put it under one of them."
                )
            path = resolved
        else:
            path = path.resolve()
        if must_exist and not path.is_dir():
            raise UserError(f"The {what} {raw} does not exist or is not a folder.")
        return path
