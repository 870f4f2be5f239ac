"""The console's review queue and Policies pages in headless Chromium, against a real proxy
(two workers) whose policy is stored in its database and judged by a trusted model that
flags: review a flagged transaction; edit the policy with an error, fix it, put it in
force and see every worker apply it; dry-run an edited policy on a recorded stream.

``LUTHIEN_CONSOLE_SCREENSHOTS=DIR`` saves the pages' screenshots there (``docs/console/``)."""

from __future__ import annotations

import json
import time
from urllib.parse import quote

import httpx
import pytest
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement

from tests.conftest import CLIENT_KEY, MockBackendServer, ProxyServer, ProxyStarter
from tests.console.test_browser import (
    ADMIN_KEY,
    WAIT,
    assert_live_adds_only,
    csp_violations,
    shot,
    sign_in,
    wait,
)
from tests.policies.test_judge import FORBIDDEN
from tests.test_judge import MESSAGES, answer, judged

SHELL = json.dumps([{"name": "shell", "arguments": json.dumps({"command": "rm -rf /"})}])


@pytest.fixture(scope="module")
def proxy(
    start_proxy: ProxyStarter, mock_backend: MockBackendServer, content_judge_url: str
) -> ProxyServer:
    return start_proxy(
        db_policy=judged(mock_backend.api_base, content_judge_url, mode="buffer", action="flag"),
        env={"ADMIN_API_KEY": ADMIN_KEY, "REFRESH_INTERVAL": "0.2"},
        workers=2,
    )


def call_shell(proxy: ProxyServer, *, stream: bool = False) -> httpx.Response:
    with httpx.Client(timeout=30) as client:
        response = client.post(
            f"{proxy.api_base}/chat/completions",
            json={"model": "gpt-4o-mini", "messages": MESSAGES, "stream": stream},
            headers={"Authorization": f"Bearer {CLIENT_KEY}", "x-mock-tool-calls": quote(SHELL)},
        )
        response.read()
        return response


def recorded_shell_stream(proxy: ProxyServer) -> str:
    """The id of a streamed answer that calls ``shell``, once it is recorded."""
    recorded = call_shell(proxy, stream=True)
    assert recorded.status_code == 200 and '"shell"' in recorded.text
    transaction_id = recorded.headers["x-luthien-transaction-id"]
    proxy.record(transaction_id)
    return transaction_id


@pytest.fixture(scope="module")
def signed_in(browser: WebDriver, proxy: ProxyServer) -> None:
    sign_in(browser, proxy, "rev. grace")


def set_text(browser: WebDriver, element: WebElement, text: str) -> None:
    """Replace a textarea's text as a person pasting it would (send_keys types each
    character, slowly, and the editor has thousands)."""
    browser.execute_script("arguments[0].value = arguments[1];", element, text)


@pytest.mark.usefixtures("signed_in")
def test_review_a_flagged_transaction(browser: WebDriver, proxy: ProxyServer) -> None:
    response = httpx.post(
        f"{proxy.api_base}/chat/completions",
        json={"model": "gpt-4o-mini", "messages": MESSAGES},
        headers={"Authorization": f"Bearer {CLIENT_KEY}", **answer(f"all about {FORBIDDEN}")},
        timeout=30,
    )
    assert response.status_code == 200  # flagged, not blocked
    transaction_id = response.headers["x-luthien-transaction-id"]
    proxy.record(transaction_id)

    browser.get(f"{proxy.url}/admin/review")
    row = browser.find_element(By.CSS_SELECTOR, f"tr[data-seq] a[href$='{transaction_id}']")
    shot(browser, "review")
    row.click()
    wait(browser).until(lambda b: transaction_id in b.current_url)
    browser.find_element(By.CSS_SELECTOR, "input[name=verdict][value=violation]").click()
    browser.find_element(By.ID, "note").send_keys("it says the forbidden word")
    browser.find_element(By.CSS_SELECTOR, ".review button[type=submit]").click()
    # The reviewer is taken back to the queue, where it no longer waits.
    wait(browser).until(lambda b: b.current_url == f"{proxy.url}/admin/review")
    assert not browser.find_elements(By.CSS_SELECTOR, f"a[href$='{transaction_id}']")
    browser.get(f"{proxy.url}/admin/transactions/{transaction_id}")
    verdict = browser.find_element(By.CSS_SELECTOR, ".verdict")
    assert verdict.text.startswith("violation by rev. grace, ")
    assert verdict.text.endswith(": it says the forbidden word")
    shot(browser, "reviewed")
    assert csp_violations(browser) == []


@pytest.mark.usefixtures("signed_in")
def test_dry_run_an_edited_policy_on_a_recorded_stream(
    browser: WebDriver, proxy: ProxyServer
) -> None:
    transaction_id = recorded_shell_stream(proxy)

    browser.get(f"{proxy.url}/admin/policy?name=root")
    editor = browser.find_element(By.ID, "definition")
    tree = json.loads(editor.get_attribute("value") or "")
    tree["config"]["policies"].append(
        {"type": "ToolCallPolicy", "config": {"denied_tools": ["shell"], "action": "drop_call"}}
    )
    tree["config"]["policies"][2]["config"]["backend_url"] = "http://127.0.0.1:9/v1"  # nowhere
    set_text(browser, editor, json.dumps(tree, indent=2))
    browser.find_element(By.ID, "transaction").send_keys(transaction_id)
    browser.find_element(By.CSS_SELECTOR, "button[formaction$='/policies/dry-run']").click()
    wait(browser).until(lambda b: b.title.startswith("Dry run of root"))
    outcomes = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".sides .outcome")]
    assert outcomes[0].startswith("200 · ok · streamed")
    assert outcomes[1].startswith("200 · ok · streamed")
    then_turns = browser.find_elements(By.CSS_SELECTOR, ".sides section:first-child .turn")
    now_turns = browser.find_elements(By.CSS_SELECTOR, ".sides section:last-child .turn")
    assert any("tool call" in turn.text for turn in then_turns)
    assert not any("tool call" in turn.text for turn in now_turns)
    decisions = [r.text for r in browser.find_elements(By.CSS_SELECTOR, ".decisions tbody tr")]
    assert "ToolCallPolicy dropped tool shell" in decisions
    shot(browser, "dry-run")
    assert csp_violations(browser) == []


@pytest.mark.usefixtures("signed_in")
def test_edit_a_policy_with_an_error_fix_it_and_see_it_in_force(
    browser: WebDriver, proxy: ProxyServer
) -> None:
    assert call_shell(proxy).status_code == 200
    browser.get(f"{proxy.url}/admin/policies")
    assert "database policy 'root' (version 1)" in browser.find_element(By.ID, "main").text
    shot(browser, "policies")
    browser.find_element(By.LINK_TEXT, "root").click()
    wait(browser).until(lambda b: "/admin/policy?name=root" in b.current_url)
    editor = browser.find_element(By.ID, "definition")
    tree = json.loads(editor.get_attribute("value") or "")
    tree["config"]["policies"].append({"type": "ToolCallPolicy", "config": {"denied": ["shell"]}})
    set_text(browser, editor, json.dumps(tree, indent=2))
    browser.find_element(By.CSS_SELECTOR, ".editor > button[type=submit]").click()
    error = wait(browser).until(lambda b: b.find_element(By.CSS_SELECTOR, "[role=alert]"))
    assert error.text.startswith("policies[5].config.denied: ")
    editor = browser.find_element(By.ID, "definition")
    assert editor.get_attribute("aria-invalid") == "true"
    browser.execute_script("arguments[0].scrollIntoView()", error)
    shot(browser, "policy-error")

    fixed = (editor.get_attribute("value") or "").replace('"denied"', '"denied_tools"')
    set_text(browser, editor, fixed)
    browser.find_element(By.CSS_SELECTOR, ".editor > button[type=submit]").click()
    notice = wait(browser).until(lambda b: b.find_element(By.CSS_SELECTOR, ".notice"))
    assert notice.text == "Stored version 2, now in force."
    shot(browser, "policy")
    deadline = time.monotonic() + WAIT
    while not all(call_shell(proxy).status_code == 403 for _ in range(4)):
        assert time.monotonic() < deadline, "the new version is not in force on every worker"
        time.sleep(0.1)

    browser.find_element(By.CSS_SELECTOR, "button[aria-label='Put version 1 in force']").click()
    # The page being left has a notice too: wait for the new page, then read its own.
    wait(browser).until(lambda b: b.current_url.endswith("?name=root&activated=1"))
    notice = browser.find_element(By.CSS_SELECTOR, ".notice")
    assert notice.text == "Version 1 is in force."
    deadline = time.monotonic() + WAIT
    while not all(call_shell(proxy).status_code == 200 for _ in range(4)):
        assert time.monotonic() < deadline, "version 1 is not back in force on every worker"
        time.sleep(0.1)
    assert csp_violations(browser) == []


def dry_run(browser: WebDriver, proxy: ProxyServer, transaction_id: str) -> None:
    """The policy in force dry-run on ``transaction_id``, from the editor's form."""
    browser.get(f"{proxy.url}/admin/policy?name=root")
    browser.find_element(By.ID, "transaction").send_keys(transaction_id)
    browser.find_element(By.CSS_SELECTOR, "button[formaction$='/policies/dry-run']").click()
    wait(browser).until(lambda b: b.title.startswith("Dry run of root"))


def sideways(browser: WebDriver) -> int:
    """How far the page scrolls sideways: more than 0 is unreadable on a phone."""
    return int(
        browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
    )


@pytest.mark.usefixtures("signed_in")
def test_every_page_at_a_phone_width(browser: WebDriver, proxy: ProxyServer) -> None:
    transaction_id = recorded_shell_stream(proxy)
    browser.set_window_size(390, 844)
    try:
        for path in (
            "/admin/review",
            "/admin/policies",
            "/admin/policy?name=root",
            f"/admin/transactions/{transaction_id}",
        ):
            browser.get(f"{proxy.url}{path}")
            assert sideways(browser) <= 0, f"{path} scrolls sideways at a phone's width"
        dry_run(browser, proxy, transaction_id)
        assert sideways(browser) <= 0, "the dry run scrolls sideways at a phone's width"
        shot(browser, "dry-run-phone")
    finally:
        browser.set_window_size(1280, 800)


# Keyboard and no-script use (issue 12, point 9).

# What a keyboard user must be able to reach. A group of radio buttons is one stop (its
# checked button; arrows move within it).
TAB_STOPS = """
const all = Array.from(document.querySelectorAll(
  "a[href], button, input:not([type=hidden]), select, textarea, summary"));
const shown = all.filter((e) => e.getClientRects().length && !e.disabled);
const stops = shown.filter((e) => {
  if (e.type !== "radio") return true;
  const group = shown.filter((o) => o.type === "radio" && o.name === e.name);
  return group.some((o) => o.checked) ? e.checked : group[0] === e;
});
stops.forEach((e, i) => { e.dataset.stop = String(i); });
return stops.map((e) => e.outerHTML.slice(0, 80));
"""
FOCUSED = """
const e = document.activeElement, style = getComputedStyle(e);
return [e.dataset.stop === undefined ? null : Number(e.dataset.stop),
        style.outlineStyle !== "none" && style.outlineWidth !== "0px",
        e.outerHTML.slice(0, 80)];
"""


def tab_through(browser: WebDriver) -> None:
    """Tab from the top of the page: every control is reached once, in the page's order,
    and shows where the focus is. (Chromium also stops at a scrolling box with nothing
    focusable inside, so a long ``pre`` can be scrolled by keys: allowed, ring checked.)"""
    stops = browser.execute_script(TAB_STOPS)
    reached: list[int] = []
    for _ in range(len(stops) + 8):  # a few scrolling boxes besides
        ActionChains(browser).send_keys(Keys.TAB).perform()
        stop, ringed, html = browser.execute_script(FOCUSED)
        if html.startswith("<body"):
            break  # back out of the page: every stop was passed
        assert ringed, f"no focus ring on {html}"
        if stop is not None:
            reached.append(stop)
        if len(reached) == len(stops):
            break
    assert reached == list(range(len(stops))), (browser.current_url, stops, reached)


@pytest.mark.usefixtures("signed_in")
def test_the_keyboard_reaches_every_control_on_every_page(
    browser: WebDriver, proxy: ProxyServer
) -> None:
    transaction_id = recorded_shell_stream(proxy)
    for path in (
        "/admin/",
        "/admin/traffic",
        f"/admin/transactions/{transaction_id}",
        "/admin/review",
        "/admin/keys",
        "/admin/policies",
        "/admin/policy?name=root",
    ):
        browser.get(f"{proxy.url}{path}")
        tab_through(browser)

    # A dry run by keys alone: type the id in its field, Tab to its button, Enter.
    browser.get(f"{proxy.url}/admin/policy?name=root")
    browser.find_element(By.ID, "transaction").send_keys(transaction_id + Keys.TAB)
    focused = browser.switch_to.active_element
    assert focused.text == "Dry run"
    focused.send_keys(Keys.ENTER)
    wait(browser).until(lambda b: b.title.startswith("Dry run of root"))
    tab_through(browser)


@pytest.mark.usefixtures("signed_in")
def test_every_page_reads_without_javascript(browser: WebDriver, proxy: ProxyServer) -> None:
    response = httpx.post(
        f"{proxy.api_base}/chat/completions",
        json={"model": "gpt-4o-mini", "messages": MESSAGES},
        headers={"Authorization": f"Bearer {CLIENT_KEY}", **answer(f"more about {FORBIDDEN}")},
        timeout=30,
    )
    transaction_id = response.headers["x-luthien-transaction-id"]
    proxy.record(transaction_id)
    browser.execute_cdp_cmd("Emulation.setScriptExecutionDisabled", {"value": True})
    try:
        browser.get(f"{proxy.url}/admin/traffic")
        link = f"a[href='/admin/transactions/{transaction_id}']"
        assert browser.find_elements(By.CSS_SELECTOR, f"table.traffic tbody {link}")
        browser.get(f"{proxy.url}/admin/review")
        assert browser.find_elements(By.CSS_SELECTOR, f"tr[data-seq] {link}")
        browser.get(f"{proxy.url}/admin/transactions/{transaction_id}")
        turns = [t.text for t in browser.find_elements(By.CSS_SELECTOR, ".conversation .turn pre")]
        assert turns[-1] == f"more about {FORBIDDEN}"
        browser.get(f"{proxy.url}/admin/")
        assert len(browser.find_elements(By.CSS_SELECTOR, "figure.chart svg[role='img']")) == 10
        browser.get(f"{proxy.url}/admin/policies")
        assert "database policy 'root'" in browser.find_element(By.ID, "main").text
    finally:
        browser.execute_cdp_cmd("Emulation.setScriptExecutionDisabled", {"value": False})


@pytest.mark.usefixtures("signed_in")
def test_the_live_feed_of_a_flagged_page_adds_flagged_transactions_only(
    browser: WebDriver, proxy: ProxyServer
) -> None:
    browser.get(f"{proxy.url}/admin/traffic?flagged=1")
    ids = []
    for text in (f"first {FORBIDDEN}", "nothing to see", f"second {FORBIDDEN}"):
        response = httpx.post(
            f"{proxy.api_base}/chat/completions",
            json={"model": "gpt-4o-mini", "messages": MESSAGES},
            headers={"Authorization": f"Bearer {CLIENT_KEY}", **answer(text)},
            timeout=30,
        )
        ids.append(response.headers["x-luthien-transaction-id"])
        proxy.record(ids[-1])
    # The last flagged one arrives by itself; the clean one, recorded before it, never.
    assert_live_adds_only(browser, ids[2], ids[1])
