"""Chinese (zh_CN) names of Danbooru tags, for display (`tag (翻译)`) and search in either language."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from lib_lora.tagging.tagtext import normalize

DATA_DIR = Path(__file__).parent / "data"


@dataclass(frozen=True)
class Translations:
    to_zh: dict[str, str]
    from_zh: dict[str, str]

    def get(self, tag: str) -> str | None:
        return self.to_zh.get(normalize(tag))

    def display(self, tag: str) -> str:
        zh = self.get(tag)
        return f"{tag} ({zh})" if zh else tag

    def to_tag(self, text: str) -> str:
        """A tag typed in either language, as the English tag (unknown text is returned as is)."""
        text = text.strip()
        return self.from_zh.get(text, text)

    def search(self, query: str, tags: list[str]) -> list[str]:
        """Tags whose English or Chinese name contains `query`."""
        q, qn = query.strip(), normalize(query)
        return [t for t in tags if qn in normalize(t) or q in (self.get(t) or "\x00")]


def read_translations(path: Path) -> dict[str, str]:
    """`tag<TAB>翻译` per line; `#` comments."""
    out = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        tag, _, zh = line.partition("\t")
        if zh.strip():
            out[normalize(tag)] = zh.strip()
    return out


@functools.lru_cache(maxsize=4)
def load_translations(lang: str = "zh_CN") -> Translations:
    to_zh = read_translations(DATA_DIR / f"{lang}.txt")
    from_zh: dict[str, str] = {}
    for tag, zh in to_zh.items():
        from_zh.setdefault(zh, tag)
    return Translations(to_zh, from_zh)
