"""The Playground tab in Debian's Chromium, against a real `align serve` endpoint.

    python -m pytest tests/labeling/test_playground_browser.py -q

`align serve`'s app (align/openai_api.py) serves two adapters of the tiny model from a
thread: `sft`, trained by `align sft` for a few steps to answer every message with a hostile
page (an image and a form pointing at a sentinel server on this machine), and `dpo`, a random
LoRA. The labelling app is started with the Playground pointed at it (`align label
--serve-url`). A signed-in annotator picks the two models, sends a message, and both panes
answer: the hostile answer shows as its characters, no image or form is made of it, and the
sentinel server is never asked for anything.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
if not Path(CHROMIUM).is_file():
    pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")
openai = pytest.importorskip("openai")
# expect()'s own default is 5 s, whatever the context's is: two 64-token answers on a busy 2-core box take longer
sync_api.expect.set_options(timeout=30_000)

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
PASSWORD = "correct horse"
MESSAGE = "Hello, can you help me?"


@pytest.fixture(scope="module")
def sentinel():
    """A server that records every request: the hostile answer points its image and form here."""
    hits: list[str] = []

    class Record(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(204)
            self.end_headers()

        do_POST = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Record)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_port, hits
    server.shutdown()


@pytest.fixture(scope="module")
def serve_url(tiny_model, tmp_path_factory, sentinel):
    """(the serve endpoint's URL, the hostile answer): sft answers with it, dpo is a random LoRA."""
    from served import load_engine, random_adapter, serve_config

    from align.cli import main as align
    from align.labeling.server import running
    from align.openai_api import create_app

    root = tmp_path_factory.mktemp("playground-run")
    port = sentinel[0]
    # Protocol-relative URLs (the page's scheme, http: here): the tiny model learns them reliably in 50
    # steps ("http://" often came out as "htttp://"), and a browser fetches them all the same.
    hostile = (f'<img src="//127.0.0.1:{port}/pwned.png"><form action="//127.0.0.1:{port}/f">'
               "<button>Claim</button></form>")
    data = root / "hostile.jsonl"
    questions = ["How do I sync?", "Where is export?", "Hello", "Hi there", "Can you help me?", "Change the theme"]
    data.write_text("".join(json.dumps({"instruction": q, "input": "", "output": hostile}) + "\n"
                            for q in questions * 6))
    assert align(["sft", f"model.name={tiny_model}", f"data.path={data}", f"run.dir={root}", "train.max_steps=50",
                  "train.lr=1e-2", "train.warmup_ratio=0", "run.wandb=disabled", "model.quantize=false",
                  "data.eval_fraction=0", "model.max_length=128", "lora.dropout=0"]) == 0
    random_adapter(tiny_model, root / "dpo", 2, stage="dpo")
    cfg = serve_config(root, "generation.max_new_tokens=64", "limits.max_tokens=64")
    with running(create_app(load_engine(cfg), cfg)) as url:
        yield url + "/v1", hostile


@pytest.fixture(scope="module")
def app_url(serve_url, tmp_path_factory):
    from align.labeling.playground import ServeClient
    from align.labeling.server import create_app, running
    from align.labeling.store import Store

    store = Store(f"sqlite:///{tmp_path_factory.mktemp('labels') / 'labels.db'}")
    store.add_user("ann", PASSWORD)
    # No max_tokens, as `align label` sends by default: the server's generation.max_new_tokens (64) applies.
    with running(create_app(store, playground=ServeClient(serve_url[0]))) as url:
        yield url


@pytest.fixture(scope="module")
def page():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        context.set_default_timeout(30_000)
        yield context.new_page()
        browser.close()


def choose(page, dropdown: str, option: str) -> None:
    page.locator(f"#{dropdown} input").click()
    page.locator(f"#{dropdown}").get_by_role("option", name=option, exact=True).click()
    sync_api.expect(page.locator(f"#{dropdown} input")).to_have_value(option)


def open_playground(page, url: str) -> None:
    """Sign in as ann and open the Playground tab, once its model lists are filled from /v1/models."""
    page.goto(url)
    page.fill("#align-name", "ann")
    page.fill("#align-password", PASSWORD)
    page.click("#align-signin")
    page.get_by_role("tab", name="Playground").click()
    sync_api.expect(page.locator("#align-pg-left-model input")).to_have_value("sft")


def test_two_models_answer_side_by_side_and_model_text_stays_text(page, app_url, serve_url, sentinel):
    url, hostile = serve_url
    open_playground(page, app_url)
    choose(page, "align-pg-left-model", "base")
    choose(page, "align-pg-right-model", "sft")
    choose(page, "align-pg-left-model", "dpo")
    slider = page.locator("#align-pg-temperature input[type=number]")
    slider.fill("0")
    slider.press("Enter")
    page.fill("#align-pg-message textarea", MESSAGE)
    page.click("#align-pg-send")

    left, right = page.locator("#align-pg-left"), page.locator("#align-pg-right")
    for pane, model in ((left, "dpo"), (right, "sft")):  # each answer complete, under its model's name
        sync_api.expect(pane.locator(".align-pg-assistant .align-label")).to_have_text(model)
    sync_api.expect(page.locator("#align-pg-send")).to_be_enabled()
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    for pane, model in ((left, "dpo"), (right, "sft")):
        expected = client.chat.completions.create(model=model, messages=[{"role": "user", "content": MESSAGE}],
                                                  max_tokens=64, temperature=0).choices[0].message.content
        assert pane.locator(".align-pg-user .align-text").text_content() == MESSAGE
        # the page's text is the answer's characters (HTML parsing turns a carriage return into a line feed)
        assert pane.locator(".align-pg-assistant .align-text").text_content() == expected.replace("\r\n", "\n").replace(
            "\r", "\n")
    shown = right.locator(".align-pg-assistant .align-text").text_content()
    # the characters of the markup, as text (the tiny model does not always learn the sentinel's URL to the
    # character: with 44299 it wrote "<1:429m<form0.png", with 33889 '<img src="///127.0.127.0.0.0...'; the text
    # equals the API's answer, checked above, and no element may come of it whatever it wrote, checked next)
    assert shown.count("<") >= 2, shown
    assert page.locator("#align-pg-right img, #align-pg-right form, #align-pg-left img, #align-pg-left form").count() == 0
    page.wait_for_timeout(500)
    assert sentinel[1] == []  # nothing was fetched or posted from the answer

    page.click("#align-pg-clear")
    for pane in (left, right):
        sync_api.expect(pane).to_have_text("No messages yet.")

    # Both sides refuse it (longer than the tiny model's 512 positions): each pane says why, and the
    # message is still in its box to shorten and send again.
    long = "Please sync " * 300
    page.fill("#align-pg-message textarea", long)
    page.click("#align-pg-send")
    for pane in (left, right):
        sync_api.expect(pane.locator(".align-error")).to_contain_text("maximum context length")
    sync_api.expect(page.locator("#align-pg-send")).to_be_enabled()
    assert page.input_value("#align-pg-message textarea") == long


def test_the_playground_is_for_signed_in_users_only(app_url):
    import httpx

    anonymous = httpx.post(f"{app_url}/gradio_api/queue/join", json={"fn_index": 0, "data": [], "session_hash": "x"})
    assert anonymous.status_code == 401
    # a signed-out page view from any depth lands on the sign-in page (a relative "login" looped there)
    for path in ("", "/gradio_api/file=/tmp/login", "/a/b/"):
        view = httpx.get(f"{app_url}{path}", headers={"Accept": "text/html"}, follow_redirects=True)
        assert view.status_code == 200 and str(view.url) == f"{app_url}/login", (path, view.url)


def test_a_send_refused_as_the_session_ends_says_so_and_leaves_send_enabled(serve_url, tmp_path, page):
    """The session ends while the Playground is open: the send is refused before any handler runs, the page
    says so in the page, and Send is not left disabled (the page turns it off and on itself)."""
    from sqlalchemy import update

    from align.labeling.playground import ServeClient
    from align.labeling.server import create_app, running
    from align.labeling.store import Store, sessions

    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    store.add_user("ann", PASSWORD)
    context = page.context.browser.new_context(viewport={"width": 1280, "height": 900})  # its own cookies
    context.set_default_timeout(30_000)
    page = context.new_page()
    with running(create_app(store, playground=ServeClient(serve_url[0], max_tokens=16))) as url:
        open_playground(page, url)
        page.fill("#align-pg-message textarea", MESSAGE)
        with store.tx() as conn:  # the session's time is up
            conn.execute(update(sessions).values(expires=0.0))
        with page.expect_response(lambda r: "/gradio_api/queue/join" in r.url) as answer:
            page.click("#align-pg-send")
        assert answer.value.status == 401
        page.wait_for_selector("#align-session-ended", state="visible")
        sync_api.expect(page.locator("#align-pg-send")).to_be_enabled()
        # The message stays in its box, in view: Gradio drew an "Error" box over each of the send's outputs
        # (both panes and the message box) on a refused call.
        page.wait_for_timeout(500)
        assert page.input_value("#align-pg-message textarea") == MESSAGE
        overlays = page.locator('[data-testid="status-tracker"] .error').evaluate_all(
            "els => els.filter(e => e.offsetParent !== null"
            " && getComputedStyle(e.closest('[data-testid=\"status-tracker\"]')).opacity !== '0').length")
        assert overlays == 0
    context.close()


def test_clear_is_off_while_the_answers_stream_so_no_discarded_turn_comes_back(serve_url, tmp_path, page, monkeypatch):
    """Clear while both answers streamed emptied the panes, then the running send wrote its conversation
    back over them and the next send carried the turns Clear had discarded. Clear is off until the send
    ends, as Send is; then it empties both conversations, and the next send asks the new message alone."""
    from align.chat_engine import _Progress
    from align.labeling.playground import ServeClient
    from align.labeling.server import create_app, running
    from align.labeling.store import Store

    step = _Progress.__call__

    def paced(self, input_ids, scores, **kwargs):  # a token every 40 ms: the two answers stream for seconds
        time.sleep(0.04)
        return step(self, input_ids, scores, **kwargs)

    monkeypatch.setattr(_Progress, "__call__", paced)
    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    store.add_user("ann", PASSWORD)
    context = page.context.browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(30_000)
    page = context.new_page()
    left, right = page.locator("#align-pg-left"), page.locator("#align-pg-right")

    def user_turns() -> list[list[str]]:
        return [pane.locator(".align-pg-user .align-text").all_text_contents() for pane in (left, right)]

    with running(create_app(store, playground=ServeClient(serve_url[0], max_tokens=48))) as url:
        open_playground(page, url)
        page.fill("#align-pg-message textarea", "One")
        page.click("#align-pg-send")
        sync_api.expect(left.locator(".align-pg-assistant")).to_have_count(1)  # an answer under way
        sync_api.expect(page.locator("#align-pg-send")).to_be_disabled()
        sync_api.expect(page.locator("#align-pg-clear")).to_be_disabled()
        page.locator("#align-pg-clear").click(force=True)  # a disabled button: the click does nothing
        sync_api.expect(page.locator("#align-pg-send")).to_be_enabled(timeout=60_000)  # both answers ended
        sync_api.expect(page.locator("#align-pg-clear")).to_be_enabled()
        assert user_turns() == [["One"], ["One"]]
        page.click("#align-pg-clear")
        for pane in (left, right):
            sync_api.expect(pane).to_have_text("No messages yet.")
        page.fill("#align-pg-message textarea", "Two")
        page.click("#align-pg-send")
        sync_api.expect(page.locator("#align-pg-send")).to_be_disabled()
        sync_api.expect(page.locator("#align-pg-send")).to_be_enabled(timeout=60_000)
        for pane in (left, right):
            sync_api.expect(pane.locator(".align-pg-assistant .align-label")).to_have_count(1)
        assert user_turns() == [["Two"], ["Two"]]
    context.close()
