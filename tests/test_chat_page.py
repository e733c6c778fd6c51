"""The chat page `qwen15 serve` answers at / (issue 14), driven in headless Chromium against the real 0.5B.

Selenium talks WebDriver to Debian's chromedriver, which is built for the Debian chromium next to it, so
nothing is downloaded and the two always match (Playwright's Python package ships its own Node.js driver
and expects the Chromium revision it was released with). A missing browser fails these tests with the
apt-get line to run: CI installs it (.ci/run).
"""

from __future__ import annotations

import json
import os
import re
import time

import httpx
import pytest

from serve_fixtures import ServerProcess

pytestmark = pytest.mark.real_model

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
KEY = "sk-page-test-5b1e0c"
# What the tests change from the page's defaults: greedy, short replies (time), the rest as shipped.
SETTINGS = {"temperature": 0, "max_tokens": 16}
XSS_IMG = "<img src=x onerror=alert(1)>"
XSS_LINK = "[click](javascript:alert(2))"


def start_browser(profile, downloads):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1200,800",
                f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    opts.set_capability("unhandledPromptBehavior", "ignore")  # an alert() stays open for no_dialog() to see
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    d.downloads = downloads
    d.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    return d


@pytest.fixture(scope="module")
def server_and_browser(real_gguf_path, tmp_path_factory):
    """The real 0.5B behind --api-key, and Chromium, started side by side (each takes seconds)."""
    from concurrent.futures import ThreadPoolExecutor

    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if missing:
        pytest.fail(f"the chat page tests need Debian's Chromium: {' and '.join(missing)} not found; "
                    f"install it with `apt-get update && apt-get install -y chromium chromium-driver`", pytrace=False)
    with ThreadPoolExecutor(1) as pool:
        browser = pool.submit(start_browser, tmp_path_factory.mktemp("chromium-profile"),
                              tmp_path_factory.mktemp("downloads"))
        try:
            srv = ServerProcess(real_gguf_path, "--max-batch", "4", "--kv-tokens", "8192", api_key=KEY, name="qwen")
        except BaseException:
            browser.result().quit()
            raise
        try:
            d = browser.result()
        except BaseException:
            srv.stop()
            raise
    yield srv, d
    d.quit()
    srv.stop()


@pytest.fixture(scope="module")
def server(server_and_browser):
    return server_and_browser[0]


@pytest.fixture(scope="module")
def driver(server_and_browser):
    return server_and_browser[1]


def open_page(d, server, settings=SETTINGS, key=KEY):
    """The page on a clean profile: no conversations, the key already stored, test settings."""
    d.get(server.base_url + "/")
    d.execute_script("localStorage.clear();"
                     "if (arguments[0]) localStorage.setItem('qwen15.apiKey', arguments[0]);"
                     "localStorage.setItem('qwen15.settings', JSON.stringify(arguments[1]));", key, settings)
    d.refresh()
    wait_ready(d)
    return d


def wait_ready(d):
    wait(d, lambda: d.execute_script("return document.body.classList.contains('ready')"), what="the model list")


def wait(d, cond, timeout=60, what="the page"):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(d, timeout, poll_frequency=0.05).until(lambda _: cond())
    except TimeoutException:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


def by_css(d, css):
    from selenium.webdriver.common.by import By

    return d.find_elements(By.CSS_SELECTOR, css)


def send(d, text):
    from selenium.webdriver.common.keys import Keys

    (box,) = by_css(d, "#input")
    box.send_keys(text, Keys.ENTER)


def wait_reply(d, what="the reply to finish"):
    wait(d, lambda: d.execute_script("return !document.body.classList.contains('streaming')"
                                     " && document.querySelectorAll('.msg.assistant .stats').length > 0"), what=what)


def conversations(d):
    return json.loads(d.execute_script("return localStorage.getItem('qwen15.conversations')") or "[]")


def no_dialog(d):
    from selenium.common.exceptions import NoAlertPresentException

    try:
        text = d.switch_to.alert.text
    except NoAlertPresentException:
        return
    d.switch_to.alert.dismiss()
    raise AssertionError(f"a script ran in the page: an alert opened with {text!r}")


def inert(d, scope):
    """No element under scope carries an event handler attribute or a javascript: link."""
    return d.execute_script("""
        const bad = [];
        for (const e of document.querySelectorAll(arguments[0] + ' *')) {
          for (const a of e.attributes) {
            if (a.name.startsWith('on') || /^\\s*javascript:/i.test(a.value)) bad.push(e.outerHTML.slice(0, 120));
          }
        }
        return bad;""", scope)


def api_reply(server, messages, max_tokens):
    """The same request the page makes, from the official client: the reference for the page's text."""
    r = server.client().chat.completions.create(model="qwen", messages=messages, temperature=0, max_tokens=max_tokens,
                                                top_p=0.8, extra_body={"top_k": 20, "repetition_penalty": 1.05})
    return r.choices[0].message.content


def test_key_is_asked_for_kept_in_the_browser_and_never_served(server, driver):
    page = httpx.get(server.base_url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert KEY not in page.text and "script-src 'self'" in page.headers["content-security-policy"]
    for asset in re.findall(r'(?:src|href)="(ui/[^"]+)"', page.text):
        r = httpx.get(f"{server.base_url}/{asset}")
        assert r.status_code == 200 and KEY not in r.text, asset
    assert httpx.get(server.base_url + "/v1/models").status_code == 401  # the API still wants the key

    d = driver
    d.get(server.base_url + "/")
    d.execute_script("localStorage.clear()")
    d.refresh()
    wait(d, lambda: d.execute_script("return document.getElementById('key-dialog').open"), what="the key dialog")
    (box,) = by_css(d, "#key-input")
    box.send_keys("sk-wrong")
    by_css(d, "#key-save")[0].click()
    wait(d, lambda: "incorrect API key" in by_css(d, "#key-error")[0].text, what="the wrong key's error")
    assert d.execute_script("return document.getElementById('key-dialog').open")
    box.clear()
    box.send_keys(KEY)
    by_css(d, "#key-save")[0].click()
    wait_ready(d)
    assert [o.text for o in by_css(d, "#model option")] == ["qwen"]
    assert d.execute_script("return localStorage.getItem('qwen15.apiKey')") == KEY
    d.execute_script("localStorage.setItem('qwen15.settings', JSON.stringify(arguments[0]))", {**SETTINGS, "max_tokens": 4})
    d.refresh()
    wait_ready(d)
    send(d, "Say hello in one short sentence.")
    wait_reply(d)
    (reply,) = by_css(d, ".msg.assistant .body")
    assert reply.text.strip() and not by_css(d, ".msg .error")


def test_reply_streams_in_shows_its_numbers_and_survives_a_reload(server, driver):
    d = open_page(driver, server)
    # Record the reply's text each time the DOM changes: a streamed reply is seen at several lengths.
    d.execute_script("""
        window.seen = [];
        new MutationObserver(() => {
          const live = document.querySelector('.msg.live .body');
          if (live) window.seen.push(live.textContent.length);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});""")
    question = "List three uses of Python, one line each."
    send(d, question)
    wait_reply(d)
    lengths = sorted(set(d.execute_script("return window.seen")) - {0})
    assert len(lengths) >= 2, f"the reply did not arrive in pieces: {lengths}"

    (conv,) = conversations(d)
    assert [m["role"] for m in conv["messages"]] == ["user", "assistant"]
    assert conv["messages"][0]["content"] == question and conv["title"].startswith("List three uses")
    content = conv["messages"][1]["content"]
    assert content == api_reply(server, [{"role": "user", "content": question}], SETTINGS["max_tokens"])
    stats = by_css(d, ".msg.assistant .stats")[0].text
    m = re.fullmatch(r"(\d+) tokens · TTFT (\d+\.\d\d) s · (\d+\.\d) tok/s · max tokens reached", stats)
    assert m and int(m[1]) == SETTINGS["max_tokens"] and float(m[2]) > 0 and float(m[3]) > 0, stats

    # The status view reads /metrics: the pool size is the server's.
    total = int(server.metric("qwen15_kv_blocks_total"))
    wait(d, lambda: by_css(d, "#st-kv")[0].text.endswith(f"/ {total}"), what="the status view")
    assert by_css(d, "#st-running")[0].text.isdigit() and by_css(d, "#st-queued")[0].text.isdigit()

    d.refresh()
    wait_ready(d)  # the page renders again once the model list is in: read it after that
    assert len(by_css(d, ".msg.assistant .stats")) == 1
    assert [e.text for e in by_css(d, "#conversations .conv-title")] == [conv["title"]]
    assert by_css(d, ".msg.user .body")[0].text == question
    assert by_css(d, ".msg.assistant .stats")[0].text == stats


def test_stop_and_escape_end_the_stream_and_the_server_frees_the_sequence(server, driver):
    d = open_page(driver, server, settings={**SETTINGS, "max_tokens": 400})
    abort = 'reason="abort"'
    for how in ("button", "escape"):
        aborted = server.metric("qwen15_sequences_finished_total", abort)
        if how == "button":
            send(d, "Write a long story about a dragon who learns to code.")
        else:
            by_css(d, ".msg.assistant .regenerate")[0].click()
        wait(d, lambda: d.execute_script("const b = document.querySelector('.msg.live .body');"
                                         "return b && b.textContent.length > 20"), what="the reply to start")
        if how == "button":
            by_css(d, "#stop")[0].click()
        else:
            from selenium.webdriver.common.keys import Keys

            by_css(d, "#input")[0].send_keys(Keys.ESCAPE)
        wait_reply(d, what=f"the stream to end after the stop {how}")
        assert "stopped" in by_css(d, ".msg.assistant .stats")[0].text
        assert by_css(d, "#send")[0].is_displayed() and not by_css(d, "#stop")[0].is_displayed()
        deadline = time.time() + 10
        while time.time() < deadline and (server.metric("qwen15_running_sequences")
                                          or server.metric("qwen15_sequences_finished_total", abort) == aborted):
            time.sleep(0.05)
        assert server.metric("qwen15_running_sequences") == 0
        assert server.metric("qwen15_sequences_finished_total", abort) == aborted + 1
        assert server.metric("qwen15_kv_blocks_used") == 0
        (conv,) = conversations(d)
        assert len(conv["messages"]) == 2 and conv["messages"][1]["stats"]["stopped"] is True


def test_regenerate_replaces_the_reply_and_an_edit_resends_from_there(server, driver):
    d = open_page(driver, server)
    send(d, "Name a color.")
    wait_reply(d)
    requests = 'endpoint="/v1/chat/completions",status="200"'
    before = server.metric("qwen15_requests_total", requests)
    by_css(d, ".regenerate")[0].click()
    wait_reply(d, what="the regenerated reply")
    assert server.metric("qwen15_requests_total", requests) == before + 1
    (conv,) = conversations(d)
    assert [m["role"] for m in conv["messages"]] == ["user", "assistant"] and conv["messages"][1]["content"]
    assert len(by_css(d, ".msg.assistant")) == 1

    by_css(d, ".msg.user .edit")[0].click()
    (area,) = by_css(d, ".msg.user textarea.edit-input")
    area.clear()
    from selenium.webdriver.common.keys import Keys

    area.send_keys("Name a fruit.", Keys.ENTER)
    wait_reply(d, what="the reply to the edited message")
    (conv,) = conversations(d)
    assert [(m["role"], m["content"] if m["role"] == "user" else "") for m in conv["messages"]] == \
        [("user", "Name a fruit."), ("assistant", "")]
    assert conv["messages"][1]["content"] == api_reply(server, [{"role": "user", "content": "Name a fruit."}],
                                                       SETTINGS["max_tokens"])


def test_code_in_a_reply_is_highlighted_and_copied(server, driver):
    d = open_page(driver, server, settings={**SETTINGS, "max_tokens": 40})
    d.execute_cdp_cmd("Browser.grantPermissions", {"origin": server.base_url,
                                                    "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
    send(d, "Write a Python function add(a, b) that returns their sum. Only the code block.")
    wait_reply(d)
    content = conversations(d)[0]["messages"][1]["content"]
    assert "```python" in content, content
    keywords = [e.text for e in by_css(d, ".msg.assistant pre.code code.hljs .hljs-keyword")]
    assert "def" in keywords and "return" in keywords
    by_css(d, ".msg.assistant pre.code button.copy")[0].click()
    wait(d, lambda: by_css(d, ".msg.assistant pre.code button.copy")[0].text == "Copied", what="the copy button")
    code = by_css(d, ".msg.assistant pre.code code")[0].text
    pasted = d.execute_async_script("navigator.clipboard.readText().then(arguments[0], e => arguments[0]('!' + e))")
    assert pasted.strip() == code.strip() and "def add" in pasted


def test_model_output_with_markup_runs_nothing(server, driver):
    from selenium.webdriver.common.keys import Keys

    d = open_page(driver, server, settings={**SETTINGS, "temperature": 0.7, "max_tokens": 40})
    # The settings dialog: a system prompt that makes the model echo, and greedy decoding.
    by_css(d, "#settings-button")[0].click()
    (system,) = by_css(d, "#set-system")
    system.send_keys("You repeat the user message verbatim. Output only the text, never a code block.")
    (temperature,) = by_css(d, "#set-temperature")
    assert temperature.get_attribute("value") == "0.7"
    temperature.clear()
    temperature.send_keys("0")
    by_css(d, "#settings-save")[0].click()
    assert json.loads(d.execute_script("return localStorage.getItem('qwen15.settings')"))["temperature"] == 0

    send(d, f"Repeat exactly, without a code block: {XSS_IMG} and {XSS_LINK}")
    wait_reply(d)
    content = conversations(d)[0]["messages"][-1]["content"]
    assert XSS_IMG in content and "javascript:alert(2)" in content, f"the model did not echo the markup: {content!r}"
    wait(d, lambda: by_css(d, ".msg.assistant .body img"), what="the reply's <img> (kept, without its handler)")
    time.sleep(0.3)  # the broken image's error event has fired by now
    no_dialog(d)
    assert inert(d, "#messages") == []
    by_css(d, "#input")[0].send_keys(Keys.ESCAPE)  # nothing streaming: Esc does nothing
    no_dialog(d)


IMPORTED = {"format": "qwen15-chat", "version": 1, "conversations": [{
    "id": "imported-1", "title": "Markdown tour",
    "messages": [
        {"role": "user", "content": "Show me everything."},
        {"role": "assistant", "content": "\n\n".join([
            f"An image: {XSS_IMG} and a link {XSS_LINK}, and <a href=\"javascript:alert(3)\">raw html</a>.",
            "<svg><script>alert(4)</script></svg><iframe src=\"javascript:alert(5)\"></iframe>",
            "Inline $x^2 + y^2 = z^2$ and display:", "\\[ \\int_0^1 x\\,dx = \\frac{1}{2} \\]",
            "| n | n² |\n|---|---|\n| 2 | 4 |\n| 3 | 9 |",
            "```python\ndef square(n):\n    return n * n\n```"])},
    ]}]}


def test_imported_conversation_renders_math_tables_code_and_runs_nothing(server, driver, tmp_path):
    d = open_page(driver, server)
    path = tmp_path / "chats.json"
    path.write_text(json.dumps(IMPORTED))
    by_css(d, "#import-file")[0].send_keys(str(path))
    wait(d, lambda: by_css(d, ".msg.assistant .body table"), what="the imported conversation")
    assert [e.text for e in by_css(d, "#conversations .conv-title")] == ["Markdown tour"]
    assert len(by_css(d, ".msg.assistant .katex")) == 2 and len(by_css(d, ".msg.assistant .katex-display")) == 1
    assert [c.text for c in by_css(d, ".msg.assistant td")] == ["2", "4", "3", "9"]
    assert "return" in [e.text for e in by_css(d, ".msg.assistant code.hljs .hljs-keyword")]
    assert by_css(d, ".msg.assistant pre.code button.copy")
    time.sleep(0.3)
    no_dialog(d)
    assert inert(d, "#messages") == [] and not by_css(d, "#messages script, #messages iframe")
    (raw_link,) = [a for a in by_css(d, ".msg.assistant a") if a.text == "raw html"]
    raw_link.click()
    no_dialog(d)
    assert len(d.window_handles) == 1  # no href: nothing opened

    # Rename, export, import the export, delete: all in the browser, all kept across a reload.
    from selenium.webdriver.common.keys import Keys

    by_css(d, "#conversations li .rename")[0].click()
    (name,) = by_css(d, "#conversations .rename-input")
    name.send_keys(Keys.CONTROL, "a")
    name.send_keys("Renamed tour", Keys.ENTER)
    by_css(d, "#export")[0].click()
    wait(d, lambda: [p for p in d.downloads.glob("qwen15-chats-*.json")], what="the export download")
    (exported,) = d.downloads.glob("qwen15-chats-*.json")
    data = json.loads(exported.read_text())
    assert [c["title"] for c in data["conversations"]] == ["Renamed tour"]
    assert data["conversations"][0]["messages"] == IMPORTED["conversations"][0]["messages"]
    by_css(d, "#import-file")[0].send_keys(str(exported))
    wait(d, lambda: len(by_css(d, "#conversations li")) == 2, what="the second import")
    d.refresh()
    wait_ready(d)
    assert len(by_css(d, "#conversations li")) == 2
    assert [e.text for e in by_css(d, "#conversations .conv-title")] == ["Renamed tour"] * 2
    assert len({c["id"] for c in conversations(d)}) == 2
    for _ in range(2):  # a second click confirms
        by_css(d, "#conversations li.active .delete")[0].click()
    wait(d, lambda: len(by_css(d, "#conversations li")) == 1, what="the deletion")
    assert len(conversations(d)) == 1

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"conversations": [{"title": "x", "messages": [{"role": "user", "content": 5}]}]}))
    by_css(d, "#import-file")[0].send_keys(str(bad))
    wait(d, lambda: "messages[0].content must be a string" in by_css(d, "#toast")[0].text, what="the import error")
    assert len(conversations(d)) == 1


def test_phone_window_and_dark_theme(server, driver):
    d = open_page(driver, server, settings={**SETTINGS, "max_tokens": 4})
    try:
        d.set_window_size(390, 844)
        from selenium.webdriver.common.keys import Keys

        by_css(d, "#input")[0].send_keys("Hi", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "there", Keys.ENTER)
        wait_reply(d)
        assert conversations(d)[0]["messages"][0]["content"] == "Hi\nthere"  # Shift+Enter: a new line
        (sidebar,) = by_css(d, "#sidebar")
        wait(d, lambda: sidebar.rect["x"] + sidebar.rect["width"] <= 0, what="the sidebar to slide away")
        by_css(d, "#menu")[0].click()
        wait(d, lambda: sidebar.rect["x"] == 0, what="the sidebar to open")
        by_css(d, "#conversations .conv-title")[0].click()
        wait(d, lambda: sidebar.rect["x"] + sidebar.rect["width"] <= 0, what="the sidebar to close")
        assert by_css(d, "#input")[0].rect["width"] > 200
        background = "return getComputedStyle(document.body).backgroundColor"
        light = d.execute_script(background)
        d.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
        dark = d.execute_script(background)
        assert light == "rgb(255, 255, 255)" and dark == "rgb(21, 23, 28)"
    finally:
        d.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
        d.set_window_size(1200, 800)


def test_no_ui_turns_the_page_off(tiny_chat_gguf):
    """In process (a server start is ~10 s here): the flag reaches ServerConfig, and that app has no page."""
    from starlette.testclient import TestClient

    from qwen15 import LLM
    from qwen15.cli import build_parser
    from qwen15.serve.app import ServerConfig, create_app

    assert build_parser().parse_args(["serve", "--no-ui"]).no_ui
    assert not build_parser().parse_args(["serve"]).no_ui
    llm = LLM.load(tiny_chat_gguf)
    with_ui = TestClient(create_app(llm, ServerConfig("tiny")))
    page = with_ui.get("/")
    (script,) = re.findall(r'src="(ui/app-\w+\.js)"', page.text)
    assert page.status_code == 200 and with_ui.get("/" + script).status_code == 200
    without = TestClient(create_app(llm, ServerConfig("tiny", ui=False)))
    assert without.get("/").status_code == 404 and without.get("/" + script).status_code == 404
    assert without.get("/v1/models").json()["data"][0]["id"] == "tiny"
