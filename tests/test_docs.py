"""Documentation references: whatever the package, its configs, benchmarks and README point a reader to is in the
repository.

- No file refers to the project's internal research folder (``shared/methods``, ``../shared``), which a user of
  the package does not have; the method notes live in ``docs/``.
- Every ``docs/<page>.md`` (optionally ``#<section>``) mentioned in those files names an existing page and, when a
  section is given, one of its headings (GitHub's anchor for it).
- Inside ``docs/``, relative links between pages resolve the same way, and the index links every page.
"""

from __future__ import annotations

import re
from pathlib import Path

from conftest import ROOT

DOCS = ROOT / "docs"
SCANNED = ("lit_fewstep", "configs", "benchmarks", "docs", "tests", "README.md")
FORBIDDEN = ("shared/methods", "../shared")
# docs/<page>.md with an optional #anchor, not preceded by a path character (so "x/docs/..." is not one).
DOC_MENTION = re.compile(r"(?<![\w/.-])docs/([\w/-]+\.md)(?:#([\w-]+))?")
MD_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _text_files() -> list[Path]:
    """Every text file under the scanned paths (binary files such as checkpoints and images are skipped)."""
    files = []
    for name in SCANNED:
        path = ROOT / name
        candidates = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for p in candidates:
            parts = p.relative_to(ROOT).parts
            if p == Path(__file__):  # this file names the forbidden folder to look for it
                continue
            if any(part == "__pycache__" or part.startswith(".") or part.endswith(".egg-info") for part in parts):
                continue
            data = p.read_bytes()
            if b"\0" in data[:8192]:
                continue
            files.append(p)
    return files


def _read(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    anchors, seen, fenced = set(), {}, False
    for line in _read(page).splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match and not fenced:
            slug = _slug(match.group(1))
            count = seen.get(slug, 0)
            anchors.add(slug if count == 0 else f"{slug}-{count}")
            seen[slug] = count + 1
    return anchors


def _where(path: Path, text: str, index: int) -> str:
    return f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, index) + 1}"


def test_scan_covers_the_tree():
    files = {p.relative_to(ROOT).as_posix() for p in _text_files()}
    for expected in ("README.md", "lit_fewstep/methods/dmd.py", "configs/dmd2/imagenet64.yaml", "docs/README.md"):
        assert expected in files


def test_nothing_points_outside_the_repository():
    offenders = []
    for path in _text_files():
        text = _read(path)
        for needle in FORBIDDEN:
            offenders += [f"{_where(path, text, m.start())}: {needle}" for m in re.finditer(re.escape(needle), text)]
    assert not offenders, ("files refer to the internal research folder, which users of the package do not have; "
                           "point to the matching docs/ page instead:\n" + "\n".join(offenders))


def test_every_docs_reference_exists():
    mentions, missing = 0, []
    for path in _text_files():
        text = _read(path)
        for m in DOC_MENTION.finditer(text):
            mentions += 1
            page, anchor = DOCS / m.group(1), m.group(2)
            if not page.is_file():
                missing.append(f"{_where(path, text, m.start())}: docs/{m.group(1)} does not exist")
            elif anchor is not None and anchor not in _anchors(page):
                missing.append(f"{_where(path, text, m.start())}: docs/{m.group(1)} has no section #{anchor}")
    assert mentions > 0, "expected the code and configs to point to docs/ pages"
    assert not missing, "\n".join(missing)


def test_links_between_docs_pages_resolve():
    broken = []
    for page in sorted(DOCS.rglob("*.md")):
        text = _read(page)
        for m in MD_LINK.finditer(text):
            target = m.group(1)
            if re.match(r"[a-z]+:", target):  # an external address
                continue
            file_part, _, anchor = target.partition("#")
            dest = (page.parent / file_part).resolve() if file_part else page
            if not dest.is_file():
                broken.append(f"{_where(page, text, m.start())}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{_where(page, text, m.start())}: {target} (no such section)")
    assert not broken, "\n".join(broken)


def test_index_lists_every_page():
    index = _read(DOCS / "README.md")
    linked = {m.group(1).partition("#")[0] for m in MD_LINK.finditer(index)}
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")} - {"README.md"}
    assert pages, "docs/ holds no pages"
    assert pages <= linked, f"docs/README.md does not link {sorted(pages - linked)}"
