"""Preference data (prompt / chosen / rejected) in every accepted format, validated row by row.

Accepted, for `align reward` and `align dpo`:
  a `datasets.save_to_disk` folder (what `align export` writes): a DatasetDict with train[/test]
  splits (no test: validation is the held-out split, as in SFT; no train: UltraFeedback's
  train_prefs/test_prefs, or the only train* split and its test*), or a single Dataset;
  .jsonl, .json (a list or JSON lines) and .parquet files, one pair per record.

A record has `prompt`, `chosen`, `rejected`, each a string or a list of chat messages
(`{"role", "content"}`); strings become TRL's conversational form (prompt = one user turn,
chosen/rejected = one assistant turn). Without `prompt`, chosen and rejected may be whole
conversations: their shared leading turns become the prompt, which must end with the user's turn,
and neither side may hold one (conversations that part before their last answer are refused).
A `system` field is the prompt's leading system turn, as in SFT data (beside a system message: an error).
Provenance columns are kept when present: task_id (the ranking a pair came from), batch,
annotators, agreement, margin, source, prompt_id, votes_chosen / votes_rejected (annotators who
ordered the pair each way), tie (a tie kept by ties=margin0; align dpo leaves it out), chosen_finished / rejected_finished (false: the response was cut at the
sampler's max_new_tokens; DPO trains no end of turn after it), and the reliability columns of `align export combine=dawid_skene`: p_chosen (the posterior probability that
chosen is the better one, a soft label in [0, 1]) and weight (>= 0), which `align reward` trains with.
A pair without task_id is grouped by its prompt, so pairs of one prompt count as one ranking. A bad
record is an error naming the file, the line (or row) and the problem.

Without a test split, one is made by prompt: every pair of a prompt lands on the same side, so
the held-out accuracy measures prompts the model never saw.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Sampler

from align.data import (
    DataError,
    _with_system_field,
    check_prompt,
    iter_records,
    json_kind,
    load_dataset_folder,
    missing,
    no_records,
    no_train_split,
    skip_record,
    split_roles,
    with_system_prompt,
)
from align.labeling.export import split_by_prompt  # the export's rule: every prompt on one side only

log = logging.getLogger(__name__)

ROLES = {"system", "user", "assistant"}
PROVENANCE = ("task_id", "batch", "annotators", "agreement", "margin", "source", "prompt_id", "votes_chosen",
              "votes_rejected", "p_chosen", "weight", "tie", "chosen_finished", "rejected_finished")
# True/false columns: tie (a tie align export kept, ties=margin0: no right answer to score) and whether
# each response ended or was cut at the sampler's max_new_tokens (align dpo trains no end of turn there).
FLAGS = ("tie", "chosen_finished", "rejected_finished")
# Numeric columns and their allowed range (low, high or None).
NUMBERS = {"agreement": (0, 1), "margin": (0, None), "p_chosen": (0, 1), "weight": (0, None)}


@dataclass
class PreferenceReport:
    path: str
    format: str
    train: int = 0
    test: int = 0
    split: str = "given"  # given | by prompt | none
    skipped: int = 0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.path}: {self.train} train / {self.test} held-out pairs ({self.format}, test split "
                f"{self.split}), {self.skipped} skipped")


# ---------------------------------------------------------------------------- one record


def _messages(value: Any, where: str, key: str, last_role: str | None) -> list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field {key!r} is empty")
        return [{"role": "user" if key == "prompt" else "assistant", "content": value}]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {key!r} must be a string or a non-empty list of messages, "
                        f"got {json_kind(value) if value != [] else 'an empty list'}")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), str) or "role" not in msg:
            raise DataError(f"{where}: {key}[{i}] must be an object with 'role' and string 'content'")
        if not isinstance(msg["role"], str) or msg["role"] not in ROLES:
            raise DataError(f"{where}: {key}[{i}].role {msg['role']!r} is not one of {sorted(ROLES)}")
        out.append({"role": msg["role"], "content": msg["content"]})
    if last_role and out[-1]["role"] != last_role:
        raise DataError(f"{where}: the last message of {key!r} must be the {last_role}'s, got {out[-1]['role']!r}")
    if not out[-1]["content"].strip():
        raise DataError(f"{where}: the last message of {key!r} is empty")
    return out


def _provenance(record: dict, where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("task_id", "batch", "source", "prompt_id"):
        if record.get(key) is not None:
            out[key] = str(record[key])
    for key, (low, high) in NUMBERS.items():
        value = record.get(key)
        if value is None:
            continue
        # Finite: JSON's 1e309 and Python's Infinity read as inf, and one infinite weight makes every weight
        # 0 or NaN once the reward stage normalises them to mean 1; an integer past a float's range (a 400-digit
        # one) has no float at all (OverflowError).
        try:
            finite = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
        except OverflowError:
            finite = False
        if not finite:
            shown = repr(value) if len(repr(value)) <= 40 else f"{repr(value)[:20]}... ({len(repr(value))} characters)"
            raise DataError(f"{where}: field {key!r} must be a finite number, got {shown}")
        if value < low or (high is not None and value > high):
            raise DataError(f"{where}: field {key!r} is {value}, outside {f'[{low}, {high}]' if high else f'>= {low}'}")
        out[key] = float(value)
    for key in ("votes_chosen", "votes_rejected"):
        value = record.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise DataError(f"{where}: field {key!r} must be a whole number >= 0, got {value!r}")
        out[key] = value
    annotators = record.get("annotators")
    if annotators is not None:
        if not isinstance(annotators, list) or not all(isinstance(a, str) for a in annotators):
            raise DataError(f"{where}: field 'annotators' must be a list of names")
        out["annotators"] = annotators
    for key in FLAGS:
        if record.get(key) is not None:
            if not isinstance(record[key], bool):
                raise DataError(f"{where}: field {key!r} must be true or false, got {record[key]!r}")
            out[key] = record[key]
    return out


def to_pair(record: Any, where: str) -> dict[str, Any]:
    """One record → {prompt, chosen, rejected (conversational), provenance...}, or a DataError."""
    if isinstance(record, DataError):
        raise record
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {json_kind(record)}")
    for key in ("chosen", "rejected"):
        if record.get(key) is None:
            raise DataError(f"{where}: missing field {key!r}")
    if record.get("prompt") is None:
        # Implicit prompt (e.g. Anthropic HH): whole conversations whose shared start is the prompt.
        chosen = _messages(record["chosen"], where, "chosen", "assistant")
        rejected = _messages(record["rejected"], where, "rejected", "assistant")
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        if n == 0:
            raise DataError(f"{where}: missing field 'prompt' (and chosen/rejected share no leading messages)")
        prompt, chosen, rejected = check_prompt(chosen[:n], where, "chosen"), chosen[n:], rejected[n:]
        # The checks an explicit prompt gets: conversations that part before their last answer (a different
        # reply, then the user again) compare two conversations, and DPO would train the user's turns.
        if prompt[-1]["role"] != "user":
            raise DataError(f"{where}: chosen and rejected part at message {n + 1}, after the {prompt[-1]['role']}'s "
                            "turn: without 'prompt' the turns they share are the prompt, which must end with the "
                            "user's (a pair is two answers to one conversation)")
        for key, side in (("chosen", chosen), ("rejected", rejected)):
            if any(m["role"] == "system" for m in side):
                raise DataError(f"{where}: {key!r} holds a system message after the turns it shares with the other "
                                "side: a system message can only open the conversation")
            if any(m["role"] == "user" for m in side):
                raise DataError(f"{where}: chosen and rejected part at message {n + 1}, before their last answer: "
                                f"without 'prompt' the turns they share are the prompt, and {key!r} would hold a "
                                "user turn, trained as the answer (a pair is two answers to one conversation)")
    else:
        prompt = check_prompt(_messages(record["prompt"], where, "prompt", "user"), where, "prompt")
        chosen = _messages(record["chosen"], where, "chosen", "assistant")
        rejected = _messages(record["rejected"], where, "rejected", "assistant")
        # UltraFeedback's shape (HuggingFaceH4/ultrafeedback_binarized): the prompt, and each side the whole
        # conversation opening with it. Kept as is, prompt + side would hold the user's turn twice.
        n = len(prompt)
        if chosen[:n] == prompt and rejected[:n] == prompt and len(chosen) > n and len(rejected) > n:
            chosen, rejected = chosen[n:], rejected[n:]
        for key, side in (("chosen", chosen), ("rejected", rejected)):
            other = next((m["role"] for m in side if m["role"] != "assistant"), None)
            if other:  # trained as the answer: a user turn would teach the model to write it, a system one to say it
                raise DataError(f"{where}: {key!r} holds a {other} turn that is not the prompt's: put the conversation "
                                "before the answer in 'prompt' and only the answer in 'chosen' and 'rejected'")
    if chosen == rejected:
        raise DataError(f"{where}: chosen and rejected are identical (a pair must prefer one answer)")
    # A `system` field (LLaMA-Factory style), as SFT reads it: the prompt's leading system turn.
    prompt = _with_system_field(record, prompt, where, "prompt" if record.get("prompt") is not None else "chosen")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **_provenance(record, where)}


def group_key(pair: dict[str, Any]) -> str:
    """The ranking a pair belongs to: its task_id, else its prompt (pairs of one prompt = one ranking)."""
    if pair.get("task_id"):
        return str(pair["task_id"])
    return "prompt:" + hashlib.sha1(json.dumps(pair["prompt"], sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- whole datasets


def _iter_folder(path: Path) -> Iterator[tuple[str, str, Any]]:
    from datasets import Dataset, DatasetDict

    ds = load_dataset_folder(path)
    splits = dict(ds) if isinstance(ds, DatasetDict) else {"train": ds} if isinstance(ds, Dataset) else {}
    # SFT's rule (split_roles), with UltraFeedback's train_prefs as the conventional name: the held-out pairs are
    # that name with test, else validation (test_prefs), as given.
    train, held_out = split_roles(list(splits), "train_prefs")
    if train is None:
        raise no_train_split(path, list(splits))
    unknown = [s for s in splits if s not in (train, held_out)]
    if unknown:
        log.warning("%s: ignoring splits %s (only %s%s are used)", path, unknown, train,
                    f", and {held_out} as the held-out set," if held_out else "")
    for split, role in ((train, "train"), (held_out, "test")):
        for i, row in enumerate(splits.get(split, []) if split else []):
            yield role, f"{path} {split} row {i}", row


def _rows_to_dataset(rows: list[dict[str, Any]], present: list[dict[str, Any]] | None = None):
    """`present`: the rows whose keys make the columns (default `rows`): every split of one file gets the same."""
    from datasets import Dataset

    # Provenance present in some rows only still becomes a column (None elsewhere); task_id is
    # always filled so K-wise grouping and prompt-level splits have a key.
    present = rows if present is None else present
    keys = ["prompt", "chosen", "rejected"] + [k for k in PROVENANCE if any(k in r for r in present)]
    columns = {k: [r.get(k) for r in rows] for k in keys}
    columns["task_id"] = [group_key(r) for r in rows]
    return Dataset.from_dict(columns)


def read_preference_pairs(path: str | Path, *, on_error: str = "raise") -> tuple[dict[str, list], PreferenceReport]:
    """Read and validate every record: ({"train": pairs, "test": pairs}, PreferenceReport), nothing split yet."""
    path = Path(path)
    if not path.exists():
        raise missing(path, " (run `align export` first, or pass data.path=...)")
    fmt = "dataset folder" if path.is_dir() else path.suffix.lstrip(".") or "jsonl"
    records = _iter_folder(path) if path.is_dir() else (("train", w, r) for w, r in iter_records(path))
    report = PreferenceReport(str(path), fmt)
    rows: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    for split, where, record in records:
        try:
            rows[split].append(to_pair(record, where))
        except DataError as err:
            if on_error == "raise":
                raise
            skip_record(report, err)
    if not rows["train"]:
        raise no_records(path, report.skipped, report.problems, "preference pairs")
    return rows, report


def load_preferences(path: str | Path, *, test_fraction: float = 0.1, seed: int = 0, on_error: str = "raise"):
    """Read, validate and convert; returns (DatasetDict with train[/test], PreferenceReport)."""
    from datasets import DatasetDict

    rows, report = read_preference_pairs(path, on_error=on_error)
    if not rows["test"]:
        rows["train"], rows["test"] = split_by_prompt(rows["train"], test_fraction, seed)
        report.split = "by prompt" if rows["test"] else "none"
    report.train, report.test = len(rows["train"]), len(rows["test"])
    log.info(report.summary())
    every = rows["train"] + rows["test"]  # a column some pairs carry is in every split (None where a pair lacks it)
    return DatasetDict({s: _rows_to_dataset(r, every) for s, r in rows.items() if r}), report


def add_system_prompt(data, system_prompt: str | None):
    """The pairs (a Dataset or DatasetDict) with `system_prompt` as each prompt's first turn, where it has
    no system turn of its own: the policy's (align.artifacts.system_prompt_of), so DPO and the reward
    model see the prompts the policy was trained and is sampled with."""
    if not system_prompt:
        return data
    return data.map(lambda row: {"prompt": with_system_prompt(row["prompt"], system_prompt)})


# ---------------------------------------------------------------------------- K-wise batches


def ranking_batches(groups: list[str], batch_size: int, seed: int) -> list[list[int]]:
    """Index batches in which the pairs of one ranking (same group) stay together.

    InstructGPT trains on all C(K,2) pairs of a K-wise ranking in one batch element, because
    pairs of one prompt are strongly correlated: shuffled apart, one prompt's pairs fill many
    batches and the model overfits it. Here each ranking's pairs go in one batch (a ranking with
    more pairs than the batch holds fills whole batches first); rankings are packed first-fit
    in a seeded random order, so some batches are a little short rather than split a ranking.
    """
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    rng = random.Random(seed)
    keys = list(by_group)
    rng.shuffle(keys)
    full: list[list[int]] = []
    open_bins: list[list[int]] = []
    for key in keys:
        idx = by_group[key]
        while len(idx) > batch_size:
            full.append(idx[:batch_size])
            idx = idx[batch_size:]
        target = next((b for b in open_bins if len(b) + len(idx) <= batch_size), None)
        if target is None:
            open_bins.append(list(idx))
        else:
            target.extend(idx)
            if len(target) == batch_size:
                open_bins.remove(target)
                full.append(target)
    batches = full + open_bins
    rng.shuffle(batches)
    return batches


class RankingBatchSampler(Sampler):
    """A batch sampler over `ranking_batches`, reshuffled every epoch (set_epoch, or each pass).

    First-fit packing of a new order can give a batch more or fewer than the first epoch's
    count; the Trainer sizes every epoch by `len()` (the first), so an epoch may end a few
    batches early or late.

    `batch_size` is None, as accelerate reads it: the batches are of several sizes. Under several
    processes its BatchSamplerShard deals them out in turn; with a size set it would keep a round
    only when the last process's batch has exactly that many pairs, dropping the others unseen
    and leaving the ranks with different step counts (a hang in the first all-reduce).
    """

    batch_size = None

    def __init__(self, groups: list[str], pairs_per_batch: int, seed: int = 0):
        self.groups, self.pairs_per_batch, self.seed = list(groups), pairs_per_batch, seed
        self.epoch = 0
        self._len = len(ranking_batches(self.groups, pairs_per_batch, seed))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        batches = ranking_batches(self.groups, self.pairs_per_batch, self.seed + self.epoch)
        self.epoch += 1
        yield from batches

    def __len__(self) -> int:
        return self._len
