"""The documents a person reads: a short README, an evaluation page that `make evaluate` writes, no link out.

No Markdown link in README.md or docs/*.md may leave the repository or name a file it does not hold.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_LIMIT_BYTES = 10_500

# [text](target) and [text](target "title"); images too. Reference-style definitions: [label]: target
_INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"`[^`\n]*`")


def _documents() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def _link_targets(text: str) -> list[str]:
    """Markdown link targets outside code blocks and code spans (which are not links)."""
    prose = _CODE_SPAN.sub("", _FENCE.sub("", text))
    return _INLINE_LINK.findall(prose) + _REFERENCE_LINK.findall(prose)


def test_the_evaluation_page_is_the_report_make_evaluate_wrote() -> None:
    # `make evaluate` copies its report.md to both places; nobody edits docs/evaluation.md by hand.
    report = ROOT / "models" / "cards" / "evaluation" / "report.md"
    assert (DOCS / "evaluation.md").read_bytes() == report.read_bytes(), (
        "docs/evaluation.md differs from models/cards/evaluation/report.md: rerun make evaluate"
    )


def test_the_readme_stays_short() -> None:
    size = len(README.read_bytes())
    assert size <= README_LIMIT_BYTES, f"README.md is {size} bytes (limit {README_LIMIT_BYTES}): move detail into docs/"


@pytest.mark.parametrize("document", _documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_stays_in_the_repository_and_resolves(document: Path) -> None:
    problems = []
    for target in _link_targets(document.read_text(encoding="utf-8")):
        if re.match(r"^https?://", target) or target.startswith("mailto:"):
            continue
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):
            problems.append(f"{target}: not a web link or a file of this repository")
            continue
        path = unquote(target.split("#", 1)[0])
        if not path:
            continue  # a link to a heading of the same page
        resolved = (ROOT / path.lstrip("/")) if path.startswith("/") else (document.parent / path)
        resolved = resolved.resolve()
        if not resolved.is_relative_to(ROOT):
            problems.append(f"{target}: points outside the repository")
        elif not resolved.exists():
            problems.append(f"{target}: no such file in the repository")
    assert not problems, f"{document.relative_to(ROOT)}: " + "; ".join(problems)


def test_the_link_check_sees_links_and_skips_code() -> None:
    text = '[a](docs/x.md) ![b](img.png "t") `[c](../code.md)`\n```\n[d](../fenced.md)\n```\n[e]: ../ref.md\n'
    assert sorted(_link_targets(text)) == ["../ref.md", "docs/x.md", "img.png"]
