"""Every relative link of README.md and docs/*.md, and every docs/ pointer in the code, resolves.

A link `[text](path#anchor)` must name a file of the repository and, with an anchor, one of
the headings of that Markdown file, as GitHub makes its anchors. A code comment or docstring
that says `docs/design.md#training-recipe` is held to the same rule.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
POINTER = re.compile(r"\bdocs/[a-z0-9_]+\.md(?:#[a-z0-9_-]+)?")
FENCE = re.compile(r"^(```|~~~)")


def anchors(path):
    """The anchors GitHub gives the headings of a Markdown file (outside code fences)."""
    found, counts, fenced = set(), {}, False
    for line in path.read_text().splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if fenced or not heading:
            continue
        text = re.sub(r"`|\*|_(?=\W)|(?<=\W)_", "", heading.group(1)).lower()
        slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
        count = counts.get(slug, 0)
        counts[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def unresolved(target, base):
    """Why `target`, relative to the folder `base`, does not resolve, or `None`."""
    path, _, anchor = target.partition("#")
    file = (base / path).resolve() if path else None
    if file is not None and not file.exists():
        return f"{target}: no file {path}"
    if anchor and file is not None and file.suffix == ".md" and anchor not in anchors(file):
        return f"{target}: no heading #{anchor} in {file.relative_to(ROOT)}"
    return None


def test_anchors_follow_githubs_rule(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# The head's large layers, on int8 weights\n## `--flag` and B-CNN\n## A\n## A\n"
    )
    assert anchors(page) == {
        "the-heads-large-layers-on-int8-weights",
        "--flag-and-b-cnn",
        "a",
        "a-1",
    }


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_relative_links_resolve(document):
    assert document.is_file(), f"{document.relative_to(ROOT)} is missing"
    problems = []
    for target in LINK.findall(document.read_text()):
        if re.match(r"^[a-z]+:", target):  # https:, mailto: ...
            continue
        problem = unresolved(target, document.parent)
        if problem:
            problems.append(problem)
    assert not problems, "\n".join(problems)


def test_docs_pointers_in_the_code_resolve():
    sources = [
        path
        for folder in ("keras_fg", "bench", "configs", "tests", "notebooks")
        for path in sorted((ROOT / folder).rglob("*"))
        if path.suffix in (".py", ".yaml", ".ipynb") and path.name != Path(__file__).name
    ]
    sources += [ROOT / name for name in ("train.py", "export.py", "predict.py")]
    pointers = {}
    for path in sources:
        for pointer in POINTER.findall(path.read_text()):
            pointers.setdefault(pointer, path.relative_to(ROOT))
    assert pointers, "no docs/ pointer found: the pattern is broken"
    problems = [
        f"{where}: {problem}"
        for pointer, where in sorted(pointers.items())
        if (problem := unresolved(pointer, ROOT))
    ]
    assert not problems, "\n".join(problems)
