"""The chat page of `lfm2vl serve`, driven in a real headless Chromium (Debian's chromium + chromium-driver through
selenium). A real `lfm2vl serve` on the bundled model answers a picture question exactly as the engine does, with
its figures line; a fake engine (tests/server_fake.py) answers slowly or with hostile text for Stop, escaping, the
API-key prompt and the server's 4xx. Screenshots go to $LFM2VL_SCREENSHOTS (default: the test's temporary folder);
scripts/page_screenshots.sh refreshes the README's one."""
from __future__ import annotations

import base64
import io
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from lfm2vl.serve.app import ServerSettings, create_app
from lfm2vl.serve.scheduler import Scheduler
from server_fake import FakeBatchGenerator, FakeEngine
from server_util import ServerProcess, ThreadServer

ROOT = Path(__file__).resolve().parent.parent
TRIANGLE = ROOT / "examples" / "blue_triangle.png"
KEY = "sk-page-key"
HOSTILE = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2"> done'


def chromium_paths() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        pytest.fail("the page tests need Debian's chromium and chromium-driver: apt-get install chromium "
                    "chromium-driver (scripts/setup.sh installs them when it runs as root)")
    return browser, driver


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = chromium_paths()
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1100,800", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, for errors such as CSP blocks
    d = webdriver.Chrome(options=opts, service=Service(executable_path=driver))
    d.set_script_timeout(30)
    yield d
    d.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("LFM2VL_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def bundled_server(tmp_path_factory):
    srv = ServerProcess(["--model", "bundled", "--log-level", "warning"],
                        tmp_path_factory.mktemp("page") / "stderr.log")
    yield srv
    srv.stop()


def fake_server(step_delay_s=0.0, reply=None, api_key=None, max_body_bytes=32 * 2 ** 20):
    engine = FakeEngine(step_delay_s=step_delay_s, reply=reply)
    scheduler = Scheduler(engine, max_batch=4, max_seq_len=4096, prefill_chunk=64, make_generator=FakeBatchGenerator)
    settings = ServerSettings(model_id="fake-vl", api_key=api_key, max_body_bytes=max_body_bytes,
                              default_max_tokens=40, context_len=4096)
    server = ThreadServer(create_app(engine, scheduler, settings))
    server.engine, server.scheduler = engine, scheduler
    return server


# ---- helpers -------------------------------------------------------------------------------------------------
def wait(cond, timeout=30.0, what="the page"):
    deadline = time.time() + timeout
    while True:
        got = cond()
        if got:
            return got
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def by_id(d, name):
    return d.find_element("id", name)


def texts(d, css):
    return [e.text for e in d.find_elements("css selector", css)]


def open_page(d, url, model="fake-vl"):
    d.get(url + "/")
    wait(lambda: by_id(d, "model").text == model, what=f"the model name {model!r}")


def knob(d, name, value):
    """Set a settings field (the Settings panel opens first, as a user opens it)."""
    if not by_id(d, "settings").get_attribute("open"):
        d.find_element("css selector", "#settings summary").click()
    field = by_id(d, name)
    field.clear()
    field.send_keys(value)


def attach(d, *paths):
    by_id(d, "file").send_keys("\n".join(str(p) for p in paths))


def ask(d, text):
    box = by_id(d, "prompt")
    box.send_keys(text)
    box.send_keys("\n")  # Enter sends


def answers(d):
    return d.find_elements("css selector", ".msg.assistant")


def finished(d, n):
    """The n-th answer's (text, figures) once its figures line is there."""
    def done():
        got = answers(d)
        if len(got) >= n:
            figures = got[n - 1].find_element("css selector", ".figures").text
            return (got[n - 1].find_element("css selector", ".text").text, figures) if figures else None
        return None
    return wait(done, what=f"answer {n}")


def png_file(folder: Path, name: str, size=(48, 32), noise=False) -> Path:
    img = Image.effect_noise(size, 80).convert("RGB") if noise else Image.new("RGB", size, (200, 40, 40))
    path = folder / name
    img.save(path, format="PNG")
    return path


# ---- the real server -----------------------------------------------------------------------------------------
def test_picture_question_streams_the_engines_answer_with_figures(browser, bundled_server, shots):
    import lfm2vl

    open_page(browser, bundled_server.url, model="bundled")
    knob(browser, "temperature", "0")
    attach(browser, TRIANGLE)
    wait(lambda: len(browser.find_elements("css selector", "#attachments img")) == 1, what="the thumbnail")
    ask(browser, "What is in this image?")
    text, figures = finished(browser, 1)
    engine = lfm2vl.load("bundled")
    want = engine.generate([{"role": "user", "content": [{"type": "image", "image": str(TRIANGLE)},
                                                         {"type": "text", "text": "What is in this image?"}]}],
                           temperature=0.0, do_image_splitting=True, max_new_tokens=1024)
    assert text == want.text.strip() and want.text.strip()
    assert f"{want.prompt_tokens} prompt tokens" in figures and "image)" in figures and "tokens/s" in figures
    assert "first token" in figures
    assert len(browser.find_elements("css selector", ".msg.user .thumbs img")) == 1

    ask(browser, "What colour is the shape?")  # a second turn: the conversation goes back with the picture
    text2, figures2 = finished(browser, 2)
    assert text2 and "prompt tokens" in figures2
    browser.save_screenshot(str(shots / "chat-page.png"))
    errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors  # nothing blocked by the page's own CSP, no failed load


def test_the_page_fits_a_phone_width_window(browser, bundled_server, shots):
    browser.set_window_size(390, 800)
    try:
        open_page(browser, bundled_server.url, model="bundled")
        attach(browser, TRIANGLE)
        ask(browser, "Describe it.")
        finished(browser, 1)
        assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        browser.save_screenshot(str(shots / "chat-page-phone.png"))
    finally:
        browser.set_window_size(1100, 800)


# ---- the fake engine -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slow_server():
    with fake_server(step_delay_s=0.03, reply="a slow answer that takes a while to arrive ") as srv:
        yield srv


def test_text_streams_in_and_stop_cancels_the_request(browser, slow_server):
    open_page(browser, slow_server.url)
    knob(browser, "max-tokens", "400")
    ask(browser, "Tell me everything.")
    seen = wait(lambda: len(answers(browser)) == 1 and answers(browser)[0].text.strip(" …"), what="streamed text")
    assert 0 < len(seen) < 400  # text shows before the answer is done
    by_id(browser, "stop").click()
    text, figures = finished(browser, 1)
    assert figures == "Stopped." and len(text) < 400
    wait(lambda: httpx.get(slow_server.url + "/health").json()["active_requests"] == 0, what="the row to be freed")
    assert slow_server.engine.generators[-1].cancelled  # the server dropped the generation
    assert by_id(browser, "send").is_displayed() and not by_id(browser, "stop").is_displayed()


def test_attach_by_picker_drop_and_paste_with_removable_thumbnails(browser, slow_server, tmp_path):
    open_page(browser, slow_server.url)
    attach(browser, png_file(tmp_path, "picked.png"))
    data = base64.b64encode(png_file(tmp_path, "x.png").read_bytes()).decode()
    for kind in ("drop", "paste"):
        browser.execute_script("""
            const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], arguments[1] + ".png", {type: "image/png"}));
            const ev = arguments[1] === "drop"
              ? new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true})
              : new ClipboardEvent("paste", {clipboardData: dt, bubbles: true, cancelable: true});
            document.getElementById("prompt").dispatchEvent(ev);""", data, kind)
    names = wait(lambda: [e.get_attribute("alt") for e in browser.find_elements("css selector", "#attachments img")]
                 if len(browser.find_elements("css selector", "#attachments img")) == 3 else None, what="3 thumbnails")
    assert names == ["picked.png", "drop.png", "paste.png"]
    browser.find_element("css selector", "#attachments button[aria-label='Remove drop.png']").click()
    assert [e.get_attribute("alt") for e in browser.find_elements("css selector", "#attachments img")] == [
        "picked.png", "paste.png"]
    by_id(browser, "prompt").send_keys("first line")
    from selenium.webdriver.common.keys import Keys
    by_id(browser, "prompt").send_keys(Keys.SHIFT, Keys.ENTER)  # Shift+Enter: a new line, nothing sent
    assert by_id(browser, "prompt").get_attribute("value") == "first line\n" and not answers(browser)
    by_id(browser, "new-chat").click()


def test_files_that_are_not_images_or_too_big_are_refused_in_the_page(browser, slow_server, tmp_path):
    open_page(browser, slow_server.url)
    note = tmp_path / "notes.txt"
    note.write_text("not a picture")
    attach(browser, note)
    assert "notes.txt is not a PNG, JPEG, WebP or GIF image." in wait(lambda: by_id(browser, "error").text)
    browser.execute_script("""
        const dt = new DataTransfer();
        dt.items.add(new File([new Uint8Array(21 * 1024 * 1024)], "huge.png", {type: "image/png"}));
        document.body.dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));""")
    assert "huge.png is 21.0 MB; the server takes at most 20.0 MB per image." in wait(
        lambda: "huge" in by_id(browser, "error").text and by_id(browser, "error").text)
    assert not browser.find_elements("css selector", "#attachments img")


def test_model_text_and_file_names_are_shown_as_text_and_run_nothing(browser, tmp_path):
    evil = png_file(tmp_path, '<img src=x onerror="window.pwned=3">.png')
    with fake_server(reply=HOSTILE) as srv:
        open_page(browser, srv.url)
        knob(browser, "max-tokens", str(len(HOSTILE)))
        attach(browser, evil)
        ask(browser, "<b>bold?</b>")
        text, _ = finished(browser, 1)
        assert text == HOSTILE
        assert texts(browser, ".msg.user .text") == ["<b>bold?</b>"]
        assert not browser.find_elements("css selector", ".msg script, .msg b, .msg .text img")
        assert browser.find_element("css selector", ".msg.user .thumbs img").get_attribute("alt") == evil.name
        assert browser.execute_script("return window.pwned") is None
        csp = httpx.get(srv.url + "/").headers["content-security-policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp


def test_api_key_is_asked_once_and_kept_for_the_tab(browser):
    with fake_server(api_key=KEY, reply="ok") as srv:
        browser.get(srv.url + "/")
        dialog = wait(lambda: by_id(browser, "key-dialog").is_displayed() and by_id(browser, "key-dialog"),
                      what="the key prompt")
        by_id(browser, "key").send_keys("wrong\n")
        wait(lambda: "did not accept" in by_id(browser, "key-message").text, what="the refusal")
        by_id(browser, "key").send_keys(KEY + "\n")
        wait(lambda: by_id(browser, "model").text == "fake-vl", what="the model name")
        assert not dialog.is_displayed()
        assert browser.execute_script("return sessionStorage.getItem('lfm2vl.apiKey')") == KEY
        browser.refresh()
        wait(lambda: by_id(browser, "model").text == "fake-vl", what="the model name after a reload")
        assert not by_id(browser, "key-dialog").is_displayed()
        ask(browser, "hi")
        assert finished(browser, 1)[0] == "ok" * 20
        browser.execute_script("sessionStorage.clear()")


def test_a_server_refusal_is_shown_and_the_turn_goes_back_to_the_composer(browser, tmp_path):
    big = png_file(tmp_path, "noise.png", size=(400, 400), noise=True)  # ~480 KB: over this server's body limit
    with fake_server(reply="never", max_body_bytes=100_000) as srv:
        open_page(browser, srv.url)
        attach(browser, big)
        ask(browser, "What is this?")
        error = wait(lambda: by_id(browser, "error").text, what="the error line")
        assert "(413)" in error and "over 100000 bytes" in error
        assert not browser.find_elements("css selector", ".msg") and by_id(browser, "empty").is_displayed()
        assert by_id(browser, "prompt").get_attribute("value") == "What is this?"
        assert len(browser.find_elements("css selector", "#attachments img")) == 1


def test_page_headers_and_no_ui():
    with fake_server() as srv:
        r = httpx.get(srv.url + "/")
        assert r.status_code == 200 and "text/html" in r.headers["content-type"]
        assert "<script" not in r.text.replace('<script src="/ui/page.js" defer></script>', "")  # no inline script
        cfg = httpx.get(srv.url + "/ui/config.json").json()
        assert cfg["max_image_bytes"] == 20 * 2 ** 20 and cfg["api_key_required"] is False
    engine = FakeEngine()
    app = create_app(engine, Scheduler(engine, make_generator=FakeBatchGenerator),
                     ServerSettings(model_id="fake-vl", ui=False))
    with ThreadServer(app) as srv:
        assert httpx.get(srv.url + "/").status_code == 404
        assert httpx.get(srv.url + "/ui/page.js").status_code == 404


def test_head_on_the_page_files_gives_the_headers_of_get_and_no_body():
    with fake_server() as srv:
        for path in ("/", "/ui/page.js", "/ui/page.css", "/ui/config.json"):
            get, head = httpx.get(srv.url + path), httpx.head(srv.url + path)
            assert head.status_code == get.status_code == 200 and head.content == b"", path
            assert {**head.headers, "date": ""} == {**get.headers, "date": ""}, path


def test_settings_reach_the_request_and_new_chat_starts_over(browser, tmp_path):
    with fake_server(reply="fine") as srv:
        open_page(browser, srv.url)
        knob(browser, "max-image-tokens", "32")
        by_id(browser, "splitting").click()  # off
        knob(browser, "temperature", "0.7")
        knob(browser, "max-tokens", "12")
        attach(browser, png_file(tmp_path, "a.png"))
        ask(browser, "one")
        finished(browser, 1)
        sent = srv.engine.prepared[-1]
        assert sent["max_image_tokens"] == 32 and sent["min_image_tokens"] == 1 and sent["do_image_splitting"] is False
        assert sent["temperature"] == 0.7 and sent["max_new_tokens"] == 12
        ask(browser, "two")
        finished(browser, 2)
        assert [m["role"] for m in srv.engine.prepared[-1]["messages"]] == ["user", "assistant", "user"]
        by_id(browser, "new-chat").click()
        assert not browser.find_elements("css selector", ".msg")
        ask(browser, "three")
        finished(browser, 1)
        assert [m["role"] for m in srv.engine.prepared[-1]["messages"]] == ["user"]
