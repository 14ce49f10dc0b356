"""The page's last used values, kept on the server so a reload (or the language switch) brings
them back.

gradio serves the page as it was built at start, so a reload shows every field at its
default. The tabs record the values a user acted with (Start, Tag, Load…) here, keyed by the
control's elem_id, in a small JSON file in the work folder; the page asks for them on load.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lib_lora.atomic import atomic_path
from lib_lora.errors import UserError

log = logging.getLogger(__name__)

FILE_NAME = "ui-last-values.json"
_PLAIN = (str, int, float, bool, type(None))


def _plain(value: Any) -> bool:
    """Only JSON values a control gives back as it got them (no images, no tables)."""
    if isinstance(value, list):
        return all(isinstance(v, _PLAIN) for v in value)
    return isinstance(value, _PLAIN)


class FormMemory:
    """{elem_id: value}, merged on every save and written atomically (never a broken file)."""

    def __init__(self, path: Path | Callable[[], Path]) -> None:
        # A callable is asked each time: the WebUI's work folder is a setting that can change.
        self._path = path
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        return Path(self._path() if callable(self._path) else self._path)

    def load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, UserError) as err:  # a hand-edited or foreign file, a refused place
            log.warning("The page's last values could not be read (%s); using the defaults.", err)
            return {}
        return {k: v for k, v in data.items() if isinstance(k, str) and _plain(v)} if isinstance(data, dict) else {}

    def get(self, key: str, default: Any = None) -> Any:
        return self.load().get(key, default)

    def save(self, values: dict[str, Any]) -> None:
        values = {k: v for k, v in values.items() if k and _plain(v)}
        if not values:
            return
        with self._lock:
            data = self.load()
            data.update(values)
            try:
                with atomic_path(self.path) as tmp:
                    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1, sort_keys=True), encoding="utf-8")
            except (OSError, UserError) as err:  # remembering is a convenience: the action itself goes on
                log.warning("The page's last values could not be saved (%s).", err)


def choice_values(component: Any) -> list[Any] | None:
    """A Dropdown's/Radio's choice values (gradio 4 keeps (label, value) pairs), or None."""
    choices = getattr(component, "choices", None)
    if not choices:
        return None
    return [c[1] if isinstance(c, tuple | list) else c for c in choices]


def restore_update(component: Any, value: Any) -> Any:
    """The update that puts a remembered value back, or a no-op when it no longer fits."""
    import gradio as gr

    if value is None:
        return gr.update()
    allowed = choice_values(component)
    if allowed is not None and not getattr(component, "allow_custom_value", False):
        multi = getattr(component, "multiselect", False)
        if (multi and not all(v in allowed for v in value)) or (not multi and value not in allowed):
            return gr.update()
    return gr.update(value=value)
