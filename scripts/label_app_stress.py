"""The labelling app under attack and under crashes, over real HTTP against `align label` (run by hand).

    python scripts/label_app_stress.py flood   [--requests 10304]
    python scripts/label_app_stress.py kill    [--annotators 50 --seconds 75 --every 15]

flood: anonymous POSTs to /gradio_api/queue/join, each with a fresh session hash (issue 12.3):
       their statuses, the server's resident memory before and after, and whether a client that
       signed in before the flood is still signed in after it.
kill:  N annotators sign in on the sign-in page and rank task after task through the app's own
       Gradio calls (through the queue, as the page makes them: /gradio_api/run/ is refused),
       while the server is killed with SIGKILL every few seconds and restarted; a client retries
       what had no answer, as a browser would. Every acknowledged submit must be in the store
       exactly once, and no task ranked twice.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from align.labeling import handlers  # noqa: E402
from align.labeling.store import Store  # noqa: E402

PASSWORD = "correct horse"


class App:
    """`align label` on a run directory, in a process of its own, restartable."""

    def __init__(self, run: Path, port: int):
        self.run, self.url, self.port, self.proc = run, f"http://127.0.0.1:{port}", port, None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "align.cli", "label", "--run-dir", str(self.run),
                                      "--port", str(self.port)], cwd=REPO,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(240):
            try:
                httpx.get(self.url + "/login", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.25)
        raise RuntimeError("the app did not start")

    def rss_mb(self) -> int:
        return int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{self.proc.pid}/status").read_text()).group(1)) // 1024

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)
        self.proc.wait(30)


def flood(app: App, store: Store, requests: int) -> None:
    store.add_user("ann", PASSWORD)
    app.start()
    try:
        me = httpx.Client(base_url=app.url)
        assert me.post("/login", data={"name": "ann", "password": PASSWORD}).status_code == 303
        before, started = app.rss_mb(), time.monotonic()

        def anonymous(_: int) -> int:
            with httpx.Client(base_url=app.url) as client:
                return client.post("/gradio_api/queue/join", json={
                    "data": [], "fn_index": 0, "session_hash": secrets.token_hex(5)}).status_code

        with ThreadPoolExecutor(16) as pool:
            statuses = Counter(pool.map(anonymous, range(requests)))
        print(f"{requests:,} anonymous POSTs in {time.monotonic() - started:.0f} s: statuses {dict(statuses)}; "
              f"server memory {before} MB -> {app.rss_mb()} MB; the client signed in before: "
              f"{me.get('/gradio_api/info').status_code} after")
    finally:
        app.stop()


def kill(app: App, store: Store, annotators: int, seconds: float, every: float) -> None:
    for i in range(annotators):
        store.add_user(f"a{i}", PASSWORD)
    store.add_tasks("b", [{"prompt": f"ticket {i}", "responses": ["a", "b", "c", "d"]} for i in range(20_000)])
    acked: dict[tuple[str, int], str] = {}
    lock, stop, errors = threading.Lock(), threading.Event(), Counter()

    def annotator(i: int) -> None:
        name, client, task, signed = f"a{i}", httpx.Client(base_url=app.url, timeout=30), None, False

        def call(api: str, data: list) -> list:
            """The handler `api` run as the page runs it: queue/join, then its event stream until it completes."""
            deps = client.get("/config").raise_for_status().json()["dependencies"]
            index = next(i for i, dep in enumerate(deps) if dep.get("api_name") == api)
            if len(deps[index]["inputs"]) != len(data):  # Gradio answers a call of another shape with a bare 500
                raise SystemExit(f"{api} takes {len(deps[index]['inputs'])} inputs, this script sends {len(data)}: "
                                 "update it to the app (app.py submit_inputs)")
            page = f"{name}-page"
            joined = client.post("/gradio_api/queue/join", json={"data": data, "fn_index": index, "session_hash": page,
                                                                "event_data": None, "trigger_id": None})
            event_id = joined.raise_for_status().json()["event_id"]
            with client.stream("GET", "/gradio_api/queue/data", params={"session_hash": page}) as stream:
                stream.raise_for_status()
                for line in stream.iter_lines():
                    message = json.loads(line[5:]) if line.startswith("data:") else {}
                    if message.get("msg") == "process_completed" and message.get("event_id") == event_id:
                        if not message.get("success"):
                            raise RuntimeError(f"{api}: {message.get('output')}")
                        return message["output"]["data"]
            raise httpx.ReadError(f"{api}: the event stream ended before the call completed")

        while not stop.is_set():
            try:
                if not signed:  # once: the session survives the server's restarts
                    signed = client.post("/login", data={"name": name, "password": PASSWORD}).status_code == 303
                    continue
                if task is None:
                    task, _, tag = call("do_load", [])[4:7]  # the task id the page would show, its order's tag
                    if task is None:
                        return
                # task, the page's account, the order's tag, shown at, 8 ranks, verdict, all bad, 8 unsafe boxes,
                # rationale, the boxes changed on the page, the page's stamp (app.py submit_inputs)
                out = call("do_submit", [task, name, tag, 0.0, "1", "2", "3", "4", *[None] * 4, None, False,
                                         *[False] * 8, "", "", ""])
                # "✅ Saved. Next task." or "✅ Already saved": acknowledged ("⚠️ Not saved: the store is busy" is not)
                if "✅" in out[0]:
                    with lock:
                        acked[(name, task)] = out[0]
                    task, tag = (out[1], out[3]) if "Next task" in out[0] else (None, None)
                else:
                    errors[re.sub(r"<[^>]+>", "", out[0])[:60]] += 1
                    task = None
            except (httpx.HTTPError, RuntimeError) as err:  # the server is down: retry the same task, as a browser would
                errors[type(err).__name__] += 1
                time.sleep(0.3)

    app.start()
    threads = [threading.Thread(target=annotator, args=(i,)) for i in range(annotators)]
    for t in threads:
        t.start()
    kills, started = 0, time.monotonic()
    while time.monotonic() - started < seconds:
        time.sleep(every)
        app.stop(signal.SIGKILL)
        kills += 1
        app.start()
    time.sleep(5)
    stop.set()
    for t in threads:
        t.join(60)
    app.stop()
    rows = store.submitted_rankings()
    stored = Counter((r["annotator"], r["task_id"]) for r in rows)
    # the page names a task by a handle of the annotator's own (handlers.task_handle): the task's id, from it
    sessions = {name: handlers.sign_in(store, name, PASSWORD) for name, _ in acked}
    acked = {(name, handlers.task_of(store, sessions[name], handle)): said for (name, handle), said in acked.items()}
    per_task = Counter(r["task_id"] for r in rows)
    print(f"{annotators} annotators, {kills} SIGKILLs in {time.monotonic() - started:.0f} s: {len(acked)} acknowledged "
          f"submits, {len(rows)} rankings stored; lost {sum(stored[k] != 1 for k in acked)}, tasks ranked twice "
          f"{sum(n > 1 for n in per_task.values())}, stored but never acknowledged {len(set(stored) - set(acked))}; "
          f"client retries {dict(errors)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", choices=["flood", "kill"])
    p.add_argument("--requests", type=int, default=10_304)
    p.add_argument("--annotators", type=int, default=50)
    p.add_argument("--seconds", type=float, default=75.0)
    p.add_argument("--every", type=float, default=15.0)
    p.add_argument("--port", type=int, default=7391)
    args = p.parse_args()
    run = Path(tempfile.mkdtemp(prefix="align-label-stress-"))
    try:
        store = Store(f"sqlite:///{run / 'labels.db'}")
        app = App(run, args.port)
        if args.scenario == "flood":
            flood(app, store, args.requests)
        else:
            kill(app, store, args.annotators, args.seconds, args.every)
    finally:
        shutil.rmtree(run, ignore_errors=True)


if __name__ == "__main__":
    main()
