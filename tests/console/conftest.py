"""A real browser for the console's tests: Debian's Chromium, headless, driven by
Selenium through Debian's ChromeDriver (``scripts/ensure-chromium`` installs both; no test
tool downloads a browser). Without them the browser tests are skipped, except under
``make test``, which sets ``LUTHIEN_REQUIRE_BROWSER=1`` so that CI never skips them."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture(scope="session")
def browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or CHROMIUM
    driver = shutil.which("chromedriver") or CHROMEDRIVER
    if not (os.path.exists(chromium) and os.path.exists(driver)):
        if os.environ.get("LUTHIEN_REQUIRE_BROWSER") == "1":
            pytest.fail("Chromium or ChromeDriver is missing: run scripts/ensure-chromium")
        pytest.skip("Chromium and ChromeDriver are not installed (scripts/ensure-chromium)")
    return chromium, driver


@pytest.fixture(scope="module")
def browser(
    browser_paths: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_AVOID_STATS", "true")  # Selenium Manager: no telemetry
    chromium, driver = browser_paths
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--window-size=1280,800",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=driver, log_output=str(Path(profile) / "driver.log"))
    chrome = webdriver.Chrome(options=options, service=service)
    chrome.set_page_load_timeout(20)
    try:
        yield chrome
    finally:
        chrome.quit()
