"""The docs stand alone: no reference into files outside this repository, and every link resolves.

* No tracked file (docs, code, comments, golden JSON) cites the old, unpublished specification
  by number ("sp-ec 2.4", "sp-ec section 3.2", "(sp-ec ...)", "sp-ec-SD 1.1") or by a path into
  a sibling directory of the repository; cite docs/deepseek-v3.md or docs/speculative-decoding.md
  with their section numbers ("docs/deepseek-v3.md §3.2") instead.
* Every relative markdown link in docs/ and README.md points to an existing file (anchors are
  not checked).
* Every "docs/<page>.md §N" citation names a section that exists on that page.
* docs/acceptance-rules.md describes every numbered rule R1-R11.

(The patterns below are written so that this file does not match them itself.)
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_S = "s" + "pec"
FORBIDDEN = [
    ("numbered reference", re.compile(rf"(?<![\w-]){_S}(?:-SD)?\s*(?:§\s*)?\d", re.I)),
    ("'section' reference", re.compile(rf"(?<![\w-]){_S}(?:-SD)?\s+sections?\b", re.I)),
    ("parenthesised reference", re.compile(rf"\(\s*{_S}(?:-SD)?\s", re.I)),
    ("reference to a spec page", re.compile(rf"(?<![\w-]){_S}\s+(?:speculative-decoding|deepseek-v3)\.md", re.I)),
    ("'decoding s-pec' reference", re.compile(rf"decoding\s+{_S}\b", re.I)),
    ("'the s-pec file'", re.compile(rf"the\s+{_S}\s+file", re.I)),
    ("path outside the repository", re.compile(r"\.\./" + "shared|" + "shared/" + _S + r"|/" + "work/")),
]


def _tracked() -> list[Path]:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], check=True,
                             capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout (git ls-files failed)")
    return [ROOT / p for p in out.decode().split("\0") if p]


def _text(path: Path) -> str | None:
    try:
        data = path.read_bytes()
    except OSError:  # listed but deleted in the work tree
        return None
    if b"\0" in data[:8192]:
        return None  # binary (safetensors, ...)
    return data.decode("utf-8", errors="replace")


def test_no_references_outside_the_repository():
    bad = []
    for path in _tracked():
        text = _text(path)
        if text is None:
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            for what, rx in FORBIDDEN:
                m = rx.search(line)
                if m:
                    bad.append(f"{path.relative_to(ROOT)}:{lineno}: {what}: {line.strip()[:120]}")
    assert not bad, (f"{len(bad)} lines cite files that are not in this repository; cite "
                     "docs/deepseek-v3.md / docs/speculative-decoding.md sections instead:\n"
                     + "\n".join(bad[:80]))


LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```[ \t]*$", re.S | re.M)


def _markdown_pages() -> list[Path]:
    pages = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]
    return [p for p in pages if p.is_file()]


def test_markdown_links_resolve():
    bad = []
    for page in _markdown_pages():
        text = FENCE.sub("", page.read_text(encoding="utf-8"))
        text = re.sub(r"`[^`\n]*`", "", text)  # inline code is not a link
        for m in LINK.finditer(text):
            target = m.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
                continue  # http(s)://, mailto:, same-page anchors
            rel = target.split("#", 1)[0]
            if not (page.parent / rel).exists():
                bad.append(f"{page.relative_to(ROOT)}: ({target})")
    assert not bad, "links to missing files:\n" + "\n".join(bad)


CITE = re.compile(r"(deepseek-v3|speculative-decoding)\.md\]?\)? §(\d+(?:\.\d+)?)")


def _sections(page: str) -> set[str]:
    text = (ROOT / "docs" / f"{page}.md").read_text(encoding="utf-8")
    return set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", text, re.M))


def test_cited_sections_exist():
    sections = {p: _sections(p) for p in ("deepseek-v3", "speculative-decoding")}
    assert {"0", "1", "2.4", "3.2", "4.7", "5.3", "8"} <= sections["deepseek-v3"]
    assert {"0", "1.3", "2.2", "2.4", "3.3", "5", "9"} <= sections["speculative-decoding"]
    bad = []
    for path in _tracked():
        text = _text(path)
        if text is None:
            continue
        for m in CITE.finditer(text):
            if m.group(2) not in sections[m.group(1)]:
                bad.append(f"{path.relative_to(ROOT)}: {m.group(0)}")
    assert not bad, "citations of sections that do not exist:\n" + "\n".join(bad)


def test_every_acceptance_rule_is_described():
    text = (ROOT / "docs" / "acceptance-rules.md").read_text(encoding="utf-8")
    missing = [f"R{n}" for n in range(1, 12) if not re.search(rf"^\* \*\*R{n}\b", text, re.M)]
    assert not missing, f"docs/acceptance-rules.md does not describe {', '.join(missing)}"
