"""Every accepted instruction-data format, and every kind of bad record, named by file and line."""

from __future__ import annotations

import json

import pytest

from align.data import DataError, load_prompts, load_sft_dataset

USER = [{"role": "user", "content": "How do I export a note?"}]
ASSISTANT = [{"role": "assistant", "content": "Open the note, then File > Export."}]


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def expect_one(ds):
    assert ds["prompt"][0][-1] == {"role": "user", "content": "How do I export a note?"}
    assert ds["completion"][0] == ASSISTANT


def test_alpaca_jsonl_and_input_is_appended(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "How do I export a note?", "input": "", "output": "Open the note, then File > Export."},
        {"instruction": "Why was I charged?", "input": "Order 1234", "output": "Let me check that."},
    ])
    ds, report = load_sft_dataset(path)
    assert report.format == "alpaca" and report.used == 2 and report.skipped == 0
    expect_one(ds)
    assert ds["prompt"][1][0]["content"] == "Why was I charged?\n\nOrder 1234"


def test_alpaca_json_list(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"instruction": "How do I export a note?", "output": ASSISTANT[0]["content"]}]))
    ds, _ = load_sft_dataset(path)
    expect_one(ds)


def test_a_bad_item_of_a_json_list_is_named_by_the_line_it_starts_on(tmp_path):
    """A .json list's records have lines too: "item 1" (0-based, and counted by the user) was all it said."""
    path = tmp_path / "list.json"
    path.write_text('[\n{"instruction": "a", "output": "b"},\n\n  {"instruction": "x",\n "output": "y"}, '
                    '{"instruction": "", "output": "b"}\n]')
    with pytest.raises(DataError, match=r"list.json:5 \(item 3\): field 'instruction' is empty"):
        load_sft_dataset(path)
    ds, report = load_sft_dataset(path, on_error="skip")
    assert report.used == 2 and report.problems == [f"{path}:5 (item 3): field 'instruction' is empty"]


def test_a_records_system_field_and_alpacas_history_are_turns_not_dropped(tmp_path):
    """LLaMA-Factory's alpaca carries `system` and `history` ([query, response] pairs before this turn); both were
    dropped without a word, as was `system` beside {prompt, completion} or {messages}."""
    system = {"role": "system", "content": "Answer in French."}
    path = write_jsonl(tmp_path / "a.jsonl", [{
        "system": "Answer in French.", "history": [["Hi", "Bonjour !"]], "instruction": "How do I export a note?",
        "input": "", "output": "Open the note, then File > Export."}])
    ds, report = load_sft_dataset(path, system_prompt="Be brief.")  # the record's own system wins, as a turn's does
    hi = [system, {"role": "user", "content": "Hi"}]
    assert ds["prompt"] == [hi, [*hi, {"role": "assistant", "content": "Bonjour !"}, *USER]]
    assert ds["completion"] == [[{"role": "assistant", "content": "Bonjour !"}], ASSISTANT]
    assert report.earlier_turns == 1
    last, _ = load_sft_dataset(path, turns="last")  # the history is context only
    assert len(last) == 1 and last["prompt"][0][-1] == USER[0]
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"system": "Answer in French.", "prompt": USER[0]["content"],
                                              "completion": ASSISTANT[0]["content"]},
                                             {"system": "Answer in French.", "prompt": USER, "completion": ASSISTANT}])
    assert load_sft_dataset(pc)[0]["prompt"] == [[system, *USER]] * 2
    chat = write_jsonl(tmp_path / "m.jsonl", [{"system": "Answer in French.", "messages": [*USER, *ASSISTANT]}])
    assert load_sft_dataset(chat)[0]["prompt"] == [[system, *USER]]


def test_the_system_turn_every_example_opens_with_is_reported_and_different_ones_are_warned_about(tmp_path, caplog):
    """Without data.system_prompt, the system turn every example opens with (a `system` field or the conversation's
    own) is the report's `system`, which the SFT manifest records; different ones are warned about once, since
    later stages then prompt the policy without any."""
    same = write_jsonl(tmp_path / "same.jsonl", [
        {"system": "Answer in French.", "messages": [*USER, *ASSISTANT]},
        {"messages": [{"role": "system", "content": "Answer in French."}, *USER, *ASSISTANT]}])
    assert load_sft_dataset(same)[1].system == "Answer in French."
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "How do I export a note?", "completion": "File > Export."}])
    assert load_sft_dataset(plain, system_prompt="Be brief.")[1].system == "Be brief."
    # data.system_prompt does not replace an example's own system turn: with every example keeping one, none trained
    # with it, and the one they share is the policy's system prompt; with some, they are counted and warned about
    with caplog.at_level("WARNING"):
        assert load_sft_dataset(same, system_prompt="Be brief.")[1].system == "Answer in French."
        _, report = load_sft_dataset(write_jsonl(tmp_path / "some.jsonl", [
            {"system": "Answer in French.", "prompt": "How do I export a note?", "completion": "Fichier > Exporter."},
            {"prompt": "How do I export a note?", "completion": "File > Export."},
            {"prompt": "How do I sync?", "completion": "Tap Sync."}]), system_prompt="Be brief.")
    assert report.system is None and report.own_system == 1
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2 and "every example opens with a system turn of its own" in warned[0], warned
    assert "none trained with data.system_prompt" in warned[0] and "'Answer in French.'" in warned[0]
    assert "1 of 3 examples open with a system turn of their own" in warned[1]
    assert "prompt the policy with data.system_prompt, as the other 2 trained" in warned[1]
    caplog.clear()
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [
        {"system": "Answer in French.", "prompt": "How do I export a note?", "completion": "Fichier > Exporter."},
        {"system": "Answer in German.", "prompt": "How do I export a note?", "completion": "Datei > Exportieren."},
        {"prompt": "How do I export a note?", "completion": "File > Export."}])
    with caplog.at_level("WARNING"):
        _, report = load_sft_dataset(mixed)
    assert report.system is None
    warned = [r.getMessage() for r in caplog.records if "system turn" in r.getMessage()]
    assert len(warned) == 1 and "2 of 3 examples open with a system turn (2 different ones)" in warned[0]
    assert "data.system_prompt" in warned[0]
    caplog.clear()
    assert load_sft_dataset(plain)[1].system is None and not caplog.records


@pytest.mark.parametrize("record, problem", [
    ({"history": [["Hi"]]}, r"history\[0\] must be a \[query, response\] pair of strings, got \[\"Hi\"\]"),
    ({"history": "Hi"}, r"field 'history' must be a list of \[query, response\] pairs \(the earlier turns\), got string"),
    ({"history": [["", "x"]]}, r"history\[0\]'s query is empty"),
    ({"system": 3}, r"field 'system' must be a string, got number"),
])
def test_a_bad_system_or_history_field_is_named(tmp_path, record, problem):
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD, {**GOOD, **record}])
    with pytest.raises(DataError, match=rf"a.jsonl:2: {problem}"):
        load_sft_dataset(path)
    chat = write_jsonl(tmp_path / "m.jsonl", [{"system": "S", "messages": [{"role": "system", "content": "T"}, *USER,
                                                                           *ASSISTANT]}])
    with pytest.raises(DataError, match=r"m.jsonl:1: field 'system' and a system message in 'messages'"):
        load_sft_dataset(chat)


def test_messages_jsonl_multi_turn(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [
        {"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, *USER, *ASSISTANT]}])
    ds, report = load_sft_dataset(path, turns="last")
    assert report.format == "messages"
    assert len(ds["prompt"][0]) == 4 and ds["prompt"][0][0]["role"] == "system"
    expect_one(ds)
    both, report = load_sft_dataset(path)  # turns=all: the earlier answer is an example too
    assert report.earlier_turns == 1 and [c[0]["content"] for c in both["completion"]] == ["Hello!", ASSISTANT[0]["content"]]
    assert both["prompt"][0] == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]


def test_prompt_completion_strings_and_messages(tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [
        {"prompt": "How do I export a note?", "completion": "Open the note, then File > Export."},
        {"prompt": USER, "completion": ASSISTANT},
    ])
    ds, report = load_sft_dataset(path)
    assert report.format == "prompt_completion" and report.used == 2
    assert ds["prompt"][0] == ds["prompt"][1] == USER
    assert ds["completion"][0] == ds["completion"][1] == ASSISTANT


def test_parquet_and_save_to_disk(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = {"instruction": ["How do I export a note?"], "input": [""], "output": [ASSISTANT[0]["content"]]}
    Dataset.from_dict(rows).to_parquet(str(tmp_path / "a.parquet"))
    expect_one(load_sft_dataset(tmp_path / "a.parquet")[0])
    DatasetDict({"train": Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "disk"))
    expect_one(load_sft_dataset(tmp_path / "disk")[0])


def test_a_hub_datasetdict_trains_on_its_train_sft_split_or_its_only_train_one(tmp_path, caplog):
    """A Hub dataset saved with load_dataset(id).save_to_disk(folder) keeps the Hub's split names: UltraFeedback's
    train_sft and test_sft (beside train_prefs, train_gen, ...), or a lone train_* split, train and hold out as
    train and test do; it was refused for having no 'train'. Several train_* splits: the error says how to pick."""
    from datasets import Dataset, DatasetDict

    from align.data import read_sft_examples

    def rows(tag: str, n: int):
        return Dataset.from_list([{"messages": [*USER, {"role": "assistant", "content": f"{tag} {i}"}]} for i in range(n)])

    DatasetDict({"train_prefs": rows("prefs", 4), "train_sft": rows("sft", 3), "test_sft": rows("held", 2),
                 "train_gen": rows("gen", 1)}).save_to_disk(str(tmp_path / "uf"))
    with caplog.at_level("WARNING"):
        ds, report = load_sft_dataset(tmp_path / "uf")
    assert [c[0]["content"] for c in ds["completion"]] == ["sft 0", "sft 1", "sft 2"]
    assert (report.train_split, report.held_out) == ("train_sft", "test_sft")
    assert "ignoring splits ['train_prefs', 'train_gen'] (only train_sft, and test_sft as the held-out set, are used)" \
        in caplog.text
    assert [c[0]["content"] for c in load_sft_dataset(tmp_path / "uf", split="test_sft")[0]["completion"]] == [
        "held 0", "held 1"]
    DatasetDict({"train_chat": rows("a", 2), "validation_chat": rows("b", 1)}).save_to_disk(str(tmp_path / "one"))
    assert read_sft_examples(tmp_path / "one")[2].held_out == "validation_chat"
    DatasetDict({"train_a": rows("a", 2), "train_b": rows("b", 1)}).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(DataError, match=r"two: a DatasetDict without a 'train' split \(has \['train_a', 'train_b'\]\), "
                                        r"and not one split named train\* to train on instead; pass the folder of the "
                                        r"split to train on, data.path=.*two/<split>"):
        load_sft_dataset(tmp_path / "two")
    assert len(load_sft_dataset(tmp_path / "two" / "train_b")[0]) == 1  # as the error says: a split's own folder


def test_a_hub_dataset_id_is_told_to_be_saved_to_a_folder_first(tmp_path, monkeypatch):
    """align reads local data only: a Hub id (owner/name) that is no file or folder here says how to save it,
    where it said only "no such file or folder"; a missing local file is not taken for one."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"^tatsu-lab/alpaca: no such file or folder; if it is a Hugging Face Hub "
                                        r"dataset id: align reads local files and folders only.*load_dataset\("
                                        r"'tatsu-lab/alpaca'\).save_to_disk\('data/alpaca'\).*pass data/alpaca"):
        load_sft_dataset("tatsu-lab/alpaca")
    with pytest.raises(DataError, match=r"^data/train.jsonl: no such file or folder$"):
        load_sft_dataset("data/train.jsonl")


def test_the_shipped_default_data_missing_says_it_comes_with_the_checkout(tmp_path, monkeypatch):
    """Installed from a wheel and run outside the checkout, the default data.path (data/support/...) is not there:
    the error says where it lives, not only that it is missing."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"^data/support/train.jsonl: no such file or folder; it is the shipped "
                                        r"default, which comes with align's source checkout"):
        load_sft_dataset("data/support/train.jsonl")


def test_system_prompt_is_prepended(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "How do I export a note?", "output": "x"}])
    ds, _ = load_sft_dataset(path, system_prompt="You are Lumen's support assistant.")
    assert ds["prompt"][0][0] == {"role": "system", "content": "You are Lumen's support assistant."}



def test_held_out_split_keeps_every_answer_of_a_prompt_on_one_side(tmp_path):
    from align.data import split_by_prompt

    rows = [{"instruction": f"Question {i}", "output": f"Answer {j} to {i}"} for i in range(20) for j in range(3)]
    ds, _ = load_sft_dataset(write_jsonl(tmp_path / "a.jsonl", rows))
    train, test = split_by_prompt(ds, 0.2, seed=0)
    assert len(train) + len(test) == 60 and len(test) == 12  # 4 of the 20 prompts, with their 3 answers each
    assert not {json.dumps(p) for p in train["prompt"]} & {json.dumps(p) for p in test["prompt"]}
    # Every prompt distinct: exactly datasets' own split, so a run's figures do not move.
    unique, _ = load_sft_dataset(write_jsonl(tmp_path / "b.jsonl", rows[::3]))
    own = unique.train_test_split(test_size=0.2, seed=0)
    assert [split["completion"] for split in split_by_prompt(unique, 0.2, seed=0)] == [
        own["train"]["completion"], own["test"]["completion"]]
    # A fraction that would leave nothing to train on (data.eval_fraction may be up to 1) keeps one prompt to train
    for data, n in ((unique, 20), (ds, 60)):
        train, test = split_by_prompt(data, 0.99, seed=0)
        assert len(train) == n // 20 and len(train) + len(test) == n

GOOD = {"instruction": "q", "input": "", "output": "a"}


@pytest.mark.parametrize("bad, problem", [
    ('{"instruction": "q", "output": "a"', "not JSON"),
    ({"instruction": "q", "input": ""}, "missing field 'output'"),
    ({"instruction": "q", "output": "   "}, "field 'output' is empty"),
    ({"instruction": 3, "output": "a"}, "field 'instruction' must be a string, got number"),
    ([1, 2], "expected a JSON object, got array"),
])
def test_bad_line_names_file_line_and_problem(tmp_path, bad, problem):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(DataError) as err:
        load_sft_dataset(path)
    assert f"{path}:3" in str(err.value) and problem in str(err.value)


def test_bad_messages(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [*USER, {"role": "robot", "content": "x"}]}])
    with pytest.raises(DataError, match=r"m.jsonl:1: messages\[1\].role 'robot'"):
        load_sft_dataset(path)
    path = write_jsonl(tmp_path / "m3.jsonl", [{"messages": [{"role": ["user"], "content": "hi"}, {"role": "assistant", "content": "yo"}]}])
    with pytest.raises(DataError, match=r"m3.jsonl:1: messages\[0\].role \['user'\] is not one of"):
        load_sft_dataset(path)  # was TypeError: unhashable type, with no file or line
    path = write_jsonl(tmp_path / "m2.jsonl", [{"messages": USER}])
    with pytest.raises(DataError, match=r"m2.jsonl:1: the last message must be the assistant's"):
        load_sft_dataset(path)
    # What a chat template cannot render as one conversation, or that asks nothing: refused, not trained
    system, answer = {"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "a"}
    for messages, problem in (([*USER, system, answer], r"messages\[1\] is a system message after the conversation"),
                              ([system, answer], r"'messages' has no user message before the answer"),
                              ([{"role": "user", "content": " "}, answer], r"messages\[0\], a user message, is empty")):
        path = write_jsonl(tmp_path / "m4.jsonl", [{"messages": messages}])
        with pytest.raises(DataError, match=r"m4.jsonl:1: " + problem):
            load_sft_dataset(path)
    path = write_jsonl(tmp_path / "m5.jsonl", [{"prompt": [answer], "completion": "b"}])
    with pytest.raises(DataError, match=r"m5.jsonl:1: 'prompt' has no user message"):
        load_sft_dataset(path)
    # An assistant's greeting before anyone asked is context, not an example of its own (data.turns=all)
    path = write_jsonl(tmp_path / "m6.jsonl", [{"messages": [system, answer, *USER, answer]}])
    ds, report = load_sft_dataset(path)
    assert len(ds) == 1 and report.earlier_turns == 0


def test_skip_mode_counts_what_it_drops(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD, "{oops", {"instruction": "q"}, GOOD])
    ds, report = load_sft_dataset(path, on_error="skip")
    assert (report.used, report.skipped) == (2, 2) and len(ds) == 2
    assert any("a.jsonl:2: not JSON" in p for p in report.problems)
    assert any("a.jsonl:3: missing field 'output'" in p for p in report.problems)


def test_unknown_format_is_explained(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match="cannot tell the format.*answer, question"):
        load_sft_dataset(path)


def test_prompts_from_prompt_file_and_from_sft_data(tmp_path, caplog):
    assert load_prompts(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b"}])) == ["a", "b"]
    assert load_prompts(write_jsonl(tmp_path / "s.jsonl", [GOOD])) == ["q"]
    assert "turns before their last user message" not in caplog.text
    # a conversation's prompt is its last user message: what it loses is said, not silently dropped
    chat = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Refund?"},
            {"role": "assistant", "content": "Oui."}, {"role": "user", "content": "The first one, please."},
            {"role": "assistant", "content": "D'accord."}]
    with caplog.at_level("WARNING"):
        assert load_prompts(write_jsonl(tmp_path / "c.jsonl", [{"messages": chat}, {"messages": chat[1:3]}])) == [
            "The first one, please.", "Refund?"]
    assert "1 of 2 records have turns before their last user message" in caplog.text
    with pytest.raises(DataError, match=r"p2.jsonl:1: field 'prompt' is empty"):
        load_prompts(write_jsonl(tmp_path / "p2.jsonl", [{"prompt": " "}]))
    with pytest.raises(DataError, match=r"p3.jsonl:2: field 'system' is not used here: a prompt is one user message"):
        load_prompts(write_jsonl(tmp_path / "p3.jsonl", [{"prompt": "a"}, {"prompt": "b", "system": "Be brief."}]))


def test_prompts_from_chat_records_that_end_with_the_users_turn(tmp_path, caplog):
    """A conversation waiting for its answer ({messages} ending with the user's turn, TRL's prompt-only
    {"prompt": [messages]}) gives its last user message, as an SFT record does; it was refused as an SFT record
    without its answer ("the last message must be the assistant's")."""
    system, user = {"role": "system", "content": "Be brief."}, {"role": "user", "content": "How do I export a note?"}
    caplog.set_level("WARNING")
    assert load_prompts(written := write_jsonl(tmp_path / "m.jsonl", [
        {"messages": [system, user]}, {"messages": [{"role": "user", "content": "Refund please"}]}])) == [
        "How do I export a note?", "Refund please"]
    assert "1 of 2 records have turns before their last user message" in caplog.text
    load_prompts(written)  # read again (by the stage, after preflight did): said once
    assert caplog.text.count("turns before their last user message") == 1
    caplog.clear()
    assert load_prompts(write_jsonl(tmp_path / "trl.jsonl", [{"prompt": [user]}, {"prompt": "Sync?"}])) == [
        "How do I export a note?", "Sync?"]
    assert not caplog.records
    with pytest.raises(DataError, match=r"e.jsonl:1: the last user message, the prompt, is empty"):
        load_prompts(write_jsonl(tmp_path / "e.jsonl", [{"messages": [{"role": "user", "content": " "}]}]))
    with pytest.raises(DataError, match=r"q.jsonl:1: cannot tell the prompt \(keys: question\); a prompts file holds "
                                        r"\{\"prompt\": \"...\"\}, TRL's prompt-only"):
        load_prompts(write_jsonl(tmp_path / "q.jsonl", [{"question": "How do I sync?"}]))


def test_utf8_with_bom_and_a_line_separator_inside_a_string(tmp_path):
    """JSON lines split at newlines only: U+2028 is legal inside a JSON string (str.splitlines broke it)."""
    path = tmp_path / "a.jsonl"
    row = {"instruction": "How do I export a note?", "output": "First\u2028then"}
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(row, ensure_ascii=False).encode() + b"\r\n")
    ds, report = load_sft_dataset(path)
    assert report.used == 1 and ds["completion"][0][0]["content"] == "First\u2028then"


def test_a_lone_utf16_surrogate_is_a_named_error_not_a_pyarrow_traceback(tmp_path):
    """JSON can spell half an emoji ("\\ud83d"): valid JSON, not text; pyarrow failed on it later, naming no line."""
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD, '{"instruction": "Fix \\ud83d this", "output": "ok"}'])
    with pytest.raises(DataError, match=r"a.jsonl:2: field 'instruction' holds \\ud83d at character 5, a lone UTF-16 "
                                        r"surrogate: half of an emoji"):
        load_sft_dataset(path)
    chat = tmp_path / "chat.json"
    chat.write_text('[\n{"messages": [{"role": "user", "content": "q"},\n {"role": "assistant", "content": "\\ude00"}]}]')
    with pytest.raises(DataError, match=r"chat.json:2 \(item 1\): field 'messages\[1\].content' holds \\ude00"):
        load_sft_dataset(chat)
    whole = write_jsonl(tmp_path / "b.jsonl", [GOOD, '{"instruction": "Fix \\ud83d\\ude00 this", "output": "\\\\ud83d"}'])
    assert load_sft_dataset(whole)[1].used == 2  # both halves, and an escaped backslash, are text


def test_a_lone_surrogate_in_a_preference_pair_is_named_too(tmp_path):
    from align.preferences import load_preferences

    path = write_jsonl(tmp_path / "p.jsonl", ['{"prompt": "q", "chosen": "ok \\ud83d", "rejected": "no"}'])
    with pytest.raises(DataError, match=r"p.jsonl:1: field 'chosen' holds \\ud83d"):
        load_preferences(path)


@pytest.mark.parametrize("specials", [["<|endoftext|>"], ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]])
def test_a_tokenizer_without_a_chat_template_ends_each_turn_with_the_eos_every_stage_stops_at(tmp_path, specials):
    """A base model's tokenizer (no template; EOS <|endoftext|>): with no <|im_end|> token the turns end with its
    EOS; with one, <|im_end|> becomes the EOS. Either way the answer's last labelled token is what generation
    stops at (it was ChatML's <|im_end|> as plain pieces: the policy never learnt to stop)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from align.modeling import load_tokenizer

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["Open Settings and tap Sync now.", "How do I sync?"], trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(tmp_path)
    tokenizer = load_tokenizer(str(tmp_path))
    turns = [{"role": "user", "content": "How do I sync?"}, {"role": "assistant", "content": "Tap Sync."}]
    ids = tokenizer.apply_chat_template(turns, tokenize=True, return_dict=True)["input_ids"]
    assert ids.count(tokenizer.eos_token_id) == 2  # each turn ends with it, as one token
    prompt = tokenizer.apply_chat_template(turns[:1], tokenize=True, add_generation_prompt=True, return_dict=True)
    assert tokenizer.eos_token_id in ids[len(prompt["input_ids"]):]  # in the answer: SFT trains it
    assert tokenizer.eos_token == ("<|im_end|>" if "<|im_end|>" in specials else "<|endoftext|>")


def test_every_assistant_turn_of_a_conversation_trains_and_its_turns_stay_on_one_side(tmp_path, caplog):
    """data.turns=all (the default): each assistant turn is an example, its conversation before it the prompt;
    the held-out split keeps a conversation's examples together (by its opening). turns=last: the last only."""
    from align.data import load_sft_dataset, split_by_prompt

    chats = [[{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": "Hello."},
              {"role": "user", "content": "Sync?"}, {"role": "assistant", "content": f"Tap Sync {i}."}]
             for i in range(20)]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps({"messages": m}) for m in chats) + "\n")
    data, report = load_sft_dataset(path)
    assert len(data) == 40 and report.earlier_turns == 20
    assert data["prompt"][0] == chats[0][:1] and data["completion"][0] == [chats[0][1]]
    assert data["prompt"][1] == chats[0][:3] and data["completion"][1] == [chats[0][3]]
    train, test = split_by_prompt(data, 0.25, seed=0, groups=report.conversations)
    opening = lambda p: p[0]["content"]  # noqa: E731
    assert {opening(p) for p in train["prompt"]}.isdisjoint({opening(p) for p in test["prompt"]})
    assert len(test) % 2 == 0 and len(test) >= 2  # whole conversations
    # conversations that open alike ("Hi") are still conversations apart: the split is not left empty
    alike = tmp_path / "alike.jsonl"
    alike.write_text("\n".join(json.dumps({"messages": [{**chats[i][0], "content": "Hi"}, chats[i][1],
                                                         {**chats[i][2], "content": f"Question {i}?"}, chats[i][3]]})
                               for i in range(20)) + "\n")
    for turns in ("all", "last"):
        data, report = load_sft_dataset(alike, turns=turns)
        train, test = split_by_prompt(data, 0.25, seed=0, groups=report.conversations)
        assert test is not None and len(test) >= 2, turns
        # ... and the first turn's example they share ("Hi" -> "Hello.") is not held out while it trains
        seen = {json.dumps(p) for p in train["prompt"]}
        assert not any(json.dumps(p) in seen for p in test["prompt"]) and len(train) + len(test) == len(data), turns

    with caplog.at_level("WARNING"):
        last, _ = load_sft_dataset(path, turns="last")
    assert len(last) == 20 and last["completion"][0] == [chats[0][3]]
    assert "20 of 20 examples have assistant turns before their last one: with data.turns=last" in caplog.text


def test_a_completion_of_messages_is_the_assistants_only(tmp_path):
    from align.data import DataError

    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": USER, "completion": [*ASSISTANT, *USER]}])
    with pytest.raises(DataError, match=r"pc.jsonl:1: field 'completion' has a user message"):
        load_sft_dataset(path)


def test_a_record_in_another_format_than_the_files_is_told_so(tmp_path):
    """The format is the first record's: a {messages} line in an alpaca file says it is in another format, not
    only that it lacks 'instruction' (a field the user would look for in vain)."""
    path = write_jsonl(tmp_path / "mixed.jsonl", [GOOD, {"messages": USER + ASSISTANT}])
    with pytest.raises(DataError, match=r"mixed.jsonl:2: missing field 'instruction'; this record is in the "
                                        r"messages format, the file's is alpaca \(detected from the first record\)"):
        load_sft_dataset(path)
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD, {"instruction": "q"}])  # same format: the error as it was
    with pytest.raises(DataError, match=r"bad.jsonl:2: missing field 'output'$"):
        load_sft_dataset(bad)
