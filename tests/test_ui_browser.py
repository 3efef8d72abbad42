"""`stackwise ui` in a real browser (headless Chromium through Playwright): the link it prints
for an experiment opens on the table of its training runs, with the run names readable.

Skipped, with the reason, where Playwright or a Chromium cannot be found (``pip install
playwright`` and a system ``chromium``, or ``playwright install chromium``). Set
``STACKWISE_UI_SCREENSHOT=path.png`` to keep a screenshot of the page.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

Helper = Callable[..., Any]


def _chromium() -> str | None:
    """A Chromium executable: the system's, else None (Playwright's own is then tried)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def test_the_printed_link_opens_the_runs_table(
    tracked: dict[str, Any], cli_command: Helper, cli_env: Helper, tmp_path: Path
) -> None:
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    driver = playwright.sync_playwright().start()
    try:
        browser = driver.chromium.launch(executable_path=_chromium(), headless=True)
    except Exception as error:  # no browser here: say so, before starting anything
        driver.stop()
        pytest.skip(f"no Chromium to drive ({type(error).__name__}): install chromium")
    process = subprocess.Popen(
        cli_command("ui", "--port", "0"),
        cwd=tracked["cwd"],
        env=cli_env(tracked["cwd"]),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        link = None
        deadline = time.monotonic() + 120
        assert process.stdout is not None
        while link is None and time.monotonic() < deadline:
            line = process.stdout.readline()
            assert line or process.poll() is None, "the UI stopped before answering"
            if line.strip().startswith("tracked: "):
                link = line.split(": ", 1)[1].strip()
        assert link is not None, "no link printed for the experiment"
        suffix = "runs?workflowType=machine_learning&viewStateShareKey=stackwise"
        assert link.endswith(f"/#/experiments/{tracked['experiment_id']}/{suffix}")

        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(link)
        # The grid's run, its points nested under it: open it as a user would.
        expander = page.locator("button[data-component-id*='runnamecellrenderer']").first
        expander.wait_for(state="visible", timeout=60_000)
        expander.click()
        for column in ("val_loss", "test_loss", "flops", "training_memory_mb"):
            assert page.get_by_text(column, exact=True).count() >= 1, column
        for name in ("rackwise", "stackwise"):
            page.get_by_text(name, exact=True).first.wait_for(state="visible", timeout=60_000)
        # The training-runs view, not the GenAI overview (traces, token usage).
        assert page.get_by_text("Token usage").count() == 0
        screenshot = Path(os.environ.get("STACKWISE_UI_SCREENSHOT") or tmp_path / "ui.png")
        page.screenshot(path=str(screenshot))
    finally:
        browser.close()
        driver.stop()
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
