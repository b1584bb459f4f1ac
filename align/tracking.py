"""Weights & Biases (offline unless the user has a key) and `metrics.jsonl`, the same figures in both.

Trainer-based stages pass `report_to=["wandb"]` and `MetricsJSONL` as a callback; stages with
their own loop (PPO, eval) use `Tracker`. Runs of one run directory share a W&B group, so a
pipeline shows as one group with a run per stage.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import netrc
import os
import re
import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from align import said_once
from align.config import RunConfig, redact

log = logging.getLogger(__name__)


# The user's own WANDB_MODE, read before a stage sets it for the trainer's callback (configure_wandb).
USER_MODE = os.environ.get("WANDB_MODE", "").strip().lower()


def wandb_mode(cfg: RunConfig) -> str:
    """run.wandb, or for `auto`: the user's WANDB_MODE where set, else online with a key that a W&B server answering
    takes, offline otherwise (a key on a machine with no network: wandb.init waited 90 s, then every stage failed
    with a traceback; a key the server refuses: eval and sample failed with one after all their work)."""
    if cfg.wandb != "auto":
        return cfg.wandb
    if USER_MODE in ("online", "offline", "disabled"):
        return USER_MODE
    if USER_MODE == "dryrun":  # W&B's older name for offline
        return "offline"
    if not has_wandb_key():
        return "offline"
    # Said once a process: the preflight, the trainer's arguments, the stage's W&B run and its closing hint each
    # ask, and a stage said "logging offline" four times
    if not wandb_reachable():
        said_once(log.warning, "W&B: a key is set, but %s does not answer: logging offline (run.wandb=auto); "
                  "upload the runs later with `wandb sync <run.dir>/wandb/offline-run-*`", wandb_host()[1])
        return "offline"
    if refused := wandb_key_refusal():
        said_once(log.warning, "W&B: %s refuses %s (%s): logging offline (run.wandb=auto); log in again "
                  "(`wandb login --relogin`) and upload the runs with `wandb sync <run.dir>/wandb/offline-run-*`",
                  wandb_host()[1], wandb_key_source(), refused)
        return "offline"
    return "online"


def wandb_host() -> tuple[str, str, int]:
    """The W&B server's scheme, host and port: WANDB_BASE_URL's, else https, api.wandb.ai, 443."""
    url = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    scheme = url.scheme or "https"
    return scheme, url.hostname or "api.wandb.ai", url.port or (80 if scheme == "http" else 443)


@functools.cache
def wandb_reachable(timeout: float = 2.0) -> bool:
    """Whether the W&B server takes a connection (asked once a process; server_reachable)."""
    return server_reachable(*wandb_host(), timeout)


def server_reachable(scheme: str, host: str, port: int, timeout: float) -> bool:
    """Whether host:port takes a connection, `timeout` seconds at most, the name's lookup included (a resolver that
    does not answer is not waited for). Through a proxy (HTTPS_PROXY, ...), as the clients go: taken as reachable,
    not asked. W&B's (wandb_reachable) and the Hub's (align.cli._hub_reachable)."""
    import threading
    import urllib.request

    proxies = urllib.request.getproxies()
    if (proxies.get(scheme) or proxies.get("all")) and not urllib.request.proxy_bypass(host):
        return True
    answered: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            answered.append(True)
        except OSError:
            answered.append(False)

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout)
    return answered == [True]


def has_wandb_key() -> bool:
    """Whether wandb would find a key (wandb_key)."""
    return wandb_key() is not None


def wandb_key() -> str | None:
    """The key wandb would use: WANDB_API_KEY, or the `wandb login` entry for the server (WANDB_BASE_URL's, else
    api.wandb.ai) in the netrc file wandb reads (NETRC's, else ~/.netrc). Only api.wandb.ai in ~/.netrc was
    looked up: a self-hosted server's key, or one in a NETRC file, left run.wandb=auto offline."""
    if os.environ.get("WANDB_API_KEY"):
        return os.environ["WANDB_API_KEY"]
    url = (os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").rstrip("/")
    try:  # wandb's own reader (the file, the entry's name, a forge's upstream), where this wandb has it
        from wandb.sdk.lib.wbauth import read_netrc_auth

        return read_netrc_auth(host=url)
    except Exception:  # noqa: BLE001 - no wandb, one that moved its reader, or a URL or key it refuses: ours
        pass
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        found = netrc.netrc(os.path.expanduser(path))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return None
    split = urlsplit(url)  # `wandb login --host` writes the server's host:port as the machine
    for name in dict.fromkeys((split.netloc, split.hostname)):
        if name and (entry := found.authenticators(name)) and entry[2]:
            return entry[2]
    return None


def wandb_key_source() -> str:
    """Where wandb_key found the key, as the user set it."""
    return "the key in WANDB_API_KEY" if os.environ.get("WANDB_API_KEY") else "the key of `wandb login` (netrc)"


@functools.cache
def wandb_key_refusal(timeout: float = 5.0) -> str | None:
    """What the W&B server says when it refuses wandb_key (asked once a process), None when it takes it, there is
    no key, or no clear answer came (no network, a TLS or proxy trouble: wandb.init is left to try). Asked as
    `wandb login --verify` asks (the GraphQL viewer, the key as the password of the user "api"), directly: wandb's
    own check starts its wandb-core process (1 s). A key the server refused failed wandb.init ("user is not logged
    in") when the stage opened its run: for sample and eval after all their work."""
    import base64
    import threading
    import urllib.error
    import urllib.request

    key = wandb_key()
    if key is None:
        return None
    base = (os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").rstrip("/")
    request = urllib.request.Request(
        f"{base}/graphql", data=json.dumps({"query": "query Viewer { viewer { id } }"}).encode(), method="POST",
        headers={"Authorization": "Basic " + base64.b64encode(f"api:{key}".encode()).decode(),
                 "Content-Type": "application/json", "User-Agent": "align"})
    said: list[str | None] = []

    def ask() -> None:
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                body = json.loads(answer.read() or b"{}")
            viewer = body.get("data", {}).get("viewer", "") if isinstance(body, dict) else ""
            # no viewer: a key it knows no user by (wandb's validate_api_key before wandb-core read it so)
            said.append("it knows no user by it" if viewer is None else None)
        except urllib.error.HTTPError as err:
            said.append(f"HTTP {err.code}: {_server_message(err)}" if err.code in (401, 403) else None)
        except Exception:  # noqa: BLE001 - no clear answer: not taken for a refusal
            said.append(None)

    asking = threading.Thread(target=ask, daemon=True)  # a name lookup is not waited for past `timeout` either
    asking.start()
    asking.join(timeout)
    return said[0] if said else None


def _server_message(err: Exception) -> str:
    """The first error message of a W&B server's answer (GraphQL's {"errors": [{"message": ...}]}), else its
    text, in one line."""
    try:
        text = err.read().decode("utf-8", "replace")
    except Exception:  # noqa: BLE001
        text = ""
    try:
        text = json.loads(text)["errors"][0]["message"]
    except Exception:  # noqa: BLE001 - not GraphQL's shape: the text as it is
        pass
    return " ".join(str(text).split())[:200] or err.reason or "refused"


def run_name(run_dir: Path) -> str:
    """The run directory's name, with its run's for a pipeline round: runs/q/round-1 is "q/round-1" (a run.dir
    named round-1 itself, exps/round-1 with no run in exps, is "round-1")."""
    from align.artifacts import round_root

    root = round_root(run_dir)
    return f"{root.name}/{Path(run_dir).name}" if root else Path(run_dir).name


def wandb_dir(run_dir: str | Path) -> Path:
    """Where a run's W&B files go: its folder, and a pipeline round's run's (runs/q/round-1 → runs/q), so that
    one `wandb sync runs/q/wandb/offline-run-*` uploads every round."""
    from align.artifacts import round_root

    return round_root(run_dir) or Path(run_dir)


def configure_wandb(cfg: RunConfig, stage: str) -> str:
    """Set the env vars W&B (and transformers' WandbCallback) read; returns the mode."""
    mode = wandb_mode(cfg)
    run_dir = Path(cfg.dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    os.environ["WANDB_MODE"] = mode
    os.environ["WANDB_DIR"] = str(wandb_dir(run_dir))
    os.environ["WANDB_PROJECT"] = cfg.wandb_project
    name = run_name(run_dir)
    os.environ["WANDB_RUN_GROUP"] = name.split("/")[0]  # a pipeline's later rounds in their run's group
    os.environ["WANDB_NAME"] = f"{name}/{stage}"
    os.environ["WANDB_JOB_TYPE"] = stage
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_LOG_MODEL", "false")
    return mode


def start_wandb_run(cfg: RunConfig, stage: str, config: dict[str, Any] | None = None):
    """This stage's W&B run, opened here with every setting named (None when disabled or not rank 0).

    wandb reads its settings (mode, dir) once per process, at its first init, and transformers'
    WandbCallback names neither: after any earlier run in the process (a pipeline's previous stage,
    a notebook's own run) the callback's run went to that run's folder and mode, or, offline, failed
    to log in. Opened first, the callback logs into this run (it starts one only when none is
    open), and a run left open before is finished.
    """
    from align.artifacts import is_main_process

    _OPENED.clear()
    mode = configure_wandb(cfg, stage)
    if mode == "disabled" or not is_main_process():
        return None
    import wandb

    env = os.environ
    run = wandb.init(project=env["WANDB_PROJECT"], group=env["WANDB_RUN_GROUP"], name=env["WANDB_NAME"],
                     job_type=stage, dir=env["WANDB_DIR"], mode=mode, config=redact(config), reinit="finish_previous")
    try:
        url = run.url  # None offline
    except Exception:  # noqa: BLE001 - a run without one (a wandb that has no URL to give) is still recorded
        url = None
    _OPENED.update(stage=stage, mode=mode, id=run.id, url=url, folder=str(run.settings.sync_dir))
    return run


# The W&B run this process opened last (start_wandb_run), for the manifest of the stage it was opened for: the
# report links each stage to its run (online) or names its folder and the `wandb sync` that uploads it (offline).
_OPENED: dict[str, Any] = {}


def wandb_record(stage: str) -> dict[str, Any] | None:
    """{mode, id, url, folder} of the W&B run this process opened for `stage`; None when it opened none."""
    return {k: v for k, v in _OPENED.items() if k != "stage"} if _OPENED.get("stage") == stage else None


def report_to(cfg: RunConfig) -> list[str]:
    return [] if wandb_mode(cfg) == "disabled" else ["wandb"]


def wandb_hint(cfg: RunConfig) -> str | None:
    if wandb_mode(cfg) == "offline":
        folder = wandb_dir(cfg.dir) / "wandb"
        return f"W&B offline runs in {folder}: upload with `wandb sync {folder}/offline-run-*`"
    return None


def _clean(metrics: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in metrics.items():
        if hasattr(v, "item"):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            v = str(v)
        out[k] = v
    return out


def scalars(figures: dict[str, Any]) -> dict[str, int | float]:
    """The numbers among `figures` as W&B's summary and charts hold them: each int or float as it is, each 95 %
    interval (a [low, high] pair under a key ending in `_ci`) as `<key>_low` and `<key>_high`; Nones, lists and
    tables left out. A filter for numbers alone dropped every interval (the manifest's win-rate and accuracy
    intervals reached no W&B run)."""
    out: dict[str, int | float] = {}
    for key, value in figures.items():
        if key.endswith("_ci") and isinstance(value, (list, tuple)) and len(value) == 2:
            out[f"{key}_low"], out[f"{key}_high"] = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = value
    return out


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(_clean(record), default=str) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file; a last line cut short (a process killed as it wrote it) is left out."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = [json.loads(line) for line in lines[:-1]]
    try:
        rows += [json.loads(line) for line in lines[-1:]]
    except json.JSONDecodeError:
        pass
    return rows


class Tracker:
    """For stages with their own loop: W&B run + metrics.jsonl with one `log` call."""

    def __init__(self, cfg: RunConfig, stage: str, out_dir: str | Path, config: dict[str, Any],
                 *, resume: bool = False):
        from align.artifacts import is_main_process

        self.path = Path(out_dir) / "metrics.jsonl"
        self.main = is_main_process()
        self.run = None
        if not self.main:
            return
        if not resume:  # resumed, the folder is made at the first log: export opens its run before it exists
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")
        self.run = start_wandb_run(cfg, stage, config)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        append_jsonl(self.path, {"step": step, **metrics})
        if self.run is not None:
            self.run.log(_clean(metrics), step=step)

    def table(self, key: str, columns: list[str], rows: list[list[Any]], step: int | None = None) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Table(columns=columns, data=rows)}, step=step)

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        if self.run is not None:
            if summary:
                self.run.summary.update(_clean(summary))
            self.run.finish()
            self.run = None


# A stage's W&B artifact type, by the stage's kind in the registry (align.artifacts.STAGES).
ARTIFACT_TYPES = {"policy": "model", "reward": "reward-model", "data": "dataset", "eval": "evaluation"}
SKIP_IN_ARTIFACT = {"checkpoints", "wandb", "metrics.jsonl", ".align.lock"}  # (artifacts.LOCK)


def artifact_name(run_dir: str | Path, stage: str) -> str:
    """`<run>-<stage>`; a pipeline round's with its run's name (q-round-1-dpo), so that runs/x/round-1's
    are not versions of runs/q/round-1's. W&B allows letters, digits, -, _ and . in a name: any other
    character of the folder's name (runs/lr=5e-3, "my run") is a _ there (the real path is in its metadata)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", f"{run_name(Path(run_dir).resolve()).replace('/', '-')}-{stage}")


def log_artifact(stage: str, folder: str | Path, run_dir: str | Path, parents: dict[str, str | Path] | None = None,
                 run=None) -> None:
    """Log a stage's artifact to the active W&B run, with its lineage.

    Online, each parent is declared with `use_artifact`, so W&B draws the graph (preference data
    → reward model → PPO policy). W&B refuses `use_artifact` offline, so the parents' names are
    also kept in the artifact's metadata and the run's config: the lineage survives
    `wandb sync` and reads back from the offline run files.
    """
    try:
        import wandb
    except ImportError:  # run.wandb=disabled needs no wandb installed (a GPU box without it, say)
        return
    from align.artifacts import MANIFEST, STAGES, is_main_process, read_manifest

    run = run or wandb.run
    if run is None or not is_main_process():
        return
    folder = Path(folder)
    # A parent's artifact is named after the stage that wrote it, which its manifest says (the
    # export's folder is preferences/, a grpo policy's grpo/, a parent may be any folder).
    parent_names = {k: artifact_name(Path(p).parent, read_manifest(p).get("stage") or Path(p).name)
                    for k, p in (parents or {}).items() if (Path(p) / MANIFEST).is_file()}
    kind = STAGES[stage].kind if stage in STAGES else None
    art = wandb.Artifact(artifact_name(run_dir, stage), type=ARTIFACT_TYPES.get(kind, "artifact"),
                         metadata={"stage": stage, "parents": parent_names, "path": str(folder)})
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not (set(rel.parts) & SKIP_IN_ARTIFACT):
            art.add_file(str(path), name=str(rel))
    if not run.settings._offline:
        for name in parent_names.values():
            try:
                run.use_artifact(f"{name}:latest")
            except Exception as err:  # a parent logged with W&B off: lineage stays in metadata
                log.info("W&B lineage: %s not found (%s)", name, err)
    run.config.update({"lineage": {"artifact": art.name, "parents": parent_names}}, allow_val_change=True)
    try:
        run.log_artifact(art)
    except Exception as err:  # W&B's trouble is not the stage's: its artifact is on disk, finished
        log.warning("W&B did not take the %s artifact (%s); the stage's folder %s is complete", stage, err, folder)


def summarize_eval(metrics: dict[str, Any]) -> None:
    """The held-out figures the manifest records (`eval_x`), as the W&B run's summary `eval/x`: the Trainer's
    W&B callback leaves its last evaluation there, which is not the kept model's where sft keeps its best."""
    try:
        import wandb
    except ImportError:  # pragma: no cover
        return
    from align.artifacts import is_main_process

    if wandb.run is not None and is_main_process():
        wandb.run.summary.update({f"eval/{k[5:]}": v for k, v in metrics.items()
                                  if k.startswith("eval_") and isinstance(v, (int, float))})


def finish_wandb() -> None:
    try:
        import wandb
    except ImportError:  # pragma: no cover
        return
    if wandb.run is not None:
        wandb.run.finish()


def fail_wandb(exit_code: int) -> None:
    """Close this process's open W&B run as failed, with `exit_code` (1 for an error, 130 for Ctrl-C, 143 for
    SIGTERM): a stage that failed or was stopped left its run open, and wandb's exit hook closed it as
    finished, exit code 0, like one that ended well. Nothing when wandb was never imported (no run started)."""
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb is not None else None
    if run is None:
        return
    try:
        run.finish(exit_code=exit_code)
    except Exception as err:  # noqa: BLE001 - W&B's trouble must not hide the stage's own error
        log.warning("W&B: could not mark the run as failed (%s)", err)
