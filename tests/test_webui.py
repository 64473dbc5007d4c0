"""The web UI end to end in headless Chromium (Debian's `chromium`, driven by Playwright)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

import genlab
from genlab.serve.app import ServeConfig, background, create_app
from servers import tiny_model_folder

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def site(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("webui")
    model = genlab.load(tiny_model_folder(tokenizer, root / "tiny"))
    with background(create_app(model, ServeConfig(db=root / "fb.db"))) as url:
        yield url, root / "fb.db"


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail("the browser test needs Debian's chromium: apt-get install chromium (scripts/test.sh does this)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"], headless=True)
        yield b
        b.close()


def rows(db: Path, sql: str, *args):
    with sqlite3.connect(db) as conn:
        return conn.execute(sql, args).fetchall()


def test_chat_stream_thumbs_up_compare_and_history(site, browser, tmp_path):
    url, db = site
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    page.wait_for_function("document.querySelector('#model').options.length > 0")
    assert page.locator("#model option").all_inner_texts() == ["tiny"]
    page.fill("#max-tokens", "24")
    page.fill("#prompt", "Tell me about the quick brown fox")
    page.click("#send")
    answer = page.locator(".message.assistant").first
    page.wait_for_function("document.querySelector('.message.assistant')?.dataset.completionId")
    completion_id = answer.get_attribute("data-completion-id")
    assert answer.locator(".text").inner_text().strip()
    assert "tok/s" in answer.locator(".meta").inner_text()
    answer.locator(".thumbs-up").click()
    page.wait_for_function("document.querySelector('.feedback-status')?.textContent === 'saved'")
    assert rows(db, "SELECT rating, rating_scale FROM feedback WHERE completion_id = ?", completion_id) == [(1, "thumbs")]
    text, = rows(db, "SELECT text FROM choices WHERE completion_id = ?", completion_id)[0]
    assert text == answer.locator(".text").inner_text()  # what the user saw is what was recorded

    # edit to correct
    answer.locator(".correct").click()
    answer.locator(".correction textarea").fill("A fox is a small omnivorous mammal.")
    answer.locator(".save-correction").click()
    page.wait_for_function("!document.querySelector('.correction')")
    assert rows(db, "SELECT correction FROM feedback WHERE completion_id = ? AND correction IS NOT NULL",
                completion_id) == [("A fox is a small omnivorous mammal.",)]

    # compare two answers -> a preference pair
    page.fill("#temperature", "1.2")
    page.fill("#prompt", "Describe the ocean")
    page.click("#compare")
    page.wait_for_function("document.querySelectorAll('.pair .better').length === 2")
    pair = page.locator(".pair .message.assistant")
    ids = [pair.nth(i).get_attribute("data-completion-id") for i in range(2)]
    pair.nth(1).locator(".better").click()
    page.wait_for_selector(".pair .chosen")
    assert rows(db, "SELECT preferred, rejected FROM feedback WHERE preferred IS NOT NULL") == [(ids[1], ids[0])]
    shots = Path(os.environ.get("GENLAB_SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shots / "webui.png"), full_page=True)
    assert (shots / "webui.png").stat().st_size > 5000

    # the history page lists every feedback row, newest first
    page.goto(url + "/history")
    page.wait_for_selector("tr.feedback-row")
    assert page.locator("tr.feedback-row").count() == 3
    assert "omnivorous" in page.locator("#history").inner_text()
    assert not errors
