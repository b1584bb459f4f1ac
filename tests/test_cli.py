"""The CLI: every stage listed, config errors are one clear line, unknown stages refused."""

from __future__ import annotations

import os
import subprocess
import sys

from align.artifacts import STAGES
from align.cli import main as align


def test_help_lists_every_stage(capsys):
    assert align(["--help"]) == 0
    out = capsys.readouterr().out
    for stage in ("sft", "sample", "label", "export", "reward", "dpo", "ppo", "eval", "pipeline", "merge"):
        assert f"  {stage} " in out
    assert set(STAGES) >= {"sft", "sample", "label", "export", "reward", "dpo", "ppo", "eval", "pipeline", "merge"}


def test_stage_help_shows_config_keys(capsys):
    assert align(["sft", "--help"]) == 0
    out = capsys.readouterr().out
    assert "train.lr = 0.0002" in out and "lora.use_dora = False" in out


def test_unknown_stage_and_bad_override(capsys):
    assert align(["trian"]) == 2
    assert "and grpo (`align ppo algo=grpo`), rloo (`align ppo algo=rloo`)" in capsys.readouterr().err  # as --help
    assert align(["sft", "train.lrr=1"]) == 2
    assert "unknown key 'train.lrr'" in capsys.readouterr().err


def test_a_variants_help_says_how_it_runs_and_where_its_keys_are(capsys):
    assert align(["grpo", "--help"]) == 0  # README: `align <stage> --help` for every stage `align --help` lists
    assert "grpo runs as `align ppo algo=grpo` (same config, reward and gate); `align ppo --help` lists its keys" \
        in capsys.readouterr().out
    assert align(["rloo", "run.dir=x"]) == 2


def test_console_script_sets_the_cpu_environment():
    """The CLI sets OMP_WAIT_POLICY / HF offline / telemetry itself, before torch loads."""
    code = ("import os, align.cli as c; c.setup_environment(); "
            "print(os.environ['OMP_WAIT_POLICY'], os.environ['HF_HUB_DISABLE_TELEMETRY'], os.environ['HF_HUB_OFFLINE'], "
            "os.environ['VLLM_NO_USAGE_STATS'])")
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_WAIT_POLICY", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "VLLM_NO_USAGE_STATS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    # no network here, so offline; vLLM's usage statistics off like the Hub's telemetry
    assert out.split() == ["PASSIVE", "1", "1", "1"]


def test_the_hub_probe_asks_the_hub_huggingface_hub_would_use():
    """HF_ENDPOINT (a mirror, a company's own Hub) is the one probed, and behind a proxy the Hub counts as
    reachable: only huggingface.co:443 was tried, directly, so a cluster with a mirror or a proxy went offline
    and a Hub id not yet cached was refused as unreachable."""
    import socket

    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen(4)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, not listening: refused
    code = "import os, align.cli as c; c.setup_environment(); print(os.environ.get('HF_HUB_OFFLINE', 'unset'))"
    proxy_vars = {"HF_HUB_OFFLINE", "HF_ENDPOINT", "NO_PROXY", "no_proxy"} | \
        {f"{s}_PROXY" for s in ("HTTP", "HTTPS", "ALL")} | {f"{s}_proxy" for s in ("http", "https", "all")}
    env = {k: v for k, v in os.environ.items() if k not in proxy_vars}
    offline = lambda extra: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,  # noqa: E731
                                           env={**env, **extra}, check=True).stdout.strip()
    try:
        up, down = (f"http://127.0.0.1:{s.getsockname()[1]}" for s in (listening, closed))
        assert offline({"HF_ENDPOINT": up}) == "unset"
        assert offline({"HF_ENDPOINT": down}) == "1"
        assert offline({"HTTPS_PROXY": up}) == "unset"  # huggingface.co (unreachable here) through a proxy
        assert offline({"HF_ENDPOINT": down, "HTTP_PROXY": up, "NO_PROXY": "127.0.0.1"}) == "1"  # not through it
    finally:
        listening.close()
        closed.close()


def test_the_cli_loads_no_kernels_from_the_hub_unless_asked():
    """transformers 5.25 swapped layers for kernels downloaded from the Hub at every load on CUDA, and offline
    raised before the first step of every stage (on the lent H200). The CLI turns that off; a user's
    USE_HUB_KERNELS=YES is kept."""
    code = ("import align.cli as c; c.setup_environment(); "
            "from transformers.integrations.hub_kernels import _kernels_enabled; print(_kernels_enabled())")
    env = {k: v for k, v in os.environ.items() if k != "USE_HUB_KERNELS"}
    run = lambda extra: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,  # noqa: E731
                                       env={**env, **extra}, check=True).stdout.split()
    assert run({}) == ["False"]
    assert run({"USE_HUB_KERNELS": "YES"}) == ["True"]


def test_stage_help_shows_the_stages_own_section_defaults(capsys):
    """A section a stage sets its own defaults for (PPO's train, sample's model) shows those, not the class's."""
    assert align(["ppo", "--help"]) == 0
    out = capsys.readouterr().out
    assert "train.lr = 1e-05" in out and "train.max_steps = 20" in out and "lora.dropout = 0.0" in out
    assert align(["sample", "--help"]) == 0
    assert "model.quantize = False" in capsys.readouterr().out


def test_stage_help_leaves_out_the_keys_the_stage_refuses(capsys):
    """sample, eval, serve and ppo refuse model.max_length (they cut no prompt), yet their --help listed it with
    its default 512 as a setting; the training stages read it and still list it, the pipeline for theirs only."""
    for stage in ("sample", "eval", "serve", "ppo"):
        assert align([stage, "--help"]) == 0
        out = capsys.readouterr().out
        assert "model.max_length" not in out and "model.quantize" in out, stage
    for stage in ("sft", "reward", "dpo"):
        assert align([stage, "--help"]) == 0
        assert "  model.max_length = 512" in capsys.readouterr().out, stage
    assert align(["pipeline", "--help"]) == 0
    out = capsys.readouterr().out
    assert "  sft.model.max_length = 512" in out and "  dpo.model.max_length = 512" in out
    assert "sample.model.max_length" not in out and "ppo.model.max_length" not in out
    assert "sample.model.quantize" in out


def test_an_unknown_option_names_the_closest_and_all_options(capsys):
    assert align(["sft", "--confg", "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert "unknown option --confg (did you mean --config?); options: --config, --help; settings are section.key=value" \
        in err
    assert align(["sft", "--zzz"]) == 2
    assert "unknown option --zzz; options: --config, --help" in capsys.readouterr().err


def test_a_second_config_file_is_refused(tmp_path, capsys):
    """The second --config replaced the first without a word (its settings all dropped)."""
    for name in ("a.yaml", "b.yaml"):
        (tmp_path / name).write_text("train: {max_steps: 1}\n")
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    for args in (["--config", str(a), "--config", str(b)], [f"--config={a}", "-c", str(b)]):
        assert align(["sft", *args]) == 2
        assert f"align sft: --config given twice ({a}, {b}); a stage reads one config file" in capsys.readouterr().err
