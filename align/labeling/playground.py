"""The Playground tab: a signed-in person chats with two served models side by side.

    align serve run.dir=runs/quickstart                          # the models, at http://127.0.0.1:8000/v1
    align label --serve-url http://127.0.0.1:8000/v1             # the app, with the Playground tab

The app talks HTTP to the OpenAI-compatible endpoint of `align serve` (or any such server, vLLM's
included): align/labeling/ imports nothing else of align/, nor torch. The URL is fixed when the app starts
and the API key comes from the ALIGN_SERVE_API_KEY environment variable, never from the command
line or the page: a user picks models and types messages, and nothing a user sends can make the
app fetch another URL (the model name and the messages travel in the JSON body). Redirects are not
followed and proxy variables are not read, so the requests go to that URL and nowhere else.

The tab sends no system message: `align serve` then puts each adapter's own system prompt (the
one it was trained with, `sft.data.system_prompt`) first, so a model answers here as it was trained
and sampled; vLLM's server does not (docs/serving.md).

Both models are asked at once (each from its own thread); `align serve` generates one answer at a time,
so one pane streams to its end and then the other (vLLM streams both together). A send nobody reads any
more (the tab closed, the event cancelled: Gradio closes the generator) closes both streams at their
next piece, so the server stops generating them: it generates one answer at a time for everyone,
and Gradio's concurrency limit is freed at once. Every piece of model text is shown as escaped
text (`handlers.text_html`), like the labelling tasks: a response holding `<img src=...>` or a form
shows as those characters and loads nothing.
"""

from __future__ import annotations

import html
import json
import queue
import re
import threading
import time
from collections.abc import Generator, Iterator
from contextlib import closing
from typing import Any
from urllib.parse import urlsplit

import httpx

from align.labeling.handlers import text_html

API_KEY_ENV = "ALIGN_SERVE_API_KEY"  # the same variable `align serve` reads (align/serving.py)
MAX_MESSAGE_CHARS = 4000  # one message typed in the tab
MAX_TURNS = 20  # messages of the user per conversation; Clear starts a new one
MAX_ANSWER_CHARS = 50_000  # an answer longer than this (a server without max_tokens) is cut
MAX_MODELS = 100
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:-]{0,127}")
SHOW_EVERY = 0.15  # seconds between two redraws of the panes while the answers stream


class PlaygroundError(Exception):
    """What went wrong with the serve endpoint, worded for the person in the tab."""


def check_url(url: str) -> str:
    """An http(s) endpoint without credentials, query or fragment, e.g. http://127.0.0.1:8000/v1 (a ValueError else)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r}: an http:// or https:// URL such as http://127.0.0.1:8000/v1")
    if parts.username or parts.password:
        raise ValueError(f"{url!r}: no user or password in the URL; the API key comes from ${API_KEY_ENV}")
    if parts.query or parts.fragment:
        raise ValueError(f"{url!r}: no query or fragment; the endpoint's base URL such as http://127.0.0.1:8000/v1")
    return url.rstrip("/")


class ServeClient:
    """The endpoint at one URL fixed at start: its models, and a streamed chat completion."""

    def __init__(self, url: str, api_key: str | None = None, *, max_tokens: int | None = None, timeout: float = 120.0):
        self.url = check_url(url)
        # None: sent without max_tokens, so the server's default applies, lowered to what the model's context
        # leaves after the conversation (align serve and vLLM); a number sent can be more than is left.
        self.max_tokens = max_tokens
        api_key = (api_key or "").strip()  # as `align serve` reads the same variable (align/serving.py)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # One client for the app's life (pooled connections); no redirects, no proxies from the environment.
        self.http = httpx.Client(base_url=self.url + "/", headers=headers, follow_redirects=False, trust_env=False,
                                 timeout=httpx.Timeout(timeout, connect=5.0))

    def models(self) -> list[str]:
        """The served model names (GET /models), in the server's order."""
        try:
            response = self.http.get("models")
        except httpx.HTTPError as err:
            raise PlaygroundError(f"the models server at {self.url} is not answering ({type(err).__name__}); "
                                  "is `align serve` running?") from None
        if response.status_code != 200:
            raise PlaygroundError(f"the models server at {self.url} answered {response.status_code}: "
                                  f"{_error_message(response)}{_key_hint(response)}")
        try:
            data = response.json()["data"]
            names = [m["id"] for m in data]
        except (ValueError, KeyError, TypeError):
            raise PlaygroundError(f"{self.url}/models did not answer with OpenAI's list of models") from None
        return [n for n in names if isinstance(n, str) and MODEL_NAME.fullmatch(n)][:MAX_MODELS]

    def stream(self, model: str, messages: list[dict[str, str]], *,
               temperature: float) -> Generator[str, None, str | None]:
        """The answer of `model` to `messages`, piece by piece (OpenAI's server-sent events); returns its
        finish_reason: `length` when it was cut at the token limit, None when the server sent none."""
        reason = None
        body = {"model": model, "messages": messages, "stream": True, "temperature": temperature}
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        try:
            with self.http.stream("POST", "chat/completions", json=body) as response:
                if response.status_code != 200:
                    response.read()
                    raise PlaygroundError(f"{response.status_code}: {_error_message(response)}{_key_hint(response)}")
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[len("data:"):].strip()
                    if data == "[DONE]":
                        return reason
                    event = json.loads(data)
                    if isinstance(event, dict) and event.get("error"):
                        raise PlaygroundError(str(event["error"].get("message", event["error"]))[:500])
                    for choice in event.get("choices") or []:
                        if choice.get("index", 0) != 0:
                            continue
                        piece = (choice.get("delta") or {}).get("content")
                        if isinstance(piece, str) and piece:
                            yield piece
                        if isinstance(choice.get("finish_reason"), str):
                            reason = choice["finish_reason"]
        except httpx.ConnectError:  # it never answered (not up), rather than stopped mid-way as below
            raise PlaygroundError(f"the models server at {self.url} is not answering (ConnectError); is `align serve` "
                                  "running?") from None
        except httpx.HTTPError as err:
            raise PlaygroundError(f"the models server at {self.url} stopped answering ({type(err).__name__})") \
                from None
        except (ValueError, AttributeError, TypeError):
            raise PlaygroundError(f"{self.url} sent something that is not OpenAI's stream format") from None
        return reason  # the stream ended without [DONE]


def _key_hint(response: httpx.Response) -> str:
    """What to do about a refused key: the endpoint's own words ask for a header, which nobody on the page sends."""
    if response.status_code != 401:
        return ""
    return (f" (the app sends the key in ${API_KEY_ENV} as `align label` started: restart it with {API_KEY_ENV} set "
            "to the key of `align serve`)")


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])[:500]
    except (ValueError, KeyError, TypeError):
        return response.text[:200] or response.reason_phrase


# ---------------------------------------------------------------------------- the tab's logic


def conversation_html(history: list[dict[str, Any]], *, pending: tuple[str, str] | None = None,
                      note: str | None = None) -> str:
    """A pane: each turn as escaped text under who said it, an answer cut at the token limit (`cut_off`)
    with a note saying so; `pending` = (model, answer so far) still streaming."""
    turns = history + ([{"role": "assistant", "model": f"{pending[0]} …", "content": pending[1]}] if pending else [])
    shown = [f'<div class="align-pg-turn align-pg-{t["role"]}"><p class="align-label">'
             f'{html.escape("You" if t["role"] == "user" else t.get("model") or "model")}</p>'
             f'{text_html(t["content"], cut_off=t.get("cut_off", False))}'
             "</div>" for t in turns]
    if note:
        shown.append(f'<p class="align-error">⚠️ {html.escape(note)}</p>')
    return "".join(shown) or '<p class="align-note">No messages yet.</p>'


def _api_messages(history: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [{"role": t["role"], "content": t["content"]} for t in history]


def send(client: ServeClient, models: tuple[str, str], message: str, histories: tuple[list, list], *,
         temperature: float = 0.7) -> Iterator[tuple[list, list, str, str]]:
    """Ask both models the same next message, each in its own conversation; yields (left history, right
    history, left pane, right pane) as the answers stream in, the last yield with both answers complete.

    The histories passed in are not changed. A model that fails leaves its pane's conversation as it
    was (the message is not added to it) and says why in the pane."""
    message = (message or "").strip()
    if not message:
        raise ValueError("type a message first")
    if len(message) > MAX_MESSAGE_CHARS:
        raise ValueError(f"the message is {len(message):,} characters; at most {MAX_MESSAGE_CHARS:,}")
    # A name the page sent (the dropdowns take any value: their choices are lost with a restart)
    if not all(isinstance(m, str) and MODEL_NAME.fullmatch(m) for m in models):
        raise ValueError("choose a model for each side")
    if max(sum(t["role"] == "user" for t in h) for h in histories) >= MAX_TURNS:
        raise ValueError(f"{MAX_TURNS} messages in this conversation: Clear to start a new one")
    asked = [h + [{"role": "user", "content": message}] for h in histories]
    answers, notes, done = ["", ""], [None, None], [False, False]
    reasons: list[str | None] = [None, None]  # each answer's finish_reason once it ended
    events: queue.Queue = queue.Queue()
    # Set once nobody reads the answers (the tab closed, the event cancelled: the generator is closed).
    # The server generates one answer at a time for everyone, so a stream nobody reads must end.
    stop = threading.Event()

    def ask(side: int) -> None:
        try:
            # Closing the stream closes its response: the server sees the client go and stops generating.
            with closing(client.stream(models[side], _api_messages(asked[side]), temperature=temperature)) as pieces:
                while True:
                    try:
                        piece = next(pieces)
                    except StopIteration as end:  # the stream's return value: its finish_reason
                        events.put((side, "done", end.value))
                        return
                    if stop.is_set():
                        return
                    events.put((side, "text", piece))
        except PlaygroundError as err:
            events.put((side, "error", str(err)))
        except Exception as err:  # never leave the tab waiting on a thread that died
            events.put((side, "error", f"the request failed ({type(err).__name__})"))

    for side in (0, 1):
        threading.Thread(target=ask, args=(side,), daemon=True, name=f"align-playground-{side}").start()

    def panes() -> tuple[list, list, str, str]:
        now, shown = [], []
        for s in (0, 1):
            if notes[s] is not None:  # failed: its conversation as it was, and why
                now.append(histories[s])
                shown.append(conversation_html(asked[s][:-1], note=notes[s]))
            elif done[s]:
                answer = {"role": "assistant", "content": answers[s], "model": models[s]}
                if reasons[s] == "length":  # cut at the token limit: the pane says so, on later turns too
                    answer["cut_off"] = True
                now.append(asked[s] + [answer])
                shown.append(conversation_html(now[s]))
            else:  # still streaming
                now.append(histories[s])
                shown.append(conversation_html(asked[s], pending=(models[s], answers[s])))
        return now[0], now[1], shown[0], shown[1]

    last = 0.0
    try:
        # at once: the message and both answers pending, shown while the models come to their first token: the
        # page has no other sign of the send on its way but its greyed buttons (show_progress hidden)
        yield panes()
        while not all(done[s] or notes[s] is not None for s in (0, 1)):
            side, kind, value = events.get()
            if kind == "text":
                answers[side] = (answers[side] + value)[:MAX_ANSWER_CHARS]
            elif kind == "done":
                done[side], reasons[side] = True, value
            else:
                notes[side] = value
            if time.monotonic() - last >= SHOW_EVERY:
                last = time.monotonic()
                yield panes()
        yield panes()
    finally:  # GeneratorExit included: each side stops at its next piece
        stop.set()
