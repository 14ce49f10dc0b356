"""What every tab shares: the host, the job runner, the folder policy, the UI language and
the page's remembered values."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lib_lora.hosts.base import Host
from lib_lora.ui.jobs import JobRunner
from lib_lora.ui.memory import FILE_NAME, FormMemory
from lib_lora.ui.paths import FolderPolicy


@dataclass
class UIContext:
    host: Host
    policy: FolderPolicy = field(default_factory=FolderPolicy)
    runner: JobRunner = None  # type: ignore[assignment]
    language: str = "en"  # "en", or "zh"/"zh_CN": shows tag translations by default
    parts: dict[str, Any] = field(default_factory=dict)  # each tab's components, for wiring across tabs
    memory: FormMemory = None  # type: ignore[assignment]
    remembered: dict[str, Any] = field(default_factory=dict)  # elem_id -> control whose value comes back

    def __post_init__(self) -> None:
        if self.runner is None:
            self.runner = JobRunner(getattr(self.host, "job", None))
        if self.memory is None:
            # Through the policy: beyond loopback a changed work-folder setting must not move it out.
            self.memory = FormMemory(lambda: self.policy.place(self.host.work_dir() / FILE_NAME, "work folder"))

    def default_folder(self, *sub: str) -> str:
        path = self.host.work_dir().joinpath(*sub)
        return str(path)

    def remember(self, *components: Any) -> None:
        """Controls whose last used value a reloaded page gets back (keyed by their elem_id)."""
        for comp in components:
            key = getattr(comp, "elem_id", None)
            if key:
                self.remembered[key] = comp

    def keep(self, components: Sequence[Any], values: Sequence[Any]) -> None:
        """Record the values a user acted with, for the remembered ones among `components`."""
        keys = [getattr(c, "elem_id", None) for c in components]
        self.memory.save({k: v for k, v in zip(keys, values, strict=True) if k in self.remembered})
