"""Instruction data in every accepted format, validated line by line.

Accepted for SFT (format detected from the first record unless given):
  alpaca             {"instruction", "input"?, "output"}            JSON list or JSONL
  messages           {"messages": [{"role", "content"}, ...]}         JSONL
  prompt_completion  {"prompt", "completion"} (strings or messages)   JSONL
each with an optional "system" (a leading system turn), and alpaca with LLaMA-Factory's "history"
([[query, response], ...], the turns before the instruction: trained as a conversation's are, data.turns)
from .json / .jsonl files (UTF-8, a BOM allowed), .parquet files, or a `datasets.save_to_disk`
folder (a DatasetDict: its train split, else train_sft, else its only train* split, and that name with
test, else validation, as the held-out set: test_sft beside train_sft); any other suffix, a folder that
is not a dataset and an empty dataset are named errors. Data is local only: a Hub dataset id is told to
be saved with `load_dataset(id).save_to_disk(folder)` first.

Everything becomes TRL's conversational prompt/completion form, so the chat template is applied
to every example and the loss falls on the completion only. A bad record (not UTF-8, not JSON, half a
\\u-escaped character, not an object, a missing or empty field) is an error naming the file, the line
(or row) and the problem; with `on_error=skip` it is logged and counted instead.
"""

from __future__ import annotations

import codecs
import hashlib
import itertools
import json
import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align import said_once

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
    earlier_turns: int = 0  # assistant turns before a conversation's last: examples of their own (turns=all)
    held_out: str | None = None  # a DatasetDict folder's held-out split (split_roles), read with split=held_out
    train_split: str = "train"  # the DatasetDict split trained on (split_roles: train, train_sft, ...)
    ignored: list[str] = field(default_factory=list)  # its other splits, which nothing reads
    # The system turn every example opens with (system_prompt, a `system` field or the conversation's own), which
    # the SFT manifest records so later stages prompt with it; else None, and `systems` counts the examples that
    # open with one and how many different ones they are. `own_system`: with system_prompt, the examples that
    # open with a system turn of their own instead (it is kept, not replaced): with every one, system is theirs.
    system: str | None = None
    systems: tuple[int, int] = (0, 0)
    own_system: int = 0
    # Per example, the key split_by_prompt keeps on one side: its conversation's last prompt (an earlier
    # turn's example has its conversation's, so a conversation is never split).
    conversations: list[str] = field(default_factory=list, repr=False)
    # Per example, the record it came from (`<file>:<line>`): an error found later (a chat template refusing it)
    # names it as the reader's own errors do.
    wheres: list[str] = field(default_factory=list, repr=False)

    def summary(self) -> str:
        turns = f", {self.earlier_turns} of them earlier assistant turns" if self.earlier_turns else ""
        return f"{self.path}: {self.used} examples used{turns}, {self.skipped} skipped ({self.format})"


# ---------------------------------------------------------------------------- reading


# What a data path may be, besides a datasets.save_to_disk folder.
SUFFIXES = (".jsonl", ".json", ".parquet")
ACCEPTED = (".jsonl (one JSON object a line), .json (a list of objects, or JSON lines), .parquet, "
            "or a datasets.save_to_disk folder")


def json_kind(value: Any) -> str:
    """A value's type in JSON's words (object, array, string, ...), for messages about records."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    return {dict: "object", list: "array", str: "string", int: "number", float: "number"}.get(
        type(value), type(value).__name__)


# A save_to_disk DatasetDict's held-out split, the first of these it has (datasets' and the Hub's usual names).
HELD_OUT_SPLITS = ("test", "validation")


def split_roles(splits: list[str], conventional: str = "train_sft") -> tuple[str | None, str | None]:
    """(the split to train on, its held-out split or None) of a DatasetDict's splits; (None, None) when none is.

    train, else `conventional` (the names of Hugging Face H4's datasets: UltraFeedback's train_sft for SFT and
    train_prefs for preferences, UltraChat's train_sft), else the only split whose name starts with train. Held
    out: that name with test, else validation, in place of train (test_prefs beside train_prefs)."""
    train = "train" if "train" in splits else conventional if conventional in splits else None
    if train is None:
        named = [s for s in splits if s.startswith("train")]
        train = named[0] if len(named) == 1 else None
    if train is None:
        return None, None
    return train, next((train.replace("train", h, 1) for h in HELD_OUT_SPLITS if train.replace("train", h, 1) in splits),
                       None)


def no_train_split(path: str | Path, splits: list[str]) -> DataError:
    """The error for a DatasetDict with no split split_roles trains on."""
    return DataError(f"{path}: a DatasetDict without a 'train' split (has {splits}), and not one split named train* "
                     f"to train on instead; pass the folder of the split to train on, data.path={Path(path) / '<split>'} "
                     "(a held-out set is then cut from it)")


def missing(path: str | Path, hint: str = "") -> DataError:
    """The error for a data path that is not there; a Hugging Face Hub dataset id (owner/name) is told how to
    save it to a folder: align reads local data only (its stages hand data on as local artifacts)."""
    text = str(path)
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text) and Path(text).suffix.lower() not in SUFFIXES:
        name = text.split("/")[1]
        hint += (f"; if it is a Hugging Face Hub dataset id: align reads local files and folders only, so save it "
                 f"once where the Hub is reachable, python -c \"from datasets import load_dataset; "
                 f"load_dataset('{text}').save_to_disk('data/{name}')\", and pass data/{name} instead")
    if Path(text).parts[:2] == ("data", "support"):
        hint += ("; it is the shipped default, which comes with align's source checkout, not with an installed "
                 f"wheel: run from the checkout's root (it holds {text}), or point the setting at your own data")
    return DataError(f"{path}: no such file or folder{hint}")


def iter_records(path: str | Path, split: str = "train") -> Iterator[tuple[str, Any]]:
    """Yield (location, record) pairs; location is 'file:line' or 'folder row N' ('folder test row N').

    A line that cannot be read (not UTF-8, not JSON) is yielded as a DataError in place of its
    record, so that `on_error=skip` can skip it; a file that cannot be read at all raises one.
    `split` other than train: that split of a DatasetDict folder, and nothing from anything else; train is the
    one split_roles trains on (train, else train_sft, else the only train* split).
    """
    path = Path(path)
    if not path.exists():
        raise missing(path)
    if path.is_dir():
        from datasets import DatasetDict

        ds = load_dataset_folder(path)
        if isinstance(ds, DatasetDict):
            train = split_roles(list(ds))[0]
            if train is None:
                raise no_train_split(path, list(ds))
            split = train if split == "train" else split
            ds = ds.get(split, [])
        elif split != "train":
            return
        label = f"{path} row" if split == "train" else f"{path} {split} row"
        for i, row in enumerate(ds):
            yield f"{label} {i}", row
        return
    if split != "train":
        return
    if not path.is_file():
        raise DataError(f"{path}: not a regular file or folder")
    if path.suffix.lower() not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {path.suffix or '(no suffix)'!r}; accepted: {ACCEPTED}")
    if path.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"{path}: not a readable parquet file ({err})") from None
        for i, row in enumerate(rows):
            yield f"{path} row {i}", row
        return
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read it ({err.strerror or err})") from None
    raw = raw.removeprefix(codecs.BOM_UTF8)  # editors on Windows start UTF-8 files with one
    if path.suffix.lower() == ".json" and raw.lstrip()[:1] in (b"[", b"{"):
        text = _utf8(path, raw)
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as err:
            if raw.lstrip()[:1] == b"[":
                raise DataError(f"{path}:{err.lineno}: not JSON ({err.msg} at column {err.colno})") from None
            whole = None  # JSON lines in a .json file: read line by line below
        if isinstance(whole, list):
            yield from json_list(path, text)
            return
        if isinstance(whole, dict) and b"\n" in raw.strip():
            raise DataError(f"{path}: one JSON object over several lines; expected a list of records "
                            "([{...}, {...}]) or one object per line (JSON lines)")
    yield from json_lines(path, raw)


def json_lines(path: str | Path, raw: bytes) -> Iterator[tuple[str, Any]]:
    """`iter_records` of JSON lines already read (`raw`, its BOM removed): (location, record or DataError)."""
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        where = f"{path}:{lineno}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            yield where, DataError(f"{where}: not UTF-8 text (byte 0x{line[err.start]:02x} at byte {err.start + 1} "
                                   f"of the line); save the file as UTF-8, e.g. {_convert_hint(raw)}")
            continue
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            yield where, DataError(f"{where}: not JSON ({err.msg} at column {err.colno})")
            continue
        yield where, _no_lone_surrogate(record, where) if _SURROGATE_ESCAPE.search(text) else record


def json_list(path: str | Path, text: str) -> Iterator[tuple[str, Any]]:
    """The items of a JSON array already checked to parse (`text`), each with the line it starts on.

    Errors name a line, as for JSON lines: "list.json:3 (item 2)", not an index the user must count to."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    line, counted = 1, 0  # the line of text[counted]
    for number in itertools.count(1):
        start = _WHITESPACE.match(text, pos).end()
        if text[start] == "]":
            return
        line, counted = line + text.count("\n", counted, start), start
        item, pos = decoder.raw_decode(text, start)
        where = f"{path}:{line} (item {number})"
        yield where, _no_lone_surrogate(item, where) if _SURROGATE_ESCAPE.search(text, start, pos) else item
        pos = _WHITESPACE.match(text, pos).end()
        pos += text[pos] == ","


_WHITESPACE = re.compile(r"[ \t\n\r]*")  # JSON's own whitespace, as the json module skips it


# JSON may spell half of a character: a lone "\\ud83d" parses to a str that is not text (it cannot be written as
# UTF-8), and pyarrow fails on it later with a traceback that names no record. Only a \\u escape can make one.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _no_lone_surrogate(record: Any, where: str) -> Any:
    """`record`, or a DataError naming the field (messages[2].content) that holds a lone UTF-16 surrogate."""
    def lone(text: str) -> str | None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            return f"\\u{ord(text[err.start]):04x} at character {err.start + 1}"
        return None

    def find(value: Any, name: str) -> str | None:
        if isinstance(value, str):
            found = lone(value)
            return found and f"{f'field {name!r}' if name else 'the record'} holds {found}"
        if isinstance(value, dict):
            for key, inner in value.items():
                found = lone(str(key))
                if found:
                    return f"a key of {f'field {name!r}' if name else 'the record'} holds {found}"
                found = find(inner, f"{name}.{key}" if name else str(key))
                if found:
                    return found
        if isinstance(value, list):
            return next(filter(None, (find(inner, f"{name}[{i}]") for i, inner in enumerate(value))), None)
        return None

    problem = find(record, "")
    if problem is None:
        return record
    return DataError(f"{where}: {problem}, a lone UTF-16 surrogate: half of an emoji (or another character JSON "
                     "writes as two \\u escapes) whose other half is missing; write the character whole or remove it")


def _utf8(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[err.start]:02x} at byte {column} of the line); "
                        f"save the file as UTF-8, e.g. {_convert_hint(raw)}") from None


def _convert_hint(raw: bytes) -> str:
    """The iconv that converts it: UTF-16 by its byte-order mark (Windows' "Unicode"), else Latin-1."""
    source = "utf-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "latin1"
    return f"iconv -f {source} -t utf-8"


def load_dataset_folder(path: str | Path):
    """`datasets.load_from_disk`, with a folder that is not one (or holds an empty one) named as such."""
    from datasets import load_from_disk

    path = Path(path)
    if (path / "dataset_dict.json").is_file():
        try:
            splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DataError(f"{path / 'dataset_dict.json'}: unreadable ({err})") from None
        folders = [path / str(split) for split in splits]
    elif (path / "state.json").is_file():
        folders = [path]
    else:
        inside = sorted(p.name for p in path.iterdir() if p.suffix.lower() in SUFFIXES)[:3]
        hint = f"; it holds {', '.join(inside)}: pass one of those files" if inside else ""
        raise DataError(f"{path}: a folder, but not a dataset saved with datasets' save_to_disk (no "
                        f"dataset_dict.json or state.json){hint}; accepted: {ACCEPTED}")
    for folder in folders:
        try:
            state = json.loads((folder / "state.json").read_text())
        except (OSError, ValueError) as err:
            raise DataError(f"{folder / 'state.json'}: unreadable ({err})") from None
        if not state.get("_data_files"):  # load_from_disk fails on these with "list index out of range"
            raise DataError(f"{folder}: an empty dataset (saved with no rows)")
    try:
        return load_from_disk(str(path))
    except Exception as err:
        raise DataError(f"{path}: not a readable datasets.save_to_disk folder ({type(err).__name__}: {err})") from None


def folder_splits(path: str | Path) -> list[str]:
    """The splits of a save_to_disk DatasetDict folder, as its dataset_dict.json lists them; [] for anything else."""
    index = Path(path) / "dataset_dict.json"
    try:
        return [str(split) for split in json.loads(index.read_text())["splits"]] if index.is_file() else []
    except (OSError, ValueError, KeyError, TypeError):
        return []  # load_dataset_folder names the problem when the folder is read


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


def detect_format(record: Any, where: str = "the first record") -> str:
    """The SFT format of `record` (the first one of a file decides for the whole file)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {json_kind(record)}")
    if "messages" in record:
        return "messages"
    if "instruction" in record or "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    raise DataError(
        f"{where}: cannot tell the format from the first record (keys: {', '.join(sorted(record)) or 'none'}); "
        "expected alpaca {instruction, input, output}, chat {messages} or {prompt, completion}"
    )


def _text(record: dict, key: str, where: str, *, required: bool = True) -> str:
    if key not in record or record[key] is None:
        if required:
            raise DataError(f"{where}: missing field {key!r}")
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {json_kind(value)}")
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
        if not isinstance(msg["role"], str) or msg["role"] not in ROLES:
            raise DataError(f"{where}: {key}[{i}].role {msg['role']!r} is not one of {sorted(ROLES)}")
        if not isinstance(msg["content"], str):
            raise DataError(f"{where}: {key}[{i}].content must be a string")
        out.append({"role": msg["role"], "content": msg["content"]})
    return out


def check_prompt(prompt: list[dict[str, str]], where: str, key: str) -> list[dict[str, str]]:
    """`prompt` (a conversation before its answer, as `key` holds it) if a chat template can render it as one:
    a system message first or nowhere (a second, mid-conversation one renders as a new system block, and
    data.system_prompt would stack a third), a user message to answer, and no empty user message."""
    for i, message in enumerate(prompt):
        if message["role"] == "system" and i:
            raise DataError(f"{where}: {key}[{i}] is a system message after the conversation began; a system "
                            "message can only be the first")
        if message["role"] == "user" and not message["content"].strip():
            raise DataError(f"{where}: {key}[{i}], a user message, is empty")
    if not any(m["role"] == "user" for m in prompt):
        raise DataError(f"{where}: {key!r} has no user message before the answer: nothing asked it")
    return prompt


def to_prompt_completion(record: Any, fmt: str, where: str, *, prompt_only: bool = False
                         ) -> tuple[list[dict], list[dict]]:
    """One record → (prompt messages, completion messages), or a DataError naming the problem. `prompt_only`: the
    prompt is what is read (a prompts file): an alpaca record needs no `output` then (its completion is empty)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {json_kind(record)}")
    if fmt == "alpaca":
        instruction = _text(record, "instruction", where)
        extra = _text(record, "input", where, required=False)
        output = _text(record, "output", where, required=not prompt_only)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        prompt = [*_history(record, where), {"role": "user", "content": user}]
        return _with_system_field(record, prompt, where, "instruction"), [{"role": "assistant", "content": output}]
    if fmt == "messages":
        if "messages" not in record:
            raise DataError(f"{where}: missing field 'messages'")
        msgs = _messages(record["messages"], where, "messages")
        if msgs[-1]["role"] == "assistant":
            check_prompt(msgs[:-1], where, "messages")
        msgs = _with_system_field(record, msgs, where, "messages")
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
            prompt = check_prompt(_messages(prompt, where, "prompt"), where, "prompt")
        prompt = _with_system_field(record, prompt, where, "prompt")
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": _text(record, "completion", where)}]
        else:
            completion = _messages(completion, where, "completion")
            if not completion[-1]["content"].strip():
                raise DataError(f"{where}: field 'completion' is empty")
            others = sorted({m["role"] for m in completion} - {"assistant"})
            if others:  # the loss is on the completion: a user turn there would train the model to write it
                raise DataError(f"{where}: field 'completion' has a {others[0]} message; it holds the assistant's "
                                "answer only (put the conversation before it in 'prompt')")
        return prompt, completion
    raise DataError(f"unknown format {fmt!r}")


def other_format(err: DataError, record: Any, fmt: str, detected: bool) -> DataError:
    """`err`, saying so when the record is in another format than the file's: a {messages} line in an alpaca
    file was "missing field 'instruction'", which sent the user looking for a field, not a format."""
    try:
        own = detect_format(record)
    except DataError:
        return err
    if own == fmt:
        return err
    how = "detected from the first record" if detected else "data.format"
    return DataError(f"{err}; this record is in the {own} format, the file's is {fmt} ({how}): every record of "
                     "one file must be in one format")


def _history(record: dict, where: str) -> list[dict[str, str]]:
    """An alpaca record's `history` (LLaMA-Factory's: [[query, response], ...], the turns before this one) as
    user/assistant messages: context for the instruction, and with data.turns=all each response an example."""
    history = record.get("history")
    if history is None:
        return []
    if not isinstance(history, list):
        raise DataError(f"{where}: field 'history' must be a list of [query, response] pairs (the earlier turns), "
                        f"got {json_kind(history)}")
    out = []
    for i, turn in enumerate(history):
        if not (isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise DataError(f"{where}: history[{i}] must be a [query, response] pair of strings, got "
                            f"{json.dumps(turn, ensure_ascii=False)[:80]}")
        if not turn[0].strip():
            raise DataError(f"{where}: history[{i}]'s query is empty")
        out += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    return out


def _with_system_field(record: dict, messages: list[dict], where: str, key: str) -> list[dict]:
    """`messages` after the record's own `system` field (LLaMA-Factory's alpaca and sharegpt records carry one),
    which data.system_prompt then leaves alone, as it does a conversation's own system turn."""
    system = _text(record, "system", where, required=False)
    if not system.strip():
        return messages
    if messages[0] == {"role": "system", "content": system}:
        return messages
    if any(m["role"] == "system" for m in messages):
        raise DataError(f"{where}: field 'system' and a system message in {key!r}: give the system prompt once")
    return [{"role": "system", "content": system}, *messages]


def with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """`messages` with a leading system turn of `system_prompt`, unless they open with one already (or it is None)."""
    if not system_prompt or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def read_sft_examples(path: str | Path, fmt: str = "auto", *, system_prompt: str | None = None,
                      on_error: str = "raise", turns: str = "all",
                      split: str = "train") -> tuple[list[list[dict]], list[list[dict]], LoadReport]:
    """Read and validate every record: (prompts, completions, LoadReport), as lists of chat messages.

    turns="all": a {messages} conversation gives an example for each non-empty assistant turn, the
    conversation before it as the prompt (the loss is on the completion only, so every answer trains
    once, in its context); "last": only the last. `split`: a DatasetDict folder's split to read (the
    report of its train names the held-out one, `held_out`)."""
    report = LoadReport(str(path) if split == "train" else f"{path} {split}", fmt)
    splits = folder_splits(path) if split == "train" else []
    if splits:
        train, report.held_out = split_roles(splits)
        report.train_split = train or "train"  # none: iter_records says so
    report.ignored = [s for s in splits if s not in (report.train_split, report.held_out)]
    prompts, completions = [], []
    detected = fmt == "auto"
    for where, record in iter_records(path, split):
        try:
            if isinstance(record, DataError):
                raise record
            if report.format == "auto":
                report.format = detect_format(record, where)
            try:
                prompt, completion = to_prompt_completion(record, report.format, where)
            except DataError as err:
                raise other_format(err, record, report.format, detected) from None
        except DataError as err:
            if on_error == "raise":
                raise
            skip_record(report, err)
            continue
        key = json.dumps(with_system_prompt(prompt, system_prompt), sort_keys=True)
        if turns == "all" and report.format in ("messages", "alpaca"):  # alpaca: its history's responses
            for j, message in enumerate(prompt):
                if message["role"] == "assistant" and message["content"].strip() and \
                        any(m["role"] == "user" for m in prompt[:j]):
                    prompts.append(with_system_prompt(prompt[:j], system_prompt))
                    completions.append([message])
                    report.conversations.append(key)
                    report.wheres.append(where)
                    report.earlier_turns += 1
        prompt = with_system_prompt(prompt, system_prompt)
        prompts.append(prompt)
        completions.append(completion)
        report.conversations.append(key)
        report.wheres.append(where)
    report.used = len(prompts)
    if not prompts:
        raise no_records(report.path, report.skipped, report.problems)
    opening = [p[0]["content"] if p and p[0]["role"] == "system" else None for p in prompts]
    if opening[0] is not None and opening.count(opening[0]) == len(opening):
        report.system = opening[0]
    else:
        report.systems = (sum(o is not None for o in opening), len({o for o in opening if o is not None}))
    if system_prompt:
        report.own_system = sum(o != system_prompt for o in opening)
    return prompts, completions, report


def load_sft_dataset(path: str | Path, fmt: str = "auto", *, system_prompt: str | None = None,
                     on_error: str = "raise", turns: str = "all", split: str = "train"):
    """Read, validate and convert; returns (datasets.Dataset of prompt/completion, LoadReport)."""
    from datasets import Dataset

    prompts, completions, report = read_sft_examples(path, fmt, system_prompt=system_prompt, on_error=on_error,
                                                     turns=turns, split=split)
    log.info(report.summary())
    if report.ignored:
        log.warning("%s: ignoring splits %s (only %s%s are used)", path, report.ignored, report.train_split,
                    f", and {report.held_out} as the held-out set," if report.held_out else "")
    with_system, different = report.systems
    if report.own_system and split == "train" and report.system is not None:
        log.warning("%s: every example opens with a system turn of its own, which data.system_prompt does not "
                    "replace: none trained with data.system_prompt. The one they share is recorded as the policy's "
                    "system prompt instead, for later stages (sample, dpo, reward, eval, serve) to prompt with: %r",
                    path, report.system)
    elif report.own_system and split == "train":
        log.warning("%s: %d of %d examples open with a system turn of their own (which data.system_prompt does not "
                    "replace); later stages (sample, dpo, reward, eval, serve) prompt the policy with data.system_prompt, "
                    "as the other %d trained", path, report.own_system, len(prompts), len(prompts) - report.own_system)
    elif with_system and split == "train" and not system_prompt:
        log.warning("%s: %d of %d examples open with a system turn (%d different ones): later stages (sample, dpo, "
                    "reward, eval, serve) prompt the policy without one; set data.system_prompt to the one they "
                    "should use", path, with_system, len(prompts), different)
    if turns == "last":
        earlier = sum(any(m["role"] == "assistant" for m in p) for p in prompts)
        if earlier:
            log.warning("%d of %d examples have assistant turns before their last one: with data.turns=last those "
                        "are context, not trained (data.turns=all trains each)", earlier, len(prompts))
    return Dataset.from_dict({"prompt": prompts, "completion": completions}), report


def split_by_prompt(dataset, test_fraction: float, seed: int, groups: list[str] | None = None):
    """(train, held-out) of a prompt/completion Dataset with every prompt on one side only.

    Several answers to one instruction on both sides would make held-out loss optimistic (the model
    saw the prompt). `groups` (LoadReport.conversations) keys rows instead of their prompts: the
    turns of one conversation (data.turns=all) stay on one side. Conversations that open alike are
    still apart, but an earlier turn's example they share (the same prompt) would be on both sides:
    a held-out row whose prompt is also a training row's trains instead. With every key distinct this
    is datasets' own train_test_split, row for row."""
    prompts = [json.dumps(p, sort_keys=True) for p in dataset["prompt"]]
    keys = list(groups) if groups is not None else prompts
    def n_test(n: int) -> int:  # datasets' own count (the ceiling), leaving at least one to train on
        return min(math.ceil(test_fraction * n), n - 1)

    if len(set(keys)) == len(keys) and len(set(prompts)) == len(prompts):
        if len(keys) < 2:
            return dataset, None
        split = dataset.train_test_split(test_size=n_test(len(keys)), seed=seed)
        return split["train"], split["test"]
    from datasets import Dataset

    distinct = list(dict.fromkeys(keys))
    if len(distinct) < 2:
        return dataset, None  # one prompt: nothing can be held out from it
    held = set(Dataset.from_dict({"key": distinct}).train_test_split(test_size=n_test(len(distinct)),
                                                                     seed=seed)["test"]["key"])
    trained = {p for p, k in zip(prompts, keys, strict=True) if k not in held}
    test = [i for i, (p, k) in enumerate(zip(prompts, keys, strict=True)) if k in held and p not in trained]
    if not test:
        return dataset, None
    train = sorted(set(range(len(keys))) - set(test))
    return dataset.select(train), dataset.select(test)


def skip_record(report, problem: str | Exception) -> None:
    """A record `data.on_error=skip` leaves out: counted, kept in `report.problems` (a LoadReport or a
    PreferenceReport) for the error that names the first when nothing is left, and logged."""
    report.skipped += 1
    report.problems.append(str(problem))
    log.warning("skipped %s", problem)


def no_records(path: str | Path, skipped: int, problems: list[str], what: str = "examples") -> DataError:
    """The error for a data path that yielded nothing usable: empty, or every record skipped."""
    if skipped:
        return DataError(f"{path}: no usable {what}: all {skipped} records were skipped (the first: {problems[0]})")
    return DataError(f"{path}: no {what} in it (empty)")


# What a prompts file's record may be (sample, eval, ppo), for the error that names the one it is not.
PROMPT_RECORDS = ('{"prompt": "..."}, TRL\'s prompt-only {"prompt": [messages]}, {"messages": [...]} ending with the '
                  "user's turn, or an SFT record (alpaca, {messages}, {prompt, completion}: its last user message)")


def load_prompts(path: str | Path) -> list[str]:
    """Prompts for sampling/eval: {"prompt": str} JSONL, TRL's prompt-only {"prompt": [messages]}, {"messages"}
    ending with the user's turn, or any SFT format: of a conversation, its last user message."""
    prompts: list[str] = []
    fmt, cut = None, 0
    for where, record in iter_records(path):
        if isinstance(record, DataError):
            raise record
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {json_kind(record)}; a prompts file holds "
                            f"{PROMPT_RECORDS}")
        if "prompt" in record and "completion" not in record and not isinstance(record["prompt"], list):
            text = record["prompt"]
            if not isinstance(text, str):
                raise DataError(f"{where}: field 'prompt' must be a string or a list of messages, got {json_kind(text)}")
            if not text.strip():
                raise DataError(f"{where}: field 'prompt' is empty")
            if record.get("system"):  # a prompt here is one user message: nowhere to put it
                raise DataError(f"{where}: field 'system' is not used here: a prompt is one user message, sampled "
                                "after the policy's own system prompt (sft data.system_prompt); drop the field, or "
                                "say it in the prompt")
            prompts.append(text)
            continue
        if "prompt" in record and "completion" not in record:  # TRL's conversational prompt-only: the turns so far
            prompt = _with_system_field(record, _messages(record["prompt"], where, "prompt"), where, "prompt")
        elif "messages" in record and _ends_with_user(record["messages"]):  # a conversation waiting for its answer
            prompt = _with_system_field(record, _messages(record["messages"], where, "messages"), where, "messages")
        else:
            if fmt is None:
                try:
                    fmt = detect_format(record, where)
                except DataError:
                    raise DataError(f"{where}: cannot tell the prompt (keys: {', '.join(sorted(record)) or 'none'}); "
                                    f"a prompts file holds {PROMPT_RECORDS}") from None
            prompt, _ = to_prompt_completion(record, fmt, where, prompt_only=True)  # {"instruction": ...} alone
        user = next((m["content"] for m in reversed(prompt) if m["role"] == "user"), None)
        if user is None:
            raise DataError(f"{where}: no user message to use as the prompt")
        if not user.strip():
            raise DataError(f"{where}: the last user message, the prompt, is empty")
        cut += any(m["role"] != "user" or m["content"] != user for m in prompt)
        prompts.append(user)
    if not prompts:
        raise no_records(path, 0, [], "prompts")
    if cut:  # once a process: preflight reads the file before the stage does
        said_once(log.warning, "%s: %d of %d records have turns before their last user message (earlier turns, a "
                  "system message): only that message is the prompt, without them. Prompts are single-turn: give a "
                  "{\"prompt\": ...} JSONL that says each in full to sample or evaluate on it", path, cut, len(prompts))
    return prompts


def _ends_with_user(messages: Any) -> bool:
    return isinstance(messages, list) and bool(messages) and isinstance(messages[-1], dict) and \
        messages[-1].get("role") == "user"
