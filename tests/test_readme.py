"""The Python examples of the README and of the reference pages in docs/ run as written (all but
the one that needs a tracked run id), and every page the README links to exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [
    (page.name, block)
    for page in PAGES
    for block in re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S)
]
RUNNABLE = [(name, block) for name, block in BLOCKS if "<run id>" not in block]


def test_docs_have_python_examples() -> None:
    assert len(RUNNABLE) >= 2


@pytest.mark.parametrize("index", range(len(RUNNABLE)))
def test_example_runs(index: int, capsys: pytest.CaptureFixture[str]) -> None:
    name, block = RUNNABLE[index]
    exec(compile(block, f"{name}[python block {index}]", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.strip(), "every example prints what it shows"
    if "ArchitectureTrainer" in block:  # blockwise over 2 x 2 blocks: four stages
        assert "['block_0', 'block_1', 'block_2', 'block_3']" in printed


def test_every_local_link_of_the_readme_and_docs_exists() -> None:
    missing = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target:
                continue
            if not (page.parent / target).exists():
                missing.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not missing, missing
