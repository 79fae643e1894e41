"""The labeling page in a real headless browser (Debian's chromium, driven over
WebDriver by selenium through /usr/bin/chromedriver), in front of a real gRPC
feedback server on a SQLite store: sign in, click buttons, press keys; what
counts is what ends up in the store.

These tests fail, not skip, when chromium or chromedriver is missing: install
them with `apt-get install -y chromium chromium-driver` (.ci/run does).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from hitl.feedback.v1 import feedback_pb2 as pb
from tests.services.feedback.conftest import make_task
from tests.services.labeling.conftest import (
    by_task,
    publish,
    start_server,
    stored,
    wait_stored,
)
from tests.services.labeling.test_web_auth import ALICE_TOKEN, BOB_TOKEN, PROXY_SECRET
from tests.services.labeling.test_web_http import WebFront, web_config

# the page's outbox in localStorage (one key per annotator), read and put back as it was
OUTBOX = """
const key = Object.keys(localStorage).find((k) => k.startsWith("hitl-label-web:outbox:"));
return [key, localStorage.getItem(key)];
"""
OUTBOX_RESTORE = "localStorage.setItem(arguments[0][0], arguments[0][1]);"

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WAIT_S = 30.0

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser():
    """One headless chromium for the module (each test's server has its own origin, so its own storage)."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(f"{' and '.join(missing)} missing: `apt-get install -y chromium chromium-driver` "
                    "(the page is tested in a real browser)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                "--disable-extensions", "--disable-background-networking", "--window-size=1280,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    """The labeling page in the browser, with waits on what it shows."""

    def __init__(self, driver: webdriver.Chrome, base: str):
        self.driver = driver
        self.base = base

    def open(self) -> "Page":
        """Open the page signed out (cookies are per host, not per port: an earlier test's sign-in would carry over)."""
        self.driver.get(self.base + "/healthz")
        self.driver.delete_all_cookies()
        self.driver.get(self.base + "/")
        return self

    def el(self, element_id: str):
        return self.driver.find_element(By.ID, element_id)

    def text(self, element_id: str) -> str:
        return self.el(element_id).text

    def wait(self, what: str, condition) -> None:
        try:
            WebDriverWait(self.driver, WAIT_S, poll_frequency=0.1).until(lambda _: condition())
        except TimeoutException:
            raise AssertionError(f"the page never showed {what}; message: {self.text('message')!r}") from None

    def wait_text(self, element_id: str, expected: str) -> None:
        self.wait(f"#{element_id} = {expected!r}", lambda: self.el(element_id).is_displayed() and self.text(element_id) == expected)

    def wait_shown(self, element_id: str) -> None:
        self.wait(f"#{element_id}", lambda: self.el(element_id).is_displayed())

    def sign_in(self, annotator: str) -> None:
        """Sign in with a self-declared id (open mode, loopback only)."""
        self.wait_shown("signin")
        assert not self.el("token").is_displayed()
        self.el("annotator-id").send_keys(annotator)
        self.el("signin-button").click()
        self.wait_text("annotator", annotator)

    def sign_in_with_token(self, token: str, annotator: str | None) -> None:
        """Sign in with a personal token (tokens mode); `annotator` None: the token must be refused."""
        self.wait_shown("signin")
        assert self.el("token").get_attribute("type") == "password" and not self.el("annotator-id").is_displayed()
        self.el("token").clear()
        self.el("token").send_keys(token)
        self.el("signin-button").click()
        if annotator is None:
            self.wait("the refusal", lambda: "not a token of this page" in self.text("signin-error"))
            assert self.el("signin").is_displayed() and not self.el("work").is_displayed()
            assert self.el("token").get_attribute("value") == ""  # the page keeps no token
        else:
            self.wait_text("annotator", annotator)

    def keys(self, *keys: str) -> None:
        """Type keys as a person would, to whatever has the focus."""
        ActionChains(self.driver).send_keys(*keys).perform()

    def ctrl(self, key: str) -> None:
        """Press `key` with Control held down."""
        ActionChains(self.driver).key_down(Keys.CONTROL).send_keys(key).key_up(Keys.CONTROL).perform()

    def display_order(self) -> list[str]:
        return [card.get_attribute("data-candidate-id") for card in self.driver.find_elements(By.CSS_SELECTOR, "#candidates .candidate")]


def test_sign_in_with_a_token_then_a_click_and_keys_judge_tasks_into_the_store(browser, url, tmp_path):
    publish(url, make_task("t1"), make_task("t2"), make_task("r1", n=3))
    srv = start_server(url)
    tokens = tmp_path / "annotators.yaml"
    tokens.write_text(f"alice: {ALICE_TOKEN}\nbob: {BOB_TOKEN}\n")
    tokens.chmod(0o600)
    front = WebFront(web_config(srv.address, guidelines="Prefer the shorter answer when both are right.", guidelines_version="g-7",
                                auth={"tokens_file": str(tokens)})).start()
    try:
        page = Page(browser, front.base).open()
        page.sign_in_with_token(BOB_TOKEN[:-2], None)  # a wrong token: still signed out
        assert browser.get_cookies() == []
        page.sign_in_with_token(ALICE_TOKEN, "alice")  # the token says who: alice
        (cookie,) = browser.get_cookies()
        assert (cookie["name"], cookie["httpOnly"], cookie["sameSite"]) == ("hitl_session", True, "Strict")
        assert browser.execute_script("return document.cookie") == ""  # no script on the page reads the session
        page.wait_text("task-id", "t1")
        assert page.text("guidelines") == "Prefer the shorter answer when both are right."
        assert page.text("guidelines-version") == "g-7"
        assert "both bad" in page.text("keys")  # the keys are listed on the page
        left, right = browser.find_elements(By.CSS_SELECTOR, "#candidates .candidate")
        assert left.location["y"] == right.location["y"] and left.location["x"] < right.location["x"]  # side by side
        orders = {"t1": page.display_order()}

        page.el("choose-A-clearly").click()  # a button
        page.wait_text("task-id", "t2")
        orders["t2"] = page.display_order()
        page.keys("x")  # a key: both bad
        page.wait_text("task-id", "r1")
        orders["r1"] = page.display_order()
        page.keys("3", "1", Keys.ENTER)  # answer 3 over 1 over 2
        page.wait_shown("empty")
        page.wait_text("server-records", "3")
        assert page.text("judged") == "3" and page.text("unsent") == "0"
        records = wait_stored(url, 3)
        page.el("signout").click()  # the session ends on the server, and the form asks for a token again
        page.wait_shown("signin")
        browser.refresh()
        page.wait_shown("signin")
        assert page.el("token").is_displayed() and len(front.front.gate.sessions) == 0
    finally:
        front.stop()
        srv.stop()
    got = {task: rs[0] for task, rs in by_task(records).items()}
    assert sorted(got) == ["r1", "t1", "t2"]
    for task_id, r in got.items():
        assert (r.annotator_id, r.project, r.guidelines_version) == ("alice", "demo", "g-7")
        assert r.metadata["client"] == "hitl-label-web" and r.metadata["display_order"] == ",".join(orders[task_id])
        assert r.HasField("lead_time_seconds") and r.lead_time_seconds > 0 and r.client_time.seconds > 0
    t1, t2 = got["t1"].preference, got["t2"].preference
    assert (t1.choice, t1.strength, t1.candidate_a_id, t1.candidate_b_id) == (pb.Preference.CHOICE_A, 1.0, *orders["t1"])
    assert (t2.choice, t2.HasField("strength"), t2.candidate_a_id) == (pb.Preference.CHOICE_BOTH_BAD, False, orders["t2"][0])
    first, second, third = orders["r1"]
    assert {e.candidate_id: e.rank for e in got["r1"].ranking.entries} == {third: 1, first: 2, second: 3}


def test_ratings_correction_flag_and_skip(browser, url):
    publish(url, make_task("q1", scales=[("helpfulness", 1, 7), ("honesty", 1, 5)]), make_task("q2"))
    srv = start_server(url)
    front = WebFront(web_config(srv.address, guidelines_version="g-2")).start()
    try:
        page = Page(browser, front.base).open()
        page.sign_in("bob")
        page.wait_text("task-id", "q1")
        left, _ = page.display_order()

        page.keys("e", "a")  # correct A
        page.wait_shown("correction-panel")
        page.el("correction-text").clear()
        page.el("correction-text").send_keys("a better answer")
        page.ctrl(Keys.ENTER)
        page.wait_text("message", "saved: correction of A (q1)")

        page.keys("f", "p", "o")  # flag the prompt as "other": the note is required
        page.wait_shown("flag-panel")
        page.keys(Keys.ENTER)
        page.wait_text("message", "a flag of kind 'other' needs a note")
        page.el("flag-note").send_keys("off topic", Keys.ENTER)
        page.wait_text("message", "saved: flag other on the prompt (q1)")

        browser.find_element(By.CSS_SELECTOR, 'input[name="confidence"][value="4"]').click()
        page.keys("r")  # ratings: the first field gets the focus
        page.keys("6", Keys.TAB, "4", Keys.ENTER)  # A rated; B left empty
        page.wait_text("task-id", "q2")
        page.keys("s")
        page.wait_shown("empty")
        page.wait_text("skipped", "1")
        records = wait_stored(url, 3)
    finally:
        front.stop()
        srv.stop()
    kinds = {r.WhichOneof("judgement"): r for r in records}
    assert sorted(kinds) == ["correction", "flag", "ratings"] and all(r.task_id == "q1" for r in records)
    assert all(r.annotator_id == "bob" and r.guidelines_version == "g-2" for r in records)
    corr = kinds["correction"].correction
    assert (corr.candidate_id, corr.corrected_text) == (left, "a better answer")
    flag = kinds["flag"].flag
    assert (flag.candidate_id, flag.kind, flag.note) == ("", pb.Flag.KIND_OTHER, "off topic")
    ratings = {(e.candidate_id, e.aspect): e.value for e in kinds["ratings"].ratings.entries}
    assert ratings == {(left, "helpfulness"): 6, (left, "honesty"): 4}  # B's row was left empty
    assert kinds["ratings"].confidence == pytest.approx(0.8)
    assert not kinds["correction"].HasField("confidence")  # confidence goes with finishing judgements only


def test_a_judgement_made_while_the_service_is_down_is_stored_once(browser, url):
    publish(url, make_task("t1"), make_task("t2"))
    srv = start_server(url)
    port = srv.server.port
    front = WebFront(web_config(srv.address, guidelines_version="g-1")).start()
    try:
        page = Page(browser, front.base).open()
        page.sign_in("carol")
        page.wait_text("task-id", "t1")
        order = page.display_order()
        srv.stop()
        page.keys("B")  # Shift+B: B clearly better; the page keeps it and resends it, with the same feedback_id
        page.wait_text("connection", "○ offline, retrying")
        page.wait_text("unsent", "1")
        kept = browser.execute_script(OUTBOX)
        browser.refresh()  # the outbox outlives the page
        page.wait_text("unsent", "1")
        assert stored(url) == []
        srv = start_server(url, port)  # the service is back, on the same store and port
        page.wait_text("task-id", "t2")
        page.wait_text("unsent", "0")
        page.wait_text("server-records", "1")
        (record,) = wait_stored(url, 1)

        # a page closed after the server stored a judgement but before it heard so kept it: it is sent again
        browser.execute_script(OUTBOX_RESTORE, kept)
        browser.refresh()
        page.wait_text("message", "saved: B clearly better (t1) (it was stored before)")
        page.wait_text("unsent", "0")
        page.wait_text("task-id", "t2")
        assert [r.feedback_id for r in stored(url)] == [record.feedback_id]
    finally:
        front.stop()
        srv.stop()
    assert (record.task_id, record.annotator_id, record.guidelines_version) == ("t1", "carol", "g-1")
    assert (record.preference.choice, record.preference.strength) == (pb.Preference.CHOICE_B, 1.0)
    assert record.preference.candidate_b_id == order[1]


def test_behind_a_sign_in_proxy_the_page_asks_nothing(browser, url, tmp_path):
    """Header mode: the proxy's headers (set here through the DevTools protocol, as a proxy
    would add them) say who it is; without them the page explains, and shows no form."""
    publish(url, make_task("t1"))
    srv = start_server(url)
    secret = tmp_path / "proxy-secret"
    secret.write_text(PROXY_SECRET)
    secret.chmod(0o600)
    front = WebFront(web_config(srv.address, guidelines_version="g-3",
                                auth={"mode": "header", "proxy_secret_file": str(secret)})).start()
    browser.execute_cdp_cmd("Network.enable", {})
    try:
        page = Page(browser, front.base).open()
        page.wait_shown("signin-proxy")
        assert not page.el("signin-form").is_displayed() and not page.el("work").is_displayed()
        browser.execute_cdp_cmd("Network.setExtraHTTPHeaders",
                                {"headers": {"X-Forwarded-User": "dana", "X-Hitl-Proxy-Secret": PROXY_SECRET}})
        browser.refresh()
        page.wait_text("annotator", "dana")
        assert not page.el("signout").is_displayed() and browser.get_cookies() == []  # the proxy keeps the session
        page.wait_text("task-id", "t1")
        page.keys("t")
        page.wait_shown("empty")
        (record,) = wait_stored(url, 1)
    finally:
        browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {}})
        front.stop()
        srv.stop()
    assert (record.task_id, record.annotator_id, record.preference.choice) == ("t1", "dana", pb.Preference.CHOICE_TIE)
