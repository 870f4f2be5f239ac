"""The operator console in headless Chromium against a real proxy process: sign in, watch a
streamed request appear live, open it and see the redaction highlighted, a hostile
prompt shown as text, a key created, used and revoked, sign out and every page closed;
no Content-Security-Policy violation on the way, readable at a phone's width.

``LUTHIEN_CONSOLE_SCREENSHOTS=DIR`` saves a screenshot of each page there (``docs/console/``
holds the ones ``docs/console.md`` shows)."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import openai
import pytest
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import CLIENT_KEY, MockBackendServer, ProxyServer, ProxyStarter
from tests.test_console import status_with

ADMIN_KEY = "browser-admin-key-0123"
HOSTILE = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">'
SECRET = "sk-proj-" + "Bb1Cc2Dd3Ee4Ff5Gg6Hh7Ii8"
WAIT = 15.0  # seconds, the most any step may take


def chain(backend: str) -> dict[str, Any]:
    return {
        "type": "SerialPolicy",
        "config": {
            "name": "browser-test",
            "policies": [
                {"type": "ClientApiKeyAuth", "config": {}},
                {"type": "AddApiKeyHeader", "config": {}},
                {"type": "SetBackendPolicy", "config": {"backend_url": backend}},
                {"type": "SendBackendRequest", "config": {}},
                {"type": "LeakedApiKeyDetection", "config": {"action": "redact"}},
            ],
        },
    }


@pytest.fixture(scope="module")
def proxy(start_proxy: ProxyStarter, mock_backend: MockBackendServer) -> ProxyServer:
    return start_proxy(
        policy=chain(mock_backend.api_base), env={"ADMIN_API_KEY": ADMIN_KEY}, workers=2
    )


def shot(browser: WebDriver, name: str) -> None:
    folder = os.environ.get("LUTHIEN_CONSOLE_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(Path(folder) / f"{name}.png"))


def wait(browser: WebDriver) -> WebDriverWait[WebDriver]:
    return WebDriverWait(browser, WAIT, poll_frequency=0.1)


def csp_violations(browser: WebDriver) -> list[str]:
    logs = browser.get_log("browser")  # type: ignore[no-untyped-call]
    return [entry["message"] for entry in logs if "Content Security Policy" in entry["message"]]


def sign_in(browser: WebDriver, proxy: ProxyServer, name: str = "ada") -> None:
    browser.get(f"{proxy.url}/admin/traffic")
    assert browser.current_url.startswith(f"{proxy.url}/admin/sign-in?next=")
    shot(browser, "sign-in")
    browser.find_element(By.ID, "name").send_keys(name)
    browser.find_element(By.ID, "key").send_keys(ADMIN_KEY + Keys.ENTER)
    wait(browser).until(lambda b: b.current_url == f"{proxy.url}/admin/traffic")
    assert browser.find_element(By.CSS_SELECTOR, ".who strong").text == name


def test_watch_a_stream_arrive_and_read_it(browser: WebDriver, proxy: ProxyServer) -> None:
    sign_in(browser, proxy)
    before = len(browser.find_elements(By.CSS_SELECTOR, "table.traffic tbody tr[data-seq]"))
    client = openai.OpenAI(base_url=proxy.api_base, api_key=CLIENT_KEY, max_retries=0)
    content = f"{HOSTILE} {SECRET}"
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": content}],
        stream=True,
        extra_headers={"x-mock-content": quote(content, safe="")},
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert SECRET not in text and "[REDACTED]" in text

    # The row arrives by itself (server-sent events), no reload.
    rows = "table.traffic tbody tr[data-seq]"
    wait(browser).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, rows)) > before)
    newest = browser.find_element(By.CSS_SELECTOR, rows)
    assert "POST /chat/completions" in newest.text and "ok" in newest.text
    shot(browser, "traffic")
    newest.find_element(By.TAG_NAME, "a").click()
    wait(browser).until(lambda b: "/admin/transactions/" in b.current_url)

    marks = browser.find_elements(By.CSS_SELECTOR, "mark.redacted")
    assert marks and {m.text for m in marks} == {"[REDACTED]"}
    turns = browser.find_elements(By.CSS_SELECTOR, ".conversation .turn pre")
    assert turns[0].text == f"{HOSTILE} [REDACTED]"  # the prompt, shown as text
    assert browser.execute_script("return window.pwned === undefined")
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text  # noqa: B018
    decision = browser.find_element(By.CSS_SELECTOR, ".decisions tr.action-redacted")
    assert decision.text.startswith("LeakedApiKeyDetection redacted")
    shot(browser, "transaction")
    assert csp_violations(browser) == []


def test_a_key_made_in_the_browser_works_until_it_is_revoked(
    browser: WebDriver, proxy: ProxyServer
) -> None:
    browser.get(f"{proxy.url}/admin/keys")
    browser.find_element(By.ID, "key-name").send_keys("made-in-browser" + Keys.ENTER)
    secret = wait(browser).until(lambda b: b.find_element(By.CSS_SELECTOR, "code.secret"))
    value = secret.text
    shot(browser, "keys")

    def status() -> int:
        return status_with(proxy, value)

    deadline = time.monotonic() + WAIT
    while not all(status() == 200 for _ in range(4)):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    browser.get(f"{proxy.url}/admin/keys")
    assert value not in browser.page_source  # shown once, never again
    revoke = "button[aria-label='Revoke made-in-browser']"
    browser.find_element(By.CSS_SELECTOR, revoke).click()
    wait(browser).until(lambda b: not b.find_elements(By.CSS_SELECTOR, revoke))
    deadline = time.monotonic() + 2.5
    while not all(status() == 401 for _ in range(4)):
        assert time.monotonic() < deadline, "a revoked key still works"
        time.sleep(0.1)
    assert csp_violations(browser) == []


def test_the_overview_and_a_phone_width(browser: WebDriver, proxy: ProxyServer) -> None:
    browser.get(f"{proxy.url}/admin/")
    windows = browser.find_elements(By.CSS_SELECTOR, "section.window h2")
    assert [w.text.split(" since ")[0] for w in windows] == ["Last hour", "Last day"]
    shot(browser, "overview")
    browser.set_window_size(390, 844)
    try:
        for path in ("/admin/", "/admin/keys", "/admin/traffic"):
            browser.get(f"{proxy.url}{path}")
            overflow = browser.execute_script(
                "return document.documentElement.scrollWidth - window.innerWidth"
            )
            assert overflow <= 0, f"{path} scrolls sideways at a phone's width"
        shot(browser, "traffic-phone")
    finally:
        browser.set_window_size(1280, 800)


def test_keyboard_reaches_everything_from_the_skip_link(
    browser: WebDriver, proxy: ProxyServer
) -> None:
    browser.get(f"{proxy.url}/admin/traffic")
    body = browser.find_element(By.TAG_NAME, "body")
    body.send_keys(Keys.TAB)
    first = browser.switch_to.active_element
    assert first.text == "Skip to content"
    first.send_keys(Keys.ENTER)
    assert browser.switch_to.active_element.get_attribute("id") == "main"
    reached = []
    for _ in range(12):
        browser.switch_to.active_element.send_keys(Keys.TAB)
        element = browser.switch_to.active_element
        reached.append(element.get_attribute("name") or element.text)
    assert "outcome" in reached and "Filter" in reached


def test_signing_out_closes_every_page(browser: WebDriver, proxy: ProxyServer) -> None:
    browser.get(f"{proxy.url}/admin/")
    browser.find_element(By.CSS_SELECTOR, ".who button").click()
    wait(browser).until(lambda b: "/admin/sign-in" in b.current_url)
    for path in ("/admin/", "/admin/traffic", "/admin/keys"):
        browser.get(f"{proxy.url}{path}")
        assert browser.current_url == f"{proxy.url}/admin/sign-in?next={quote(path)}"
    assert csp_violations(browser) == []


# The traffic's text search and the overview's charts (issue 12, points 2 and 7).


def signed_in(browser: WebDriver, proxy: ProxyServer, path: str) -> None:
    """``path`` open, signing in first if the session is gone."""
    browser.get(f"{proxy.url}{path}")
    if "/admin/sign-in" in browser.current_url:
        browser.find_element(By.ID, "name").send_keys("ada")
        browser.find_element(By.ID, "key").send_keys(ADMIN_KEY + Keys.ENTER)
        wait(browser).until(lambda b: b.current_url == f"{proxy.url}{path}")


def test_a_search_finds_a_transaction_by_a_word_of_its_prompt(
    browser: WebDriver, proxy: ProxyServer
) -> None:
    word = f"capybara{uuid.uuid4().hex[:6]}"
    ids = []
    for prompt in (f"Where does the {word} live?", "Where does the heron live?"):
        answer = httpx.post(
            f"{proxy.api_base}/chat/completions",
            json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}]},
            headers={"Authorization": f"Bearer {CLIENT_KEY}"},
            timeout=10,
        )
        assert answer.status_code == 200
        ids.append(answer.headers["x-luthien-transaction-id"])
        proxy.record(ids[-1])
    signed_in(browser, proxy, "/admin/traffic")
    browser.find_element(By.NAME, "q").send_keys(word.upper() + Keys.ENTER)
    wait(browser).until(lambda b: "q=" in b.current_url)
    rows = browser.find_elements(By.CSS_SELECTOR, "table.traffic tbody tr[data-seq]")
    links = [r.find_element(By.TAG_NAME, "a").get_attribute("href") for r in rows]
    assert links == [f"{proxy.url}/admin/transactions/{ids[0]}"]
    caption = browser.find_element(By.CSS_SELECTOR, "table.traffic caption").text
    assert caption.startswith(f"Holding \u201c{word.upper()}\u201d in a prompt or an answer")
    shot(browser, "traffic-search")
    rows[0].find_element(By.TAG_NAME, "a").click()
    wait(browser).until(lambda b: "/admin/transactions/" in b.current_url)
    turns = browser.find_elements(By.CSS_SELECTOR, ".conversation .turn pre")
    assert turns[0].text == f"Where does the {word} live?"
    assert csp_violations(browser) == []


def test_the_live_feed_of_a_searched_page_adds_only_what_matches(
    browser: WebDriver, proxy: ProxyServer
) -> None:
    word = f"okapi{uuid.uuid4().hex[:6]}"
    signed_in(browser, proxy, f"/admin/traffic?q={word}")
    ids = []
    for prompt in (f"Is the {word} shy?", "Is the heron shy?", f"Where is the {word}?"):
        answer = httpx.post(
            f"{proxy.api_base}/chat/completions",
            json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}]},
            headers={"Authorization": f"Bearer {CLIENT_KEY}"},
            timeout=10,
        )
        ids.append(answer.headers["x-luthien-transaction-id"])
        proxy.record(ids[-1])
    # The last match arrives by itself; the other prompt, recorded before it, never.
    assert_live_adds_only(browser, ids[2], ids[1])


def assert_live_adds_only(browser: WebDriver, last: str, never: str) -> None:
    """The traffic table's live feed brings ``last`` to the top by itself, and never
    ``never``, recorded before it (the feed gives records in order)."""
    link = f"table.traffic tbody a[href$='{last}']"
    wait(browser).until(lambda b: b.find_elements(By.CSS_SELECTOR, link))
    rows = browser.find_elements(By.CSS_SELECTOR, "table.traffic tbody tr[data-seq] a")
    shown = [(r.get_attribute("href") or "").rsplit("/", 1)[-1] for r in rows]
    assert shown[0] == last and never not in shown


def test_the_overview_draws_its_charts(browser: WebDriver, proxy: ProxyServer) -> None:
    signed_in(browser, proxy, "/admin/")
    windows = browser.find_elements(By.CSS_SELECTOR, "section.window")
    assert len(windows) == 2
    for window, bars in zip(windows, (12, 24), strict=True):
        charts = window.find_elements(By.CSS_SELECTOR, "figure.chart svg[role='img']")
        assert len(charts) == 5
        for chart in charts:
            assert chart.size["width"] > 150  # drawn, at its box's width
            assert len(chart.find_elements(By.CSS_SELECTOR, "rect.bar")) == bars
    # Earlier tests' requests were in the last hour: its Requests chart has a bar drawn.
    requests = windows[0].find_elements(By.CSS_SELECTOR, "figure.chart")[0]
    heights = [
        float(bar.get_attribute("height") or 0)
        for bar in requests.find_elements(By.CSS_SELECTOR, "rect.bar")
    ]
    assert max(heights) > 0
    figures = windows[0].find_element(By.CSS_SELECTOR, "dl.figures").text
    assert "Requests" in figures and "TTFT p50 / p90 / p99" in figures
    shot(browser, "overview")
    table = windows[0].find_element(By.CSS_SELECTOR, "details.numbers table")
    assert not table.is_displayed()
    windows[0].find_element(By.CSS_SELECTOR, "details.numbers summary").click()
    assert table.is_displayed()
    assert len(table.find_elements(By.CSS_SELECTOR, "tbody tr")) == 12
    assert csp_violations(browser) == []
