"""The embedded SmolLM2-135M: GGUF → transformers folder round-trips, ChatML intact."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.smollm


@pytest.fixture(scope="module")
def converted():
    from align.embedded import embedded_model_dir

    return embedded_model_dir()


def test_tokenizer_keeps_chatml(converted):
    from align.modeling import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_gguf_and_converted_folder_give_the_same_greedy_tokens(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.embedded import gguf_path

    gguf = gguf_path()
    tok = AutoTokenizer.from_pretrained(str(converted))
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    outs = []
    for model in (AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name),
                  AutoModelForCausalLM.from_pretrained(str(converted))):
        with torch.no_grad():
            outs.append(model.generate(**ids, max_new_tokens=12, do_sample=False)[0])
    assert torch.equal(outs[0], outs[1])
    assert "Paris" in tok.decode(outs[1][ids["input_ids"].shape[1]:])


def test_gguf_read_once_parses_each_file_once_inside_the_block_only(tmp_path):
    import gguf

    from align.embedded import gguf_read_once

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", torch.ones(4, 3).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with gguf_read_once():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is first  # a path or its string: one parse
        assert first.fields["llama.block_count"].contents() == 2
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2).get_name("model.embed_tokens") == "token_embd"
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (real_reader, real_map)
    assert gguf.GGUFReader(path) is not gguf.GGUFReader(path)


def test_a_cache_that_cannot_be_written_is_a_stage_error_naming_align_cache(tmp_path, monkeypatch):
    """ALIGN_CACHE=/etc/passwd ended in a NotADirectoryError traceback."""
    from align import StageError
    from align.embedded import embedded_model_dir

    a_file = tmp_path / "passwd"
    a_file.write_text("not a folder")
    monkeypatch.setenv("ALIGN_CACHE", str(a_file))
    with pytest.raises(StageError, match=f"into {a_file}/models \\(ALIGN_CACHE={a_file}\\), and that failed: Not a "
                                         "directory; set ALIGN_CACHE to a folder you can write"):
        embedded_model_dir()


def test_an_empty_align_cache_is_the_default_cache(monkeypatch):
    """`ALIGN_CACHE=` put the converted model under the working directory (Path("") is ".")."""
    from pathlib import Path

    from align.embedded import cache_root

    monkeypatch.setenv("ALIGN_CACHE", "")
    assert cache_root() == Path.home() / ".cache" / "align"
