"""User-given names (LoRA names, run names): any Unicode letters, nothing that leaves a folder."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

from lib_lora.errors import UnsafeNameError

# Windows reserves these as device names whatever the extension (CON.txt is CON).
_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
_FORBIDDEN_CHARS = set('/\\:*?"<>|')
MAX_NAME_LEN = 120
# A kohya image folder, `<repeats>_<name>` ("10_anna"): the trainer's subsets, the tagger's folders.
SUBSET_RE = re.compile(r"^(\d+)_(.+)$")


def validate_name(name: str, what: str = "name") -> str:
    """Return the name (NFC-normalised, stripped) or raise UnsafeNameError saying why.

    Unicode letters, digits, spaces, '-', '_', '.', '(', ')' and the like are fine ("张娜英" works);
    path separators, '..', drive letters, control characters and device names are refused.
    """
    if not isinstance(name, str):
        raise UnsafeNameError(f"The {what} must be text.")
    cleaned = unicodedata.normalize("NFC", name).strip()
    if not cleaned:
        raise UnsafeNameError(f"The {what} is empty: give it a name such as 'my_lora'.")
    if len(cleaned) > MAX_NAME_LEN:
        raise UnsafeNameError(f"The {what} is {len(cleaned)} characters long; use at most {MAX_NAME_LEN}.")
    bad = sorted({c for c in cleaned if c in _FORBIDDEN_CHARS})
    if bad:
        raise UnsafeNameError(
            f"The {what} {name!r} contains {' '.join(bad)}, which could leave the output folder; "
            "use letters, digits, spaces, '-' or '_'."
        )
    if any(unicodedata.category(c).startswith("C") for c in cleaned):
        raise UnsafeNameError(f"The {what} {name!r} contains control or invisible characters; remove them.")
    if cleaned in {".", ".."} or cleaned.startswith(".") or ".." in cleaned:
        raise UnsafeNameError(f"The {what} {name!r} must not start with '.' or contain '..'.")
    if re.match(r"^[A-Za-z]:", cleaned):
        raise UnsafeNameError(f"The {what} {name!r} looks like a drive letter; give a plain name.")
    stem = cleaned.split(".")[0].upper().rstrip()
    if stem in _RESERVED:
        raise UnsafeNameError(f"The {what} {name!r} is a reserved device name on Windows; choose another.")
    if cleaned.endswith("."):
        raise UnsafeNameError(f"The {what} {name!r} must not end with '.'.")
    return cleaned


# What the WebUI shows as one LoRA: its weights in any format it loads, and the card files
# beside them (`<name>.json` holds the user's card notes). Writing `<name>.safetensors` next to
# any of these replaces or shadows them, so they are checked as one unit.
LORA_UNIT_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".json", ".preview.png")


def output_file(folder: str | Path, name: str, suffix: str, overwrite: bool = False,
                unit: tuple[str, ...] = ()) -> Path:
    """The path `<folder>/<name><suffix>` after checking the name; refuses to clobber unless asked.

    `unit` names more suffixes that belong with the file (its card files): any of them existing
    is refused the same way."""
    name = validate_name(name, "LoRA name")
    folder = Path(folder)
    path = folder / f"{name}{suffix}"
    if path.resolve().parent != folder.resolve():
        raise UnsafeNameError(f"The LoRA name {name!r} would write outside {folder}.")
    if not overwrite:
        taken = [folder / f"{name}{s}" for s in dict.fromkeys((suffix, *unit)) if (folder / f"{name}{s}").exists()]
        if taken:
            others = f" (and {', '.join(p.name for p in taken[1:])})" if len(taken) > 1 else ""
            where = "" if path in taken else f", where {path.name} and its card files would go"
            raise UnsafeNameError(
                f"{taken[0]} already exists{others}{where}. "
                "Choose another name, or turn on --overwrite to replace it."
            )
    return path


def lora_output_file(folder: str | Path, name: str, overwrite: bool = False) -> Path:
    """`<folder>/<name>.safetensors`, refused when it or any file of its unit exists (unless overwrite)."""
    return output_file(folder, name, ".safetensors", overwrite, unit=LORA_UNIT_SUFFIXES)
