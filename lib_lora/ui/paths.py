"""Which server paths a request may name: the one place that decides.

On loopback the person at the page is the person at the machine, so any path is fine. When
the app listens on other addresses, anyone who reaches the port could otherwise point an
input at /etc or a home directory, so every path a request names (folders, model files, tag
lists, run folders, whether typed in the page or sent to the REST API) is limited to
configured roots. A refused path gets the same sentence whether it exists or not, so nothing
about the rest of the machine comes back.

This module imports no gradio: the WebUI host's REST route uses it too.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lib_lora.errors import UserError, file_error, shown

NOUNS = {"folder": "folder", "file": "file", "model": "file or folder"}


@dataclass(frozen=True)
class FolderPolicy:
    roots: tuple[Path, ...] | None = None  # None: unrestricted (loopback)
    # Values taken as they are, not as paths: what the person at the machine configured at start
    # (the standalone app's --base-model), which may live outside the roots.
    names: frozenset[str] = frozenset()

    @classmethod
    def limited(cls, roots: Iterable[str | Path], names: Iterable[str] = ()) -> FolderPolicy:
        resolved: list[Path] = []
        for r in roots:
            path = Path(r).expanduser().resolve()
            if path not in resolved:
                resolved.append(path)
        return cls(tuple(resolved), frozenset(str(n) for n in names if n))

    @property
    def restricted(self) -> bool:
        return self.roots is not None

    def describe(self) -> str:
        if self.roots is None:
            return "any folder on this machine"
        return ", ".join(str(r) for r in self.roots)

    def allows(self, resolved: Path) -> bool:
        """Whether a resolved path lies in (or is) one of the roots."""
        return self.roots is None or any(resolved == r or r in resolved.parents for r in self.roots)

    def place(self, text: str | os.PathLike, what: str) -> Path:
        """The path resolved (symlinks and `..` followed), or the refusal when it lies outside
        the roots. Nothing is read or created here, and the refusal does not depend on whether
        the path exists."""
        raw = str(text)
        try:
            path = Path(raw).expanduser()
            if self.roots is not None and not path.is_absolute():
                path = self.roots[0] / path
            resolved = path.resolve()
        except OSError as err:  # a path over the system's length limit, a link loop...
            raise file_error(err, raw, f"use the {what}") from None
        except (ValueError, RuntimeError):  # a NUL byte, a symlink loop (older Pythons)
            raise UserError(f"The {what} {shown(raw)} is not a usable path; type another one.") from None
        if not self.allows(resolved):
            raise UserError(
                f"The {what} {raw} is outside the folders this server may use ({self.describe()}); "
                "put it under one of them."
            )
        return resolved

    def check(self, text: str | os.PathLike | None, what: str = "folder", must_exist: bool = True,
              kind: str = "folder") -> Path:
        """A path a request names, as a resolved Path, or a UserError saying what is wrong.
        `kind` is folder, file or model (a file or a folder)."""
        if not isinstance(text, str | os.PathLike | None):  # the page's API accepts any JSON value
            raise UserError(f"The {what} must be text: type the path of a {NOUNS[kind]}.")
        raw = str(text or "").strip().strip('"')
        if not raw:
            raise UserError(f"The {what} is empty: type the path of a {NOUNS[kind]}.")
        path = self.place(raw, what)
        if must_exist:
            try:
                ok = {"folder": path.is_dir, "file": path.is_file, "model": path.exists}[kind]()
            except OSError as err:  # a name over the system's length limit
                raise file_error(err, raw, f"use the {what}") from None
            if not ok:
                raise UserError(f"The {what} {raw} does not exist or is not a {NOUNS[kind]}.")
        return path

    def check_config(self, cfg: Any, label: Callable[[dataclasses.Field], str] | None = None) -> Any:
        """The config with every path field (schema metadata `path`) through `check`.

        Empty values (the step's default place) and the field's declared names (`tiny`, a
        background model's name) are not paths and pass as they are; so do the policy's
        `names`. Run this before the config's own checks, which look at the files."""
        if self.roots is None:
            return cfg
        changes = {}
        for f in dataclasses.fields(cfg):
            kind = f.metadata.get("path")
            value = getattr(cfg, f.name)
            if kind and isinstance(value, list):  # subsets: each entry's image_dir is a folder
                what = label(f) if label is not None else f.name
                changes[f.name] = [
                    {**e, "image_dir": str(self.check(e["image_dir"], what, must_exist=False, kind=kind))}
                    if isinstance(e, dict) and isinstance(e.get("image_dir"), str) and e["image_dir"].strip() else e
                    for e in value
                ]
                continue
            if not kind or not isinstance(value, str) or not value.strip():
                continue
            if value in f.metadata.get("names", ()) or (kind == "model" and value in self.names):
                continue
            what = label(f) if label is not None else f.name
            changes[f.name] = str(self.check(value, what, must_exist=False, kind=kind))
        return dataclasses.replace(cfg, **changes) if changes else cfg
