"""The labelling app's security headers and its refusal of a cross-site sign-in (docs/labeling.md, "Security"),
through the real server on SQLite and PostgreSQL, without a browser."""

from __future__ import annotations

import httpx

from align.labeling import auth

PASSWORD = "correct horse"


def assert_secured(response: httpx.Response) -> None:
    """What docs/labeling.md promises on every response: a Content-Security-Policy that lets the page load and
    send nothing outside this server and allows no framing, X-Frame-Options DENY, Referrer-Policy same-origin (no other site gets a Referer)."""
    where = f"{response.request.method} {response.request.url.path} -> {response.status_code}"
    policy = [part.strip() for part in response.headers.get("content-security-policy", "").split(";")]
    for directive in ("default-src 'self'", "connect-src 'self'", "form-action 'self'", "frame-src 'none'",
                      "object-src 'none'", "frame-ancestors 'none'"):
        assert directive in policy, (where, directive, policy)
    assert response.headers.get("x-frame-options") == "DENY", where
    assert response.headers.get("referrer-policy") == "same-origin", where
    assert response.headers.get("x-content-type-options") == "nosniff", where


def test_every_response_is_secured_and_a_cross_site_sign_in_is_refused(store):
    """The sign-in page, a refused sign-in (401, 403), an anonymous call (401), an anonymous page (a redirect) and
    the signed-in page all carry the headers; a sign-in form posted from another site's page (Sec-Fetch-Site:
    cross-site, login CSRF) is refused with the right password and sets no cookie."""
    from align.labeling.server import create_app, running

    store.add_user("alice", PASSWORD)
    form = {"name": "alice", "password": PASSWORD}
    with running(create_app(store)) as url, httpx.Client(base_url=url, follow_redirects=False, timeout=30) as client:
        page = client.get("/login")
        assert page.status_code == 200 and "Sign in" in page.text
        assert_secured(page)
        anonymous = client.get("/config")
        assert anonymous.status_code == 401
        assert_secured(anonymous)
        redirected = client.get("/", headers={"Accept": "text/html"})
        assert redirected.status_code == 303 and redirected.headers["location"] == "login"
        assert_secured(redirected)
        wrong = client.post("/login", data={**form, "password": "guess"})
        assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
        assert_secured(wrong)

        forged = client.post("/login", data=form, headers={"Sec-Fetch-Site": "cross-site"})
        assert forged.status_code == 403 and "another site" in forged.text
        assert "set-cookie" not in forged.headers and auth.COOKIE not in client.cookies
        assert_secured(forged)

        # The same form from this server's own page signs in: the refusal was the header's doing.
        signed_in = client.post("/login", data=form, headers={"Sec-Fetch-Site": "same-origin"})
        assert signed_in.status_code == 303 and auth.COOKIE in client.cookies
        assert_secured(signed_in)
        app_page = client.get("/", headers={"Accept": "text/html"})
        assert app_page.status_code == 200 and "<html" in app_page.text.lower()
        assert_secured(app_page)


def test_no_page_of_another_origin_may_read_an_answer(store):
    """Gradio's CORS middleware answered a localhost origin on a localhost host, and behind a proxy (another Host)
    any origin, with Access-Control-Allow-Origin and -Credentials: a page on another port of this host, or any
    page once proxied, read /config as the signed-in annotator (their name, the Playground's serve URL). Now no
    response carries an Access-Control-* header, so the browser lets no other origin read one."""
    from align.labeling.server import create_app, running

    store.add_user("alice", PASSWORD)
    with running(create_app(store)) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.post("/login", data={"name": "alice", "password": PASSWORD}).status_code == 303
        own = url.removeprefix("http://")
        for host, origin in ((own, "http://127.0.0.1:9911"), (own, "http://localhost:8888"),
                             ("labels.example.org", "https://evil.example.org"),
                             ("labels.example.org", "https://attacker.example")):
            for method, path, extra in (("GET", "/config", {}), ("GET", "/gradio_api/info", {}),
                                        ("GET", "/", {"accept": "text/html"}), ("GET", "/login", {}),
                                        ("OPTIONS", "/config", {"access-control-request-method": "GET"}),
                                        ("OPTIONS", "/gradio_api/queue/join", {
                                            "access-control-request-method": "POST",
                                            "access-control-request-headers": "content-type"})):
                answer = client.request(method, path, headers={"host": host, "origin": origin, **extra})
                assert answer.status_code < 500, (method, path, answer.status_code)
                leaked = [k for k in answer.headers if k.lower().startswith("access-control-")]
                assert not leaked, (host, origin, method, path, answer.status_code, leaked)
        assert client.get("/config").status_code == 200  # the page's own reads work as before
