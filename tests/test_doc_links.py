"""No README, page of docs/ or docstring names a file the repository does not hold.

Scanned: ``README.md``, ``docs/**/*.md`` and ``plca/**/*.py``. A reference is a path that starts at
one of the repository's top-level folders (``docs/method.md``, ``configs/folder_plca.yaml``,
``bench/association.py``; a ``*`` must match at least one file), a config piece
(``_base_/models/x.yaml``, in ``configs/``), an upper-case Markdown name
(``README.md``, ``METHOD.md``), or the target of a relative Markdown link (resolved from the page's
folder). A file of another project is named with its repository in front
(``lhoyer/DAFormer/configs/...``), which this check leaves alone.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("docs", "configs", "bench", "plca", "tests", "scripts", "examples", "data")
EXTENSIONS = ("md", "yaml", "yml", "py", "json", "txt", "toml", "csv", "sh")
# not preceded by a path or word character: "/x/configs/a.yaml" and "lhoyer/DAFormer/configs/a.py" are not ours
_PATH = re.compile(rf"(?<![\w/.<>$-])((?:{'|'.join(FOLDERS)})/[\w.*/=-]*\.(?:{'|'.join(EXTENSIONS)}))\b")
# config pieces are named from the configs folder, as the configs' own _base_ lists name them
_BASE = re.compile(r"(?<![\w/.<>$-])(_base_/[\w./-]*\.ya?ml)\b")
_MARKDOWN_NAME = re.compile(r"(?<![\w/.-])([A-Z][A-Z_]+\.md)\b")
_LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")


def scanned_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").rglob("*.md")), *sorted((root / "plca").rglob("*.py"))]


def references(path: Path, root: Path = ROOT) -> list[tuple[int, str, Path]]:
    """``(line, as written, where it points)`` for every file reference in ``path``."""
    found = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        for match in _PATH.finditer(line):
            found.append((number, match.group(1), root / match.group(1)))
        for match in _BASE.finditer(line):
            found.append((number, match.group(1), root / "configs" / match.group(1)))
        for match in _MARKDOWN_NAME.finditer(line):
            found.append((number, match.group(1), root / match.group(1)))
        if path.suffix == ".md":
            for match in _LINK.finditer(line):
                target = match.group(1)
                if not re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                    found.append((number, target, path.parent / target))
    return found


def exists(target: Path, root: Path = ROOT) -> bool:
    if "*" in target.name or "*" in str(target.parent):
        return any(root.glob(str(target.relative_to(root))))
    return target.exists()


def missing(root: Path = ROOT) -> list[str]:
    """``FILE:LINE: as written`` for each reference to a file that does not exist (once per line)."""
    found = [f"{path.relative_to(root)}:{line}: {written}"
             for path in scanned_files(root) for line, written, target in references(path, root)
             if not exists(target, root)]
    return list(dict.fromkeys(found))  # a Markdown link's target may also read as a path


def test_every_referenced_file_exists():
    absent = missing()
    assert not absent, "references to files the repository does not hold:\n" + "\n".join(absent)


def test_the_method_documentation_exists_and_is_referenced():
    assert (ROOT / "docs" / "method.md").is_file()
    cited = {written for path in scanned_files() for _, written, _ in references(path)}
    assert "docs/method.md" in cited


def test_the_scan_finds_what_is_missing_and_leaves_other_projects_alone(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "plca").mkdir()
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "a_plca.yaml").write_text("")
    (tmp_path / "README.md").write_text(
        "See `docs/method.md` and METHOD.md; configs/*_plca.yaml and configs/*_none.yaml; "
        "[the notes](docs/notes.md), [the web](https://example.org/x.md).\n")
    (tmp_path / "docs" / "method.md").write_text("[back](../README.md) and [gone](../bench/gone.py)\n")
    (tmp_path / "plca" / "m.py").write_text('"""As ``lhoyer/DAFormer/configs/_base_/x.py``; see bench/none.py, '
                                           '_base_/models/none.yaml."""\n')
    assert sorted(missing(tmp_path)) == sorted([
        "README.md:1: METHOD.md", "README.md:1: configs/*_none.yaml", "README.md:1: docs/notes.md",
        "docs/method.md:1: ../bench/gone.py", "plca/m.py:1: bench/none.py", "plca/m.py:1: _base_/models/none.yaml"])
