"""The README's Python examples run as written (all but the one that needs a tracked run id)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
RUNNABLE = [block for block in BLOCKS if "<run id>" not in block]


def test_readme_has_python_examples() -> None:
    assert len(RUNNABLE) >= 2


@pytest.mark.parametrize("index", range(len(RUNNABLE)))
def test_readme_example_runs(index: int, capsys: pytest.CaptureFixture[str]) -> None:
    exec(compile(RUNNABLE[index], f"README.md[python block {index}]", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.strip(), "every README example prints what it shows"
    if "ArchitectureTrainer" in RUNNABLE[index]:  # blockwise over 2 x 2 blocks: four stages
        assert "['block_0', 'block_1', 'block_2', 'block_3']" in printed
