"""Preference data: every accepted format, prompt-level splits, K-wise batches, bad lines named."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from align.cli import main as align
from align.data import DataError
from align.preferences import load_preferences, ranking_batches, split_by_prompt

USER = [{"role": "user", "content": "How do I sync?"}]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def pairs(n: int, **extra) -> list[dict]:
    return [{"prompt": f"Question {i}?", "chosen": f"Thanks! Answer {i}.", "rejected": f"No. {i}", **extra}
            for i in range(n)]


def test_jsonl_strings_become_conversational_with_provenance(tmp_path):
    rows = pairs(10)
    rows[0].update(task_id=7, margin=2, agreement=0.75, annotators=["ann", "bob"], source="sft@1", batch="round-0")
    data, report = load_preferences(write_jsonl(tmp_path / "p.jsonl", rows), test_fraction=0.2, seed=0)
    row = next(r for r in data["train"].to_list() + data["test"].to_list() if r["task_id"] == "7")
    assert row["prompt"] == [{"role": "user", "content": "Question 0?"}]
    assert row["chosen"] == [{"role": "assistant", "content": "Thanks! Answer 0."}]
    assert row["rejected"] == [{"role": "assistant", "content": "No. 0"}]
    assert row["margin"] == 2.0 and row["agreement"] == 0.75 and row["annotators"] == ["ann", "bob"]
    assert row["source"] == "sft@1" and row["batch"] == "round-0"
    # Without task_id a pair is grouped by its prompt.
    assert all(t.startswith("prompt:") for t in data["train"]["task_id"] if t != "7")
    assert (report.train, report.test, report.split) == (8, 2, "by prompt")


def test_json_list_of_messages_and_implicit_prompt(tmp_path):
    system = {"role": "system", "content": "Be kind."}
    records = [
        {"prompt": [system, *USER], "chosen": [{"role": "assistant", "content": "Open Settings."}],
         "rejected": [{"role": "assistant", "content": "No."}]},
        # Anthropic-HH style: whole conversations, the shared start is the prompt.
        {"chosen": [*USER, {"role": "assistant", "content": "Open Settings."}],
         "rejected": [*USER, {"role": "assistant", "content": "No."}]},
    ]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(records))
    data, report = load_preferences(path, test_fraction=0)
    rows = data["train"].to_list()
    assert rows[0]["prompt"] == [system, *USER]
    assert rows[1]["prompt"] == USER and rows[1]["rejected"] == [{"role": "assistant", "content": "No."}]
    assert "test" not in data and report.split == "none"


def test_implicit_prompt_conversations_that_part_before_the_last_answer_are_refused(tmp_path):
    """Without `prompt`, the shared turns are the prompt; conversations that part earlier left user turns in a side
    (DPO trained the policy to write them) or a prompt ending with the assistant, which an explicit prompt refuses."""
    def u(text):
        return {"role": "user", "content": text}

    def a(text):
        return {"role": "assistant", "content": text}

    other_reply = {"chosen": [u("Hi"), a("Hello! How can I help?"), u("Reset my password"), a("Settings > Account.")],
                   "rejected": [u("Hi"), a("What."), u("Reset my password"), a("No.")]}
    other_question = {"chosen": [u("Hi"), a("Hello!"), u("Thanks"), a("You're welcome.")],
                      "rejected": [u("Hi"), a("Hello!"), u("Bye"), a("Bye.")]}
    good = {"chosen": [u("Hi"), a("Hello!"), u("Thanks"), a("You're welcome.")],
            "rejected": [u("Hi"), a("Hello!"), u("Thanks"), a("Whatever.")]}
    path = write_jsonl(tmp_path / "hh.jsonl", [good, other_reply, other_question])
    with pytest.raises(DataError, match=r"hh.jsonl:2: chosen and rejected part at message 2, before their last answer: "
                                        r"without 'prompt' the turns they share are the prompt, and 'chosen' would hold "
                                        r"a user turn"):
        load_preferences(path)
    data, report = load_preferences(path, test_fraction=0, on_error="skip")
    assert report.skipped == 2 and len(data["train"]) == 1 and data["train"][0]["prompt"][-1] == u("Thanks")
    assert "hh.jsonl:3: chosen and rejected part at message 3, after the assistant's turn" in report.problems[1]


def test_ultrafeedback_sides_that_repeat_the_prompt_are_cut_to_the_answer(tmp_path):
    """HuggingFaceH4/ultrafeedback_binarized: `prompt` a string, each side the whole conversation opening with
    it. The user's turn is the prompt once, not again at the start of each side."""
    record = {"prompt": "How do I sync?", "chosen": [*USER, {"role": "assistant", "content": "Open Settings."}],
              "rejected": [*USER, {"role": "assistant", "content": "No."}]}
    path = write_jsonl(tmp_path / "uf.jsonl", [record])
    row = load_preferences(path, test_fraction=0)[0]["train"][0]
    assert row["prompt"] == USER and row["chosen"] == [{"role": "assistant", "content": "Open Settings."}]


def test_a_records_system_field_is_the_prompts_system_turn_as_in_sft(tmp_path):
    """LLaMA-Factory's `system` field, which SFT trains as a leading system turn, was dropped from a pair: DPO and
    the reward model then saw the prompt without the system turn the policy was trained with."""
    system = {"role": "system", "content": "Answer in French."}
    answers = {"chosen": "Ouvrez Réglages.", "rejected": "No."}
    hh = {"chosen": [*USER, {"role": "assistant", "content": "Ouvrez Réglages."}],
          "rejected": [*USER, {"role": "assistant", "content": "No."}]}
    path = write_jsonl(tmp_path / "s.jsonl", [
        {"system": "Answer in French.", "prompt": "How do I sync?", **answers},
        {"system": "Answer in French.", "prompt": [system, *USER], **answers},  # the same turn, given twice: once
        {"system": "Answer in French.", **hh},  # implicit prompt
        {"system": "", "prompt": "How do I sync?", **answers}])  # empty: no turn, as in SFT
    prompts = load_preferences(path, test_fraction=0)[0]["train"]["prompt"]
    assert prompts == [[system, *USER]] * 3 + [USER]


def test_parquet_and_save_to_disk_folders(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset, DatasetDict

    pq.write_table(pa.Table.from_pylist(pairs(6)), tmp_path / "p.parquet")
    data, report = load_preferences(tmp_path / "p.parquet", test_fraction=0.5, seed=1)
    assert len(data["train"]) == 3 and len(data["test"]) == 3 and report.format == "parquet"

    # align export's output: a DatasetDict whose test split is kept as given.
    conv = [{"prompt": USER, "chosen": [{"role": "assistant", "content": f"Yes {i}"}],
             "rejected": [{"role": "assistant", "content": f"No {i}"}], "task_id": f"t{i // 3}", "margin": 1,
             "agreement": 1.0, "annotators": ["a"], "source": "sft", "prompt_id": "p0", "batch": "round-0"}
            for i in range(9)]
    DatasetDict({"train": Dataset.from_list(conv[:6]), "test": Dataset.from_list(conv[6:])}).save_to_disk(
        str(tmp_path / "prefs"))
    data, report = load_preferences(tmp_path / "prefs")
    assert (len(data["train"]), len(data["test"]), report.split) == (6, 3, "given")
    assert data["test"]["task_id"] == ["t2"] * 3

    # No test split: validation is the held-out one, as SFT reads it; another split is ignored, with a warning.
    DatasetDict({"train": Dataset.from_list(pairs(6)), "validation": Dataset.from_list(conv[6:]),
                 "extra": Dataset.from_list(pairs(2))}).save_to_disk(str(tmp_path / "validation"))
    data, report = load_preferences(tmp_path / "validation", test_fraction=0.5)
    assert (len(data["train"]), len(data["test"]), report.split) == (6, 3, "given")
    assert data["test"]["task_id"] == ["t2"] * 3

    # UltraFeedback saved from the Hub (load_dataset(id).save_to_disk): its train_prefs, test_prefs held out,
    # its SFT and generation splits ignored; it was refused for having no 'train' split.
    DatasetDict({"train_prefs": Dataset.from_list(pairs(6)), "test_prefs": Dataset.from_list(conv[6:]),
                 "train_sft": Dataset.from_list(pairs(2)), "test_gen": Dataset.from_list(pairs(2))}).save_to_disk(
        str(tmp_path / "ultrafeedback"))
    data, report = load_preferences(tmp_path / "ultrafeedback")
    assert (len(data["train"]), len(data["test"]), report.split) == (6, 3, "given")
    assert data["test"]["task_id"] == ["t2"] * 3

    # A single saved Dataset: split by prompt.
    Dataset.from_list(pairs(10)).save_to_disk(str(tmp_path / "single"))
    data, report = load_preferences(tmp_path / "single", test_fraction=0.3)
    assert (len(data["train"]), len(data["test"]), report.split) == (7, 3, "by prompt")


def test_split_by_prompt_keeps_every_prompt_on_one_side():
    rows = [{"prompt": [{"role": "user", "content": f"q{i % 10}"}], "n": i} for i in range(60)]
    train, test = split_by_prompt(rows, 0.2, seed=3)
    seen_train = {r["prompt"][0]["content"] for r in train}
    seen_test = {r["prompt"][0]["content"] for r in test}
    assert not seen_train & seen_test
    assert len(seen_test) == 2 and len(train) + len(test) == 60


def test_split_by_prompt_splits_each_batch_on_its_own_and_a_prompt_stays_with_its_first_batch():
    def row(batch, q):
        return {"prompt": [{"role": "user", "content": q}], "batch": batch}

    first = [row("a", f"q{i}") for i in range(10)]
    alone = split_by_prompt(first, 0.2, seed=3)
    # A second batch, which asks two of the first batch's prompts again: they keep the side they had.
    second = [row("b", f"r{i}") for i in range(10)] + [row("b", "q0"), row("b", "q1")]
    train, test = split_by_prompt(first + second, 0.2, seed=3)
    side = {r["prompt"][0]["content"]: "test" for r in test} | {r["prompt"][0]["content"]: "train" for r in train}
    assert len(side) == 20
    assert all(side[r["prompt"][0]["content"]] == s for s, part in zip(("train", "test"), alone, strict=True) for r in part)
    assert sum(s == "test" and q.startswith("r") for q, s in side.items()) == 2
    # Batches of one prompt each: the first cannot hold its one out, the second holds out the one owed.
    train, test = split_by_prompt([row(f"b{i}", f"q{i}") for i in range(5)], 0.2, seed=0)
    assert (len(train), len(test)) == (4, 1) and test[0]["prompt"][0]["content"] == "q1"


@pytest.mark.parametrize("later", [4, 12])
def test_a_later_rounds_export_keeps_round_zeros_small_split(later):
    """Round 0 of 4 prompts at 0.1 holds out one alone. With a round of 4 after it each batch held out its
    rounded share, none, and the pooled fallback then held out one of all 8, a prompt round 0 trained on;
    with 12 after it round 0's held-out prompt went to training."""
    def row(batch, q):
        return {"prompt": [{"role": "user", "content": q}], "batch": batch}

    first = [row("round-0", f"round-0-p{i}") for i in range(4) for _ in range(6)]
    alone = {r["prompt"][0]["content"] for r in split_by_prompt(first, 0.1, seed=0)[1]}
    assert len(alone) == 1
    second = [row("round-1", f"round-1-p{i}") for i in range(later) for _ in range(6)]
    test = {r["prompt"][0]["content"] for r in split_by_prompt(first + second, 0.1, seed=0)[1]}
    assert {q for q in test if q.startswith("round-0")} == alone
    assert len(test) == max(1, round((4 + later) * 0.1))  # round 1 adds its share of the whole: none at 8 prompts, one at 16


BAD = [
    ("{not json", r"not JSON"),
    ("[1, 2]", r"expected a JSON object"),
    ({"prompt": "q", "rejected": "no"}, r"missing field 'chosen'"),
    ({"prompt": "q", "chosen": "yes", "rejected": "  "}, r"field 'rejected' is empty"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, r"chosen and rejected are identical"),
    ({"prompt": [{"role": "bot", "content": "q"}], "chosen": "a", "rejected": "b"}, r"prompt\[0\].role 'bot'"),
    ({"prompt": [{"role": "assistant", "content": "q"}], "chosen": "a", "rejected": "b"},
     r"last message of 'prompt' must be the user's"),
    ({"prompt": "q", "chosen": 5, "rejected": "b"}, r"field 'chosen' must be a string or a non-empty list"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}, r"field 'margin' must be a finite number"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "agreement": 1.5}, r"field 'agreement' is 1.5, outside"),
    ('{"prompt": "q", "chosen": "a", "rejected": "b", "weight": 1e309}', r"field 'weight' must be a finite number, "
                                                                           r"got inf"),
    ('{"prompt": "q", "chosen": "a", "rejected": "b", "weight": 1' + "0" * 400 + "}",
     r"field 'weight' must be a finite number, got 10000000000000000000\.\.\. \(401 characters\)"),
    ('{"prompt": "q", "chosen": "a", "rejected": "b", "margin": Infinity}', r"field 'margin' must be a finite number"),
    ('{"prompt": "q", "chosen": "a", "rejected": "b", "p_chosen": NaN}', r"field 'p_chosen' must be a finite number"),
    ({"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
     r"missing field 'prompt'"),
    ({"prompt": "q", "chosen": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "a"}],
      "rejected": "b"}, r"'chosen' holds a user turn that is not the prompt's"),
    ({"prompt": "q", "chosen": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
      "rejected": "b"}, r"'chosen' holds a system turn that is not the prompt's"),
    ({"chosen": [*USER, {"role": "assistant", "content": "a"}],
      "rejected": [*USER, {"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}]},
     r"'rejected' holds a system message after the turns it shares"),
    ({"prompt": [*USER, {"role": "system", "content": "s"}, *USER], "chosen": "a", "rejected": "b"},
     r"prompt\[1\] is a system message after the conversation began"),
    ({"system": "Be brief.", "prompt": [{"role": "system", "content": "Be kind."}, *USER], "chosen": "a",
      "rejected": "b"}, r"field 'system' and a system message in 'prompt'"),
    ({"system": 3, "prompt": "q", "chosen": "a", "rejected": "b"}, r"field 'system' must be a string, got number"),
    ({"prompt": [{"role": {"r": 1}, "content": "q"}], "chosen": "a", "rejected": "b"}, r"prompt\[0\]\.role .* is not one of"),
]


BAD_IDS = ["not-json", "not-object", "missing-chosen", "empty", "identical", "bad-role", "prompt-ends-assistant",
           "wrong-type", "margin-text", "agreement-range", "weight-1e309", "weight-400-digits",
           "margin-infinity", "p-chosen-nan", "no-prompt", "user-turn-in-side", "system-turn-in-side", "system-in-implicit-side", "system-mid-prompt", "system-twice", "system-not-text", "role-not-text"]


@pytest.mark.parametrize("bad, message", BAD, ids=BAD_IDS)
def test_bad_record_names_file_line_and_problem(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "p.jsonl", [pairs(1)[0], bad, pairs(2)[1]])
    with pytest.raises(DataError, match=rf"{path}:2: .*{message}"):
        load_preferences(path)
    data, report = load_preferences(path, on_error="skip", test_fraction=0)
    assert report.skipped == 1 and len(data["train"]) == 2 and "p.jsonl:2" in report.problems[0]


def test_bad_row_in_a_dataset_folder_is_named(tmp_path):
    from datasets import Dataset

    rows = pairs(3)
    rows[2]["rejected"] = rows[2]["chosen"]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "prefs"))
    with pytest.raises(DataError, match=r"prefs train row 2: chosen and rejected are identical"):
        load_preferences(tmp_path / "prefs")


def test_cli_reports_a_bad_line_and_exits_2(tmp_path, capsys):
    path = write_jsonl(tmp_path / "p.jsonl", [pairs(1)[0], {"prompt": "q", "chosen": "a"}])
    rc = align(["reward", f"data.path={path}", f"run.dir={tmp_path / 'run'}", "from_sft=false",
                "run.wandb=disabled"])
    assert rc == 2
    assert f"{path}:2: missing field 'rejected'" in capsys.readouterr().err


def test_ranking_batches_keep_each_ranking_in_one_batch():
    # Rankings of 6, 3 and 1 pairs (K=4, K=3, K=2), shuffled into the index order.
    groups = [f"t{i}" for i in range(12) for _ in range([6, 3, 1][i % 3])]
    batches = ranking_batches(groups, batch_size=8, seed=0)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(groups)))  # every pair exactly once
    assert all(len(b) <= 8 for b in batches)
    where = {}
    for n, batch in enumerate(batches):
        for i in batch:
            where.setdefault(groups[i], set()).add(n)
    assert all(len(s) == 1 for s in where.values()), "a ranking was split across batches"
    # Packed first-fit: close to full, not one ranking per batch.
    assert len(batches) <= len(groups) // 8 + 3
    assert ranking_batches(groups, 8, seed=1) != batches  # reshuffled per seed (epoch)


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_ranking_batches_are_dealt_whole_to_every_process(processes):
    """Under accelerate launch each process gets every n-th batch: every pair seen in an epoch, the same
    number of steps on every rank (a rank with fewer would hang the others in their all-reduce)."""
    import torch
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader

    from align.preferences import RankingBatchSampler

    # 60 rankings of 6, 5 or 3 pairs (K=4, some ties dropped): batches of 12 come out short, not full
    groups = [f"t{i}" for i in range(60) for _ in range([6, 6, 5, 3][i % 4])]
    per_rank = []
    for rank in range(processes):
        loader = DataLoader(list(range(len(groups))), batch_sampler=RankingBatchSampler(groups, 12, seed=0))
        if processes > 1:
            loader = prepare_data_loader(loader, device=torch.device("cpu"), num_processes=processes,
                                         process_index=rank, put_on_device=False)
        per_rank.append([b.tolist() for b in loader])
        assert len(per_rank[-1]) == len(loader)
    assert len({len(b) for b in per_rank}) == 1, [len(b) for b in per_rank]
    seen = {i for batches in per_rank for batch in batches for i in batch}
    assert seen == set(range(len(groups)))
    for batches in per_rank:
        assert all(len({groups[i] for i in b}) * 3 <= len(b) for b in batches)  # whole rankings, not single pairs


def test_a_ranking_larger_than_the_batch_fills_whole_batches():
    groups = ["big"] * 10 + ["small"] * 2
    sizes = Counter(len(b) for b in ranking_batches(groups, batch_size=4, seed=0))
    assert sum(k * v for k, v in sizes.items()) == 12 and max(sizes) == 4


def test_a_hub_dataset_id_is_told_to_be_saved_to_a_folder_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"HuggingFaceH4/ultrafeedback_binarized: no such file or folder .*if it is a "
                                        r"Hugging Face Hub dataset id.*save_to_disk\('data/ultrafeedback_binarized'\)"):
        load_preferences("HuggingFaceH4/ultrafeedback_binarized")


def test_small_batches_hold_out_their_share_not_one_each():
    """The floor of one held-out prompt applied to every batch: ten batches of 3 prompts at 0.1 held out 10 of 30,
    twenty of 2 held out 20 of 40. Each batch holds out its share rounded now, and the floor is the whole split's."""
    rows = [{"prompt": [{"role": "user", "content": f"q{b}-{i}"}], "batch": f"b{b}"} for b in range(10) for i in range(3)]
    train, test = split_by_prompt(rows, 0.1, seed=0)
    assert (len(train), len(test)) == (27, 3)  # no batch's share reaches a prompt: split together, 10 %
    rows = [{"prompt": [{"role": "user", "content": f"q{b}-{i}"}], "batch": f"b{b}"} for b in range(4) for i in range(10)]
    train, test = split_by_prompt(rows, 0.1, seed=0)
    assert (len(train), len(test)) == (36, 4)
