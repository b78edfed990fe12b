"""The page at `/` in a real browser (headless Chromium through selenium): a prompt typed in streams in as the
server's own greedy answer, Stop ends a long stream and frees its slot, and the page shows the stream's tokens/s.

Needs Debian's `chromium` and `chromium-driver` and `pip install selenium`; skips without them.
"""

from __future__ import annotations

import shutil
import time

import httpx
import pytest

from tests import test_serve

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER), reason="no chromium/chromedriver (apt-get install chromium chromium-driver)"
)

model_dir = test_serve.model_dir
# A long max_new_tokens, so that a stream runs until Stop is pressed.
LIMITS = dict(max_batch_size=4, max_prompt_tokens=32, max_new_tokens=100_000, queue_size=8, request_timeout=120)
WAIT_S = 60


@pytest.fixture(scope="module")
def server(model_dir):
    with test_serve.start(test_serve.Backend("torch", model_dir), **LIMITS) as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    yield driver
    driver.quit()


def fill(browser, field: str, value) -> None:
    element = browser.find_element(By.ID, field)
    element.clear()
    element.send_keys(str(value))


def status(browser) -> str:
    return browser.find_element(By.ID, "status").text


def output(browser) -> str:
    """The streamed text exactly as it arrived (`.text` would trim and collapse its spaces)."""
    return browser.execute_script("return document.getElementById('output').textContent")


def test_the_page_streams_the_servers_greedy_answer(server, browser, tmp_path):
    browser.get(server.url)
    WebDriverWait(browser, WAIT_S).until(lambda b: b.find_element(By.ID, "model").text == "tiny")
    fill(browser, "prompt", "Once upon a time")
    fill(browser, "temperature", 0)
    fill(browser, "max-tokens", 40)
    browser.find_element(By.ID, "ignore-eos").click()
    browser.find_element(By.ID, "start").click()
    WebDriverWait(browser, WAIT_S).until(lambda b: status(b).startswith("done"))
    expected = test_serve.greedy(server.url, "Once upon a time", max_tokens=40)
    assert output(browser) == expected and expected.strip()
    assert status(browser) == "done (length reached), 40 tokens"
    assert browser.find_element(By.ID, "rate").text.endswith("tokens/s")
    shot = tmp_path / "web-page.png"
    assert browser.save_screenshot(str(shot)) and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stop_ends_a_long_stream_and_frees_its_slot(server, browser):
    browser.get(server.url)
    fill(browser, "prompt", "The dog")
    fill(browser, "max-tokens", 100_000)
    ignore_eos = browser.find_element(By.ID, "ignore-eos")
    if not ignore_eos.is_selected():
        ignore_eos.click()
    browser.find_element(By.ID, "start").click()
    WebDriverWait(browser, WAIT_S).until(lambda b: status(b) == "writing" and len(output(b)) > 20)
    assert httpx.get(f"{server.url}/health").json()["active_sequences"] == 1
    browser.find_element(By.ID, "stop").click()
    WebDriverWait(browser, WAIT_S).until(lambda b: status(b).startswith("stopped"))
    stopped = output(browser)
    deadline = time.monotonic() + WAIT_S
    while httpx.get(f"{server.url}/health").json()["active_sequences"]:
        assert time.monotonic() < deadline, "the server still decodes the stopped stream"
        time.sleep(0.05)
    time.sleep(0.3)
    assert output(browser) == stopped  # nothing arrives after Stop
    assert browser.find_element(By.ID, "start").is_enabled() and not browser.find_element(By.ID, "stop").is_enabled()
