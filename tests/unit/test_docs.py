"""The README and the docs cannot point at things that are not there: every relative link and every repository path
they name in backticks exists."""

import re

import pytest
from scripts import ROOT

PAGES = sorted(
    [
        ROOT / "README.md",
        *(ROOT / "docs").glob("*.md"),
        ROOT / "examples/recipes/README.md",
        ROOT / "model_cards/README.md",
    ]
)
#: Top-level folders whose paths the pages name in backticks (`hf_multimax/masking.py`, `tests/unit/test_layout.py`).
TOP_LEVEL = ("hf_multimax", "tests", "examples", "benchmarks", "docs", "model_cards", ".ci")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"`([^`\s]+)`")


def is_placeholder(path: str) -> bool:
    """A path with a part to fill in (`examples/recipes/evidence/TASK/`, `IMPLEMENTATION/seed_N/`, `run_*.py`)."""
    return any(char in path for char in "<>*{}|") or any(
        re.fullmatch(r"[A-Z][A-Z_]*(_N)?", part) or part.endswith("_N") for part in re.split(r"[/.]", path) if part
    )


def named_paths(text: str) -> list[str]:
    paths = []
    for token in CODE.findall(text):
        token = token.split("::")[0].rstrip(".,;:")
        if token.split("/")[0] in TOP_LEVEL and "/" in token and not is_placeholder(token):
            paths.append(token)
    return paths


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    missing = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or an anchor in the same page
        if not (page.parent / target.split("#")[0]).exists():
            missing.append(target)
    assert missing == [], f"{page.relative_to(ROOT)} links to files that do not exist"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_named_repository_path_exists(page):
    missing = [path for path in named_paths(page.read_text()) if not (ROOT / path).exists()]
    assert missing == [], f"{page.relative_to(ROOT)} names paths that do not exist"


def test_the_checks_see_links_and_paths():
    # the patterns find what the pages use, so that an empty page list or a broken regex cannot pass silently
    assert len(PAGES) >= 8
    assert named_paths("see `hf_multimax/masking.py`, `examples/recipes/evidence/TASK/` and `pip`") == [
        "hf_multimax/masking.py"
    ]
    assert LINK.findall("[docs/usage.md](docs/usage.md) and [paper](https://arxiv.org/abs/2406.01189)") == [
        "docs/usage.md",
        "https://arxiv.org/abs/2406.01189",
    ]
