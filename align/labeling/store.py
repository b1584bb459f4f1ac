"""The labelling store: prompts, their K responses, annotators and rankings in a real database.

SQLite by default (one file beside the run, WAL, foreign keys on, synchronous=FULL so that an
acknowledged ranking survives a crash), PostgreSQL by URL for a team (`postgresql://...`, driven
by psycopg 3). The data model follows Argilla's: a task (a prompt with its K responses, in a
batch and round) gets at most one ranking per annotator (`UNIQUE(task, annotator)`), with a
status draft / submitted / discarded. Assignment is serialised per database (SQLite: every write
transaction is `BEGIN IMMEDIATE`, while reads go on beside it under WAL; PostgreSQL: a
transaction-scoped advisory lock), so two annotators asking at once never get the same slot, and a submit is one transaction that keeps
the first acknowledged ranking when it is repeated (a double click, a retry after a timeout).

The app's sign-in state lives here too, so that every app process on one database agrees on it
and a restart keeps it: signed-in sessions (only a hash of each token, with its expiry), failed
sign-ins per user name and client address, and the secret that signs session cookies.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import random
import re
import secrets
import sqlite3
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    select,
    update,
)
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DatabaseError, IntegrityError, OperationalError

log = logging.getLogger(__name__)

# 2: sessions and sign_in_failures (the app's own sign-in); 3: tasks.priority (the queue's order)
SCHEMA_VERSION = 3
ASSIGNMENT_TTL = 30 * 60  # an open assignment older than this no longer holds its slot (seconds)
NAME_CHARS, BATCH_CHARS = 100, 200  # the columns' sizes: PostgreSQL refuses a longer value
MAX_RESPONSES = 8  # responses a task may hold: the app lays out this many slots (generation.k allows 2 to 8)
MIN_TIMED = 3  # rankings with a known time before the admin view gives an annotator's rate
# A sign-in's password check under way (Store.begin_sign_in) is forgotten after this long: the process died in it
CHECK_EXPIRES = 60.0
# How long a store is waited for before the call fails with an error (never a hang), the same on both databases:
LOCK_WAIT = 30  # seconds for a lock another process holds (SQLite's busy timeout, PostgreSQL's lock_timeout)
CONNECT_TIMEOUT = 10  # seconds for a PostgreSQL server to answer a new connection
# seconds a PostgreSQL session may sit in a transaction doing nothing (a process stopped or hung holding the
# assignment lock) before the server ends it and frees the lock; no transaction of align's idles that long
IDLE_IN_TRANSACTION = 60

metadata = MetaData()
meta_table = Table("align_meta", metadata, Column("key", String(64), primary_key=True), Column("value", Text))
prompts = Table(
    "prompts", metadata,
    Column("id", Integer, primary_key=True),
    Column("text_sha256", String(64), nullable=False, unique=True),
    Column("text", Text, nullable=False),
    Column("meta", Text, nullable=False, default="{}"),
)
tasks = Table(
    "tasks", metadata,
    Column("id", Integer, primary_key=True),
    Column("batch", String(BATCH_CHARS), nullable=False, index=True),
    Column("round", Integer, nullable=False, default=0),
    Column("kind", String(16), nullable=False, default="ranking"),  # ranking | pairwise
    Column("prompt_id", Integer, ForeignKey("prompts.id"), nullable=False),
    Column("source", Text, nullable=False, default="{}"),  # provenance: checkpoint, generation, time
    Column("is_gold", Boolean, nullable=False, default=False),
    Column("created", Float, nullable=False),
    # Higher is handed out sooner (assign). `align sample selection=uncertainty` writes how much the
    # current reward model would learn from the task; everything else is 0, so the queue is id order.
    Column("priority", Float, nullable=False, default=0.0, server_default="0"),
    UniqueConstraint("batch", "prompt_id", name="uq_task_batch_prompt"),
)
responses = Table(
    "responses", metadata,
    Column("id", Integer, primary_key=True),
    Column("task_id", Integer, ForeignKey("tasks.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("position", Integer, nullable=False),  # the canonical order rankings are stored in
    Column("text", Text, nullable=False),
    Column("meta", Text, nullable=False, default="{}"),
    UniqueConstraint("task_id", "position", name="uq_response_position"),
)
annotators = Table(
    "annotators", metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(NAME_CHARS), nullable=False, unique=True),
    Column("password_hash", String(256), nullable=False),
    Column("is_admin", Boolean, nullable=False, default=False),
    Column("created", Float, nullable=False),
)
assignments = Table(
    "assignments", metadata,
    Column("id", Integer, primary_key=True),
    Column("task_id", Integer, ForeignKey("tasks.id", ondelete="CASCADE"), nullable=False),
    Column("annotator_id", Integer, ForeignKey("annotators.id"), nullable=False, index=True),
    # assigned | submitted | skipped | expired (abandoned, and its slot went to someone else: assign)
    Column("status", String(16), nullable=False, default="assigned"),
    Column("assigned_at", Float, nullable=False),
    UniqueConstraint("task_id", "annotator_id", name="uq_assignment_task_annotator"),
)
rankings = Table(
    "rankings", metadata,
    Column("id", Integer, primary_key=True),
    Column("task_id", Integer, ForeignKey("tasks.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("annotator_id", Integer, ForeignKey("annotators.id"), nullable=False),
    Column("status", String(16), nullable=False, default="submitted"),  # draft | submitted | discarded
    Column("ranks", Text, nullable=False),  # JSON list, canonical response order, 1 = best, ties share
    # JSON list: all_bad, unsafe (the ranking; written before per-reply flags), unsafe:<i> (response i, canonical)
    Column("flags", Text, nullable=False, default="[]"),
    Column("rationale", Text, nullable=False, default=""),
    Column("seconds", Float, nullable=False, default=0.0),
    Column("created", Float, nullable=False),
    Column("updated", Float, nullable=False),
    UniqueConstraint("task_id", "annotator_id", name="uq_ranking_task_annotator"),
)
gold = Table(
    "gold", metadata,
    Column("task_id", Integer, ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True),
    Column("ranks", Text, nullable=False),
)
sessions = Table(
    "sessions", metadata,
    # sha256 of the token: a copy of the database does not hold a usable cookie
    Column("token_sha256", String(64), primary_key=True),
    Column("annotator_id", Integer, ForeignKey("annotators.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("created", Float, nullable=False),
    Column("expires", Float, nullable=False),
)
sign_in_failures = Table(
    "sign_in_failures", metadata,
    # "name:<user name>", "address:<client address>", or "checking:address:<client address>" (checks under way)
    Column("key", String(300), primary_key=True),
    Column("failures", Integer, nullable=False),
    Column("last", Float, nullable=False),
    Column("locked_until", Float, nullable=False),
)


def _set_meta(conn: Connection, key: str, value: str) -> None:
    """align_meta's `key` set to `value`, made where it is not there yet (inside the caller's transaction)."""
    if conn.execute(select(meta_table.c.key).where(meta_table.c.key == key)).first():
        conn.execute(update(meta_table).where(meta_table.c.key == key).values(value=value))
    else:
        conn.execute(insert(meta_table).values(key=key, value=value))


def gold_turn(key: bytes, seed: int, annotator_id: int, done: int, gold_rate: float) -> bool:
    """Whether an annotator's next task (after `done` given) is a gold one, at about `gold_rate`. Keyed with the
    store's secret (`key`, Store.secret): drawn from the seed, the account's id and the count alone, which are no
    secret (ids go 1, 2, ... and the seed defaults to 0), an annotator could work out which of their tasks were
    gold and rank those with care."""
    digest = hmac.new(key, f"gold:{seed}:{annotator_id}:{done}".encode(), hashlib.sha256).digest()
    return random.Random(digest).random() < gold_rate


class StoreError(RuntimeError):
    """A store problem worded for the user."""


def hash_password(password: str, salt: bytes | None = None) -> str:
    salt = salt or os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1)
    return f"scrypt${salt.hex()}${digest.hex()}"


def check_password(password: str, stored: str) -> bool:
    try:
        _, salt, digest = stored.split("$")
    except ValueError:
        return False
    return hmac.compare_digest(hash_password(password, bytes.fromhex(salt)).split("$")[2], digest)


# Checked when the user name is unknown, so that an unknown name costs the same scrypt as a wrong
# password: the time of an answer does not tell which names exist.
_NO_SUCH_USER = hash_password(secrets.token_hex(16))
DISABLED = "disabled"  # a disabled account's password hash: no password matches it


def safe_url(url: str) -> str:
    """The URL with any password masked, for messages: the user part's (an empty user name too, and all of a
    password holding an @ not percent-encoded) and a `password` query parameter's (libpq reads one there)."""
    if url.startswith("sqlite:"):
        return url  # no password, and shown as the user wrote it
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return re.sub(r"://.*@", "://***@", url)  # unreadable: all before its last @ may be secret
    if parsed.host and "@" in parsed.host:  # SQLAlchemy ends the password at its first @: the rest went to the host
        parsed = parsed.set(password=parsed.password or "***", host=parsed.host.rsplit("@", 1)[1])
    return re.sub(r"([?&]password=)[^&]*", r"\1***", parsed.render_as_string(hide_password=True))


def sqlite_url(path: str | os.PathLike) -> str:
    """The SQLite URL of a file, its path quoted: in sqlite:///{path} a `?` starts a query and a `%` an escape,
    so a folder named `what?` or `100%41` gave another file."""
    return URL.create("sqlite", database=str(path)).render_as_string(hide_password=False)


def sqlite_path(url: str) -> str | None:
    """The file a sqlite:/// URL names, as SQLAlchemy opens it (unquoted, no query); None for another URL."""
    if not url.startswith("sqlite:///"):
        return None
    return make_url(url).database or ""


def url_problem(url: str) -> str | None:
    """Why `url` cannot be a labelling store, worded for the user; None when it can be one."""
    if url.startswith("sqlite:"):
        if not url.startswith("sqlite:///"):
            return (f"{url}: a SQLite URL names its file after three slashes: sqlite:///relative/labels.db or "
                    "sqlite:////absolute/labels.db")
        if sqlite_path(url) in ("", ":memory:"):
            return (f"{url}: an in-memory database is gone when the command exits, with every task and ranking "
                    "in it; name a file: sqlite:///path/labels.db")
        return None
    if url.startswith(("postgresql://", "postgres://", "postgresql+psycopg://")):
        try:
            host = make_url(url).host or ""
        except (ArgumentError, ValueError):  # a port that is no number, as `:2@db` of a password `hun@ter:2`
            host = None
        if (host is None and url.count("@") > 1) or "@" in (host or ""):  # psycopg: "failed to resolve host"
            return (f"{safe_url(url)}: more than one @ before the host: percent-encode the password "
                    "(an @ in it as %40, a % as %25)")
        if host is None:
            return f"{safe_url(url)}: not a database URL SQLAlchemy can read (is the port a number?)"
        return None
    return f"{safe_url(url)}: not a database URL align supports; use sqlite:///path/labels.db or postgresql://user@host/db"


def _engine(url: str) -> Engine:
    """The engine of a URL url_problem accepted: SQLite, or PostgreSQL through psycopg 3."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": LOCK_WAIT, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            dbapi_conn.isolation_level = None  # let SQLAlchemy's begin hook issue BEGIN itself
            cur = dbapi_conn.cursor()
            for pragma in ("journal_mode=WAL", "foreign_keys=ON", "synchronous=FULL", f"busy_timeout={LOCK_WAIT * 1000}"):
                cur.execute(f"PRAGMA {pragma}")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):
            # A write transaction (Store.tx) takes the write lock at the start: a read-then-write (assignment)
            # cannot interleave. A read is a deferred BEGIN: WAL lets it read beside a writer, never waiting.
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("align_write") else "BEGIN")

        return engine
    try:
        # prepare_threshold=None: no server-side prepared statements. psycopg prepares a statement after 5 runs and
        # reuses it by name; behind PgBouncer in transaction pooling (before 1.21) the next transaction may be on
        # a server connection without it, or with another client's of the same name ("prepared statement _pg3_1
        # already exists": the 6th ranking two annotators saved failed). The store's statements are small.
        engine = create_engine(url, pool_pre_ping=True,
                               connect_args={**_pg_client_timeouts(make_url(url)), "prepare_threshold": None})
    except ModuleNotFoundError:
        raise StoreError("a PostgreSQL store needs psycopg 3: pip install 'align-rlhf[postgres]'") from None
    settings = _pg_server_timeouts(make_url(url))
    if settings:
        # Set in each transaction, not as the startup parameter `options`: PgBouncer before 1.20 refuses a
        # connection that sends any ("unsupported startup parameter: options"), later ones may drop them, and in
        # transaction pooling a session setting would land on whichever server connection is free. SET LOCAL lasts
        # to the transaction's end, through any pooler; both in one round trip (no parameters: one simple query).
        statement = "; ".join(f"SET LOCAL {name} = {value}" for name, value in settings.items())

        @event.listens_for(engine, "begin")
        def _pg_begin(conn):
            conn.exec_driver_sql(statement)

    return engine


def _pg_client_timeouts(url: URL) -> dict[str, Any]:
    """libpq's own settings (client side, nothing sent to the server) so that a PostgreSQL store fails with an
    error where it would hang: a server that takes the connection and never answers, a connection dropped
    without a word. A setting the URL (or PGCONNECT_TIMEOUT) gives is the user's."""
    given = dict(url.query)
    args: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT, "keepalives": 1, "keepalives_idle": 30,
                            "keepalives_interval": 10, "keepalives_count": 3}
    args = {k: v for k, v in args.items() if k not in given}
    if "PGCONNECT_TIMEOUT" in os.environ:
        args.pop("connect_timeout", None)
    return args


def _pg_server_timeouts(url: URL) -> dict[str, str]:
    """The server settings each transaction starts with: a lock held by a process that is stopped fails the wait
    after LOCK_WAIT, and such a session is ended after IDLE_IN_TRANSACTION, freeing its lock. One the user sets
    in the URL's `options` or in PGOPTIONS is theirs (left out here). No statement_timeout: an export's read of a
    big store may rightly take long."""
    theirs = url.query.get("options", os.environ.get("PGOPTIONS", ""))
    theirs = " ".join(theirs) if isinstance(theirs, tuple) else theirs  # given twice in the URL
    ours = {"lock_timeout": f"{LOCK_WAIT * 1000}", "idle_in_transaction_session_timeout": f"{IDLE_IN_TRANSACTION * 1000}"}
    given = _pg_option_names(theirs)
    return {name: value for name, value in ours.items() if name not in given}


def _pg_option_names(options: str) -> set[str]:
    """The settings libpq's `options` string gives the server, read as the server reads it: split into words at
    unescaped spaces, a backslash escaping the next character (postinit.c pg_split_opts), then getopt over them
    (postgres.c process_postgres_switches): `-c name=value`, `-cname=value`, `--name=value`, after other flags
    in the same word too (`-ec name=value`); a name in any case, with - for _ (ParseLongOption, GUC lookup)."""
    words, word, escaped, started = [], [], False, False
    for ch in options + " ":
        if ch in " \t\n\v\f\r" and not escaped:  # C isspace
            if started:
                words.append("".join(word))
            word, started = [], False
        elif ch == "\\" and not escaped:
            escaped = started = True
        else:
            word.append(ch)
            escaped, started = False, True
    names, i = set(), 0
    while i < len(words):
        flags, i = words[i], i + 1
        j = 1 if flags.startswith("-") else len(flags)  # a word that is no option: skipped
        while j < len(flags):
            letter, j = flags[j], j + 1
            if letter not in _PG_SWITCHES_WITH_VALUE:
                continue
            if j < len(flags):
                value = flags[j:]
            elif i < len(words):
                value, i = words[i], i + 1
            else:
                break
            if letter in "c-" and "=" in value:
                names.add(value.split("=", 1)[0].strip().lower().replace("-", "_"))
            break
    return names


# postgres.c's getopt string "B:bC:c:D:d:EeFf:h:ijk:lN:nOPp:r:S:sTt:v:W:-:": the switches that take a value
_PG_SWITCHES_WITH_VALUE = "BCcDdfhkNprStvW-"


def _text(value: str) -> str:
    """Text as both databases keep it: PostgreSQL refuses a NUL character in a text column (SQLite takes
    it), and one can come in a pasted rationale or a model's answer; it becomes U+FFFD, shown as such."""
    return value.replace("\x00", "\ufffd")


def _loads(text: str | None, default: Any) -> Any:
    return json.loads(text) if text else default


def _note_key(batch: str) -> str:
    """A batch's note's key in align_meta (64 characters at most; a batch name takes up to 200): its hash."""
    return "batch-note:" + hashlib.sha256(batch.encode()).hexdigest()[:53]


def _create_private(path: str) -> None:
    """A new SQLite store's file, made readable by its owner only (0600; SQLite gives its -wal and -shm files the
    same mode): it holds the secret that keys the shuffles and the gold draw, password hashes and every ranking,
    and under a umask of 022 it was readable by every user of the machine. An existing file keeps its mode (a
    team may have opened it to a group on purpose)."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        pass


def _backup_sqlite(path: str, version: int) -> str:
    """A copy of the SQLite store at `path` beside it, `<path>.v<version>.bak` (or `.v<version>.<n>.bak` when
    that is taken), made with SQLite's backup API: under WAL a plain copy of the file misses what the -wal file
    still holds (the latest writes, even the tables). Raises StoreError, and nothing is migrated, if it fails."""
    target, n = f"{path}.v{version}.bak", 1
    while os.path.exists(target):
        target, n = f"{path}.v{version}.{n}.bak", n + 1
    partial = target + ".partial"
    try:
        if os.path.exists(partial):  # an earlier crashed backup's, at whatever mode it was made with
            os.remove(partial)
        _create_private(partial)  # a copy of everything the store holds, as private as a new store
        source, copy = sqlite3.connect(path, timeout=LOCK_WAIT), sqlite3.connect(partial)
        try:
            source.backup(copy)
        finally:
            source.close()
            copy.close()
        os.replace(partial, target)
    except (sqlite3.Error, OSError) as err:
        if os.path.exists(partial):
            os.remove(partial)
        raise StoreError(f"{path}: schema version {version} needs migrating, and the backup made first failed "
                         f"({err}); nothing was changed: free disk space beside it (or let this user write to its "
                         "folder) and try again") from err
    return target


class Store:
    """All reads and writes of the labelling data; the app and the stages get one passed in."""

    def __init__(self, url: str):
        self.url = url
        self._secret: bytes | None = None  # secret()'s, once read: it never changes
        problem = url_problem(url)
        if problem:
            raise StoreError(problem)
        path = sqlite_path(url)
        if path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            _create_private(path)
        self.engine = _engine(url)
        self.is_postgres = self.engine.dialect.name == "postgresql"
        try:
            self._create()
        except DatabaseError as err:  # unreachable, refused, or a file that is not an SQLite database (or is damaged)
            detail = str(err.orig or err).strip()
            if not self.is_postgres and not isinstance(err, OperationalError):
                detail += " (not an SQLite database, or a damaged one)"
            raise StoreError(f"cannot open the labelling store {safe_url(url)}: {detail}") from err

    def _create(self) -> None:
        # A store already at this schema (most opens) is read without the lock: opening one, as `align label status`
        # does, never waits for another process's locked transaction.
        with self.engine.connect() as conn:
            if inspect(conn).has_table("align_meta") and conn.execute(select(meta_table.c.value).where(
                    meta_table.c.key == "schema_version")).scalar() == str(SCHEMA_VERSION):
                return
        with self.tx(lock=True) as conn:
            row = conn.execute(select(meta_table.c.value).where(meta_table.c.key == "schema_version")).first() \
                if inspect(conn).has_table("align_meta") else None
            if row is not None and int(row[0]) > SCHEMA_VERSION:
                raise StoreError(f"{safe_url(self.url)}: schema version {row[0]} is newer than this align "
                                 f"({SCHEMA_VERSION}); upgrade align")
            path = sqlite_path(self.url)
            if row is not None and int(row[0]) < SCHEMA_VERSION and path is not None:
                backup = _backup_sqlite(path, int(row[0]))  # under the write lock: no write is half in it
                log.warning("%s: schema version %s is migrated in place to %s; the store as it was is backed up "
                            "in %s (remove it once this align works for you)", path, row[0], SCHEMA_VERSION, backup)
            old_tasks = inspect(conn).has_table("tasks")
            metadata.create_all(conn)  # creates the tables that are missing (version 2 added two)
            # Version 3 added a column to a table that exists: create_all leaves existing tables alone.
            if old_tasks and "priority" not in {c["name"] for c in inspect(conn).get_columns("tasks")}:
                conn.exec_driver_sql("ALTER TABLE tasks ADD COLUMN priority FLOAT NOT NULL DEFAULT 0")
            if row is None:
                conn.execute(insert(meta_table).values(key="schema_version", value=str(SCHEMA_VERSION)))
            elif int(row[0]) < SCHEMA_VERSION:
                conn.execute(update(meta_table).where(meta_table.c.key == "schema_version")
                             .values(value=str(SCHEMA_VERSION)))

    @property
    def schema_version(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(meta_table.c.value).where(meta_table.c.key == "schema_version")).scalar_one())

    @contextmanager
    def tx(self, *, lock: bool = False) -> Iterator[Connection]:
        """One transaction; `lock` serialises it against other locking transactions (assignment)."""
        with self.engine.connect() as conn:
            conn.execution_options(align_write=True)  # SQLite: BEGIN IMMEDIATE (_engine's begin hook)
            with conn.begin():
                if lock and self.is_postgres:
                    conn.exec_driver_sql("SELECT pg_advisory_xact_lock(727274)")
                yield conn

    # ------------------------------------------------------------------------------ tasks

    def add_tasks(self, batch: str, items: list[dict[str, Any]], *, source: dict[str, Any] | None = None,
                  round: int = 0, kind: str = "ranking", note: Any = None) -> int:
        """Prompts with their K responses as tasks of `batch`, in one transaction; returns how many are new.

        Idempotent on (batch, prompt): a prompt already in the batch is left as it is. An item's
        optional `priority` (a finite number, default 0) orders the queue: higher is handed out sooner.
        `note` (JSON), when given, becomes the batch's note (batch_note) in the same transaction: how its tasks
        were chosen (align sample selection=uncertainty) is kept exactly as long as they are, whatever stops
        the caller after the commit.
        """
        if kind not in ("ranking", "pairwise"):
            raise ValueError(f"kind: {kind!r} is not allowed; allowed values: ranking, pairwise")
        if not 0 < len(batch) <= BATCH_CHARS or "\x00" in batch:
            raise ValueError(f"batch: a name of 1 to {BATCH_CHARS} characters, got {batch[:40]!r}"
                             f"{'...' if len(batch) > 40 else ''} ({len(batch)} characters)")
        added = 0
        now = time.time()
        with self.tx(lock=True) as conn:
            for n, item in enumerate(items):
                if not isinstance(item.get("prompt"), str) or not item["prompt"].strip():
                    raise ValueError(f"item {n}: 'prompt' must be a non-empty string")
                where = f"item {n} (prompt {item['prompt'][:60]!r})"
                texts, metas = item.get("responses"), item.get("response_meta")
                got = (f"a {type(texts).__name__}" if not isinstance(texts, (list, tuple))  # a str: one per character
                       else f"{len(texts)}" if not 2 <= len(texts) <= MAX_RESPONSES
                       else next((f"a response that is not a string ({t!r:.40})" for t in texts if not isinstance(t, str)),
                                 None))
                if got:
                    raise ValueError(f"{where}: 'responses' must be a list of 2 to {MAX_RESPONSES} strings (the app "
                                     f"lays out {MAX_RESPONSES}), got {got}")
                if kind == "pairwise" and len(texts) != 2:
                    raise ValueError(f"{where}: a pairwise task has exactly two responses, got {len(texts)}")
                metas = metas or [{} for _ in texts]
                if not isinstance(metas, (list, tuple)) or len(metas) != len(texts) \
                        or not all(isinstance(m, dict) for m in metas):
                    raise ValueError(f"{where}: 'response_meta' must be a list of {len(texts)} objects, one per "
                                     f"response, got {json.dumps(metas, default=str)[:80]}")
                priority = item.get("priority", 0.0)
                if isinstance(priority, bool) or not isinstance(priority, (int, float)) or not math.isfinite(priority):
                    raise ValueError(f"item {n}: 'priority' must be a finite number, got {priority!r}")
                prompt_id = self._prompt_id(conn, _text(item["prompt"]), item.get("prompt_meta") or {})
                exists = conn.execute(select(tasks.c.id).where(tasks.c.batch == batch,
                                                               tasks.c.prompt_id == prompt_id)).first()
                if exists:
                    continue
                task_id = conn.execute(insert(tasks).values(
                    batch=batch, round=round, kind=kind, prompt_id=prompt_id, source=json.dumps(source or {}, default=str),
                    is_gold=False, created=now, priority=float(priority))).inserted_primary_key[0]
                conn.execute(insert(responses), [
                    {"task_id": task_id, "position": i, "text": _text(t), "meta": json.dumps(m, default=str)}
                    for i, (t, m) in enumerate(zip(texts, metas, strict=True))])
                added += 1
            if note is not None:
                _set_meta(conn, _note_key(batch), json.dumps(note, default=str))
        return added

    def record_overlap(self, overlap: int) -> None:
        """The overlap `align label` (the app or --simulate) runs with, for `align label status` to count pending
        rankings against when it is not given one."""
        with self.tx(lock=True) as conn:
            _set_meta(conn, "labelling_overlap", str(overlap))

    def recorded_overlap(self) -> int | None:
        """The overlap labelling last ran with on this store (record_overlap); None before any did."""
        with self.engine.connect() as conn:
            value = conn.execute(select(meta_table.c.value).where(meta_table.c.key == "labelling_overlap")).scalar()
        return int(value) if value is not None and str(value).isdigit() else None

    def batch_note(self, batch: str) -> Any:
        """The note the last add_tasks given one left for `batch` (None without one)."""
        with self.engine.connect() as conn:
            row = conn.execute(select(meta_table.c.value).where(meta_table.c.key == _note_key(batch))).first()
        return None if row is None else _loads(row[0], None)

    @staticmethod
    def _prompt_id(conn: Connection, text: str, meta: dict[str, Any]) -> int:
        sha = hashlib.sha256(text.encode()).hexdigest()
        row = conn.execute(select(prompts.c.id).where(prompts.c.text_sha256 == sha)).first()
        if row:
            return row[0]
        return conn.execute(insert(prompts).values(text_sha256=sha, text=text,
                                                   meta=json.dumps(meta, default=str))).inserted_primary_key[0]

    def task_prompts(self, batch: str) -> set[str]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(prompts.c.text).join(tasks, tasks.c.prompt_id == prompts.c.id)
                                .where(tasks.c.batch == batch))
            return {r[0] for r in rows}

    def task(self, task_id: int) -> dict[str, Any]:
        """A task with its responses in canonical order (model names are in `meta`: not for annotators)."""
        with self.engine.connect() as conn:
            return self._task(conn, task_id)

    @staticmethod
    def _task(conn: Connection, task_id: int) -> dict[str, Any]:
        row = conn.execute(select(tasks, prompts.c.text.label("prompt"))
                           .join(prompts, tasks.c.prompt_id == prompts.c.id).where(tasks.c.id == task_id)).mappings().first()
        if row is None:
            raise KeyError(f"no task {task_id}")
        resp = conn.execute(select(responses.c.text, responses.c.meta).where(responses.c.task_id == task_id)
                            .order_by(responses.c.position)).all()
        try:
            source, metas = _loads(row["source"], {}), [_loads(m, {}) for _, m in resp]
        except ValueError as err:  # written by hand or by a bug: name the task rather than fail on every page
            raise StoreError(f"task {task_id}: its source or a response's meta in the store is not JSON ({err})") from None
        return {"task_id": row["id"], "batch": row["batch"], "round": row["round"], "kind": row["kind"],
                "prompt": row["prompt"], "is_gold": bool(row["is_gold"]), "priority": row["priority"],
                "source": source, "responses": [{"text": t, "meta": m} for (t, _), m in zip(resp, metas, strict=True)]}

    def batch_tasks(self, batch: str) -> list[dict[str, Any]]:
        """Flat rows (Dataset.from_list-able): task_id, batch, round, priority, prompt, responses."""
        with self.engine.connect() as conn:
            ids = [r[0] for r in conn.execute(select(tasks.c.id).where(tasks.c.batch == batch).order_by(tasks.c.id))]
            out = []
            for task_id in ids:
                t = self._task(conn, task_id)
                out.append({"task_id": t["task_id"], "batch": t["batch"], "round": t["round"],
                            "priority": t["priority"], "prompt": t["prompt"],
                            "responses": [r["text"] for r in t["responses"]]})
            return out

    def batch_response_meta(self, batch: str) -> list[dict[str, Any]]:
        """Each response's meta in `batch`, by task and canonical order, from one query (whatever the batch's size)."""
        with self.engine.connect() as conn:
            return [_loads(m, {}) for (m,) in conn.execute(
                select(responses.c.meta).join(tasks, responses.c.task_id == tasks.c.id)
                .where(tasks.c.batch == batch).order_by(tasks.c.id, responses.c.position))]

    def batches(self) -> list[str]:
        with self.engine.connect() as conn:
            return [r[0] for r in conn.execute(select(tasks.c.batch).distinct().order_by(tasks.c.batch))]

    def add_gold(self, task_id: int, ranks: list[int]) -> None:
        """Mark a task as gold with its known ranking (canonical order); gold tasks are not exported. Not an A/B task
        of `align eval human=true` (it would become every annotator's gold turn, and the Playground, closed while
        a gold A/B task is open, would stay closed for good), nor an answer with every response tied (no pair to
        score an annotator on)."""
        task = self.task(task_id)
        if task["kind"] == "pairwise" or str(task["batch"]).startswith("eval-"):
            raise ValueError(f"task {task_id} (batch {task['batch']}): an A/B task of align eval human=true cannot be "
                             "gold (align eval reads its verdicts); make a task of a ranking batch gold (align "
                             "label status lists the batches)")
        _check_ranks(ranks, len(task["responses"]))
        if len(set(ranks)) == 1:
            raise ValueError(f"gold ranks {','.join(map(str, ranks))} tie every response: a gold answer needs at "
                             "least one response ranked above another to score the annotators")
        with self.tx() as conn:
            conn.execute(update(tasks).where(tasks.c.id == task_id).values(is_gold=True))
            if conn.execute(select(gold.c.task_id).where(gold.c.task_id == task_id)).first():
                conn.execute(update(gold).where(gold.c.task_id == task_id).values(ranks=json.dumps(ranks)))
            else:
                conn.execute(insert(gold).values(task_id=task_id, ranks=json.dumps(ranks)))

    def gold_answers(self) -> dict[int, list[int]]:
        with self.engine.connect() as conn:
            return {t: json.loads(r) for t, r in conn.execute(select(gold.c.task_id, gold.c.ranks))}

    # ------------------------------------------------------------------------------ annotators

    def add_user(self, name: str, password: str, *, admin: bool = False) -> int:
        name = name.strip()
        if not name:
            raise ValueError("a user name cannot be empty")
        if len(name) > NAME_CHARS or not name.isprintable():
            raise ValueError(f"a user name has at most {NAME_CHARS} characters and no control characters "
                             f"(got {len(name)} characters)")
        if len(password) < 4:
            raise ValueError("a password needs at least 4 characters")
        try:
            with self.tx() as conn:
                return conn.execute(insert(annotators).values(
                    name=name, password_hash=hash_password(password), is_admin=admin, created=time.time())
                ).inserted_primary_key[0]
        except IntegrityError:
            raise ValueError(f"user {name!r} already exists") from None

    def users(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(annotators.c.id, annotators.c.name, annotators.c.is_admin,
                                       annotators.c.password_hash == DISABLED).order_by(annotators.c.name)).all()
        return [{"id": i, "name": name, "is_admin": admin, "disabled": bool(off)} for i, name, admin, off in rows]

    def _account(self, conn: Connection, name: str) -> Any:
        row = conn.execute(select(annotators).where(annotators.c.name == name.strip())).mappings().first()
        if row is None:
            raise ValueError(f"no user {name!r} (align label users list)")
        return row

    def set_password(self, name: str, password: str) -> None:
        """A new password (also how a disabled account comes back); the account's open sessions end."""
        if len(password) < 4:
            raise ValueError("a password needs at least 4 characters")
        new_hash = hash_password(password)  # outside the lock: ~50 ms
        with self.tx(lock=True) as conn:  # serialised with open_session: no sign-in with the old password after this
            row = self._account(conn, name)
            conn.execute(update(annotators).where(annotators.c.id == row["id"]).values(password_hash=new_hash))
            conn.execute(delete(sessions).where(sessions.c.annotator_id == row["id"]))

    def disable_user(self, name: str) -> None:
        """No more sign-ins, and its open sessions end now; its rankings stay (exports do not change)."""
        with self.tx(lock=True) as conn:
            row = self._account(conn, name)
            if row["is_admin"] and self._admins(conn) <= 1:
                raise ValueError(f"{name!r} is the last admin: make another admin first (users admin NAME on)")
            conn.execute(update(annotators).where(annotators.c.id == row["id"]).values(password_hash=DISABLED))
            conn.execute(delete(sessions).where(sessions.c.annotator_id == row["id"]))

    def set_admin(self, name: str, admin: bool) -> None:
        with self.tx(lock=True) as conn:
            row = self._account(conn, name)
            if row["is_admin"] and row["password_hash"] != DISABLED and not admin and self._admins(conn) <= 1:
                raise ValueError(f"{name!r} is the last admin: make another admin first")
            conn.execute(update(annotators).where(annotators.c.id == row["id"]).values(is_admin=admin))

    @staticmethod
    def _admins(conn: Connection) -> int:
        return conn.execute(select(func.count()).select_from(annotators).where(
            annotators.c.is_admin.is_(True), annotators.c.password_hash != DISABLED)).scalar_one()

    def authenticate(self, name: str, password: str, *, with_hash: bool = False) -> dict[str, Any] | None:
        """The account for a right name and password, else None; an unknown name takes as long as a wrong password.
        `with_hash`: with the stored hash the password was checked against ("password_hash"), for open_session."""
        with self.engine.connect() as conn:
            row = conn.execute(select(annotators).where(annotators.c.name == name.strip())).mappings().first()
        known = row is not None and row["password_hash"] != DISABLED  # a disabled one: as long as a wrong password
        ok = check_password(password, row["password_hash"] if known else _NO_SUCH_USER)
        if not known or not ok:
            return None
        account = {"annotator_id": row["id"], "name": row["name"], "is_admin": bool(row["is_admin"])}
        return {**account, "password_hash": row["password_hash"]} if with_hash else account

    # ------------------------------------------------------------------------------ sign-in state

    def secret(self) -> bytes:
        """This store's key for signing session cookies and keying the annotators' shuffles: made once, shared by
        every app process on it (read once per Store: every task view asks for it)."""
        if self._secret is not None:
            return self._secret
        with self.tx(lock=True) as conn:
            row = conn.execute(select(meta_table.c.value).where(meta_table.c.key == "session_secret")).first()
            if row is not None:
                self._secret = bytes.fromhex(row[0])
                return self._secret
            key = secrets.token_bytes(32)
            conn.execute(insert(meta_table).values(key="session_secret", value=key.hex()))
        self._secret = key  # once the row is committed: a failed commit leaves the next call to make or read one
        return key

    def open_session(self, annotator_id: int, ttl: float, *, verified_hash: str | None = None) -> str | None:
        """A new session token for this annotator, valid for `ttl` seconds; expired sessions are purged.

        `verified_hash`: the password hash a sign-in checked (authenticate's, read before its ~50 ms check). No
        session (None) when the account's hash is another by now: `users disable` or `users passwd` committed in
        between, and their "its sessions end now" ran before this one existed. Serialised with them (lock)."""
        token = secrets.token_urlsafe(32)
        now = time.time()
        with self.tx(lock=verified_hash is not None) as conn:
            if verified_hash is not None and conn.execute(select(annotators.c.password_hash).where(
                    annotators.c.id == annotator_id)).scalar() != verified_hash:
                return None
            conn.execute(delete(sessions).where(sessions.c.expires <= now))
            conn.execute(insert(sessions).values(token_sha256=hashlib.sha256(token.encode()).hexdigest(),
                                                 annotator_id=annotator_id, created=now, expires=now + ttl))
        return token

    def session(self, token: str) -> dict[str, Any] | None:
        """The account signed in with this token while the session has not expired nor been closed, else None."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(annotators.c.id, annotators.c.name, annotators.c.is_admin, sessions.c.expires)
                .join(sessions, sessions.c.annotator_id == annotators.c.id)
                .where(sessions.c.token_sha256 == hashlib.sha256(token.encode()).hexdigest(),
                       sessions.c.expires > time.time(),
                       annotators.c.password_hash != DISABLED)).first()  # disabled: ended, whatever is left
        if row is None:
            return None
        return {"annotator_id": row.id, "name": row.name, "is_admin": bool(row.is_admin), "expires": row.expires}

    def close_session(self, token: str) -> None:
        with self.tx() as conn:
            conn.execute(delete(sessions).where(sessions.c.token_sha256 == hashlib.sha256(token.encode()).hexdigest()))

    def begin_sign_in(self, name_key: str, address_key: str, lock_for: Callable[[str, int], float], forget: float,
                      *, max_per_name: int) -> float | None:
        """Start a sign-in's password check, or say why not: the seconds left of a lock-out, or None while the
        address has as many checks under way as it has failures to spare (wait for one of them to end); 0: go
        ahead (`end_sign_in` must follow).

        The name's attempt is counted as a failure before the check, and the address's as a check under way
        (a row `checking:<address key>`), in one serialised transaction: parallel guesses cannot slip past
        either count. The address's failures are counted when the check fails (`end_sign_in`), so a right
        password never counts against it: a team behind one proxy waits for its turn, never for a lock-out.
        The name's lock-out holds an address that failed recently or has a check under way; one with a clean
        record may still try (anyone could lock a name, the only admin's too, with a few wrong guesses) until
        the name has `max_per_name` recent failures, which keeps guessing from many addresses in check.
        `lock_for(key, failures)` is the lock-out after that many failures; a key's failures are forgotten
        `forget` seconds after its last one, a check under way after CHECK_EXPIRES (a process that died in it).
        """
        checking = f"checking:{address_key}"
        with self.tx(lock=True) as conn:
            # The clock is read under the lock: read before it, a sign-in that waited for another's
            # transaction saw that one's later `locked_until` (a lock-free failure's "now") as a lock-out.
            now = time.time()
            rows = {r.key: r for r in conn.execute(select(sign_in_failures).where(
                sign_in_failures.c.key.in_([name_key, address_key, checking])))}

            def recent(key: str, within: float) -> int:
                row = rows.get(key)
                return row.failures if row is not None and now - row.last < within else 0

            def locked(key: str) -> float:
                return rows[key].locked_until - now if key in rows else 0.0

            failed, under_way, named = recent(address_key, forget), recent(checking, CHECK_EXPIRES), recent(name_key, forget)
            wait = locked(address_key)
            if failed or under_way or named >= max_per_name:
                wait = max(wait, locked(name_key))
            if wait > 0:
                return wait
            if under_way and lock_for(address_key, failed + under_way) > 0:
                return None
            lock = lock_for(name_key, named + 1)
            self._put_sign_in(conn, rows, name_key, failures=named + 1, last=now,
                              locked_until=now + lock if lock > 0 else 0.0)
            self._put_sign_in(conn, rows, checking, failures=under_way + 1, last=now, locked_until=0.0)
            return 0.0

    def end_sign_in(self, name_key: str, address_key: str, outcome: bool | None,
                    lock_for: Callable[[str, int], float], forget: float) -> None:
        """A password check `begin_sign_in` let through has ended: `outcome` True (a right password: the name
        starts over), False (wrong: a failure of the address, locked out after its free ones), None (the check
        itself failed: only its place is given back)."""
        checking = f"checking:{address_key}"
        with self.tx(lock=True) as conn:
            now = time.time()
            rows = {r.key: r for r in conn.execute(select(sign_in_failures).where(
                sign_in_failures.c.key.in_([name_key, address_key, checking])))}
            if (row := rows.get(checking)) is not None:
                if row.failures > 1 and now - row.last < CHECK_EXPIRES:
                    conn.execute(update(sign_in_failures).where(sign_in_failures.c.key == checking)
                                 .values(failures=row.failures - 1))
                else:
                    conn.execute(delete(sign_in_failures).where(sign_in_failures.c.key == checking))
            if outcome:
                conn.execute(delete(sign_in_failures).where(sign_in_failures.c.key == name_key))
            elif outcome is False:
                row = rows.get(address_key)
                failures = (row.failures if row is not None and now - row.last < forget else 0) + 1
                lock = lock_for(address_key, failures)
                self._put_sign_in(conn, rows, address_key, failures=failures, last=now,
                                  locked_until=now + lock if lock > 0 else 0.0)

    @staticmethod
    def _put_sign_in(conn: Connection, rows: dict[str, Any], key: str, **values: Any) -> None:
        if key in rows:
            conn.execute(update(sign_in_failures).where(sign_in_failures.c.key == key).values(**values))
        else:
            conn.execute(insert(sign_in_failures).values(key=key, **values))

    # ------------------------------------------------------------------------------ assignment

    def assign(self, annotator_id: int, *, overlap: int = 1, gold_rate: float = 0.0, seed: int = 0,
               batch: str | None = None, new: bool = True) -> int | None:
        """The task this annotator should do next (an open assignment first), or None; with `new` false,
        only an open assignment (nothing is newly held).

        A task goes to `overlap` annotators, never twice to one; with `gold_rate` > 0, a gold
        task the annotator has not seen comes up at about that rate. Otherwise the queue's order:
        the task with the fewest rankings held (so every task gets its first ranking before any gets
        a second), then the highest `priority`, then the oldest (lowest id).
        """
        now = time.time()
        key = self.secret() if gold_rate > 0 else b""  # before the transaction: secret() may write its own
        # Slots held: submitted, or assigned recently (an abandoned assignment frees its slot).
        holds = (assignments.c.status == "submitted") | (
            (assignments.c.status == "assigned") & (assignments.c.assigned_at > now - ASSIGNMENT_TTL))
        with self.tx(lock=True) as conn:
            open_q = (select(assignments.c.task_id, assignments.c.assigned_at, tasks.c.is_gold)
                      .join(tasks, tasks.c.id == assignments.c.task_id)
                      .where(assignments.c.annotator_id == annotator_id, assignments.c.status == "assigned")
                      .order_by(assignments.c.id))
            if batch:
                open_q = open_q.where(tasks.c.batch == batch)
            for task_id, assigned_at, is_gold in conn.execute(open_q).all():
                own = (assignments.c.task_id == task_id) & (assignments.c.annotator_id == annotator_id)
                if assigned_at <= now - ASSIGNMENT_TTL and not is_gold:
                    # Abandoned, its slot was free for others: taken back only while the task has a slot free or
                    # a draft of theirs is in it; else it would get a ranking more than `overlap` while others wait.
                    others = conn.execute(select(func.count()).select_from(assignments).where(
                        assignments.c.task_id == task_id, assignments.c.annotator_id != annotator_id, holds)).scalar_one()
                    draft = conn.execute(select(rankings.c.id).where(
                        rankings.c.task_id == task_id, rankings.c.annotator_id == annotator_id,
                        rankings.c.status == "draft")).first()
                    if others >= overlap and draft is None:
                        conn.execute(update(assignments).where(own, assignments.c.status == "assigned")
                                     .values(status="expired"))
                        continue
                # shown again (a reload): the annotator is at it, the slot stays theirs a while longer
                conn.execute(update(assignments).where(own).values(assigned_at=now))
                return task_id
            if not new:
                return None
            # An expired assignment is not theirs, but the task may come to them again once its slot is free
            # (the one who took it over skipped it): otherwise a small team could leave it unranked for good.
            mine = select(assignments.c.task_id).where(assignments.c.annotator_id == annotator_id,
                                                       assignments.c.status != "expired")
            base = select(tasks.c.id).where(tasks.c.id.not_in(mine))
            if batch:
                base = base.where(tasks.c.batch == batch)
            done = conn.execute(select(func.count()).select_from(assignments).where(
                assignments.c.annotator_id == annotator_id)).scalar_one()
            task_id = None
            if gold_rate > 0 and gold_turn(key, seed, annotator_id, done, gold_rate):
                row = conn.execute(base.where(tasks.c.is_gold.is_(True)).order_by(tasks.c.id)).first()
                task_id = row[0] if row else None
            if task_id is None:
                held = (select(assignments.c.task_id, func.count().label("n")).where(holds)
                        .group_by(assignments.c.task_id).subquery())
                n = func.coalesce(held.c.n, 0)
                row = conn.execute(base.where(tasks.c.is_gold.is_(False)).outerjoin(held, held.c.task_id == tasks.c.id)
                                   .where(n < overlap).order_by(n, tasks.c.priority.desc(), tasks.c.id)
                                   .limit(1)).first()
                task_id = row[0] if row else None
                if task_id is not None:
                    # Those who walked away (no draft of theirs in it) still hold a slot while one is free for them;
                    # the slots this annotator over-takes end here, the oldest first, so a submit from such an old
                    # page is refused (else at overlap 1 the task got two rankings), rather than when its owner
                    # next asks for a task. At overlap > 1 the others keep theirs while the task has room.
                    others = (assignments.c.task_id == task_id) & (assignments.c.annotator_id != annotator_id)
                    drafted = select(rankings.c.id).where(rankings.c.task_id == assignments.c.task_id,
                                                          rankings.c.annotator_id == assignments.c.annotator_id,
                                                          rankings.c.status == "draft").exists()
                    held_now = conn.execute(select(func.count()).select_from(assignments).where(
                        others, holds)).scalar_one()
                    stale = conn.execute(select(assignments.c.id, drafted).where(
                        others, assignments.c.status == "assigned", assignments.c.assigned_at <= now - ASSIGNMENT_TTL)
                        .order_by(assignments.c.assigned_at.desc(), assignments.c.id.desc())).all()
                    free = overlap - 1 - held_now - sum(1 for _, has_draft in stale if has_draft)
                    over = [row_id for row_id, has_draft in stale if not has_draft][max(0, free):]
                    if over:
                        conn.execute(update(assignments).where(assignments.c.id.in_(over),
                                                               assignments.c.status == "assigned").values(status="expired"))
            if task_id is None:
                return None
            again = (assignments.c.task_id == task_id) & (assignments.c.annotator_id == annotator_id)
            if conn.execute(update(assignments).where(again).values(status="assigned", assigned_at=now)).rowcount == 0:
                conn.execute(insert(assignments).values(task_id=task_id, annotator_id=annotator_id, status="assigned",
                                                        assigned_at=now))
            return task_id

    def progress(self, annotator_id: int, batch: str | None = None) -> dict[str, int]:
        """This annotator's assignments by status; `batch`: of that batch's tasks only (the app serving one batch
        counted the tasks of every batch they had labelled before)."""
        query = select(assignments.c.status, func.count()).where(assignments.c.annotator_id == annotator_id)
        if batch:  # "" as None: every batch, as assign takes it
            query = query.where(assignments.c.task_id.in_(select(tasks.c.id).where(tasks.c.batch == batch)))
        with self.engine.connect() as conn:
            counts = dict(conn.execute(query.group_by(assignments.c.status)).all())
        return {"done": counts.get("submitted", 0), "skipped": counts.get("skipped", 0),
                "assigned": sum(n for status, n in counts.items() if status != "expired")}  # an expired one: not theirs

    def assigned_tasks(self, annotator_id: int, *, open_only: bool = False) -> list[int]:
        """Every task this annotator was given, whatever became of it: the open ones first, then the newest;
        `open_only`: the open ones alone."""
        query = select(assignments.c.task_id).where(assignments.c.annotator_id == annotator_id)
        if open_only:
            query = query.where(assignments.c.status == "assigned")
        with self.engine.connect() as conn:
            return list(conn.execute(query.order_by((assignments.c.status == "assigned").desc(),
                                                    assignments.c.id.desc())).scalars())

    def assignment_status(self, annotator_id: int, task_id: int) -> str | None:
        """assigned / submitted / skipped / expired for this annotator's assignment of the task; None if it is not
        theirs."""
        with self.engine.connect() as conn:
            row = conn.execute(select(assignments.c.status).where(
                assignments.c.task_id == task_id, assignments.c.annotator_id == annotator_id)).first()
        return row[0] if row else None

    def skip(self, annotator_id: int, task_id: int) -> None:
        with self.tx() as conn:
            conn.execute(update(assignments).where(assignments.c.task_id == task_id,
                                                   assignments.c.annotator_id == annotator_id,
                                                   assignments.c.status == "assigned").values(status="skipped"))

    def release(self, annotator_id: int, task_id: int) -> None:
        """Give back an open assignment (status expired, as an abandoned one ends after ASSIGNMENT_TTL): its slot is
        free at once, and the task may come to this annotator again (a skip is final for them). A simulated
        annotator whose scorer failed on the task gives it back so: held, the next run was handed nothing and
        `align label status` counted it pending for 30 minutes. A submitted assignment stays as it is."""
        with self.tx() as conn:
            conn.execute(update(assignments).where(assignments.c.task_id == task_id,
                                                   assignments.c.annotator_id == annotator_id,
                                                   assignments.c.status == "assigned").values(status="expired"))

    # ------------------------------------------------------------------------------ rankings

    def save_ranking(self, annotator_id: int, task_id: int, ranks: list[int], *, flags: list[str] | None = None,
                     rationale: str | None = "", seconds: float = 0.0, status: str = "submitted",
                     flags_set: Collection[str] | None = None, keep_draft: Collection[str] = (),
                     spoken: Collection[str] = ()) -> bool:
        """Write a ranking in one transaction; True if this call made it, False if one was already submitted.

        A submitted ranking is final: a repeated submit (double click, retry) keeps the first one.
        A draft is replaced by the submit, and updated by a later draft rank by rank: a rank the later
        one leaves at 0 (not set in that tab) keeps its value. A draft's `rationale` of None keeps the
        saved one (a rank or flag set, the rationale box untouched); "" clears it. A draft's `flags_set` names
        the flags this call speaks for (on when in `flags`, off when not); the others keep their saved value,
        so a second tab that never showed a flag cannot clear it. None: `flags` is the whole set.
        `keep_draft`: what of the saved draft a submit keeps (read in the same transaction), so that what was set in
        another tab, which the submitting page never showed, is not lost: "unsafe", its unsafe:<i> flags (the union
        with `flags`); "all_bad", its all_bad flag (the union); "rationale", its rationale where the submit's is empty.
        `spoken`: the flags (and "rationale") the submitting page changed itself, whose value there is the one kept
        whatever the draft holds: its own untick's draft may land after the submit (each event has a queue of its own).
        """
        if status not in ("draft", "submitted"):
            raise ValueError(f"status: {status!r} is not allowed; allowed values: draft, submitted")
        check_flags([*(flags or []), *(flags_set or [])], len(ranks))
        now = time.time()
        values = {"ranks": json.dumps(list(ranks)), "flags": json.dumps(sorted(flags or [])), "rationale": _text(rationale or ""),
                  "seconds": float(seconds), "status": status, "updated": now}
        for _attempt in range(3):
            try:
                # lock: serialised with assign, which expires a stale assignment from what it read (PostgreSQL,
                # READ COMMITTED): a submit between that read and its write got "expired" over "submitted", or
                # wrote "submitted" over "expired", and the task two rankings at overlap 1 (SQLite: IMMEDIATE)
                with self.tx(lock=True) as conn:
                    assigned = conn.execute(select(assignments.c.status).where(
                        assignments.c.task_id == task_id, assignments.c.annotator_id == annotator_id)).first()
                    if assigned is None:
                        raise PermissionError(f"task {task_id} is not assigned to this annotator")
                    if assigned.status == "skipped":
                        raise PermissionError(f"task {task_id} was skipped; it is no longer open for this annotator")
                    if assigned.status == "expired":
                        raise PermissionError(f"task {task_id} was handed to someone else; it is no longer open for "
                                              "this annotator")
                    # FOR UPDATE: a draft merges into the saved one (ranks, flags), so on PostgreSQL a second draft
                    # reading the row before this one commits would write back without it (SQLite: IMMEDIATE)
                    row = conn.execute(select(rankings.c.id, rankings.c.status, rankings.c.ranks, rankings.c.flags,
                                              rankings.c.rationale).where(
                        rankings.c.task_id == task_id, rankings.c.annotator_id == annotator_id).with_for_update()).first()
                    if row and row.status == "submitted":
                        return False
                    if row and status == "submitted" and row.status == "draft" and keep_draft:
                        drafted = {f for f in json.loads(row.flags or "[]") if f not in spoken and (
                            ("unsafe" in keep_draft and names_reply(f)) or (f in keep_draft and f == "all_bad"))}
                        values["flags"] = json.dumps(sorted(set(flags or []) | drafted))
                        if ("rationale" in keep_draft and "rationale" not in spoken and not values["rationale"]
                                and row.rationale):
                            values["rationale"] = row.rationale
                    if row and status == "draft" and row.status == "draft":  # a draft fills in ranks (0 = not set
                        kept = json.loads(row.ranks)  # here): a second tab that never saw a rank cannot erase it; a
                        # discarded ranking (the task given to them again) lends the new one nothing
                        if len(kept) == len(ranks):
                            values["ranks"] = json.dumps([new or old for new, old in zip(ranks, kept, strict=True)])
                        if rationale is None:
                            values.pop("rationale")
                        if flags_set is not None:
                            spoken = set(flags_set)
                            kept_flags = set(json.loads(row.flags or "[]")) - spoken
                            values["flags"] = json.dumps(sorted(kept_flags | (set(flags or []) & spoken)))
                    if row:
                        # Conditional: on PostgreSQL two submits over one draft both read "draft"; the second
                        # UPDATE waits for the first, re-checks this WHERE and changes nothing.
                        changed = conn.execute(update(rankings).where(
                            rankings.c.id == row.id, rankings.c.status != "submitted").values(**values)).rowcount
                        if not changed:
                            return False
                    else:
                        conn.execute(insert(rankings).values(task_id=task_id, annotator_id=annotator_id, created=now,
                                                             **values))
                    # A submit closes the assignment; a draft (the annotator at work) renews its hold on the slot,
                    # so a task taking longer than ASSIGNMENT_TTL is not handed to someone else meanwhile.
                    held = update(assignments).where(assignments.c.task_id == task_id,
                                                     assignments.c.annotator_id == annotator_id)
                    conn.execute(held.values(status="submitted") if status == "submitted" else held.values(assigned_at=now))
                    return True
            except IntegrityError:
                continue  # another request of this annotator inserted first: look again
        return False

    def _ranking(self, annotator_id: int, task_id: int, status: str) -> dict[str, Any] | None:
        """This annotator's ranking of a task in `status` (ranks in canonical order, flags, rationale), or None."""
        with self.engine.connect() as conn:
            row = conn.execute(select(rankings.c.ranks, rankings.c.flags, rankings.c.rationale).where(
                rankings.c.task_id == task_id, rankings.c.annotator_id == annotator_id,
                rankings.c.status == status)).first()
        return {"ranks": json.loads(row.ranks), "flags": json.loads(row.flags), "rationale": row.rationale} \
            if row else None

    def submitted_ranks(self, annotator_id: int, task_id: int) -> list[int] | None:
        """This annotator's submitted ranking of a task (canonical order), or None."""
        found = self._ranking(annotator_id, task_id, "submitted")
        return found["ranks"] if found else None

    def submitted_flags(self, annotator_id: int, task_id: int) -> list[str] | None:
        """The flags of this annotator's submitted ranking of a task, or None."""
        found = self._ranking(annotator_id, task_id, "submitted")
        return found["flags"] if found else None

    def submitted_notes(self, annotator_id: int, task_id: int) -> dict[str, Any] | None:
        """The flags and rationale of this annotator's submitted ranking of a task, or None."""
        found = self._ranking(annotator_id, task_id, "submitted")
        return {"flags": found["flags"], "rationale": found["rationale"]} if found else None

    def draft(self, annotator_id: int, task_id: int) -> list[int] | None:
        """This annotator's saved draft of a task (canonical order, 0 = not ranked yet), or None."""
        found = self._ranking(annotator_id, task_id, "draft")
        return found["ranks"] if found else None

    def draft_notes(self, annotator_id: int, task_id: int) -> dict[str, Any] | None:
        """The flags and rationale of this annotator's draft of a task, or None without a draft."""
        found = self._ranking(annotator_id, task_id, "draft")
        return {"flags": found["flags"], "rationale": found["rationale"]} if found else None

    def discard(self, ranking_task_id: int, annotator_id: int) -> None:
        """Set this annotator's ranking of a task aside (status discarded: no export or statistic reads it) and end
        their assignment (expired): left submitted, it held the task's slot while pending_count counted the task
        as pending, and `align pipeline label=human` waited for a ranking nobody could be given. The task may
        come to them again, as after any expired assignment, once its slot is free."""
        with self.tx(lock=True) as conn:
            conn.execute(update(rankings).where(rankings.c.task_id == ranking_task_id,
                                                rankings.c.annotator_id == annotator_id).values(status="discarded"))
            conn.execute(update(assignments).where(assignments.c.task_id == ranking_task_id,
                                                   assignments.c.annotator_id == annotator_id,
                                                   assignments.c.status == "submitted").values(status="expired"))

    def submitted_rankings(self, batch: str | None = None) -> list[dict[str, Any]]:
        """Every submitted ranking with its task, in canonical response order. A row the app never wrote (ranks out
        of range, of another length than its task's answers, not JSON) comes with ranks None and `unreadable` (why):
        a reader of its batch refuses it (`readable`), a reader of other batches, or of statistics, leaves it out."""
        with self.engine.connect() as conn:
            q = (select(rankings, annotators.c.name.label("annotator"))
                 .join(annotators, annotators.c.id == rankings.c.annotator_id)
                 .join(tasks, tasks.c.id == rankings.c.task_id)
                 .where(rankings.c.status == "submitted").order_by(rankings.c.task_id, rankings.c.id))
            if batch:
                q = q.where(tasks.c.batch == batch)
            rows = conn.execute(q).mappings().all()
            cache: dict[int, dict[str, Any]] = {}
            out = []
            for r in rows:
                t = cache.get(r["task_id"]) or cache.setdefault(r["task_id"], self._task(conn, r["task_id"]))
                # The app writes only checked ranks; a row edited by hand, or responses removed after it was
                # ranked, would otherwise give pairs of the wrong answers, or a traceback naming no ranking.
                try:
                    ranks, flags = json.loads(r["ranks"]), json.loads(r["flags"])
                    if not isinstance(ranks, list):
                        raise ValueError(f"ranks {r['ranks']!r} is not a list")
                    _check_ranks(ranks, len(t["responses"]))
                    if not isinstance(flags, list):
                        raise ValueError(f"flags {r['flags']!r} is not a list")
                    # an unsafe:<i> past the task's responses would flag another reply, or none: refused as ranks are
                    check_flags([f for f in flags if names_reply(f)], len(t["responses"]))
                    unreadable = None
                except ValueError as err:  # kept, marked: a reader of its batch refuses it (readable), others skip it
                    unreadable = (f"task {r['task_id']}'s ranking by {r['annotator']} (rankings.id {r['id']}) cannot "
                                  f"be read: {err}; correct that row, or discard it (Store.discard; by hand, set "
                                  "its status to 'discarded' and its assignment's, the assignments row of that task "
                                  "and annotator, to 'expired', which frees the task's slot for another ranking)")
                    log.warning("%s", unreadable)
                    ranks, flags = None, []
                out.append({"task_id": t["task_id"], "batch": t["batch"], "round": t["round"], "kind": t["kind"],
                            "prompt": t["prompt"], "responses": t["responses"], "source": t["source"],
                            "annotator": r["annotator"], "ranks": ranks, **({"unreadable": unreadable} if unreadable
                                                                             else {}),
                            "flags": flags, "rationale": r["rationale"], "seconds": r["seconds"],
                            "is_gold": t["is_gold"], "submitted_at": r["updated"]})
            return out

    def pending_count(self, batch: str | None = None, overlap: int = 1) -> int:
        """Rankings still needed: over non-gold tasks, the sum of max(0, overlap - submitted)."""
        with self.engine.connect() as conn:
            n = (select(rankings.c.task_id, func.count().label("n")).where(rankings.c.status == "submitted")
                 .group_by(rankings.c.task_id).subquery())
            q = select(func.coalesce(n.c.n, 0)).select_from(tasks.outerjoin(n, n.c.task_id == tasks.c.id)).where(
                tasks.c.is_gold.is_(False))
            if batch:
                q = q.where(tasks.c.batch == batch)
            return sum(max(0, overlap - c) for (c,) in conn.execute(q))

    def blind_tasks_open(self, overlap: int = 1) -> bool:
        """Whether an A/B task (kind pairwise: `align eval human=true`'s blind comparisons) can still be handed
        out at `overlap`: a gold one, or one with fewer than `overlap` submitted verdicts."""
        verdicts = (select(func.count()).select_from(rankings)
                    .where(rankings.c.task_id == tasks.c.id, rankings.c.status == "submitted").scalar_subquery())
        open_ = select(tasks.c.id).where(tasks.c.kind == "pairwise", tasks.c.is_gold | (verdicts < overlap)).limit(1)
        with self.engine.connect() as conn:
            return conn.execute(open_).first() is not None

    def skipped_out(self, batch: str | None = None, overlap: int = 1) -> int:
        """Of pending_count's rankings, those nobody is left to give: on a task someone skipped, the rankings still
        needed past the annotators who can sign in and have neither ranked nor skipped it. A skip is final for its
        annotator (assign never hands the task back to them), so a task every annotator skipped waits for an
        account added later; `align label status` and `align pipeline label=human` count these apart. An admin
        counts as an annotator once they have taken a task of the batch or ranked anything: one who only watches
        the admin view would keep the wait open for ever."""
        return self._skipped(batch, overlap)[1]

    def pending_on_skipped(self, batch: str | None = None, overlap: int = 1) -> int:
        """Of pending_count's rankings, those on tasks someone skipped (skipped_out's, and those still waiting for
        an annotator who has not skipped them)."""
        return self._skipped(batch, overlap)[0]

    def _skipped(self, batch: str | None, overlap: int) -> tuple[int, int]:
        """(pending rankings on skipped tasks, of them those nobody is left to give): see skipped_out."""
        with self.engine.connect() as conn:
            in_batch = select(tasks.c.id)
            if batch:
                in_batch = in_batch.where(tasks.c.batch == batch)
            took = select(assignments.c.id).where(assignments.c.annotator_id == annotators.c.id,
                                                  assignments.c.task_id.in_(in_batch)).exists()
            ranked_any = select(rankings.c.id).where(rankings.c.annotator_id == annotators.c.id,
                                                     rankings.c.status == "submitted").exists()
            live = {a for (a,) in conn.execute(select(annotators.c.id).where(
                annotators.c.password_hash != DISABLED, ~annotators.c.is_admin | took | ranked_any))}
            scope = in_batch.where(tasks.c.is_gold.is_(False))
            closed: dict[int, set[int]] = {}  # task -> who ranked or skipped it
            skipped: set[int] = set()
            for task_id, annotator_id, status in conn.execute(
                    select(assignments.c.task_id, assignments.c.annotator_id, assignments.c.status).where(
                        assignments.c.status.in_(("submitted", "skipped")), assignments.c.task_id.in_(scope))):
                closed.setdefault(task_id, set()).add(annotator_id)
                if status == "skipped":
                    skipped.add(task_id)
            if not skipped:
                return 0, 0
            ranked = dict(conn.execute(select(rankings.c.task_id, func.count()).where(
                rankings.c.status == "submitted", rankings.c.task_id.in_(skipped)).group_by(rankings.c.task_id)).all())
        needed = {t: max(0, overlap - ranked.get(t, 0)) for t in skipped}
        return sum(needed.values()), sum(max(0, n - len(live - closed[t])) for t, n in needed.items())

    def batch_counts(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            n = (select(rankings.c.task_id, func.count().label("n")).where(rankings.c.status == "submitted")
                 .group_by(rankings.c.task_id).subquery())
            rows = conn.execute(select(tasks.c.batch, tasks.c.is_gold, func.coalesce(n.c.n, 0))
                                .select_from(tasks.outerjoin(n, n.c.task_id == tasks.c.id))).all()
        out: dict[str, dict[str, Any]] = {}
        for batch, is_gold, count in rows:
            b = out.setdefault(batch, {"batch": batch, "tasks": 0, "gold": 0, "rankings": 0, "unranked": 0})
            b["tasks"] += 1
            b["gold"] += bool(is_gold)
            b["rankings"] += count
            b["unranked"] += count == 0 and not is_gold
        return sorted(out.values(), key=lambda b: b["batch"])

    def annotator_activity(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            people = conn.execute(select(annotators.c.id, annotators.c.name, annotators.c.is_admin)).mappings().all()
            status = conn.execute(select(assignments.c.annotator_id, assignments.c.status, func.count())
                                  .group_by(assignments.c.annotator_id, assignments.c.status)).all()
            # Time on task: the seconds each ranking took; 0 is unknown (the app restarted while it was open)
            times = conn.execute(select(rankings.c.annotator_id, func.count(), func.sum(rankings.c.seconds))
                                 .where(rankings.c.status == "submitted", rankings.c.seconds > 0)
                                 .group_by(rankings.c.annotator_id)).all()
        counts: dict[int, dict[str, int]] = {}
        for a, s, c in status:
            counts.setdefault(a, {})[s] = c
        timed = {a: (n, total) for a, n, total in times}
        out = []
        for p in people:
            c = counts.get(p["id"], {})
            n, total = timed.get(p["id"], (0, 0.0))
            # Rankings per hour of time on task (not per hour between the first and last submit, which
            # counts breaks and says 60/hour for one ranking); none from fewer than MIN_TIMED rankings.
            per_hour = round(3600 * n / total, 1) if n >= MIN_TIMED and total > 0 else None
            out.append({"name": p["name"], "admin": bool(p["is_admin"]), "done": c.get("submitted", 0),
                        "skipped": c.get("skipped", 0), "open": c.get("assigned", 0), "per_hour": per_hour,
                        "mean_seconds": round(total / n, 1) if n else None})
        return out


def readable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`rows` (Store.submitted_rankings()'s) if every one can be read, else a StoreError naming the first that
    cannot (ranks the app never wrote): for a reader whose result it would change (an export of its batch)."""
    bad = next((r["unreadable"] for r in rows if r.get("unreadable")), None)
    if bad:
        raise StoreError(bad)
    return rows


UNSAFE_REPLY = "unsafe:"  # a ranking's flag naming one unsafe response by its canonical index: "unsafe:2"
FLAGS = ("all_bad", "unsafe")  # the ranking's own flags; "unsafe" alone is what the app wrote before per-reply flags


def names_reply(flag: object) -> bool:
    """Whether a stored flag names one response (unsafe:<i>), not the whole ranking."""
    return isinstance(flag, str) and flag.startswith(UNSAFE_REPLY)


def unsafe_flag(index: int) -> str:
    """The flag that marks response `index` (canonical order) unsafe."""
    return f"{UNSAFE_REPLY}{index}"


def unsafe_replies(flags: Collection[str] | None) -> set[int]:
    """The canonical indices of the responses a ranking's `flags` mark unsafe (its unsafe:<i> entries)."""
    return {int(f[len(UNSAFE_REPLY):]) for f in flags or () if names_reply(f)}


def task_flags(flags: Collection[str] | None) -> set[str]:
    """A ranking's flags that speak for the whole ranking: all_bad, and unsafe written without a response (the app
    before per-reply flags); flagged=drop drops such a ranking's task whole."""
    return {f for f in flags or () if not names_reply(f)}


def flag_names(flags: Collection[str] | None) -> set[str]:
    """A ranking's flags as the export's `flag` column names them: unsafe:<i> is "unsafe" (which reply is
    the pair's own matter: rejected_unsafe, chosen_unsafe)."""
    return {"unsafe" if names_reply(f) else f for f in flags or ()}


def check_flags(flags: Collection[str], k: int) -> None:
    """ValueError unless every flag is all_bad, unsafe, or unsafe:<i> with 0 <= i < k (a response of the task)."""
    for f in flags:
        if f in FLAGS:
            continue
        index = f[len(UNSAFE_REPLY):] if names_reply(f) else None
        if index is None or not (index.isdigit() and index.isascii() and index == str(int(index)) and int(index) < k):
            raise ValueError(f"flag {f!r} is not allowed: a flag is all_bad, unsafe, or unsafe:<i> with i the index "
                             f"of one of the task's {k} responses (0 to {k - 1}, canonical order)")


def _check_ranks(ranks: list[int], k: int) -> None:
    if len(ranks) != k:
        raise ValueError(f"give every response a rank: {len(ranks)} ranks for {k} responses")
    bad = [r for r in ranks if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= k]
    if bad:
        raise ValueError(f"ranks must be whole numbers from 1 (best) to {k}; got {bad[0]!r}")
