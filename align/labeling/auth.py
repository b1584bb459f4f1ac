"""Who is asking: sign-in with a lock-out, a signed session cookie checked on every request, sign-out.

The app's identity is never something a client can copy out of a URL. Signing in sets the
cookie `align_session` (`__Host-align_session` over HTTPS; HttpOnly, SameSite=Strict, Secure over
HTTPS, with an expiry): a random token, signed with the store's secret (`Store.secret`). The
server keeps only the token's hash, with its expiry, in the store's `sessions` table, so that
every app process on one database agrees, a restart keeps everyone signed in, signing out ends
the session at once, and an expired session is refused by the server whatever the browser still
sends. The signature lets the server turn away forged or garbage cookies without a database
query. A request carrying the session cookie twice (another site planted one) is signed out.

Sign-in failures are counted per user name and per client address (`Throttle`): after a few,
each further failure locks that name (or address) out for twice as long as the last one; a
name's lock-out holds only addresses that failed recently, until the name has many failures. An
unknown name costs the same scrypt as a wrong password and gets the same answer.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from align.labeling.handlers import AuthError
from align.labeling.store import NAME_CHARS, Store

COOKIE = "align_session"  # the session cookie over plain HTTP (the default: this machine's own browser)
# Over HTTPS (or behind a proxy that says so) the cookie is this one: a browser keeps a `__Host-` cookie only when
# this host set it itself, Secure, for Path=/ and with no Domain. So a sibling subdomain cannot plant one (a plain
# cookie set for the parent domain is sent along with the app's own), nor can a page served over plain HTTP.
HTTPS_COOKIE = "__Host-" + COOKIE
# A browser that sends the session cookie twice holds one that another site set (for the parent domain, or for a
# narrower path): which is whose cannot be told, so nobody is signed in until the cookies are cleared.
TWO_COOKIES = ("This browser sent two session cookies for this app: another site on this domain (or another port "
               "of this host) set one. Clear this site's cookies in the browser's settings, then sign in.")
SESSION_HOURS = 12.0
REFUSED = "unknown user or wrong password"
# What a page whose session ended is told (align/labeling/server.py's refusals, align/labeling/app.py's page). Not "reload": a
# reload goes to the sign-in page and loses what the page holds and the draft could not save.
SESSION_ENDED = ("your session has ended: sign in again in a new tab, then come back to this page and carry on "
                 "(it keeps what you set on it, your ranks included)")


class SignInRefused(AuthError):
    """A refused sign-in, worded for the person signing in (`retry_after`: seconds locked out, or 0)."""

    def __init__(self, message: str, retry_after: float = 0.0):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Throttle:
    """Lock-outs after failed sign-ins: `free_*` failures are free, then `first_lock` seconds, doubling up
    to `max_lock`; a name's or address's failures are forgotten `forget` seconds after its last one.
    An address has more free failures than a name: many people may sign in from behind one proxy. A name's
    lock-out holds the addresses that failed recently; an address with a clean record may still try until the
    name has `max_per_name` recent failures (else a few wrong guesses locked out anyone, the only admin too).
    A sign-in waits at most `wait_for_turn` seconds while its address has other checks under way."""

    free_per_name: int = 5
    free_per_address: int = 20
    max_per_name: int = 20
    wait_for_turn: float = 10.0
    first_lock: float = 30.0
    max_lock: float = 15 * 60.0
    forget: float = 60 * 60.0

    def lock_for(self, key: str, failures: int) -> float:
        free = self.free_per_address if key.startswith("address:") else self.free_per_name
        # the doubling capped: 2.0 ** 1030 overflows a float
        return 0.0 if failures < free else min(self.max_lock, self.first_lock * 2.0 ** min(failures - free, 40))


def _signature(secret: bytes, token: str) -> str:
    digest = hmac.new(secret, token.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def cookie_value(secret: bytes, token: str) -> str:
    return f"{token}.{_signature(secret, token)}"


def cookie_name(https: bool) -> str:
    return HTTPS_COOKIE if https else COOKIE


def session_cookies(cookie_headers: Iterable[str], https: bool) -> list[str]:
    """Every value a request's Cookie headers give the session cookie (`HTTPS_COOKIE` over HTTPS: a plain
    `align_session` there is another site's, and ignored). More than one: `TWO_COOKIES`. Read here rather than
    from Starlette's cookie dict, which keeps the last of two and so took the planted one."""
    name = cookie_name(https)
    found = []
    for header in cookie_headers:
        for pair in header.split(";"):
            key, sep, value = pair.strip().partition("=")
            if sep and key == name:
                found.append(value.strip())
    return found


def token_of(secret: bytes, value: str | None) -> str | None:
    """The token of a cookie this server signed, else None (no database query for a forged one)."""
    if not value or len(value) > 200 or "." not in value or not value.isascii():  # compare_digest: ASCII only
        return None
    token, signature = value.rsplit(".", 1)
    return token if hmac.compare_digest(signature, _signature(secret, token)) else None


def session_of(store: Store, secret: bytes, value: str | None) -> dict[str, Any] | None:
    """The signed-in account for a cookie value, checked against the store now (expiry, sign-out), or None."""
    token = token_of(secret, value)
    return store.session(token) if token else None


def address_key(address: str) -> str:
    """What sign-in failures are counted against: an IPv6 client by its /64 (one host holds a whole /64, so keyed
    by the full address every guess could come from a fresh one and the per-address count never bit); IPv4 and
    anything else as it is (cut to the column)."""
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return address[:80]
    if ip.version == 4:
        return str(ip)
    if ip.ipv4_mapped is not None:  # ::ffff:10.0.0.9, as a dual-stack server sees an IPv4 client
        return str(ip.ipv4_mapped)
    return str(ipaddress.ip_network(f"{ip}/64", strict=False))


def sign_in(store: Store, name: str, password: str, address: str, *, throttle: Throttle = Throttle(),
            hours: float = SESSION_HOURS) -> tuple[str, dict[str, Any]]:
    """(session token, account) for a right name and password; SignInRefused otherwise, or while locked out."""
    name = (name or "").strip()
    known = len(name) <= NAME_CHARS and "\x00" not in name  # no account has another name (Store.add_user)
    name = name.replace("\x00", "")  # PostgreSQL keeps no NUL: a key without it
    by_name, by_address = f"name:{name.lower()[:200]}", f"address:{address_key(address)}"
    counts = (throttle.lock_for, throttle.forget)
    # Both attempts are counted before the password is checked (Store.begin_sign_in): parallel guesses
    # cannot slip past either count. While the address has as many checks under way as failures to spare,
    # this one waits for its turn (a team signing in at once behind one proxy), a while at most.
    deadline = time.monotonic() + throttle.wait_for_turn
    while (wait := store.begin_sign_in(by_name, by_address, *counts, max_per_name=throttle.max_per_name)) is None:
        if time.monotonic() > deadline:
            raise SignInRefused("too many sign-ins at once from this address: try again in a few seconds",
                                retry_after=1.0)
        time.sleep(0.05)
    if wait > 0:
        raise SignInRefused(f"too many failed sign-ins: try again in {math.ceil(wait)} s", retry_after=wait)
    outcome = None
    try:
        account = store.authenticate(name, password or "", with_hash=True) if known else None
        outcome = account is not None
    finally:
        store.end_sign_in(by_name, by_address, outcome, *counts)
    if account is None:
        raise SignInRefused(REFUSED)
    verified = account.pop("password_hash")
    # None: disabled or given a new password while this one was checked (the session would outlive that)
    if (token := store.open_session(account["annotator_id"], hours * 3600, verified_hash=verified)) is None:
        raise SignInRefused(REFUSED)
    return token, account


def sign_out(store: Store, secret: bytes, value: str | None) -> None:
    if token := token_of(secret, value):
        store.close_session(token)
