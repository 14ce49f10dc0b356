"""What every tab shares: the host, the job runner, the folder policy and the UI language."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lib_lora.hosts.base import Host
from lib_lora.ui.jobs import JobRunner
from lib_lora.ui.paths import FolderPolicy


@dataclass
class UIContext:
    host: Host
    policy: FolderPolicy = field(default_factory=FolderPolicy)
    runner: JobRunner = None  # type: ignore[assignment]
    language: str = "en"  # "en", or "zh"/"zh_CN": shows tag translations by default
    parts: dict[str, Any] = field(default_factory=dict)  # each tab's components, for wiring across tabs

    def __post_init__(self) -> None:
        if self.runner is None:
            self.runner = JobRunner(getattr(self.host, "job", None))

    def default_folder(self, *sub: str) -> str:
        path = self.host.work_dir().joinpath(*sub)
        return str(path)
