"""A handler of the labelling app called as its page calls it: through Gradio's queue (queue/join, then the
queue/data event stream), the only way the server lets a signed-in client run one (align/labeling/server.py ROUTES;
/gradio_api/run/<api_name> is refused). Imported by the tests as `gradio_queue` (tests/labeling is on sys.path)."""

from __future__ import annotations

import json

import httpx


class Completed:
    """The answer of a queued call, read as the answer of a direct call was: `status_code` 200 and the handler's
    output ({"data": [...], ...}) as `.json()`; 500 and {"error": ...} when the handler failed. `.text` is every
    output the call sent, in order, one JSON a line: a generator's (the Playground's send) yields on the way
    too, not only its last one."""

    def __init__(self, message: dict, sent: list[dict] = ()):
        self.message = message
        self.output = message.get("output") or {}
        self.status_code = 200 if message.get("success") else 500
        self.text = "\n".join(json.dumps(m.get("output") or {}, ensure_ascii=False) for m in [*sent, message])

    def json(self):
        return self.output

    def __repr__(self) -> str:
        return f"<Completed {self.status_code} {self.text[:300]}>"


def fn_index(client: httpx.Client, api_name: str) -> int:
    """The index of the page's event whose handler is `api_name` (in /config's "dependencies", as the page has it)."""
    config = client.get("/config")
    config.raise_for_status()
    found = [i for i, dep in enumerate(config.json()["dependencies"]) if dep.get("api_name") == api_name]
    assert len(found) == 1, f"{api_name!r}: {len(found)} events of the page run it"
    return found[0]


def queued(client: httpx.Client, api: str | int, data: list, session_hash: str, **body) -> Completed | httpx.Response:
    """Run the handler `api` (its api_name, looked up in `client`'s /config, or a fn_index) with `data` as page
    session `session_hash`, through the queue, and wait for it. A refused join (401, 403, 413, ...) is returned
    as that response itself; so is a refused event stream."""
    index = api if isinstance(api, int) else fn_index(client, api)
    joined = client.post("/gradio_api/queue/join", json={"event_data": None, "trigger_id": None, **body, "data": data,
                                                         "fn_index": index, "session_hash": session_hash})
    if joined.status_code != 200:
        return joined
    event_id = joined.json()["event_id"]
    with client.stream("GET", "/gradio_api/queue/data", params={"session_hash": session_hash}) as stream:
        if stream.status_code != 200:
            stream.read()
            return stream
        sent = []  # a generator's outputs before its last
        for line in stream.iter_lines():
            if not line.startswith("data:"):
                continue
            message = json.loads(line[len("data:"):])
            if message.get("msg") == "unexpected_error":
                return Completed({"success": False, "output": {"error": message.get("message")}})
            if message.get("event_id") != event_id:
                continue
            if message.get("msg") == "process_generating":
                sent.append(message)
            elif message.get("msg") == "process_completed":
                return Completed(message, sent)
    raise AssertionError(f"the event stream of {session_hash!r} ended before event {event_id} completed")
