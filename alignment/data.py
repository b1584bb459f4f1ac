"""Instruction data in every accepted format, validated line by line.

Accepted for SFT (format detected from the first record unless given):
  alpaca             {"instruction", "input"?, "output"}            JSON list or JSONL
  messages           {"messages": [{"role", "content"}, ...]}         JSONL
  prompt_completion  {"prompt", "completion"} (strings or messages)   JSONL
from .json / .jsonl files, .parquet files, or a `datasets.save_to_disk` folder.

Everything becomes TRL's conversational prompt/completion form, so the chat template is applied
to every example and the loss falls on the completion only. A bad record is an error naming the
file, the line (or row) and the problem; with `on_error=skip` it is logged and counted instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ROLES = {"system", "user", "assistant"}


class DataError(ValueError):
    """A problem with one input record, worded as `<file>:<line>: <problem>`."""


@dataclass
class LoadReport:
    path: str
    format: str
    used: int = 0
    skipped: int = 0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return f"{self.path}: {self.used} examples used, {self.skipped} skipped ({self.format})"


# ---------------------------------------------------------------------------- reading


def iter_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Yield (location, record) pairs; location is 'file:line' or 'folder row N'."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        from datasets import DatasetDict, load_from_disk

        try:
            ds = load_from_disk(str(path))
        except Exception as err:
            raise DataError(f"{path}: not a datasets.save_to_disk folder ({err})") from None
        if isinstance(ds, DatasetDict):
            if "train" not in ds:
                raise DataError(f"{path}: a DatasetDict without a 'train' split (has {list(ds)})")
            ds = ds["train"]
        for i, row in enumerate(ds):
            yield f"{path} row {i}", row
        return
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path} row {i}", row
        return
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: not JSON ({err.msg})") from None
        for i, item in enumerate(items):
            yield f"{path} item {i}", item
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{lineno}", json.loads(line)
        except json.JSONDecodeError as err:
            yield f"{path}:{lineno}", DataError(f"{path}:{lineno}: not JSON ({err.msg} at column {err.colno})")


def file_hash(path: str | Path) -> str:
    """sha256 of a file, or of every file in a folder (sorted), for manifests."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        digest.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------- SFT examples


def detect_format(record: Any) -> str:
    if isinstance(record, dict):
        if "messages" in record:
            return "messages"
        if "instruction" in record or "output" in record:
            return "alpaca"
        if "prompt" in record and "completion" in record:
            return "prompt_completion"
        keys = ", ".join(sorted(record))
    else:
        keys = type(record).__name__
    raise DataError(
        f"cannot tell the format from the first record (keys: {keys}); expected alpaca "
        "{instruction, input, output}, chat {messages} or {prompt, completion}"
    )


def _text(record: dict, key: str, where: str, *, required: bool = True) -> str:
    if key not in record or record[key] is None:
        if required:
            raise DataError(f"{where}: missing field {key!r}")
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return value


def _messages(value: Any, where: str, key: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {key!r} must be a non-empty list of messages")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise DataError(f"{where}: {key}[{i}] must be an object with 'role' and 'content'")
        if msg["role"] not in ROLES:
            raise DataError(f"{where}: {key}[{i}].role {msg['role']!r} is not one of {sorted(ROLES)}")
        if not isinstance(msg["content"], str):
            raise DataError(f"{where}: {key}[{i}].content must be a string")
        out.append({"role": msg["role"], "content": msg["content"]})
    return out


def to_prompt_completion(record: Any, fmt: str, where: str) -> tuple[list[dict], list[dict]]:
    """One record → (prompt messages, completion messages), or a DataError naming the problem."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if fmt == "alpaca":
        instruction = _text(record, "instruction", where)
        extra = _text(record, "input", where, required=False)
        output = _text(record, "output", where)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return [{"role": "user", "content": user}], [{"role": "assistant", "content": output}]
    if fmt == "messages":
        if "messages" not in record:
            raise DataError(f"{where}: missing field 'messages'")
        msgs = _messages(record["messages"], where, "messages")
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's (the completion)")
        if not msgs[-1]["content"].strip():
            raise DataError(f"{where}: the assistant's last message is empty")
        if len(msgs) < 2:
            raise DataError(f"{where}: needs at least one message before the assistant's")
        return msgs[:-1], msgs[-1:]
    if fmt == "prompt_completion":
        for key in ("prompt", "completion"):
            if key not in record:
                raise DataError(f"{where}: missing field {key!r}")
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": _text(record, "prompt", where)}]
        else:
            prompt = _messages(prompt, where, "prompt")
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": _text(record, "completion", where)}]
        else:
            completion = _messages(completion, where, "completion")
            if not completion[-1]["content"].strip():
                raise DataError(f"{where}: field 'completion' is empty")
        return prompt, completion
    raise DataError(f"unknown format {fmt!r}")


def load_sft_dataset(path: str | Path, fmt: str = "auto", *, system_prompt: str | None = None,
                     on_error: str = "raise"):
    """Read, validate and convert; returns (datasets.Dataset of prompt/completion, LoadReport)."""
    from datasets import Dataset

    report = LoadReport(str(path), fmt)
    prompts, completions = [], []
    for where, record in iter_records(path):
        try:
            if isinstance(record, DataError):
                raise record
            if report.format == "auto":
                report.format = detect_format(record)
            prompt, completion = to_prompt_completion(record, report.format, where)
        except DataError as err:
            if on_error == "raise":
                raise
            report.skipped += 1
            report.problems.append(str(err))
            log.warning("skipped %s", err)
            continue
        if system_prompt and prompt[0]["role"] != "system":
            prompt = [{"role": "system", "content": system_prompt}, *prompt]
        prompts.append(prompt)
        completions.append(completion)
    report.used = len(prompts)
    if not prompts:
        raise DataError(f"{path}: no usable examples")
    log.info(report.summary())
    return Dataset.from_dict({"prompt": prompts, "completion": completions}), report


def load_prompts(path: str | Path) -> list[str]:
    """Prompts for sampling/eval: {"prompt": str} JSONL, or any SFT format (its user turn)."""
    prompts: list[str] = []
    fmt = None
    for where, record in iter_records(path):
        if isinstance(record, DataError):
            raise record
        if isinstance(record, dict) and isinstance(record.get("prompt"), str) and "completion" not in record:
            text = record["prompt"]
            if not text.strip():
                raise DataError(f"{where}: field 'prompt' is empty")
            prompts.append(text)
            continue
        fmt = fmt or detect_format(record)
        prompt, _ = to_prompt_completion(record, fmt, where)
        prompts.append(next(m["content"] for m in reversed(prompt) if m["role"] == "user"))
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts
