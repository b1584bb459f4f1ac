"""Serve every policy adapter of a run behind one OpenAI-compatible endpoint.

    align serve run.dir=runs/quickstart                  http://127.0.0.1:8000/v1: sft, dpo, ..., base
    align serve run.dir=runs/q adapters='{old: runs/old/dpo}' port=8001
    ALIGN_SERVE_API_KEY=$(openssl rand -hex 16) align serve run.dir=runs/q host=0.0.0.0
    align serve run.dir=runs/q generation.backend=vllm   vLLM's own server, multi-LoRA (CUDA + vllm)

The base is loaded once and each adapter is attached to it with peft (align.chat_engine); a
request's `model` picks the adapter (peft's set_adapter when it differs from the last request's,
nothing reloaded), and `base` is the base with every adapter skipped. On start it prints the URL,
the model names and a curl and an openai snippet; Ctrl-C stops it (a generation under way stops at its next token). docs/serving.md has the
API, the limits, what runs on CPU and on GPU, and what concurrency means here. A request without a
system message gets the adapter's system prompt (the one it was trained with), on the transformers
backend; vLLM's server does not add it (a warning says so).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import subprocess
from pathlib import Path

from align.config import ConfigError, ServeStageConfig
from align.preflight import check_stage
from align.serving import (
    API_KEY_ENV,
    BASE,
    api_key,
    is_loopback,
    served_models,
    shared_base,
    url_host,
    vllm_command,
)

log = logging.getLogger(__name__)

# Seconds Ctrl-C waits for open connections (a stream that is being cut) before closing them.
SHUTDOWN_SECONDS = 3


def main(cfg: ServeStageConfig) -> Path:
    # --- resolve inputs ---------------------------------------------------------------------
    check_stage("serve", cfg)  # adapters, one base, the API key for a non-loopback host, the machine
    models = served_models(cfg)
    base = shared_base(models, cfg)
    key = api_key(cfg)
    # The port is taken before the model loads: one in use is an error now, not after the load.
    listener = bind(cfg.host, cfg.port)
    port = listener.getsockname()[1]
    names = [*models, BASE]

    if cfg.generation.backend == "vllm":
        listener.close()  # vLLM binds it itself
        return run_vllm(models, base, cfg, key, port, names)

    # --- model ------------------------------------------------------------------------------
    from align.chat_engine import ChatEngine
    from align.openai_api import create_app

    engine = ChatEngine.load(models, base, cfg)
    app = create_app(engine, cfg, api_key=key, loopback=is_loopback(cfg.host))

    # --- serve ------------------------------------------------------------------------------
    print_ready(cfg, port, names, base, key, engine.device)
    server = make_server(app, engine)
    try:
        server.run(sockets=[listener])
    except KeyboardInterrupt:  # uvicorn has shut down cleanly, then re-raised the Ctrl-C it caught
        pass
    print("align serve: stopped", flush=True)
    return Path(cfg.run.dir)


def bind(host: str, port: int) -> socket.socket:
    """A socket listening on (host, port): port 0 takes a free one."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        listener = socket.socket(family, kind, proto)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        # Listening now, before the model loads: a client that calls the printed URL at once waits in the
        # backlog until the server accepts, instead of being refused.
        listener.listen(128)
    except OSError as err:  # socket.gaierror included: a host name that does not resolve
        reason = err.strerror or err
        if err.errno in (errno.EADDRINUSE, errno.EACCES):  # taken, or below 1024 for a user without the right
            raise ConfigError(f"host={host} port={port}: cannot listen there ({reason}); "
                              "choose another port (port=0 takes a free one)") from None
        # an address that is not this machine's, a name that does not resolve: another port would not do
        raise ConfigError(f"host={host}: cannot listen there ({reason}); give an address of this machine "
                          "(127.0.0.1, 0.0.0.0)") from None
    return listener


def make_server(app, engine):
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's, plus: on Ctrl-C every running generation stops at its next token (uvicorn only
        stops taking connections and waits for the open ones, which a long generation would hold), and
        its answer, cut off, is a 503 or a stream's error event, not a finished one (ShuttingDown)."""

        def handle_exit(self, sig, frame) -> None:
            engine.closing.set()
            super().handle_exit(sig, frame)

    return Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=SHUTDOWN_SECONDS))


def print_ready(cfg: ServeStageConfig, port: int, names: list[str], base: str, key: str | None, device) -> None:
    url = f"http://{url_host(cfg.host)}:{port}/v1"
    example = next((n for n in names if n != BASE), BASE)
    # Double quotes only: the snippet is inside a shell's single quotes.
    secret = f'os.environ["{API_KEY_ENV}"]' if key else '"none"'
    auth = f" -H \"Authorization: Bearer ${API_KEY_ENV}\"" if key else ""
    where = (f"API key: required (Authorization: Bearer <key>; the key is ${API_KEY_ENV}"
             f"{'' if os.environ.get(API_KEY_ENV) else ' — set it to the api_key in your config'})"
             if key else "API key: none (this machine only)")
    body = json.dumps({"model": example, "messages": [{"role": "user", "content": "How do I sync my notes?"}]})
    # The python snippet is one expression: pasted with its indentation, a statement starting on an
    # indented line would be an IndentationError, while inside parentheses indentation does not count.
    print(f"""
align serve: {len(names) - 1} adapter(s) and the base on one {base} ({device})
  serving on {url}    (Ctrl-C stops it)
  models: {', '.join(names)}
  {where}

  curl {url}/chat/completions -H "Content-Type: application/json"{auth} \\
    -d '{body}'

  # with the openai package (pip install openai; it is not one of align's dependencies)
  python -c 'import os; from openai import OpenAI; print(OpenAI(
    base_url="{url}", api_key={secret}).chat.completions.create(
    model="{example}", messages=[{{"role": "user", "content": "Hello"}}]).choices[0].message.content)'
""", flush=True)


def stop_child(child: subprocess.Popen, grace: float = 60.0, term_grace: float = 10.0) -> int:
    """Stop vLLM's server after a Ctrl-C: SIGINT and `grace` seconds to shut down, then SIGTERM and 10 s, then
    SIGKILL (`term_grace` after SIGTERM); a second Ctrl-C moves on to the next. A server slow to stop, or a second Ctrl-C, ended align serve
    with a traceback and left vLLM running, holding the GPU. Its exit code."""
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, term_grace), (signal.SIGKILL, None)):
        if child.poll() is not None:
            return child.returncode
        child.send_signal(sig)
        try:
            return child.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            log.warning("vLLM's server did not stop within %.0f s of %s", wait, signal.Signals(sig).name)
        except KeyboardInterrupt:
            log.warning("stopping vLLM's server harder (a second Ctrl-C)")
    return child.wait()


def run_vllm(models: dict[str, Path], base: str, cfg: ServeStageConfig, key: str | None, port: int,
             names: list[str]) -> Path:
    """vLLM's OpenAI server, one base with every adapter as a LoRA module, until Ctrl-C."""
    from align.artifacts import system_prompt_of

    prompted = [name for name, folder in {BASE: base, **models}.items() if system_prompt_of(folder)]
    if prompted:  # vLLM applies the chat template itself: nothing here can add a system turn per adapter
        log.warning("%s trained with a system prompt (sft.data.system_prompt): vLLM's server does not add it; "
                    "send it as the request's system message (the transformers backend adds it itself)",
                    ", ".join(prompted))
    command = vllm_command(models, base, cfg, port)
    env = dict(os.environ)
    if key:
        env["VLLM_API_KEY"] = key  # not on the command line, which every user of the machine can read
    log.info("starting vLLM: %s", " ".join(command))
    print_ready(cfg, port, names, base, key, "cuda, vLLM: ready when it says `Application startup complete`")
    child = subprocess.Popen(command, env=env)
    try:
        code = child.wait()
    except KeyboardInterrupt:
        code = stop_child(child)
    if code not in (0, -signal.SIGINT, 128 + signal.SIGINT, -signal.SIGTERM, -signal.SIGKILL):
        from align import StageError

        raise StageError(f"vLLM's server stopped with exit code {code}; its own messages above say why")
    print("align serve: stopped", flush=True)
    return Path(cfg.run.dir)
