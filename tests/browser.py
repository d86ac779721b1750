"""A headless Chromium for tests that render HTML (the run report): Debian's `chromium` and `chromium-driver`
driven by selenium 4, with every path set explicitly so that selenium-manager never downloads a browser or a
driver. Tests that use it are skipped, with the reason, where selenium, chromium or chromedriver is missing.

    def test_page(browser, tmp_path):
        page = browser.open(tmp_path / "report.html")
        assert all(width > 0 for width in page.image_widths())

`browser` (a pytest fixture, one Chromium for the test session) and `chromium()` (a context manager) give a
`Browser`. Its scripts run through WebDriver (`execute_script`), which a page's Content-Security-Policy does not
block even where the policy allows no script at all (tests/test_report_browser.py checks this on a page with the
report's own policy); what the page itself runs, and what it fetches, the policy does govern, and the browser log
(`Browser.log()`) records every violation.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("CAPFILT_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CAPFILT_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")
ARGUMENTS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,2000",
             "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check", "--disable-extensions",
             "--disable-background-networking", "--disable-component-update", "--disable-sync")
PAGE_LOAD_SECONDS = 30


def missing() -> str | None:
    """Why no browser can be started here (None when one can)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return f"{path} is missing (apt-get install {package})"
    return None


@dataclass
class Browser:
    """A WebDriver session and what tests ask of the page it shows."""

    driver: Any

    def open(self, path: str | Path) -> Browser:
        """Show the local file `path` (waits for its load event: every image decoded or failed)."""
        self.log()  # forget what earlier pages logged
        self.driver.get(Path(path).resolve().as_uri())
        return self

    def script(self, source: str, *arguments: Any) -> Any:
        """The value of the JavaScript function body `source` (`return ...`) run by WebDriver on the page."""
        return self.driver.execute_script(source, *arguments)

    def image_widths(self) -> list[int]:
        """The natural width of each <img> in document order: 0 for one that did not load."""
        return self.script("return [...document.images].map(i => i.complete ? i.naturalWidth : 0)")

    def text(self, selector: str = "body") -> str:
        """The rendered text of the first element `selector` matches (what a reader sees, CSS applied)."""
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, selector).text

    def texts(self, selector: str) -> list[str]:
        """The `textContent` of every element `selector` matches (hidden ones too)."""
        return self.script("return [...document.querySelectorAll(arguments[0])].map(e => e.textContent)", selector)

    def count(self, selector: str) -> int:
        """How many elements `selector` matches."""
        return self.script("return document.querySelectorAll(arguments[0]).length", selector)

    def resources(self) -> list[str]:
        """The URL of every resource the page fetched (the Resource Timing entries; data: URIs are not fetches)."""
        return self.script("return performance.getEntriesByType('resource').map(e => e.name)")

    def event_handler_attributes(self) -> list[str]:
        """`tag.attribute` for every element attribute named on...: the event handlers of the DOM."""
        return self.script(
            "return [...document.querySelectorAll('*')].flatMap(e => [...e.attributes]"
            ".filter(a => a.name.toLowerCase().startsWith('on')).map(a => e.tagName.toLowerCase() + '.' + a.name))")

    def log(self) -> list[dict[str, Any]]:
        """The browser log since the last call (console messages, failed loads, CSP violations): dicts with
        `level`, `message`, `source` and `timestamp`."""
        return self.driver.get_log("browser")

    def csp_violations(self) -> list[str]:
        """The messages of the browser log since the last call that report a Content-Security-Policy violation."""
        return [entry["message"] for entry in self.log() if "Content Security Policy" in entry["message"]]

    def screenshot(self, path: str | Path, full_page: bool = True) -> Path:
        """A PNG of the page at `path`: the whole document where `full_page` (the window is resized to its
        height through the DevTools protocol, then back), else the window."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not full_page:
            self.driver.save_screenshot(str(path))
            return path
        width, height = self.script(
            "const e = document.documentElement;"
            "return [Math.max(e.scrollWidth, document.body.scrollWidth), Math.max(e.scrollHeight, document.body.scrollHeight)]")
        metrics = {"width": max(int(width), 1), "height": min(max(int(height), 1), 16384), "deviceScaleFactor": 1,
                   "mobile": False}
        self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
        try:
            self.driver.save_screenshot(str(path))
        finally:
            self.driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        return path


@contextlib.contextmanager
def chromium() -> Iterator[Browser]:
    """A headless Chromium for the time of the block; skips the test where none can be started here."""
    reason = missing()
    if reason:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ARGUMENTS:
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # With both paths given, selenium-manager is not run (no download, no network); a driver log helps when
    # Chromium does not start in CI.
    log = os.environ.get("CAPFILT_TEST_CHROMEDRIVER_LOG")
    service = Service(CHROMEDRIVER, log_output=log) if log else Service(CHROMEDRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.set_page_load_timeout(PAGE_LOAD_SECONDS)
        driver.set_script_timeout(PAGE_LOAD_SECONDS)
        yield Browser(driver)
    finally:
        driver.quit()


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    """One headless Chromium for every test of the session that asks for it."""
    with chromium() as session:
        yield session


def artifacts_directory(fallback: Path) -> Path:
    """Where tests save what a person should look at: $CAPFILT_TEST_ARTIFACTS when set, else `fallback`."""
    directory = Path(os.environ.get("CAPFILT_TEST_ARTIFACTS") or fallback)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


__all__ = ["Browser", "artifacts_directory", "browser", "chromium", "missing"]
