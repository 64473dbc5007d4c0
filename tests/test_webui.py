"""The web UI end to end: the real server (a tiny random genlab model, uvicorn in a thread) driven
by headless Chromium (Debian's `chromium`, through Playwright); what the UI does is checked in the
feedback database the server writes."""

from __future__ import annotations

import json
import os
import re
import socket
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

import genlab
from genlab.serve.app import ServeConfig, create_app
from servers import tiny_model_folder

CHROMIUM = Path("/usr/bin/chromium")
TIMEOUT_MS = 60_000  # generous: the machine running the tests may be busy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(app):
    """The real uvicorn server in a background thread; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="webui-test-server", daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "the test server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive(), "the test server did not stop"


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory):
    return tiny_model_folder(tokenizer, tmp_path_factory.mktemp("webui") / "tiny")


@pytest.fixture(scope="module")
def site(model_dir, tmp_path_factory):
    db = tmp_path_factory.mktemp("webui-db") / "fb.db"
    with serving(create_app(genlab.load(model_dir), ServeConfig(db=db))) as url:
        yield url, db


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"the web UI test needs Debian's Chromium at {CHROMIUM}: install it with "
                    "`apt-get install chromium` (do not use `playwright install`)")
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"], headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A fresh page (own context: empty localStorage) that fails the test on any JavaScript error."""
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def rows(db: Path, sql: str, *args):
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def finished(msg) -> str:
    """Wait until an assistant message is complete; its completion id (fails fast on an error)."""
    from playwright.sync_api import expect

    expect(msg).to_be_attached()
    expect(msg).not_to_have_class(re.compile(r"\bstreaming\b"))
    error = msg.locator(".meta .error")
    assert error.count() == 0, f"the answer failed: {error.first.text_content()}"
    cid = msg.get_attribute("data-completion-id")
    assert cid and cid.startswith("chatcmpl-"), cid
    return cid


def screenshot_dir(tmp_path: Path) -> Path:
    """$GENLAB_SCREENSHOT_DIR if set, else the test's tmp dir."""
    folder = Path(os.environ.get("GENLAB_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def wait_models(page):
    page.wait_for_function("document.querySelector('#model').options.length > 0")


def test_chat_feedback_compare_and_history(site, page, tmp_path):
    from playwright.sync_api import expect

    url, db = site
    page.goto(url + "/")
    wait_models(page)
    assert page.locator("#model option").evaluate_all("os => os.map(o => o.value)") == ["tiny"]
    page.fill("#max-tokens", "12")  # 4 turns must fit the tiny model's 256-token context
    page.fill("#temperature", "0.9")
    page.fill("#seed", "3")  # reproducible answers

    # --- send (button), stream, thumbs up ------------------------------------------------
    page.fill("#prompt", "Tell me about the quick brown fox")
    page.click("#send")
    first = page.locator(".message.assistant").nth(0)
    cid = finished(first)
    shown = first.locator(".text").text_content()
    assert shown.strip(), "the streamed answer is empty"
    assert "token" in first.locator(".stats").text_content()
    recorded, = rows(db, "SELECT text FROM choices WHERE completion_id = ?", cid)
    assert recorded[0] == shown  # what the user saw is what was recorded
    req, = rows(db, "SELECT request, params FROM completions WHERE id = ?", cid)
    request, params = json.loads(req[0]), json.loads(req[1])
    assert request["stream"] is True and request["stream_options"] == {"include_usage": True}
    assert request["messages"] == [{"role": "user", "content": "Tell me about the quick brown fox"}]
    assert params["max_tokens"] == 12 and params["temperature"] == pytest.approx(0.9) and params["seed"] == 3

    first.locator(".thumbs-up").click()
    expect(first.locator(".feedback-status")).to_have_text("saved")
    assert rows(db, "SELECT rating, rating_scale FROM feedback WHERE completion_id = ?", cid) == [(1, "thumbs")]

    # --- edit to correct (with a comment), then a plain comment -----------------------------
    first.locator(".correct").click()
    first.locator(".correction textarea").fill("A fox is a small omnivorous mammal.")
    first.locator(".correction-comment").fill("too vague")
    first.locator(".save-correction").click()
    expect(first.locator(".correction")).to_have_count(0)
    assert rows(db, "SELECT correction, comment FROM feedback WHERE completion_id = ? AND correction IS NOT NULL",
                cid) == [("A fox is a small omnivorous mammal.", "too vague")]
    first.locator(".comment-button").click()
    first.locator(".comment textarea").fill("nice try")
    first.locator(".save-comment").click()
    expect(first.locator(".comment")).to_have_count(0)
    assert rows(db, "SELECT comment FROM feedback WHERE completion_id = ? AND correction IS NULL AND comment IS NOT NULL",
                cid) == [("nice try",)]

    # --- Shift+Enter is a new line, Enter sends; the conversation is carried along -----------
    page.click("#prompt")
    page.keyboard.type("Second line one")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("line two")
    assert page.input_value("#prompt") == "Second line one\nline two"
    page.keyboard.press("Enter")
    second = page.locator(".message.assistant").nth(1)
    cid2 = finished(second)
    messages = json.loads(rows(db, "SELECT messages FROM completions WHERE id = ?", cid2)[0][0])
    assert messages == [{"role": "user", "content": "Tell me about the quick brown fox"},
                        {"role": "assistant", "content": shown},
                        {"role": "user", "content": "Second line one\nline two"}]
    second.locator(".thumbs-down").click()
    expect(second.locator(".feedback-status")).to_have_text("saved")
    assert rows(db, "SELECT rating FROM feedback WHERE completion_id = ?", cid2) == [(-1,)]

    # --- compare two answers: a preference pair; the chosen answer continues the chat ---------
    page.fill("#temperature", "1.5")
    page.fill("#seed", "41")
    page.fill("#prompt", "Describe the ocean")
    page.click("#compare")
    pair = page.locator(".pair .message.assistant")
    expect(pair).to_have_count(2)
    finished(pair.nth(0)), finished(pair.nth(1))
    expect(page.locator(".pair .better")).to_have_count(2)
    ids = [pair.nth(i).get_attribute("data-completion-id") for i in range(2)]
    texts = [pair.nth(i).locator(".text").text_content() for i in range(2)]
    assert all(ids) and ids[0] != ids[1]
    seeds = [json.loads(rows(db, "SELECT params FROM completions WHERE id = ?", i)[0][0])["seed"] for i in ids]
    assert seeds == [41, 42]
    pair.nth(1).locator(".better").click()
    expect(pair.nth(1)).to_have_class(re.compile(r"\bchosen\b"))
    expect(pair.nth(1).locator(".feedback-status")).to_have_text("saved")
    assert rows(db, "SELECT completion_id, preferred, rejected FROM feedback WHERE preferred IS NOT NULL") == \
        [(ids[1], ids[1], ids[0])]
    expect(page.locator(".pair .better")).to_have_count(0)
    assert pair.nth(1).locator(".thumbs-up").count() == 1  # the chosen one can be rated like any answer

    page.fill("#seed", "5")
    page.fill("#prompt", "And the sky?")
    page.click("#send")
    third = page.locator("#messages > .message.assistant").nth(2)
    messages = json.loads(rows(db, "SELECT messages FROM completions WHERE id = ?", finished(third))[0][0])
    assert messages[-3:] == [{"role": "user", "content": "Describe the ocean"},
                             {"role": "assistant", "content": texts[1]},
                             {"role": "user", "content": "And the sky?"}]
    assert len(messages) == 7

    shots = screenshot_dir(tmp_path)
    page.screenshot(path=str(shots / "webui.png"), full_page=True)
    assert (shots / "webui.png").stat().st_size > 5000

    # --- the history page: every feedback row, newest first, with paging -----------------------
    total = rows(db, "SELECT COUNT(*) FROM feedback")[0][0]
    assert total == 5
    page.click("#history-link")
    page.wait_for_url(url + "/history")
    expect(page.locator("tr.feedback-row")).to_have_count(total)
    table = page.locator("#history").inner_text()
    for expected in ("omnivorous", "too vague", "nice try", "Tell me about the quick brown fox", "Describe the ocean",
                     "preferred over", "thumbs down"):
        assert expected in table, expected
    newest = rows(db, "SELECT completion_id FROM feedback ORDER BY id DESC")
    assert page.locator("tr.feedback-row").evaluate_all("rs => rs.map(r => r.dataset.completionId)") == \
        [r[0] for r in newest]
    page.screenshot(path=str(shots / "webui-history.png"), full_page=True)

    page.goto(url + "/history?limit=2")
    expect(page.locator("tr.feedback-row")).to_have_count(2)
    expect(page.locator("#newer")).to_be_disabled()
    page.click("#older")
    expect(page.locator("#summary")).to_contain_text("showing 3–4")
    page.click("#older")
    expect(page.locator("tr.feedback-row")).to_have_count(1)
    expect(page.locator("#older")).to_be_disabled()
    page.click("#newer")
    expect(page.locator("tr.feedback-row")).to_have_count(2)
    page.click("#chat-link")
    page.wait_for_url(url + "/")


def test_sources_citations_errors_and_request_body(site, page, tmp_path):
    """RAG rendering and stream errors, with /v1/chat/completions answered by canned server-sent
    events (the tiny server has no document store); feedback still goes to the real server."""
    from playwright.sync_api import expect

    url, db = site
    sent = []
    chunk = {"id": "chatcmpl-canned", "object": "chat.completion.chunk", "created": 1, "model": "tiny+docs"}
    sources = [{"n": 1, "source": "ocean.md", "path": "/docs/ocean.md", "title": "Oceans", "heading": "Depth",
                "text": "The Mariana Trench is about 11 km deep.", "score": 0.91},
               {"n": 2, "source": "sky.md", "path": "/docs/sky.md", "title": None, "heading": None,
                "text": "The sky is blue.", "score": 0.42}]
    answer = ["The deepest point is ", "about 11 km [1]", " <b>deep</b> [7]."]
    events = [{**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}]
    events += [{**chunk, "choices": [{"index": 0, "delta": {"content": a}, "finish_reason": None}]} for a in answer]
    events += [{**chunk, "sources": sources,
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop", "citations": {"cited": [1], "invalid": [7]}}]},
               {**chunk, "choices": [], "usage": {"prompt_tokens": 50, "completion_tokens": 9, "total_tokens": 59}}]
    good = "".join(f"data: {json.dumps(e)}\r\n\r\n" for e in events) + "data: [DONE]\r\n\r\n"
    broken = (f"data: {json.dumps(events[0])}\n\n" f"data: {json.dumps(events[1])}\n\n"
              'data: {"error": {"message": "generation failed (boom)", "type": "server_error", "param": null, "code": null}}\n\n')
    bodies = [good, broken]

    def fulfil(route):
        sent.append(json.loads(route.request.post_data))
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=bodies[len(sent) - 1])

    page.route("**/v1/chat/completions", fulfil)
    page.goto(url + "/")
    wait_models(page)
    page.check("#json-mode")
    page.fill("#temperature", "0")
    page.fill("#top-p", "0.5")
    page.fill("#max-tokens", "33")
    page.fill("#seed", "7")
    page.fill("#system", "Be brief.")
    page.fill("#prompt", "How deep is the ocean?")
    page.click("#send")
    msg = page.locator(".message.assistant").first
    expect(msg).to_have_attribute("data-completion-id", "chatcmpl-canned")
    assert sent[0] == {"model": "tiny", "stream": True, "stream_options": {"include_usage": True},
                       "messages": [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "How deep is the ocean?"}],
                       "temperature": 0, "top_p": 0.5, "max_tokens": 33, "seed": 7,
                       "response_format": {"type": "json_object"}}
    assert msg.locator(".text").text_content() == "".join(answer)
    assert msg.locator(".text b").count() == 0  # model output is text, never HTML
    assert "9 tokens" in msg.locator(".stats").text_content()
    srcs = msg.locator(".sources .source")
    expect(srcs).to_have_count(2)
    assert "[1]" in srcs.nth(0).inner_text() and "Oceans" in srcs.nth(0).inner_text()
    assert "Depth" in srcs.nth(0).inner_text() and "cited" in srcs.nth(0).inner_text()
    assert "sky.md" in srcs.nth(1).inner_text() and "cited" not in srcs.nth(1).locator("summary").inner_text()
    assert srcs.nth(0).evaluate("e => e.classList.contains('cited')")
    assert not srcs.nth(1).evaluate("e => e.classList.contains('cited')")
    assert not srcs.nth(0).evaluate("e => e.open")
    srcs.nth(0).locator("summary").click()
    expect(srcs.nth(0).locator("pre")).to_have_text("The Mariana Trench is about 11 km deep.")
    expect(msg.locator(".invalid-citations")).to_contain_text("[7]")
    page.screenshot(path=str(screenshot_dir(tmp_path) / "webui-sources.png"))

    # the real server does not know this completion: the error message is shown, nothing saved
    msg.locator(".thumbs-up").click()
    expect(msg.locator(".feedback-status")).to_contain_text("unknown completion_id")
    assert "error" in msg.locator(".feedback-status").get_attribute("class")
    assert rows(db, "SELECT COUNT(*) FROM feedback WHERE completion_id = 'chatcmpl-canned'") == [(0,)]

    # an error event mid-stream: the message says so, gets no feedback buttons, stays out of the chat
    page.fill("#prompt", "Again?")
    page.press("#prompt", "Enter")
    failed = page.locator(".message.assistant").nth(1)
    expect(failed.locator(".error")).to_have_text("generation failed (boom)")
    assert failed.locator(".thumbs-up").count() == 0
    assert failed.get_attribute("data-completion-id") is None
    expect(page.locator("#send")).to_be_enabled()
    assert [m["role"] for m in sent[1]["messages"]] == ["system", "user", "assistant", "user"]


def test_api_key(model_dir, tmp_path, page):
    """A server with API keys: a clear message without a key; with the key (kept in
    localStorage) the models load and feedback is recorded under the key's user."""
    from playwright.sync_api import expect

    db = tmp_path / "keyed.db"
    app = create_app(genlab.load(model_dir), ServeConfig(db=db, api_keys=["alice=sesame-0123456789"]))
    with serving(app) as url:
        page.goto(url + "/")
        expect(page.locator("#status")).to_contain_text("401")
        expect(page.locator("#status")).to_contain_text("API key")
        assert page.locator("#model option").count() == 0
        page.fill("#api-key", "sesame-0123456789")
        page.press("#api-key", "Tab")  # change event: stored, models reloaded
        wait_models(page)
        assert page.evaluate("localStorage.getItem('genlab-api-key')") == "sesame-0123456789"
        page.fill("#max-tokens", "8")
        page.fill("#prompt", "hello")
        page.click("#send")
        msg = page.locator(".message.assistant").first
        finished(msg)
        msg.locator(".thumbs-down").click()
        expect(msg.locator(".feedback-status")).to_have_text("saved")
        assert rows(db, "SELECT rating, user FROM feedback") == [(-1, "alice")]

        page.reload()  # the key survives a reload
        wait_models(page)
        page.goto(url + "/history")
        expect(page.locator("tr.feedback-row")).to_have_count(1)
        page.evaluate("localStorage.removeItem('genlab-api-key')")
        page.reload()
        expect(page.locator("#summary")).to_contain_text("401")


def test_image_mode_draws_rates_and_picks(model_dir, tmp_path, page):
    """A server with a text and an image model: choosing the image model switches the UI to image
    mode (a guidance field, two images per caption, no corrections); what is shown is what was
    recorded (the PNG decodes to the recorded token ids' image), thumbs and the A/B pick land in
    the feedback database, and choosing the text model switches back."""
    import base64
    import io

    import numpy as np
    from PIL import Image
    from playwright.sync_api import expect

    from genlab.image.feedback import load_version
    from test_image_feedback import tiny_image_model

    images_dir = tiny_image_model(tmp_path / "t2i")
    db = tmp_path / "fb.db"
    with serving(create_app(genlab.load(model_dir), ServeConfig(db=db, image_model=images_dir))) as url:
        page.goto(url + "/")
        wait_models(page)
        assert page.locator("#model option").evaluate_all("os => os.map(o => [o.value, o.dataset.modality])") == \
            [["tiny", "text"], ["t2i", "image"]]
        page.select_option("#model", "tiny")
        expect(page.locator("body")).not_to_have_class(re.compile(r"\bimage-mode\b"))
        expect(page.locator("#guidance")).to_be_hidden()
        page.select_option("#model", "t2i")
        expect(page.locator("body")).to_have_class(re.compile(r"\bimage-mode\b"))
        expect(page.locator("#guidance")).to_be_visible()
        assert "Caption" in page.get_attribute("#prompt", "placeholder")

        page.fill("#guidance", "25")  # out of range: refused before any request
        page.fill("#prompt", "a cat")
        page.click("#send")
        expect(page.locator("#status")).to_contain_text("Guidance must be between 0 and 20")
        assert rows(db, "SELECT COUNT(*) FROM completions") == [(0,)]

        page.fill("#guidance", "1.5")
        page.fill("#temperature", "0.8")
        page.fill("#seed", "7")
        page.fill("#prompt", "a cat zebra")  # "zebra": not in the model's vocabulary
        page.click("#send")
        cards = page.locator(".pair.images .image-card")
        expect(cards).to_have_count(2)
        expect(page.locator(".pair-hint")).to_contain_text("left out: zebra")
        ids = [cards.nth(i).get_attribute("data-completion-id") for i in range(2)]
        assert all(i and i.startswith("img") for i in ids) and ids[0] != ids[1]
        codec = load_version(images_dir).codec
        for i, cid in enumerate(ids):
            prompt, endpoint, params = rows(db, "SELECT prompt, endpoint, params FROM completions WHERE id = ?", cid)[0]
            params = json.loads(params)
            assert (prompt, endpoint) == ("a cat zebra", "images")
            assert (params["seed"], params["guidance"], params["temperature"]) == (7 + i, 1.5, pytest.approx(0.8))
            token_ids = json.loads(rows(db, "SELECT token_ids FROM choices WHERE completion_id = ?", cid)[0][0])
            codes = np.array(token_ids[:-1]) - codec.image_offset
            recorded = codec.image.decode(codes.reshape(1, *codec.image.grid))[0]
            src = cards.nth(i).locator("img.generated").get_attribute("src")
            assert src.startswith("data:image/png;base64,")
            shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))
            np.testing.assert_array_equal(shown, recorded)
        assert cards.locator(".correct").count() == 0  # an image has no text to correct
        expect(page.locator(".pair.images .better")).to_have_count(2)

        cards.nth(0).locator(".thumbs-down").click()
        expect(cards.nth(0).locator(".feedback-status")).to_have_text("saved")
        expect(cards.nth(0).locator(".thumbs-down")).to_have_class(re.compile(r"\bon\b"))
        cards.nth(1).locator(".better").click()
        expect(cards.nth(1)).to_have_class(re.compile(r"\bchosen\b"))
        expect(cards.nth(0)).to_have_class(re.compile(r"\brejected\b"))
        expect(page.locator(".pair.images .better")).to_have_count(0)
        assert rows(db, "SELECT completion_id, rating, preferred, rejected FROM feedback ORDER BY id") == [
            (ids[0], -1, None, None), (ids[1], None, ids[1], ids[0])]
        page.screenshot(path=str(screenshot_dir(tmp_path) / "webui-images.png"), full_page=True)

        page.select_option("#model", "tiny")  # back to chat
        expect(page.locator("body")).not_to_have_class(re.compile(r"\bimage-mode\b"))
        assert "Message" in page.get_attribute("#prompt", "placeholder")
