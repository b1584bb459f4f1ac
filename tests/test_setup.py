"""scripts/setup.sh's versions: constraints.txt pins what the tests ran with, inside pyproject.toml's ranges,
and pyproject's requires-python is one every pinned or required release accepts."""

from __future__ import annotations

import importlib.metadata as metadata
import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def pins() -> dict[str, str]:
    found = {}
    for number, line in enumerate((REPO / "constraints.txt").read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([0-9][0-9A-Za-z.+-]*)", line)
        assert match, f"constraints.txt line {number}: {line!r} is not name==version"
        name = canonicalize_name(match[1])
        assert name not in found, f"constraints.txt line {number}: {match[1]} pinned twice"
        found[name] = match[2]
    return found


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def requirements() -> list[Requirement]:
    spec = project()
    listed = list(spec["dependencies"])
    for extra in spec["optional-dependencies"].values():
        listed += extra
    return [Requirement(text) for text in listed]


def test_setup_sh_parses_and_installs_with_the_constraints():
    assert subprocess.run(["bash", "-n", str(REPO / "scripts" / "setup.sh")]).returncode == 0
    script = (REPO / "scripts" / "setup.sh").read_text()
    assert "-c constraints.txt" in script and '"${pins[@]}" -e' in script
    # the CPU build of torch, never PyPI's Linux default (CUDA, several GB): a local +cpu wheel, else PyTorch's CPU index
    assert "torch==2.13.0+cpu" in script and "--index-url https://download.pytorch.org/whl/cpu" in script


def test_every_pin_lies_inside_pyprojects_range():
    pinned = pins()
    assert "torch" not in pinned, "torch is setup.sh's own choice (CPU wheel or the CUDA one already there)"
    checked = 0
    for req in requirements():
        name = canonicalize_name(req.name)
        if name in pinned:
            checked += 1
            assert req.specifier.contains(pinned[name], prereleases=True), (
                f"constraints.txt pins {req.name}=={pinned[name]}, outside pyproject's {req}")
    assert checked >= 10   # the ML stack itself is pinned, not only its helpers


def test_the_environment_runs_the_pinned_versions():
    # Skipped for an environment set up with ALIGN_UNPINNED=1 on purpose (newer releases than the pins).
    if os.environ.get("ALIGN_UNPINNED") == "1":
        pytest.skip("ALIGN_UNPINNED=1: newest releases within pyproject's ranges, not the pins")
    wrong = []
    for name, version in pins().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            wrong.append(f"{name} not installed (a pin of nothing: drop it, or `scripts/setup.sh --dev`)")
            continue
        if Version(installed) != Version(version):
            wrong.append(f"{name} {installed}, pinned {version}")
    assert not wrong, ("this environment is not the tested one; `scripts/setup.sh --dev` installs the pins "
                       "(ALIGN_UNPINNED=1 to test newer ones on purpose): " + "; ".join(wrong))


def test_requires_python_is_one_every_required_release_accepts():
    # trl 1.16 and transformers 5.25 need Python >= 3.11: a project saying >= 3.10 fails to install there.
    lowest = re.search(r">=\s*(3\.\d+)", project()["requires-python"])[1]
    refused = []
    for req in requirements():
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue   # an extra this environment has not (gpu)
        needs = dist.metadata.get("Requires-Python")
        if needs and not SpecifierSet(needs).contains(f"{lowest}.0"):
            refused.append(f"{req.name} {dist.version} needs Python {needs}")
    assert not refused, f"pyproject says Python >= {lowest}: " + "; ".join(refused)
