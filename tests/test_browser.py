"""The pattern explorer in a real browser: JupyterLab in headless Chromium runs notebook 04, a
mouse drags the w0 slider, and the FLOP ratio and the picture on the page change.

Chromium is Debian's /usr/bin/chromium, driven by playwright with `executable_path` (playwright's
own browser download does not work here, and is never attempted). Locally the test is skipped,
with the reason, when Chromium is missing; in CI (the CI environment variable set) it fails.
The screenshots are kept in test-artifacts/ (gitignored).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest
from browser_lab import CHROMIUM, CHROMIUM_FLAGS, jupyter_lab

from longnet_ref.analysis.complexity import flop_ratio

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "04_sparsity_patterns.ipynb"
ARTIFACTS = ROOT / "test-artifacts"
EXPLORER = ".longnet-pattern-explorer"


def require(condition: bool, reason: str):
    """Skip locally, fail in CI: a browser test that silently does not run proves nothing."""
    if condition:
        return
    if "CI" in os.environ:
        pytest.fail(f"{reason} (CI must run the browser test: .ci/run installs chromium with apt)")
    pytest.skip(reason)


def picture_digest(page) -> str:
    """SHA-256 of the explorer's PNG as the browser holds it (the <img> src is a blob URL)."""
    return page.evaluate(
        """async (selector) => {
            const img = document.querySelector(selector + " img");
            const bytes = await (await fetch(img.src)).arrayBuffer();
            const digest = await crypto.subtle.digest("SHA-256", bytes);
            return Array.from(new Uint8Array(digest), b => b.toString(16).padStart(2, "0")).join("");
        }""",
        EXPLORER,
    )


def scroll_until_attached(page, selector: str, timeout: float):
    """JupyterLab renders cells lazily: scroll the notebook down until `selector` is in the DOM."""
    locator = page.locator(selector).first
    deadline = time.monotonic() + timeout
    while True:
        try:
            locator.wait_for(state="attached", timeout=2000)
            break
        except Exception:  # playwright's TimeoutError: not rendered yet
            if time.monotonic() > deadline:
                raise AssertionError(f"{selector} never appeared in {timeout} s") from None
            page.evaluate(
                """() => document.querySelectorAll(".jp-WindowedPanel-outer, .jp-Notebook")
                    .forEach(el => { el.scrollTop = el.scrollHeight; })"""
            )
    locator.scroll_into_view_if_needed()
    return locator


def wait_for(condition, timeout: float, message: str):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(message)
        time.sleep(0.25)


@pytest.mark.timeout(420)
def test_pattern_explorer_in_jupyterlab(tmp_path):
    require(CHROMIUM.is_file(), f"{CHROMIUM} not found (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require(False, "the playwright package is not installed (pip install -e .[dev])")
    started = time.monotonic()
    ARTIFACTS.mkdir(exist_ok=True)
    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(NOTEBOOK, served / NOTEBOOK.name)  # JupyterLab may autosave: never touch the repository's copy

    with jupyter_lab(served, tmp_path) as lab, sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),  # a fresh profile
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            page = browser.new_page()
            page.goto(f"{lab.url}/lab/tree/{NOTEBOOK.name}?reset&token={lab.token}")
            page.wait_for_function("() => window.jupyterapp !== undefined", timeout=60_000)
            page.locator(".jp-Notebook").first.wait_for(timeout=60_000)
            lab.wait_for_connected_idle_kernel(timeout=90)

            page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
            explorer = scroll_until_attached(page, f"{EXPLORER} .longnet-flop_ratio", timeout=240)
            explorer = page.locator(EXPLORER)
            flop = explorer.locator(".longnet-flop_ratio")
            wait_for(lambda: flop.inner_text().strip() != "", 60, "the explorer shows no FLOP ratio")
            explorer.scroll_into_view_if_needed()
            before_ratio, before_picture = flop.inner_text(), picture_digest(page)
            slider = explorer.locator(".widget-slider", has=page.locator(".widget-label", has_text=re.compile("^w0$")))
            readout = slider.locator(".widget-readout")
            assert readout.inner_text().strip() == "8", "the w0 slider starts at 8"
            assert before_ratio == f"{flop_ratio(64, [8, 16, 32], [1, 2, 4]):.4f}"
            page.screenshot(path=str(ARTIFACTS / "browser_explorer_before.png"), full_page=False)

            # Drag the w0 handle to the right with the mouse, as a reader would.
            handle = slider.locator(".noUi-handle")
            box = handle.bounding_box()
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            page.mouse.down()
            page.mouse.move(box["x"] + box["width"] / 2 + 25, box["y"] + box["height"] / 2, steps=5)
            page.mouse.up()
            wait_for(lambda: readout.inner_text().strip() != "8", 10, "dragging did not move the w0 slider")
            w0 = int(readout.inner_text())

            expected = f"{flop_ratio(64, [w0, 2 * w0, 4 * w0], [1, 2, 4]):.4f}"
            wait_for(lambda: flop.inner_text() == expected, 60, f"FLOP ratio for w0={w0} never shown ({expected})")
            wait_for(lambda: picture_digest(page) != before_picture, 30, "the picture did not change")
            explorer.screenshot(path=str(ARTIFACTS / "browser_pattern_explorer.png"))
            page.screenshot(path=str(ARTIFACTS / "browser_explorer_after.png"), full_page=False)
            assert expected != before_ratio
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "browser_failure.png"), full_page=False)
            raise
        finally:
            browser.close()
    print(f"browser test: w0 8 -> {w0}, FLOP ratio {before_ratio} -> {expected}, {time.monotonic() - started:.0f} s")


def test_a_missing_browser_fails_in_ci_and_is_skipped_locally(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run the browser test"):
        require(False, "no chromium")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="no chromium"):
        require(False, "no chromium")
    require(True, "never raised")
