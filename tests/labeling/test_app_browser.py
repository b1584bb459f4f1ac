"""The labelling app, started for real and driven in Debian's Chromium with Playwright.

    python -m pytest tests/labeling/test_app_browser.py -q
    ALIGN_SCREENSHOTS=1 python -m pytest tests/labeling/test_app_browser.py -q -k screenshots

One app on a temp SQLite store serves the whole module; each test signs in as its own
annotator, so the tests do not share tasks. What a test checks is read back from the store,
not from the page. ALIGN_SCREENSHOTS=1 also rewrites docs/img/annotator.png and admin.png.
"""

from __future__ import annotations

import json
import random
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
if not Path(CHROMIUM).is_file():
    pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")

REPO = Path(__file__).resolve().parents[2]
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
PASSWORD = "correct horse"
ANNOTATORS = ["mouse", "keys", "double", "ann1", "ann2", "plain", "seed", "reload"]
TIMEOUT_MS = 15_000

# A real-looking task for the screenshot: one prompt from data/support/prompts.jsonl and four
# replies of different quality (B invents a discount, C is curt, D is padded).
REFUND_PROMPT = ("I want my money back. I paid for Pro almost two weeks ago and the app has been garbage "
                 "the entire time.")
REFUND_REPLIES = [
    "I'm sorry Pro hasn't worked out for you. Since your payment was less than 14 days ago, you can get a "
    "full refund: go to **Settings > Account > Billing > Request refund**, or just reply here and I'll "
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(store, **kwargs) -> Iterator[str]:
    """The real app on `store`, served in this process on a free port; yields its URL."""
    from labeling.app import build_app

    demo = build_app(store, **kwargs)
    port = _free_port()
    demo.queue(default_concurrency_limit=8).launch(server_name="127.0.0.1", server_port=port,
                                                   prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        demo.close()


def new_store(folder: Path, *, admin: str = "boss"):
    from labeling.store import Store

    store = Store(f"sqlite:///{folder / 'labels.db'}")
    store.add_user(admin, PASSWORD, admin=True)
    return store


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(url, store, export_dir) for one running app shared by the module; closed after it."""
    tmp = tmp_path_factory.mktemp("labels")
    store = new_store(tmp)
    for name in ANNOTATORS:
        store.add_user(name, PASSWORD)
    store.add_tasks("support-1", _support_tasks(16), source={"policy": "test"})
    with running(store, overlap=1, export_dir=str(tmp / "export")) as url:
        yield url, store, tmp / "export"


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    yield context.new_page()
    context.close()


def sign_in(page, url: str, name: str, password: str = PASSWORD, *, expect_task: bool = True) -> None:
    page.goto(url)
    page.fill("#align-name textarea", name)
    page.fill("#align-password input", password)
    page.click("#align-signin")
    if expect_task:
        page.wait_for_selector("#resp-a", state="visible")


def shown_task(page) -> tuple[str, list[str]]:
    """The prompt and the response texts in the order the page shows them."""
    prompt = page.inner_text("#align-prompt").removeprefix("Customer:").strip()
    bodies = [page.inner_text(f"#resp-{letter} .align-body").strip() for letter in "abcd"]
    return prompt, bodies


def canonical(store, prompt: str, bodies: list[str], ranks_shown: list[int]) -> tuple[int, list[int]]:
    """(task_id, ranks in the store's order) for what the page showed: map shown -> canonical by text."""
    task = next(t for t in store_tasks(store) if _same(t["prompt"], prompt))
    ranks = [0] * len(task["responses"])
    for body, rank in zip(bodies, ranks_shown, strict=True):
        [index] = [i for i, r in enumerate(task["responses"]) if _same(r, body)]
        ranks[index] = rank
    return task["task_id"], ranks


def _same(stored: str, shown: str) -> bool:
    """The page shows rendered markdown (no `**`, list numbers as markers): compare the words."""
    stored = re.sub(r"(?m)^\s*(\d+\.|[-*])\s+", "", stored)
    return re.findall(r"\w+", stored) == re.findall(r"\w+", shown)


def store_tasks(store) -> list[dict]:
    return [t for batch in store.batches() for t in store.batch_tasks(batch)]


def rankings_of(store, name: str) -> list[dict]:
    return [r for r in store.submitted_rankings() if r["annotator"] == name]


def wait_for_message(page, text: str) -> str:
    page.wait_for_function(
        "t => document.querySelector('#align-message').innerText.includes(t)", arg=text)
    return page.inner_text("#align-message")


def wait_for_rows(store, name: str, n: int, timeout: float = 10.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while len(rows := rankings_of(store, name)) < n and time.monotonic() < deadline:
        time.sleep(0.1)
    return rows


def test_sign_in_refuses_a_wrong_password(served, page):
    url, store, _ = served
    sign_in(page, url, "plain", "wrong password", expect_task=False)
    page.wait_for_function("document.querySelector('#align-signin-error').innerText.trim().length > 0")
    assert page.locator("#resp-a").is_hidden()
    assert page.locator("#align-submit").is_hidden()
    assert rankings_of(store, "plain") == []
    sign_in(page, url, "plain")  # the right password then works on the same page
    assert page.locator("#align-who").inner_text().startswith("Signed in as")


def test_rank_with_the_mouse_and_submit(served, page):
    url, store, _ = served
    sign_in(page, url, "mouse")
    prompt, bodies = shown_task(page)
    ranks = [3, 1, 4, 2]
    for letter, rank in zip("abcd", ranks, strict=True):
        page.click(f"#rank-{letter} label:has-text('{rank}')")
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
    page.keyboard.type("2143")  # A=2, B=1, C=4, D=3 (the selection moves on after each digit)
    page.keyboard.press("c")
    page.keyboard.press("2")  # C=2: a tie with A
    page.keyboard.press("u")  # unsafe
    checked = [page.locator(f"#rank-{x} input:checked").get_attribute("value") for x in "abcd"]
    assert checked == ["2", "1", "2", "3"]
    page.keyboard.press("Enter")
    wait_for_message(page, "✅")
    rows = wait_for_rows(store, "keys", 1)
    task_id, expected = canonical(store, prompt, bodies, [2, 1, 2, 3])
    assert [(r["task_id"], r["ranks"]) for r in rows] == [(task_id, expected)]
    assert rows[0]["flags"] == ["unsafe"]

    prompt2, _ = shown_task(page)
    assert prompt2 != prompt
    page.locator("#align-progress").click()
    page.keyboard.press("s")  # skip: a new task, no ranking
    page.wait_for_function("p => !document.querySelector('#align-prompt').innerText.includes(p)", arg=prompt2)
    assert len(rankings_of(store, "keys")) == 1


def test_a_partial_ranking_survives_a_reload(served, browser):
    """Ranks set before a reload (or a crash of the tab) are saved as a draft and shown again."""
    from labeling import handlers

    url, store, _ = served
    annotator = handlers.sign_in(store, "reload", PASSWORD)["annotator_id"]
    first = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    first.set_default_timeout(TIMEOUT_MS)
    sign_in(first, url, "reload")
    prompt, bodies = shown_task(first)
    first.click("#rank-a label:has-text('2')")
    first.click("#rank-b label:has-text('1')")
    task_id, partial = canonical(store, prompt, bodies, [2, 1, 0, 0])
    deadline = time.monotonic() + 10
    while store.draft(annotator, task_id) != partial and time.monotonic() < deadline:
        time.sleep(0.1)
    assert store.draft(annotator, task_id) == partial
    first.context.close()  # the tab is gone without a submit

    again = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    again.set_default_timeout(TIMEOUT_MS)
    try:
        sign_in(again, url, "reload")
        assert shown_task(again) == (prompt, bodies)  # the same task, in the same shuffled order
        checked = [again.locator(f"#rank-{x} input:checked") for x in "abcd"]
        assert [c.get_attribute("value") if c.count() else None for c in checked] == ["2", "1", None, None]
        again.click("#rank-c label:has-text('4')")
        again.click("#rank-d label:has-text('3')")
        again.click("#align-submit")
        wait_for_message(again, "✅")
        rows = wait_for_rows(store, "reload", 1)
        assert [(r["task_id"], r["ranks"]) for r in rows] == [canonical(store, prompt, bodies, [2, 1, 4, 3])]
        assert store.draft(annotator, task_id) is None  # the draft became the submitted ranking
    finally:
        again.context.close()


def test_double_click_on_submit_keeps_one_ranking(served, page):
    url, store, _ = served
    sign_in(page, url, "double")
    for letter, rank in zip("abcd", [1, 2, 3, 4], strict=True):
        page.click(f"#rank-{letter} label:has-text('{rank}')")
    page.dblclick("#align-submit")
    wait_for_message(page, "✅")
    page.wait_for_timeout(1000)  # let a second request, if any, land
    assert len(rankings_of(store, "double")) == 1
    # the second click was swallowed by the page, not sent against the next (unranked) task
    assert "⚠️" not in page.inner_text("#align-message")


def test_two_annotators_at_once_get_different_tasks(served, browser):
    url, store, _ = served
    contexts = [browser.new_context(viewport={"width": 1280, "height": 900}) for _ in range(2)]
    try:
        pages = [c.new_page() for c in contexts]
        for p, name in zip(pages, ["ann1", "ann2"], strict=True):
            p.set_default_timeout(TIMEOUT_MS)
            sign_in(p, url, name)
        prompts = [shown_task(p)[0] for p in pages]
        assert prompts[0] != prompts[1]
        for p in pages:
            for letter, rank in zip("abcd", [1, 1, 3, 4], strict=True):
                p.click(f"#rank-{letter} label:has-text('{rank}')")
        for p in pages:  # both submits in flight together
            p.click("#align-submit")
        for p in pages:
            wait_for_message(p, "✅")
        rows = [wait_for_rows(store, name, 1) for name in ["ann1", "ann2"]]
        assert [len(r) for r in rows] == [1, 1]
        assert rows[0][0]["task_id"] != rows[1][0]["task_id"]
    finally:
        for c in contexts:
            c.close()


def test_admin_tab_is_refused_to_annotators_and_exports_for_admins(served, page, browser):
    from labeling import handlers

    url, store, export_dir = served
    seed = handlers.sign_in(store, "seed", PASSWORD)  # rankings to export, whichever tests ran before
    for _ in range(2):
        handlers.submit(store, seed, handlers.next_task(store, seed), [1, 2, 3, 4], seconds=30.0)
    sign_in(page, url, "plain")
    assert page.get_by_role("tab", name="Admin").count() == 0
    assert page.locator("#align-refresh, #align-export").count() == 0  # not even in the page

    admin = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    admin.set_default_timeout(TIMEOUT_MS)
    try:
        sign_in(admin, url, "boss")
        admin.get_by_role("tab", name="Admin").click()
        admin.wait_for_function("document.querySelector('#align-totals').innerText.includes('rankings')")
        # the table renders its rows after the update lands
        admin.wait_for_function("document.querySelector('#align-per-annotator').innerText.includes('seed')")
        admin.click("#align-export")
        admin.wait_for_function("document.querySelector('#align-export-summary').innerText.includes('Exported')")
        summary = json.loads((export_dir / "summary.json").read_text())
        assert summary["pairs"] > 0 and (export_dir / "dataset_dict.json").is_file()
        assert f"{summary['pairs']} pairs" in admin.inner_text("#align-export-summary")
    finally:
        admin.context.close()


def test_pairwise_task_maps_the_verdict_to_ranks(tmp_path, browser):
    store = new_store(tmp_path)
    store.add_user("judge", PASSWORD)
    store.add_tasks("eval-ab", [{"prompt": REFUND_PROMPT, "responses": REFUND_REPLIES[:2]}], kind="pairwise")
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    page.set_default_timeout(TIMEOUT_MS)
    try:
        with running(store) as url:
            page.goto(url)
            page.fill("#align-name textarea", "judge")
            page.fill("#align-password input", PASSWORD)
            page.click("#align-signin")
            page.wait_for_selector("#align-pairwise", state="visible")
            assert page.locator("#rank-a").is_hidden()
            prompt, (a, b) = page.inner_text("#align-prompt"), [
                page.inner_text(f"#resp-{x} .align-body") for x in "ab"]
            page.locator("#align-progress").click()
            page.keyboard.press("3")  # B better
            assert page.locator("#align-pairwise input:checked").get_attribute("value") == "B"
            page.keyboard.press("Control+Enter")
            wait_for_message(page, "✅")
            [row] = wait_for_rows(store, "judge", 1)
            _, expected = canonical(store, prompt.removeprefix("Customer:").strip(), [a, b], [2, 1])
            assert row["ranks"] == expected and row["flags"] == []
            assert "All done" in page.inner_text("#align-progress")
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
    import labeling.store
    from labeling import handlers

    store = new_store(tmp_path, admin="lena")
    store.add_user("sam", PASSWORD)
    store.add_tasks("round-1", [{"prompt": REFUND_PROMPT, "responses": REFUND_REPLIES}], source={"policy": "sft"})
    store.add_tasks("round-1", _support_tasks(9), source={"policy": "sft"})
    store.add_tasks("round-2", _support_tasks(30)[9:], source={"policy": "dpo-1"})
    refund, *rest = [t["task_id"] for t in store.batch_tasks("round-1")]
    store.add_gold(rest[4], [1, 2, 3, 4])
    rng = random.Random(0)
    monkeypatch.setattr(labeling.store, "time", _Clock(time.time() - 3 * 3600))
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
                handlers.skip(store, session, task)  # left open for the annotator screenshot
                continue
            ranks = [1, 2, 3, 4]
            if rng.random() < noise:
                j = rng.randrange(3)
                ranks[j], ranks[j + 1] = ranks[j + 1], ranks[j]
            handlers.submit(store, session, task, [ranks[j] for j in task["order"]], seconds=rng.uniform(20, 95))
    monkeypatch.undo()

    out = REPO / "docs/img"
    out.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(tmp_path)  # the export folder the picture shows is the default one, written under tmp
    with running(store, overlap=3, export_dir="runs/quickstart/preferences") as url:
        page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
        sign_in(page, url, "sam")
        assert "money back" in page.inner_text("#align-prompt")
        # the order differs per annotator: rank by text so the picture shows a sensible ranking
        _, bodies = shown_task(page)
        wanted = {0: "1", 2: "2", 3: "3"}  # good, curt, padded; the invented discount is still open
        for letter, body in zip("abcd", bodies, strict=True):
            [index] = [i for i, r in enumerate(REFUND_REPLIES) if _same(r, body)]
            if index in wanted:
                page.click(f"#rank-{letter} label:has-text('{wanted[index]}')")
        page.click(f"#resp-{'abcd'[[_same(REFUND_REPLIES[1], b) for b in bodies].index(True)]} .align-body")
        page.wait_for_timeout(600)
        page.screenshot(path=str(out / "annotator.png"), full_page=True)

        admin = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
        sign_in(admin, url, "lena")
        admin.get_by_role("tab", name="Admin").click()
        admin.wait_for_function("document.querySelector('#align-per-annotator').innerText.includes('maria')")
        admin.click("#align-export")
        admin.wait_for_function("document.querySelector('#align-export-summary').innerText.includes('Exported')")
        admin.wait_for_timeout(600)  # the "pending" fade of the updated blocks
        admin.screenshot(path=str(out / "admin.png"))
