"""The packaging habits: one version, a licence, a citation that agrees with the README, typed, linted."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

import plca
from plca.tools.model_card import PLCA_BIBTEX

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PAPER_AUTHORS = [("Kang", "Guoliang"), ("Wei", "Yunchao"), ("Yang", "Yi"), ("Zhuang", "Yueting"),
                 ("Hauptmann", "Alexander G.")]


def test_the_version_is_written_once():
    project = PYPROJECT["project"]
    assert "version" not in project and project["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "plca.version.__version__"}
    from plca.version import __version__

    assert plca.__version__ == __version__
    assert yaml.safe_load((ROOT / "CITATION.cff").read_text())["version"] == __version__
    written = [path for path in (ROOT / "plca").rglob("*.py")
               if re.search(r"^__version__ = ", path.read_text(), re.MULTILINE)]
    assert written == [ROOT / "plca" / "version.py"]


def test_the_citation_names_the_paper_as_the_readme_and_the_model_cards_do():
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["cff-version"] == "1.2.0" and citation["license"] == "MIT"
    paper = citation["preferred-citation"]
    assert paper["title"] == ("Pixel-Level Cycle Association: A New Perspective for Domain Adaptive Semantic "
                              "Segmentation")
    assert [(a["family-names"], a["given-names"]) for a in paper["authors"]] == PAPER_AUTHORS
    assert paper["year"] == 2020 and paper["volume"] == 33
    assert PLCA_BIBTEX in (ROOT / "README.md").read_text()
    bib_authors = re.search(r"author\s*=\s*\{(.*)\},", PLCA_BIBTEX)[1].split(" and ")
    assert bib_authors == [f"{family}, {given}" for family, given in PAPER_AUTHORS]


def test_licence_typing_marker_and_metadata():
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert PYPROJECT["project"]["license"] == {"text": "MIT"}
    assert "License :: OSI Approved :: MIT License" in PYPROJECT["project"]["classifiers"]
    assert (ROOT / "plca" / "py.typed").is_file() and PYPROJECT["tool"]["setuptools"]["package-data"] == {
        "plca": ["py.typed"]}
    assert PYPROJECT["project"]["urls"] and (ROOT / "CHANGELOG.md").read_text().startswith("# Changelog")


def test_ruff_is_configured_installed_by_dev_and_run_by_ci():
    lint = PYPROJECT["tool"]["ruff"]
    assert set(lint["lint"]["select"]) >= {"E", "W", "F", "B"} and lint["line-length"] == 120
    assert any(dep.startswith("ruff") for dep in PYPROJECT["project"]["optional-dependencies"]["dev"])
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.index("make lint") < ci.index("make test")
    assert "ruff check" in (ROOT / "Makefile").read_text()
