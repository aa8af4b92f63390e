"""The chat page at ``/`` in a real headless Chromium against a live server: a streamed answer, its bill, a bad key.

Skips where Chromium, its driver or selenium is missing, unless ``OPENGLM_REQUIRE_BROWSER=1`` (CI).
"""

from __future__ import annotations

import os
import re
import shutil

import pytest
from live_server import serving


def _driver():
    missing = [n for n in ("chromium", "chromedriver") if not shutil.which(n)]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium")
    if missing:
        message = f"no headless browser here ({', '.join(missing)} missing)"
        if os.environ.get("OPENGLM_REQUIRE_BROWSER") == "1":
            pytest.fail(message + ", and OPENGLM_REQUIRE_BROWSER=1")
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


@pytest.mark.slow
def test_chat_page_streams_an_answer_and_bills_it(tiny_checkpoint, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _driver()
    try:
        with serving(tiny_checkpoint, f"sqlite:///{tmp_path / 'page.db'}") as (server, store, secret, aid):
            wait = WebDriverWait(browser, 60)
            browser.get(server.url + "/")

            # A wrong key: no models are listed (listing needs a key), the page shows the API's error,
            # nothing is billed.
            browser.find_element(By.ID, "key").send_keys("sk-glm-wrong", Keys.TAB)
            wait.until(lambda b: "key" in b.find_element(By.ID, "status").text.lower())
            assert browser.find_elements(By.CSS_SELECTOR, "#model option") == []
            browser.find_element(By.ID, "input").send_keys("Hello", Keys.ENTER)
            error = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, ".msg.error"))[0]
            assert "key" in error.text.lower()
            assert store.ledger_totals(aid)["requests"] == 0

            key = browser.find_element(By.ID, "key")
            key.clear()
            key.send_keys(secret, Keys.TAB)
            wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#model option"))  # /v1/models answered the key
            assert browser.find_element(By.ID, "model").get_attribute("value") == "tiny"
            browser.find_element(By.ID, "input").send_keys("Hello there", Keys.ENTER)
            status = wait.until(lambda b: re.fullmatch(r"(\d+) prompt \+ (\d+) completion tokens",
                                                       b.find_element(By.ID, "status").text))
            prompt, completion = int(status.group(1)), int(status.group(2))
            answers = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")
            assert [m.text for m in browser.find_elements(By.CSS_SELECTOR, ".msg.user")] == ["Hello", "Hello there"]
            assert len(answers) == 1 and completion >= 1
            # What the page showed is what the ledger holds, and the key was remembered.
            totals = store.ledger_totals(aid)
            assert (totals["requests"], totals["prompt_tokens"], totals["completion_tokens"]) == (1, prompt, completion)
            assert browser.execute_script("return localStorage.getItem('openglm-key')") == secret
    finally:
        browser.quit()
