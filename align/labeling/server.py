"""The labelling app's web server: a sign-in page, the session cookie, and the Gradio app behind them.

    align label --run-dir runs/quickstart      (align/labeling/cli.py builds this and serves it)

One FastAPI app: `GET/POST /login` and `POST /logout` are ours (align/labeling/auth.py does the work),
and the Gradio Blocks of align/labeling/app.py is mounted at `/` behind `RequireSession`. That
middleware answers every request without a valid session itself (a redirect to /login for a
page, 401 for anything else; 503 when the store cannot say whether it is valid) before Gradio sees
it, so anonymous traffic never creates Gradio session state: Gradio keeps 10,000 sessions and
drops the oldest, and a flood of fresh session hashes used to push signed-in annotators out. Gradio's own `auth_dependency` is given the same
answer, so its routes would refuse an anonymous call too. Every response carries a
Content-Security-Policy that lets the page load and send nothing outside this server, and no CORS header
(Gradio's own allowed a page on another port, or behind a proxy any page, to read `/config` as the
annotator: `send_secured` takes them out). `/login` and
`/logout` take a form only from this server's own pages (`_from_own_page`): another page, even on
another port of this host, cannot post a sign-in into another account. Nor can a sibling subdomain plant
its cookie: over HTTPS the cookie is `__Host-align_session`, which only this host can set, and a request
carrying the session cookie twice is signed out (auth.session_cookies). A page on another port of this
host can still overwrite the cookie (cookies do not tell ports apart: RFC 6265, section 8.5).

A signed-in request reaches only the routes the page uses (`ROUTES`): Gradio also mounts routes
this app has no use for and that a signed-in annotator must not have, such as `deep_link` (a copy
of any session's page, by its hash), `upload` (files of any size into the server's temp folder),
`file=` with a remote URL (an open proxy), `proxy=`, and `run/<api_name>` (a handler run outside the queue,
past its concurrency limits: the Playground's 4 streams at once, say). A request body is at most `MAX_BODY`
bytes (a sign-in or sign-out form, sent before any session, `FORM_BODY`; the sign-in form URL-encoded
only), and a Gradio session hash belongs to the account that first used it: another account
presenting it (to read that page's event stream, cancel its events) is refused. A POST body is
read as Gradio reads it (JSON, leading whitespace allowed), and one that is not JSON is refused.
"""

from __future__ import annotations

import errno
import functools
import html
import ipaddress
import json
import logging
import os
import re
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import gradio as gr
import uvicorn
from fastapi import FastAPI, Form, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.requests import HTTPConnection
from uvicorn.config import STARTUP_FAILURE

from align.labeling import auth
from align.labeling.app import STORE_ERRORS, build_app
from align.labeling.store import Store

log = logging.getLogger(__name__)

OPEN = {("GET", "/login"), ("POST", "/login"), ("POST", "/logout")}  # all a client without a session can reach
# What a signed-in page uses of Gradio's routes (each of the app's flows, recorded from the browser tests);
# anything else is 404 before Gradio sees it. `app_id` is what the page polls after a call failed in transit
# (the network dropped, the server restarted) and reloads once it answers; without it the page was dead for
# good. It answers the app's random id, which /config holds too. The page runs every handler through the
# queue (queue/join, then queue/data): Gradio's `run/<api_name>`, which runs one outside the queue and past its
# concurrency limits (the Playground's 4 streams, the app's 8 calls), is not let through, and Gradio is told
# to refuse it too (blocks.queue(api_open=False) below).
ROUTES = {
    "GET": re.compile(r"/|/theme\.css|/favicon\.ico|/manifest\.json|/robots\.txt|/(assets|static|svelte)/.+"
                      r"|/config/?|/gradio_api/(info/?|queue/data|heartbeat/[^/]+|startup-events|app_id/?)"),
    "HEAD": re.compile(r"/|/(assets|static)/.+"),
    "POST": re.compile(r"/gradio_api/(queue/join|cancel)"),
}
MAX_BODY = 1 << 20  # bytes: a ranking, a rationale (handlers.MAX_RATIONALE), a Playground message
FORM_BODY = 1 << 16  # bytes: a sign-in form (a name of at most store.NAME_CHARS and a password), or a sign-out
# The routes that take a page's session hash and read or drive its Gradio state: a hash's owner is checked and
# recorded on these only (any other URL may carry a session_hash parameter; Gradio ignores it there).
PAGE_STATE = re.compile(r"/gradio_api/(queue/(join|data)|cancel|heartbeat/[^/]+)")
SESSION_HASH = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what one may be: Gradio's page makes 11 of [a-z0-9]
# Page-session hashes remembered per account (one per page load); past it an account forgets its own oldest,
# never another account's (a global list, oldest dropped first, let one account flush out everyone's).
HASHES_PER_ACCOUNT = 2_000
# Calls one account may have queued or running at once (queue/join). Gradio's queue is one line for every account:
# 1,500 joins from one signed-in annotator in 7 s held another's submit for 53 s and a page load for 39 s. A page
# never has many: each of its events runs once at a time (trigger_mode always_last or once), so however fast a
# person types or clicks (the rationale drafts on every key), its calls wait for their answers; only a script that
# joins without waiting meets the limit. Counted in Gradio's own queue (Queue.event_ids_to_events: each event
# until its run ends), by the session hashes the account owns (RequireSession.owners).
MAX_PENDING = 24
# The page's event stream and heartbeat (GETs that read what its own queued calls answer, nothing of the store):
# while the store is down, a session the store confirmed within STORE_GRACE seconds is taken for them. Refused,
# Gradio's page took a stream answered 503 for a dropped connection and sent nothing more (the submit that would
# have said "Not saved" was never sent) until it reloaded. Every other request is refused (503) as before.
STREAMS = re.compile(r"/gradio_api/(queue/data|heartbeat/[^/]+)")
STORE_GRACE = 60.0
SECURITY_HEADERS = {
    # Gradio needs inline scripts and `Function` (gr.HTML templates); nothing may come from, or be
    # sent to, another host: no remote image, font, frame, fetch or form target.
    "Content-Security-Policy": "default-src 'self'; script-src 'self' 'unsafe-inline' 'unsafe-eval'; "
                               "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; font-src 'self' data:; "
                               "media-src 'self' data: blob:; worker-src 'self' blob:; connect-src 'self'; "
                               "frame-src 'none'; object-src 'none'; base-uri 'self'; form-action 'self'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    # Gradio puts session hashes in URLs: never send them on. "same-origin", not "no-referrer": under that
    # a browser sends "Origin: null" with the page's own sign-in and sign-out forms, which a browser without
    # Sec-Fetch-Site needs to show (_from_own_page); this server is the only one that gets a Referer.
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}

LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>align · labelling · sign in</title>
<style>
body {{ font-family: ui-sans-serif, system-ui, sans-serif; background: #fafafa; color: #27272a; }}
main {{ max-width: 360px; margin: 12vh auto; background: #fff; border: 1px solid #e4e4e7; border-radius: 8px;
       padding: 24px 28px; }}
h1 {{ font-size: 1.3em; margin: 0 0 16px; }}
label {{ display: block; margin: 12px 0 4px; font-weight: 600; }}
input {{ width: 100%; box-sizing: border-box; padding: 8px; border: 1px solid #d4d4d8; border-radius: 6px;
        font-size: 1em; }}
button {{ margin-top: 18px; width: 100%; padding: 10px; border: 0; border-radius: 6px; background: #c2410c;
         color: #fff; font-size: 1em; font-weight: 600; cursor: pointer; }}
#align-signin-error {{ color: #b91c1c; min-height: 1.2em; margin: 12px 0 0; }}
</style></head>
<body><main>
<h1>align · labelling</h1>
<form method="post" action="login">
<label for="align-name">Name</label>
<input id="align-name" name="name" autocomplete="username" required value="{name}" autofocus>
<label for="align-password">Password</label>
<input id="align-password" name="password" type="password" autocomplete="current-password" required>
<button id="align-signin" type="submit">Sign in</button>
<p id="align-signin-error" role="alert">{error}</p>
</form>
</main></body></html>
"""


OTHER_PAGE = ("refused: this form was sent by another site's page (or another port of this host); "
              "sign in and out on this server's own pages")
# The store cannot answer (PostgreSQL unreachable, SQLite's file gone or locked past its busy timeout) while the
# server checks who is asking: 503 in these words, before any handler runs; the detail goes to the log.
STORE_DOWN = "the store is busy or unreachable: nothing was saved or changed; try again in a moment"
NOT_SIGNED_IN = "Not signed in: the store is busy or unreachable. Try again in a moment."
STORE_DOWN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>align · labelling · store unreachable</title></head>
<body style="font-family: ui-sans-serif, system-ui, sans-serif; max-width: 480px; margin: 12vh auto">
<h1>align · labelling</h1>
<p id="align-store-down" role="alert">{text}</p>
</body></html>
"""
PAGE_NOT_SHOWN = "The store is busy or unreachable, so this page could not be shown: reload it in a moment."
NOT_SIGNED_OUT = "Not signed out: the store is busy or unreachable. Go back and sign out again in a moment."


# Said once per process (_check_proxy): a proxy that sends no X-Forwarded-For makes every annotator one address.
NO_FORWARDED_FOR = ("a request for %r came through a proxy on %s that sends no X-Forwarded-For: behind it every "
                    "annotator shares its address, so twenty wrong passwords from anyone lock the whole team out, five "
                    "on one name lock that person out everywhere, and without X-Forwarded-Proto the cookie is not "
                    "Secure; make the proxy send X-Forwarded-For and X-Forwarded-Proto (docs/labeling.md, "
                    "Deployment and security, Binding)")
UNTRUSTED_PROXY = ("X-Forwarded-For came from %s, which FORWARDED_ALLOW_IPS does not trust (default 127.0.0.1,::1): "
                   "it is ignored, so if %s is your proxy every annotator shares its address and sign-in limits lock "
                   "the whole team out; set FORWARDED_ALLOW_IPS to the proxy's address (docs/labeling.md, Binding)")
_proxy_warned: set[str] = set()


def loopback_name(host: str | None) -> bool:
    """Whether a host name (from Host, Origin or Referer, or `align label --host`) is this machine's: localhost,
    127.x, ::1."""
    host = (host or "").strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@functools.lru_cache(maxsize=8)
def _allowed(setting: str) -> tuple[list[str], list[ipaddress.IPv4Network | ipaddress.IPv6Network]]:
    """FORWARDED_ALLOW_IPS's entries and the networks among them, parsed once per value (_check_proxy runs on
    every request, each Gradio event and static file)."""
    entries = [a.strip() for a in setting.split(",") if a.strip()]
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            continue
    return entries, networks


def _trusted_peer(peer: str) -> bool | None:
    """Whether uvicorn believes X-Forwarded-For from `peer` (FORWARDED_ALLOW_IPS, as `serve` leaves it: default
    127.0.0.1,::1); None when it trusts every address ("*": direct clients and a proxy cannot be told apart)."""
    entries, networks = _allowed(os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1,::1"))
    if "*" in entries:
        return None
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return peer in entries  # a unix socket's path, say
    return any(address in network for network in networks)


def _check_proxy(scope: dict) -> None:
    """Warn once per process when the proxy in front cannot tell annotators apart. A proxy on this machine (or
    one FORWARDED_ALLOW_IPS names) that sends no X-Forwarded-For, a plain nginx `proxy_pass` say, makes every
    request come from its address. A browser went through a proxy when it asked for a host name that is not this
    machine's: in Host, or (nginx sends the upstream's 127.0.0.1 as Host) in the Origin or Referer of a request
    the browser calls same-origin. X-Forwarded-For from an address not trusted (a proxy in another container)
    is ignored: the same thing."""
    if len(_proxy_warned) == 2 or not scope.get("client"):
        return
    peer = scope["client"][0]  # the proxy's, unless uvicorn took the client's from X-Forwarded-For (then one of it)
    headers = dict(scope["headers"])
    trusted = _trusted_peer(peer)
    if b"x-forwarded-for" in headers:
        listed = [a.strip() for a in headers[b"x-forwarded-for"].decode("latin-1").split(",")]
        if peer not in listed and trusted is False and "untrusted" not in _proxy_warned:
            _proxy_warned.add("untrusted")
            log.warning(UNTRUSTED_PROXY, peer, peer)
        return
    if "no-xff" in _proxy_warned or not (trusted or loopback_name(peer)):
        return
    asked = [_origin("http://" + headers.get(b"host", b"").decode("latin-1"))]
    if headers.get(b"sec-fetch-site", b"same-origin") == b"same-origin":
        asked += [_origin(headers.get(h, b"").decode("latin-1")) for h in (b"origin", b"referer")]
    outside = [o[1] for o in asked if o is not None and not loopback_name(o[1])]
    if outside:
        _proxy_warned.add("no-xff")
        log.warning(NO_FORWARDED_FOR, outside[0], peer)


def _login_page(error: str = "", name: str = "", status_code: int = 200, **headers: str) -> HTMLResponse:
    body = LOGIN_PAGE.format(error=html.escape(error), name=html.escape(name))
    return HTMLResponse(body, status_code=status_code, headers=headers or None)


def _origin(url: str) -> tuple[str, str, int | None] | None:
    """(scheme, host, port) of a URL or an Origin header, the port filled in; None for "null" or garbage."""
    try:
        parts = urlsplit(url)
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        return None
    return (parts.scheme, parts.hostname, port) if parts.scheme and parts.hostname else None


def _session_cookies(connection: HTTPConnection) -> list[str]:
    """The values of the session cookie a request carries (auth.session_cookies): its name says HTTPS or not."""
    return auth.session_cookies(connection.headers.getlist("cookie"), https=connection.url.scheme in ("https", "wss"))


def _from_own_page(request: Request) -> bool:
    """Whether a POST to /login or /logout came from this server's own pages. Any other page's form, also one
    on another port of this host or a sibling subdomain ("same-site"), signing a browser in is login CSRF: the
    annotator then ranks as the attacker's account. Every current browser says where a request comes from in
    Sec-Fetch-Site; without it, a browser posting a form to another origin sends Origin (or at least Referer),
    which must then be this server's own (scheme://host:port, the host as the browser sent it). A request with
    none of the three is no browser's cross-origin form (curl, a script): it may sign in."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site in ("same-origin", "none")  # "none": the user's own navigation (typed, a bookmark)
    sender = request.headers.get("origin") or request.headers.get("referer")
    if sender is None:
        return True
    own = _origin(f"{request.url.scheme}://{request.headers.get('host', '')}")
    return own is not None and _origin(sender) == own


class RequireSession:
    """ASGI middleware: a request without a valid session stops here, before Gradio sees it."""

    def __init__(self, app: Any, store: Store, secret: bytes, blocks: gr.Blocks | None = None):
        self.app, self.store, self.secret, self.blocks = app, store, secret, blocks
        # Gradio session hash -> the annotator who used it first, and each annotator's hashes, oldest first.
        # In memory only: after a restart the map is empty and the next account to use a hash owns it. A hash
        # is a random string the page makes for itself and sends only to this server, not a thing to guess,
        # so this check is defence in depth; the identity of every call comes from the cookie.
        self.owners: dict[str, int] = {}
        self.hashes_of: dict[int, OrderedDict[str, None]] = {}
        # The session hashes of the calls each account queued (accepted joins only), newest last: _pending counts
        # their events. Apart from `owners`, where any page-state request (a heartbeat's GET) records a hash, so
        # 2,000 of them would push out the hashes of calls still waiting and take them off the count.
        self.joined: dict[str, int] = {}
        self.joined_of: dict[int, OrderedDict[str, None]] = {}
        # cookie value -> (its session, when the store confirmed it), newest last: STREAMS while the store is down
        self.confirmed: OrderedDict[str, tuple[dict, float]] = OrderedDict()

    def _confirmed(self, value: str, session: dict | None) -> None:
        self.confirmed.pop(value, None)
        if session is not None:
            self.confirmed[value] = (session, time.monotonic())
            while len(self.confirmed) > 10_000:
                self.confirmed.popitem(last=False)

    def _still_good(self, value: str) -> dict | None:
        """The session the store confirmed for this cookie within STORE_GRACE seconds and not expired since."""
        session, at = self.confirmed.get(value, (None, 0.0))
        if session is None or time.monotonic() - at > STORE_GRACE or session.get("expires", 0) <= time.time():
            return None
        return session

    def _pending(self, annotator_id: int) -> int:
        """This account's calls queued or running now, in Gradio's queue (0 when it cannot be read: no limit)."""
        events = getattr(getattr(self.blocks, "_queue", None), "event_ids_to_events", None)
        if not isinstance(events, dict):
            return 0
        return sum(self.joined.get(event.session_hash) == annotator_id for event in list(events.values()))

    def _joins(self, session_hash: Any, annotator_id: int) -> None:
        """Count `session_hash`'s events as this account's from now on (a join it let through)."""
        if not isinstance(session_hash, str) or not session_hash:
            return
        self.joined[session_hash] = annotator_id
        mine = self.joined_of.setdefault(annotator_id, OrderedDict())
        mine[session_hash] = None
        mine.move_to_end(session_hash)
        if len(mine) > HASHES_PER_ACCOUNT:
            gone = mine.popitem(last=False)[0]
            if self.joined.get(gone) == annotator_id:
                del self.joined[gone]

    def _owned_by_another(self, session_hash: Any, annotator_id: int) -> bool:
        if not isinstance(session_hash, str) or not session_hash:
            return False
        owner = self.owners.setdefault(session_hash, annotator_id)
        if owner != annotator_id:
            return True
        mine = self.hashes_of.setdefault(annotator_id, OrderedDict())
        mine[session_hash] = None
        mine.move_to_end(session_hash)
        if len(mine) > HASHES_PER_ACCOUNT:  # this account's oldest page, most likely long closed
            del self.owners[mine.popitem(last=False)[0]]
        return False

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        _check_proxy(scope)

        async def send_secured(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for key, value in SECURITY_HEADERS.items():
                    headers.setdefault(key, value)
                # No page of another origin may read an answer: Gradio's CORS middleware allowed any localhost
                # origin on a localhost host, and any origin at all behind a proxy, with credentials.
                for key in {k for k in headers.keys() if k.startswith("access-control-")}:
                    del headers[key]
            await send(message)

        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        if (scope.get("method"), path) in OPEN:
            if scope["method"] == "POST":
                form = await _form_refusal(scope, receive, path)
                if isinstance(form, Response):
                    await form(scope, receive, send_secured)
                    return
                receive = _replay(form, receive)
            await self.app(scope, receive, send_secured)
            return
        values = _session_cookies(HTTPConnection(scope))
        value = values[0] if len(values) == 1 else None  # two: one is another site's (auth.TWO_COOKIES)
        wants_page = scope["type"] == "http" and scope["method"] in ("GET", "HEAD") and \
            b"text/html" in dict(scope["headers"]).get(b"accept", b"")
        session = None
        if auth.token_of(self.secret, value):  # a forged or garbage cookie costs no database query
            try:
                session = await run_in_threadpool(auth.session_of, self.store, self.secret, value)
            except STORE_ERRORS:
                stream = scope["type"] == "http" and scope["method"] == "GET" and STREAMS.fullmatch(path)
                session = self._still_good(value) if stream else None
                if session is None:
                    log.exception("%s %s: the session could not be checked: the store failed", scope.get("method"),
                                  path)
                    if scope["type"] == "websocket":
                        await send({"type": "websocket.close", "code": 1013})  # try again later
                        return
                    await _store_down(wants_page)(scope, receive, send_secured)
                    return
                log.warning("GET %s: the store failed; the session it confirmed under %.0f s ago is taken for the "
                            "page's stream", path, STORE_GRACE)
            else:
                self._confirmed(value, session)
        if session is None:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            # Relative, so that it holds behind a proxy's path prefix; from a deeper path, up to the root first
            # (a plain "login" from /a/b would be /a/login, itself signed-out: a redirect loop)
            login = "../" * (path.count("/") - 1) + "login"
            response: Response = (RedirectResponse(login, status_code=303) if wants_page else JSONResponse(
                {"detail": "not signed in, or " + auth.SESSION_ENDED}, status_code=401))
            await response(scope, receive, send_secured)
            return
        # Gradio and align/labeling/app.py (which reads auth.COOKIE on each event) see the one cookie checked here, by
        # its plain name, and no other: never a second session cookie that Starlette would prefer.
        scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"cookie"]
                 + [(b"cookie", f"{auth.COOKIE}={value}".encode())]}
        scope.setdefault("state", {})["align_session"] = session
        if scope["type"] == "http":
            refused = await self._refusal(scope, receive, path, session)
            if isinstance(refused, Response):
                await refused(scope, receive, send_secured)
                return
            if refused is not None:  # the body, read to check it: handed on as it came
                receive = _replay(refused, receive)
        await self.app(scope, receive, send_secured)

    async def _refusal(self, scope: dict, receive: Any, path: str, session: dict) -> Response | bytes | None:
        """A response refusing the request, else the body it read (POST), else None."""
        route = ROUTES.get(scope["method"])
        if route is None or not route.fullmatch(path):
            return JSONResponse({"detail": "not found"}, status_code=404)
        query = HTTPConnection(scope).query_params
        if "deep_link" in query:  # Gradio draws the page from <its temp folder>/deep_links/<name>/state.json, a
            # folder every Gradio process on the machine shares: a file planted there ran its script in the page
            return JSONResponse({"detail": "deep links are not served here"}, status_code=400)
        claimed: list[Any] = query.getlist("session_hash") if PAGE_STATE.fullmatch(path) else []
        if path.startswith("/gradio_api/heartbeat/"):
            claimed.append(path.rsplit("/", 1)[1])
        body = None
        if scope["method"] == "POST":
            body = await _read_body(scope, receive)
            if body is None:
                return JSONResponse({"detail": f"request body over {MAX_BODY} bytes"}, status_code=413)
            # Read as Gradio reads it (FastAPI: json.loads of the whole body, leading whitespace and all): a
            # body this check read differently (it once looked only at bodies starting with "{") would skip it.
            try:
                payload = json.loads(body)
            except (ValueError, RecursionError):
                return JSONResponse({"detail": "the request body is not JSON"}, status_code=400)
            if isinstance(payload, dict):
                claimed.append(payload.get("session_hash"))
        # Each page-state request names its page: Gradio's own hashes are short words. An empty one ("") was let
        # through uncounted and unowned, and Gradio filed its event under another key than its messages: its first
        # queue-estimate broadcast raised and stopped the queue for every account (12 joins by one annotator).
        if PAGE_STATE.fullmatch(path) and not (claimed and all(
                isinstance(h, str) and SESSION_HASH.fullmatch(h) for h in claimed)):
            return JSONResponse({"detail": "a page-state request names its page's session_hash (letters, digits, "
                                           "_ and -, at most 64)"}, status_code=400)
        if any(self._owned_by_another(h, session["annotator_id"]) for h in claimed):
            name = session["name"]  # the page's own account is not known here: its session's owner id only
            return JSONResponse({"detail": f"this page was opened by another account; you are signed in as {name}: "
                                           f"reload to rank as {name} (nothing from this page was saved)"},
                                status_code=403)
        if path == "/gradio_api/queue/join":
            if self._pending(session["annotator_id"]) >= MAX_PENDING:
                return JSONResponse({"detail": f"too many calls from this account at once ({MAX_PENDING} waiting or "
                                               "running): nothing of this one was run; try again in a moment"},
                                    status_code=429, headers={"Retry-After": "1"})
            self._joins(payload.get("session_hash") if isinstance(payload, dict) else None, session["annotator_id"])
        return body



def _store_down(page: bool, text: str = PAGE_NOT_SHOWN) -> Response:
    """503 for a request the store could not check or serve: a short page saying `text` for a page load, JSON for
    a call (the page keeps what it holds and says "Not saved": align/labeling/app.py's PAGE_JS)."""
    if page:
        return HTMLResponse(STORE_DOWN_PAGE.format(text=html.escape(text)), status_code=503,
                            headers={"Retry-After": "10"})
    return JSONResponse({"detail": STORE_DOWN}, status_code=503, headers={"Retry-After": "10"})


async def _form_refusal(scope: dict, receive: Any, path: str) -> Response | bytes:
    """A response refusing a sign-in or sign-out form nobody has signed in to send, else its body (read whole).
    FastAPI parses a form before the handler runs, a multipart one into temp files of any size: anonymous
    uploads to /login could fill the disk (of a SQLite store too). So the sign-in form must be URL-encoded,
    the one kind the page's form sends, and either form is at most FORM_BODY bytes."""
    kind = dict(scope["headers"]).get(b"content-type", b"").split(b";")[0].strip().lower()
    if path == "/login" and kind != b"application/x-www-form-urlencoded":
        return JSONResponse({"detail": "the sign-in form must be application/x-www-form-urlencoded"},
                            status_code=415)
    body = await _read_body(scope, receive, FORM_BODY)
    if body is None:
        return JSONResponse({"detail": f"request body over {FORM_BODY} bytes"}, status_code=413)
    return body


async def _read_body(scope: dict, receive: Any, limit: int = MAX_BODY) -> bytes | None:
    """The whole request body, or None past `limit` bytes (said by Content-Length or found reading)."""
    declared = dict(scope["headers"]).get(b"content-length", b"0")
    if not declared.isdigit() or int(declared) > limit:
        return None
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away
            break
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            return None
        if not message.get("more_body"):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Any) -> Any:
    """An ASGI `receive` that hands on a body already read, then the server's own (a disconnect)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def create_app(store: Store, *, throttle: auth.Throttle | None = None, session_hours: float = auth.SESSION_HOURS,
               **layout: Any) -> FastAPI:
    """The whole web app on `store`; `layout` goes to align.labeling.app.build_app (overlap, batch, export, ...)."""
    throttle = throttle or auth.Throttle()
    secret = store.secret()
    blocks = build_app(store, secret=secret, **layout)
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.state.blocks = blocks

    @app.get("/login")
    def login_page(request: Request) -> Response:
        values = _session_cookies(request)
        if len(values) > 1:
            return _login_page(auth.TWO_COOKIES)
        try:
            if values and auth.session_of(store, secret, values[0]):
                return RedirectResponse("./", status_code=303)
        except STORE_ERRORS:
            log.exception("sign-in page: the session could not be checked: the store failed")
        return _login_page()  # the form either way: a sign-in says whether the store answers

    @app.post("/login")
    def login(request: Request, name: str = Form(""), password: str = Form("")) -> Response:
        if not _from_own_page(request):
            return _login_page(OTHER_PAGE, status_code=403)
        address = request.client.host if request.client else "unknown"
        try:
            token, account = auth.sign_in(store, name, password, address, throttle=throttle, hours=session_hours)
        except auth.SignInRefused as err:
            log.info("sign-in refused for %r from %s: %s", name[:100], address, err)
            if err.retry_after:
                return _login_page(str(err), name[:100], status_code=429, **{"Retry-After": str(int(err.retry_after) + 1)})
            return _login_page(str(err), name[:100], status_code=401)
        except STORE_ERRORS:
            log.exception("sign-in of %r from %s: the store failed", name[:100], address)
            return _login_page(NOT_SIGNED_IN, name[:100], status_code=503, **{"Retry-After": "10"})
        response = RedirectResponse("./", status_code=303)
        https = request.url.scheme == "https"  # served over HTTPS, or a proxy on this machine says so (serve)
        response.set_cookie(auth.cookie_name(https), auth.cookie_value(secret, token), max_age=int(session_hours * 3600),
                            path="/", httponly=True, samesite="strict", secure=https)
        log.info("%s signed in from %s", account["name"], address)
        return response

    @app.post("/logout")
    def logout(request: Request) -> Response:
        if not _from_own_page(request):
            return JSONResponse({"detail": OTHER_PAGE}, status_code=403)
        try:
            for value in _session_cookies(request):  # two (auth.TWO_COOKIES): both end
                auth.sign_out(store, secret, value)
        except STORE_ERRORS:  # the session is not ended: the cookie stays, and the page says so
            log.exception("sign-out: the store failed")
            return _store_down(page=True, text=NOT_SIGNED_OUT)
        response = RedirectResponse("login", status_code=303)
        https = request.url.scheme == "https"  # a browser takes a `__Host-` cookie's removal only with Secure
        response.delete_cookie(auth.cookie_name(https), path="/", httponly=True, samesite="strict", secure=https)
        return response

    # api_open=False: a queued handler cannot be run by a direct POST to /gradio_api/run/<api_name>, which skips
    # the queue and every concurrency limit (ROUTES refuses that path first; this is Gradio's own refusal).
    blocks.queue(default_concurrency_limit=8, api_open=False)
    # show_error=False: an exception's own text (SQL, a path, model text in a message) stays in the server's log;
    # the page shows what a handler raises as gr.Error, which Gradio shows either way.
    gr.mount_gradio_app(
        app, blocks, path="/", show_error=False, footer_links=[], run_history=False,
        # Gradio's routes ask this too; the middleware has already refused anyone it would say None for.
        auth_dependency=lambda request: (getattr(request.state, "align_session", None) or {}).get("name"),
    )
    app.add_middleware(RequireSession, store=store, secret=secret, blocks=blocks)
    return app


# Gradio keeps a heartbeat stream open per page: without a limit, stopping the server would wait
# for every annotator to close their tab.
SHUTDOWN_SECONDS = 3


class CannotListen(Exception):
    """(host, port) cannot be listened on: `reason` is the system's word for why, `port_problem` whether
    another port would do (it is taken, or below 1024 for a user without the right) rather than another host
    (an address that is not this machine's, a name that does not resolve)."""

    def __init__(self, reason: str, port_problem: bool):
        super().__init__(reason)
        self.reason, self.port_problem = reason, port_problem


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on (host, port), taken before the app's URL is printed: with uvicorn binding it
    itself, the URL came first, then its "[Errno 98] error while attempting to bind": another program's URL.
    The address family is the one uvicorn picks: IPv6 for an address with a colon, else IPv4 (`localhost` is
    127.0.0.1); SO_REUSEADDR as uvicorn sets it. Raises CannotListen."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        address = socket.getaddrinfo(host.strip("[]") or None, port, family, socket.SOCK_STREAM,
                                     flags=socket.AI_PASSIVE)[0][4]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(2048)  # uvicorn's backlog
        except BaseException:
            sock.close()
            raise
    except OSError as err:  # socket.gaierror included: a name that does not resolve
        raise CannotListen(err.strerror or str(err), err.errno in (errno.EADDRINUSE, errno.EACCES)) from None
    return sock


def serve(app: FastAPI, listener: socket.socket) -> None:
    """Serve on `listener` (listen()) until Ctrl-C. Behind a reverse proxy on this machine, its
    X-Forwarded-For / -Proto are believed (uvicorn's default: FORWARDED_ALLOW_IPS=127.0.0.1,::1), so lock-outs
    count the real client address and the cookie is Secure (and `__Host-`) when the proxy speaks HTTPS. An app
    that fails to start exits with uvicorn's code for that (3), as uvicorn.run did."""
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning",
                                           timeout_graceful_shutdown=SHUTDOWN_SECONDS))
    try:
        server.run(sockets=[listener])
    except KeyboardInterrupt:  # uvicorn has shut down cleanly, then re-raised the Ctrl-C it caught
        pass
    finally:
        listener.close()
    if not server.started:
        raise SystemExit(STARTUP_FAILURE)  # 3


@contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", port: int | None = None) -> Iterator[str]:
    """`app` served from a thread of this process until the block ends (the browser tests); yields its URL."""
    if port is None:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           timeout_graceful_shutdown=SHUTDOWN_SECONDS))
    thread = threading.Thread(target=server.run, name="align-label-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the labelling app did not start on {host}:{port}")
        time.sleep(0.05)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
