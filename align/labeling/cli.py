"""`align label`: the labelling app, its accounts, simulated annotators and the store's status.

    align label --run-dir runs/quickstart                      the app on http://127.0.0.1:7860
    align label users add alice --admin                        an account (asks for a password)
    align label users list
    align label users passwd alice                             a new password (ends her sessions)
    align label users disable bob                              no more sign-ins; his rankings stay
    align label users admin carol on                           admin rights on (or off)
    align label --simulate support_style --annotators 3 --noise 0.3
    align label --simulate support_style --profiles good,noisy:0.8,adversarial --gold-rate 0.1
    align label --simulate support_style --simulate-unsafe support_unsafe   + unsafe ticks by a flagger
    align label status                                         tasks and rankings per batch
    align label gold TASK_ID 2,1,3,4                           a gold answer (canonical order)
    align label --serve-url http://127.0.0.1:8000/v1           + the Playground tab (models of `align serve`)

The store is sqlite:///<run-dir>/labels.db unless --db gives a URL (postgresql://... for a team).
Where the default store and the export folder are in a run directory is the run layout's to say
(align.artifacts): `align label` passes them in, and the admin tab's Export button runs the
`export` it is handed (`align export` into that folder), so align.labeling imports nothing else of align.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import shlex
import socket
import sys
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def _number(kind: type, low: float, high: float | None = None):
    """An argparse type: `kind` in [low, high], else argparse's one-line error naming the option."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") \
                from None
        if not (low <= value and (high is None or value <= high)) or value == float("inf"):  # also refuses nan
            allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text}")
        return value
    return parse


def check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with the options and command, found before the store is opened or created."""
    cmd = args.command
    known = (cmd[:2] in (["users", "add"], ["users", "passwd"], ["users", "disable"]) and len(cmd) == 3) \
        or (cmd[:2] == ["users", "admin"] and len(cmd) == 4 and cmd[3] in ("on", "off")) \
        or cmd in (["users", "list"], ["status"], [])
    if len(cmd) == 3 and cmd[0] == "gold":
        try:
            int(cmd[1]), [int(x) for x in cmd[2].split(",")]
        except ValueError:
            return f"gold TASK_ID RANKS: a task number and comma-separated ranks, e.g. gold 12 2,1,3; got {cmd[1:]}"
        known = True
    if not known:
        flag = {"run.dir": "--run-dir", "store": "--db", "port": "--port", "host": "--host"}.get(
            cmd[0].partition("=")[0]) if cmd and "=" in cmd[0] else None
        if flag:  # the stages' key=value form: align label takes flags (`align label run.dir=runs/x` was "unknown")
            return f"{cmd[0]}: align label takes flags, not key=value: {flag} {cmd[0].partition('=')[2]}"
        return f"unknown command {' '.join(cmd)!r}; see `align label --help`"
    if args.profiles and not args.simulate:
        return "--profiles: only with --simulate (the profiles of simulated annotators)"
    if args.simulate_unsafe and not args.simulate:
        return "--simulate-unsafe: only with --simulate (the flagger of simulated annotators)"
    if args.simulate:
        from align.labeling.scorers import resolve_flagger, resolve_scorer
        from align.labeling.simulate import parse_profile

        try:
            resolve_scorer(args.simulate)
        except ValueError as err:
            return f"--simulate: {err}"
        if args.simulate_unsafe:
            try:
                resolve_flagger(args.simulate_unsafe)
            except ValueError as err:
                return f"--simulate-unsafe: {err}"
        profiles = args.profiles.split(",") if args.profiles else []
        for spec in profiles:
            try:
                parse_profile(spec)
            except ValueError as err:
                return f"--profiles: {err}"
        if profiles and args.annotators is not None and args.annotators != len(profiles):
            return f"--profiles gives {len(profiles)} profiles for --annotators {args.annotators}: one per annotator"
    if args.serve_url:
        from align.labeling.playground import check_url

        try:
            check_url(args.serve_url)
        except ValueError as err:
            return f"--serve-url {err}"
    if not args.simulate and not cmd and args.guidelines:
        path = Path(args.guidelines)
        if not path.is_file():
            return f"--guidelines {path}: no such file"
        try:
            path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            return f"--guidelines {path}: not a readable UTF-8 text file ({err})"
    run_dir, db_file = Path(args.run_dir), None
    if not args.db:
        if run_dir.exists() and not run_dir.is_dir():
            return f"--run-dir {run_dir}: a file, not a folder"
        if any(p.exists() and not p.is_dir() for p in run_dir.parents):
            return f"--run-dir {run_dir}: a file is in the way of that folder"
        db_file = run_dir / "labels.db"
    else:
        from align.labeling.store import sqlite_path, url_problem

        problem = url_problem(args.db)
        if problem:
            return f"--db {problem}"
        if sqlite_path(args.db) is not None:
            db_file = Path(sqlite_path(args.db))
    # Only `users add` may create a SQLite store: the other commands read one, and a typo in a
    # path would otherwise leave an empty labels.db behind.
    if db_file is not None and cmd[:2] != ["users", "add"] and not db_file.is_file():
        # with --db, the store sample writes is named by its store= (run.dir's labels.db is another file)
        made_by = f"`align sample store={shlex.quote(args.db)}` makes it (or check the --db URL)" if args.db else \
            f"`align sample run.dir={shlex.quote(str(run_dir))}` makes it (or pass --db URL)"
        return f"no labelling store at {db_file}: {made_by}"
    return None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="align label", description="The labelling app and its store.")
    p.add_argument("--run-dir", default="runs/quickstart", help="run directory (its labels.db is the default store)")
    p.add_argument("--db", help="database URL: sqlite:///path.db or postgresql://user:pw@host/db")
    p.add_argument("--guidelines", help="a markdown file shown to annotators (default: the shipped guidelines)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_number(int, 1, 65535), default=7860)
    # from 36 s to a year, refused with the other options before the store is opened
    p.add_argument("--session-hours", type=_number(float, 0.01, 24 * 365), default=12.0,
                   help="a sign-in lasts this long, then the server asks again (default 12)")
    p.add_argument("--overlap", type=_number(int, 1), default=None,
                   help="annotators per task (default 1; with --simulate, the number of simulated annotators)")
    p.add_argument("--gold-rate", type=_number(float, 0, 1), default=0.0,
                   help="share of gold tasks mixed in (0..1), in the app and for simulated annotators")
    p.add_argument("--batch", help="only this batch (default: every batch)")
    p.add_argument("--simulate", metavar="SCORER", help="rank pending tasks with a scorer instead of starting the app")
    p.add_argument("--simulate-unsafe", metavar="FLAGGER",
                   help="with --simulate: tick unsafe the replies a flagger (prompt, response) -> bool returns True "
                        "for: support_unsafe (the guidelines' asks for secrets, disabling 2FA) or module:function "
                        "(default: none flagged)")
    p.add_argument("--annotators", type=_number(int, 1), default=None,
                   help="with --simulate: how many simulated annotators (default 1, or one per --profiles entry)")
    p.add_argument("--profiles", metavar="P,P,...",
                   help="with --simulate: one profile per annotator: good, noisy:A (pairwise accuracy A), random, "
                        "adversarial (reversed); e.g. good,noisy:0.8,adversarial")
    p.add_argument("--noise", type=_number(float, 0), default=0.0,
                   help="with --simulate: score noise (share of the spread)")
    p.add_argument("--tie-resolution", type=_number(float, 0), default=0.0, metavar="R",
                   help="with --simulate: replies whose scores round to the same multiple of R tie, as a person "
                        "calls near-equal replies a tie (default 0: only equal scores)")
    p.add_argument("--seed", type=_number(int, 0), default=0,
                   help="with --simulate: the noise's and profiles' seed (with --gold-rate, the gold turns are "
                        "keyed with the store's secret too: the same seed on another store draws otherwise)")
    p.add_argument("--serve-url", metavar="URL",
                   help="the OpenAI-compatible endpoint of `align serve` (e.g. http://127.0.0.1:8000/v1): adds the "
                        "Playground tab; its API key, if any, is read from $ALIGN_SERVE_API_KEY")
    p.add_argument("--serve-max-tokens", type=_number(int, 1), default=None,
                   help="with --serve-url: the longest answer the Playground asks for (default: the server's, "
                        "align serve's generation.max_new_tokens, as far as the model's context leaves room)")
    p.add_argument("command", nargs="*", help="users add NAME [--admin] [--password P] | users list | "
                                              "users passwd NAME [--password P] | users disable NAME | "
                                              "users admin NAME on|off | status | gold TASK_ID RANKS")
    p.add_argument("--admin", action="store_true", help="with users add: an admin account")
    p.add_argument("--password", help="with users add or passwd: the password (asked for when absent)")
    return p


def main(argv: list[str], *, store_url: Callable[[str | None, str], str],
         export_dir: Callable[[str], str | Path], export: Callable[[str, str], dict] | None = None,
         export_command: Callable[[str, str | None], str] | None = None) -> int:
    """`store_url(--db, --run-dir)` is the store to open, `export_dir(--run-dir)` the admin's export folder,
    `export(store_url, run_dir) -> summary` is `align export` for the admin's button, `export_command(--run-dir,
    --db)` the export to run next (with the config family the run's sample ran from)."""
    args = parser().parse_args(argv)
    problem = check_args(args)
    if problem:
        print(f"align label: {problem}", file=sys.stderr)
        return 2
    overlap = args.overlap or 1  # --simulate's default is its number of annotators, below; status's, the recorded
    from sqlalchemy.exc import OperationalError

    from align.labeling.store import Store, StoreError, safe_url

    try:
        store = Store(store_url(args.db, args.run_dir))
    except StoreError as err:
        print(f"align label: {err}", file=sys.stderr)
        return 2
    cmd = args.command
    try:
        if cmd[:2] == ["users", "add"] and len(cmd) == 3:
            try:
                password = args.password or getpass.getpass(f"password for {cmd[2]}: ")
            except (EOFError, KeyboardInterrupt):  # no terminal to ask on, or Ctrl-D / Ctrl-C at the prompt
                print(f"\nalign label: no password given for {cmd[2]!r}; give one with --password", file=sys.stderr)
                return 2
            store.add_user(cmd[2], password, admin=args.admin)
            print(f"user {cmd[2].strip()!r} added{' (admin)' if args.admin else ''} to {safe_url(store.url)}")
            return 0
        if cmd == ["users", "list"]:
            for u in store.users():
                print(f"{u['name']}{'  (admin)' if u['is_admin'] else ''}{'  (disabled)' if u['disabled'] else ''}")
            return 0
        if cmd[:2] == ["users", "passwd"]:
            if cmd[2].strip() not in {u["name"] for u in store.users()}:  # before asking for a password
                raise ValueError(f"no user {cmd[2].strip()!r} (align label users list)")
            try:
                password = args.password or getpass.getpass(f"new password for {cmd[2]}: ")
            except (EOFError, KeyboardInterrupt):  # no terminal to ask on, or Ctrl-D / Ctrl-C at the prompt
                print(f"\nalign label: no password given for {cmd[2]!r}; give one with --password", file=sys.stderr)
                return 2
            store.set_password(cmd[2], password)
            print(f"user {cmd[2].strip()!r}: new password; signed out everywhere")
            return 0
        if cmd[:2] == ["users", "disable"]:
            store.disable_user(cmd[2])
            print(f"user {cmd[2].strip()!r} disabled and signed out; their rankings stay (users passwd "
                  f"{shlex.quote(cmd[2].strip())} enables again)")
            return 0
        if cmd[:2] == ["users", "admin"]:
            store.set_admin(cmd[2], cmd[3] == "on")
            print(f"user {cmd[2].strip()!r}: admin {cmd[3]}")
            return 0
        if cmd in ([], ["status"]) and args.batch and args.batch not in store.batches():
            # else status said "pending rankings: 0", --simulate ranked nothing and the app handed out no task, all
            # with exit 0, as if the batch were done
            print(f"align label: --batch {args.batch!r} is not in the store; its batches: "
                  f"{', '.join(store.batches()) or 'none yet'} (`align sample batch=NAME` writes one)", file=sys.stderr)
            return 2
        if cmd == ["status"]:
            recorded = None if args.overlap else store.recorded_overlap()  # what the app or --simulate last ran with
            overlap = args.overlap or recorded or 1
            for b in store.batch_counts():
                if not args.batch or b["batch"] == args.batch:
                    print(f"{b['batch']}: {b['tasks']} tasks ({b['gold']} gold), {b['rankings']} rankings, "
                          f"{b['unranked']} unranked, {store.pending_count(b['batch'], overlap)} pending")
            on_skipped = store.pending_on_skipped(args.batch, overlap)
            skipped = store.skipped_out(args.batch, overlap)
            why = [f"{skipped} on tasks every annotator skipped (nobody left to rank them; an account added with "
                   "`align label users add` would be given them)"] if skipped else []
            if on_skipped > skipped:  # an admin counts once they take a task: one who only watches is not waited for
                why.append(f"{on_skipped - skipped} waiting for an annotator who has not skipped the task")
            # Counted against --overlap, else the overlap the app or --simulate last ran with on this store
            said = "" if args.overlap else (", as labelling last ran with; --overlap counts another" if recorded else
                                            ", --overlap's default: no labelling has run on this store yet")
            print(f"pending rankings (overlap {overlap}{said}): {store.pending_count(args.batch, overlap)}"
                  + (f", {on_skipped} of them on tasks someone skipped: {', '.join(why)}" if on_skipped else ""))
            return 0
        if len(cmd) == 3 and cmd[0] == "gold":
            task_id = int(cmd[1])
            store.add_gold(task_id, [int(x) for x in cmd[2].split(",")])
            ranked = sum(r["task_id"] == task_id for r in store.submitted_rankings())
            print(f"task {cmd[1]} is gold with ranks {cmd[2]}" + (
                f"; its {ranked} submitted ranking{'s' if ranked > 1 else ''} now score{'' if ranked > 1 else 's'} "
                "the annotators and no longer reach the exported pairs" if ranked else ""))
            return 0
        if cmd:
            print(f"align label: unknown command {' '.join(cmd)!r}; see `align label --help`", file=sys.stderr)
            return 2
        if args.simulate:
            from align.labeling.simulate import simulate

            profiles = args.profiles.split(",") if args.profiles else None
            annotators = args.annotators or (len(profiles) if profiles else 1)
            store.record_overlap(args.overlap or annotators)
            n = simulate(store, args.simulate, annotators=annotators, noise=args.noise, seed=args.seed,
                         batch=args.batch, overlap=args.overlap or annotators, profiles=profiles,
                         gold_rate=args.gold_rate, tie_resolution=args.tie_resolution,
                         unsafe_flagger=args.simulate_unsafe)
            print(f"{n} rankings submitted by {annotators} simulated annotator(s) ({args.simulate}"
                  f"{', profiles ' + args.profiles if profiles else ''}"
                  f"{', unsafe by ' + args.simulate_unsafe if args.simulate_unsafe else ''})")
            # align eval human=true's A/B tasks (batches eval-*) are read by its board, not by export
            batches = [args.batch] if args.batch else [b["batch"] for b in store.batch_counts() if b["rankings"]]
            db = safe_url(args.db) if args.db else None  # its password masked: hints land in logs
            if any(not b.startswith("eval-") for b in batches):
                print("next: " + (export_command(str(args.run_dir), db) if export_command else
                                  f"align export run.dir={shlex.quote(str(args.run_dir))}"
                                  + (f" store={shlex.quote(db)}" if db else "")))
            if any(b.startswith("eval-") for b in batches):
                print(f"next: align eval run.dir={shlex.quote(str(args.run_dir))} human=true"
                      + (f" store={shlex.quote(db)}" if db else "") + " (with the settings that made the "
                      "A/B tasks; or the align pipeline command that made them, again)")
            return 0
        store.record_overlap(args.overlap or 1)  # the app's: what `align label status` counts pending against
    except (ValueError, KeyError) as err:
        print(f"align label: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)  # no repr quotes
        return 2
    except OperationalError as err:  # a lock held past LOCK_WAIT (another process stuck in it), or the server gone
        print(f"align label: the store is busy or unreachable ({safe_url(store.url)}: "
              f"{str(err.orig or err).strip()}); try again in a moment", file=sys.stderr)
        return 1
    return serve(store, args, str(export_dir(args.run_dir)), export)


# `align pipeline label=human` starts the app with its own pid here: the app stops when that process is gone.
PARENT_ENV = "ALIGN_LABEL_PARENT_PID"


def stop_with_parent() -> None:
    """When started by a pipeline (PARENT_ENV), stop (SIGTERM, as a `kill` does) once that process is gone, even
    killed by SIGKILL, whose pipeline never ran the code that stops the app: the app went on holding its port,
    and every rerun's app failed with "address already in use". On Linux the kernel sends the signal
    (PR_SET_PDEATHSIG); elsewhere, and for a parent gone before that was set, a thread watches the parent's pid."""
    import signal
    import threading
    import time

    parent = os.environ.pop(PARENT_ENV, "")
    if not parent.isdigit():
        return
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG

    def watch() -> None:
        while os.getppid() == int(parent):
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="align-label-parent", daemon=True).start()


def _any_address(host: str) -> bool:
    return host.strip("[]") in ("0.0.0.0", "::", "")


def _open_url(host: str, port: int) -> str:
    """A URL a person can open: http://0.0.0.0:PORT is no address to browse to, so an app on every interface is
    named by this machine's host name."""
    if _any_address(host):
        host = socket.gethostname() or "<this machine>"
    return f"http://[{host.strip('[]')}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(store, args: argparse.Namespace, export_dir: str, export: Callable[[str, str], dict] | None = None) -> int:
    from align.labeling.server import CannotListen, create_app, listen, loopback_name
    from align.labeling.server import serve as run_server
    from align.labeling.store import safe_url

    guidelines = Path(args.guidelines) if args.guidelines else Path(__file__).with_name("guidelines.md")
    if not guidelines.is_file():
        print(f"align label: guidelines file not found: {guidelines}", file=sys.stderr)
        return 2
    if not any(not u["disabled"] for u in store.users()):
        print("align label: no accounts to sign in with yet; make one first: align label users add NAME --admin",
              file=sys.stderr)
        return 2
    stop_with_parent()
    # The address is taken first: one that cannot be listened on is said now, in one line, and the URL printed
    # below is the app's own (uvicorn, binding it itself, printed the URL, then its "[Errno 98]": another
    # program's URL).
    try:
        listener = listen(args.host, args.port)
    except CannotListen as err:
        print(f"align label: {_cannot_listen(args.host, args.port, err)}", file=sys.stderr)
        return 2
    try:
        playground = None
        if args.serve_url:
            from align.labeling.playground import API_KEY_ENV, PlaygroundError, ServeClient

            playground = ServeClient(args.serve_url, os.environ.get(API_KEY_ENV),
                                     max_tokens=args.serve_max_tokens)
            try:
                print(f"Playground tab: {', '.join(playground.models())} at {playground.url}")
            except PlaygroundError as err:  # it may start later: the tab says so until it does
                print(f"Playground tab: {err}")
        app = create_app(store, session_hours=args.session_hours, guidelines_md=guidelines.read_text(),
                         overlap=args.overlap or 1, gold_rate=args.gold_rate, batch=args.batch,
                         export=(lambda: export(store.url, args.run_dir)) if export else None,
                         export_dir=export_dir, playground=playground)
        if not loopback_name(args.host):
            to = "every network this machine is on" if _any_address(args.host) else args.host
            print(f"align label: warning: --host {args.host} serves the app over plain HTTP to {to}: "
                  "passwords and session cookies cross it unencrypted; keep the app on 127.0.0.1 behind a "
                  "reverse proxy that speaks HTTPS (docs/labeling.md, Deployment and security, Binding)",
                  file=sys.stderr)
        print(f"labelling app for {safe_url(store.url)}: {_open_url(args.host, args.port)}  "
              "(Ctrl-C stops it)")
        run_server(app, listener)
    finally:  # closed however it ends (serve closes it too)
        listener.close()
    return 0


def _cannot_listen(host: str, port: int, err) -> str:
    """Why the app cannot listen on --host/--port, naming the flag to change: --port for a port another
    program holds (or one below 1024 without the right), --host for an address not this machine's or a name
    that does not resolve."""
    if err.port_problem:
        where = f"[{host.strip('[]')}]:{port}" if ":" in host else f"{host}:{port}"
        return f"--port {port}: cannot listen on {where} ({err.reason}): choose another --port"
    return (f"--host {host}: cannot listen there ({err.reason}): give an address of this machine "
            "(127.0.0.1, 0.0.0.0)")
