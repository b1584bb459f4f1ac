"""Shared fixtures: a tiny random Llama with a small BPE tokenizer trained on the fly.

The tiny model is built from config (no files, no Hub) and saved to a session temp folder,
so tests go through the same `from_pretrained` path a user's model does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("USE_HUB_KERNELS", "NO")  # as align.cli.setup_environment: no kernels fetched from the Hub

REPO = Path(__file__).resolve().parents[1]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(autouse=True)
def _warnings_said_afresh():
    """align.said_once's memory is a process's: each test is a run of its own, whose warnings it may read."""
    import align

    align._said.clear()


def build_tiny_model(folder: Path, *, vocab_size: int = 384, hidden: int = 64, layers: int = 2) -> Path:
    """A 2-layer Llama and a byte-level BPE trained on the shipped data, saved to `folder`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [REPO.joinpath("data/support/train.jsonl").read_text()] if REPO.joinpath(
        "data/support/train.jsonl").is_file() else []
    texts += ["Thanks for reaching out! Here is how to sync your notes.", "Sorry about that. Please try again."]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, initializer_range=0.1, bos_token_id=fast.bos_token_id,
                         eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = fast.eos_token_id
    model.generation_config.pad_token_id = fast.pad_token_id
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture
def sft_data(tmp_path) -> Path:
    """A small task with a known answer: every reply is the same polite sentence."""
    path = tmp_path / "train.jsonl"
    rows = [{"instruction": f"Question number {i}: how do I sync my notes?", "input": "",
             "output": "Thanks for reaching out! Open Settings and tap Sync now."} for i in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture
def wandb_server(monkeypatch):
    """A W&B server on 127.0.0.1 that answers every request with `answer` (status, JSON body): 401 and GraphQL's
    "user is not logged in" unless a test sets another, as a server does for a key it refuses. WANDB_BASE_URL points
    at it, WANDB_API_KEY holds a well-formed key; `asked` holds each request's path and Authorization header."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from types import SimpleNamespace

    import align
    from align import tracking

    server = SimpleNamespace(answer=(401, {"errors": [{"message": "user is not logged in"}]}), asked=[])

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            server.asked.append((self.path, self.headers.get("Authorization")))
            status, body = server.answer
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_PUT = do_POST

        def log_message(self, *args):
            pass

    http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    server.url = f"http://127.0.0.1:{http.server_address[1]}"
    for key in ("WANDB_MODE", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", server.url)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setattr(tracking, "USER_MODE", "")
    caches = (tracking.wandb_reachable, tracking.wandb_key_refusal)
    for cache in caches:
        cache.cache_clear()
    align._said.clear()
    try:
        yield server
    finally:
        http.shutdown()
        http.server_close()
        for cache in caches:
            cache.cache_clear()
        align._said.clear()
