"""Reading the project's Markdown the way GitHub renders it: heading anchors and links."""

import re
from collections import Counter
from pathlib import Path

_HEADING = re.compile(r"^#{1,6} (.+?)\s*#*$", re.MULTILINE)
_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
_LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)")


def without_code_blocks(text: str) -> str:
    return _FENCE.sub("", text)


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives a document's headings: lower case, punctuation dropped,
    spaces as hyphens, a repeated heading numbered (-1, -2...)."""
    seen: Counter[str] = Counter()
    found = set()
    for heading in _HEADING.findall(without_code_blocks(text)):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug if not seen[slug] else f"{slug}-{seen[slug]}")
        seen[slug] += 1
    return found


def relative_links(path: Path) -> list[str]:
    """Every link target in `path` that is not a URL (files of this repository, anchors)."""
    targets = _LINK.findall(without_code_blocks(path.read_text()))
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]
