"""The install picks the CPU-only torch unless the user asks for a GPU build (issue 14).

Real pip and real shell throughout: ``scripts/torch_choice.py`` and ``scripts/install.sh --dry-run`` run as
child processes; a fake ``nvidia-smi`` on PATH plays the GPU, and small real wheels in a find-links folder
(with pip's own configuration switched off) play the package indexes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support.processes import REPO, child_env

HELPER = REPO / "scripts" / "torch_choice.py"
PINNED = "9.9.9"  # a version no machine has installed, so the "installed already" shortcut never applies


def fake_nvidia_smi(folder: Path, exit_code: int) -> Path:
    """A folder with an ``nvidia-smi`` that exits with ``exit_code`` (0: a working driver)."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "nvidia-smi"
    script.write_text(f"#!/bin/sh\nexit {exit_code}\n")
    script.chmod(0o755)
    return folder


def build_wheel(folder: Path, version: str) -> Path:
    """A minimal, valid pure-Python wheel of a package named torch (pip reads its metadata)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"torch-{version}-py3-none-any.whl"
    info = f"torch-{version}.dist-info"
    files = {
        "torch/__init__.py": "",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(path, "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)
        wheel.writestr(f"{info}/RECORD", "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n")
    return path


def offline_pip_env(find_links: Path, path_prefix: Path | None = None, **extra: str) -> dict[str, str]:
    """pip without its machine configuration: no index, only ``find_links``; optionally a folder first on PATH."""
    env = child_env(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(find_links), **extra)
    if path_prefix is not None:
        env["PATH"] = f"{path_prefix}{os.pathsep}{env['PATH']}"
    return env


def choose(requirements: Path, env: dict[str, str]) -> tuple[list[str], str]:
    """Run the helper: the pip arguments it prints, and what it said on stderr."""
    result = subprocess.run([sys.executable, str(HELPER), "--requirements", str(requirements)], env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.split(), result.stderr


@pytest.fixture()
def requirements(tmp_path: Path) -> Path:
    """requirements.txt pinning torch the way the project's does, included from another file as dev's is."""
    (tmp_path / "requirements.txt").write_text(f"# app host\nhttpx>=0.27\ntorch=={PINNED}\n")
    (tmp_path / "requirements-dev.txt").write_text("-r requirements.txt\npytest>=8\n")
    return tmp_path / "requirements-dev.txt"


def test_the_default_is_the_cpu_build_even_on_a_machine_with_a_gpu(tmp_path: Path, requirements: Path) -> None:
    links = tmp_path / "links"
    build_wheel(links, f"{PINNED}+cpu")
    env = offline_pip_env(links, fake_nvidia_smi(tmp_path / "bin", 0))
    arguments, said = choose(requirements, env)
    assert arguments == [f"torch=={PINNED}+cpu"], said  # found in the configured indexes: no extra index
    assert "from pip's configured indexes" in said and "SLB_TORCH=cpu, the default" in said


def test_without_a_local_cpu_wheel_the_pytorch_cpu_index_is_added(tmp_path: Path, requirements: Path) -> None:
    links = tmp_path / "links"
    build_wheel(links, PINNED)  # only the plain build: on Linux that would be the CUDA one
    arguments, said = choose(requirements, offline_pip_env(links))
    assert arguments == [f"torch=={PINNED}+cpu", "--extra-index-url", "https://download.pytorch.org/whl/cpu"], said
    assert "PyTorch CPU index" in said


@pytest.mark.parametrize(("choice", "nvidia_exit", "expect_cpu", "reason"), [
    ("auto", 0, False, "SLB_TORCH=auto and nvidia-smi works"),
    ("auto", 9, True, "nvidia-smi is missing or fails"),
    ("auto", None, True, "nvidia-smi is missing or fails"),
    ("cuda", None, False, "SLB_TORCH=cuda"),
    ("CPU", 0, True, "SLB_TORCH=cpu"),
])
def test_slb_torch_chooses_the_build(tmp_path: Path, requirements: Path, choice: str, nvidia_exit: int | None,
                                     expect_cpu: bool, reason: str) -> None:
    links = tmp_path / "links"
    build_wheel(links, f"{PINNED}+cpu")
    bin_dir = fake_nvidia_smi(tmp_path / "bin", nvidia_exit) if nvidia_exit is not None else None
    env = offline_pip_env(links, bin_dir, SLB_TORCH=choice)
    if bin_dir is None:  # a PATH without any nvidia-smi: only the system folders
        env["PATH"] = "/usr/bin:/bin"
    arguments, said = choose(requirements, env)
    assert arguments == ([f"torch=={PINNED}+cpu"] if expect_cpu else []), said
    assert reason in said


def test_a_wrong_slb_torch_is_refused_with_the_choices(tmp_path: Path, requirements: Path) -> None:
    result = subprocess.run([sys.executable, str(HELPER), "--requirements", str(requirements)],
                            env=offline_pip_env(tmp_path, SLB_TORCH="gpu"), capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert "SLB_TORCH='gpu': use one of cpu, cuda, auto" in result.stderr


def test_requirements_without_torch_need_no_argument(tmp_path: Path) -> None:
    agent = tmp_path / "agent.txt"
    agent.write_text("paho-mqtt>=2\n")
    assert choose(agent, offline_pip_env(tmp_path)) == ([], f"[install] {agent.name} pins no torch\n")


def test_the_cpu_build_satisfies_the_plain_pin_and_wins_over_it(tmp_path: Path) -> None:
    """What install.sh runs: ``-r requirements.txt torch==X+cpu`` installs X+cpu although the file pins X."""
    links = tmp_path / "links"
    build_wheel(links, PINNED)
    build_wheel(links, f"{PINNED}+cpu")
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(f"torch=={PINNED}\n")
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report",
         str(report), "-r", str(requirements), f"torch=={PINNED}+cpu"],
        env=offline_pip_env(links), capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    chosen = [item["metadata"]["version"] for item in json.loads(report.read_text())["install"]]
    assert chosen == [f"{PINNED}+cpu"]


def install_dry_run(env: dict[str, str]) -> str:
    result = subprocess.run(["bash", str(REPO / "scripts" / "install.sh"), "--dry-run"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stderr
    return result.stderr


def test_install_sh_passes_the_choice_to_pip(tmp_path: Path) -> None:
    """The real install.sh on the real requirements.txt (its torch pin), with pip's machine configuration."""
    bin_dir = fake_nvidia_smi(tmp_path / "bin", 0)
    env = child_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    pin = next(line.split("==")[1].strip() for line in (REPO / "requirements.txt").read_text().splitlines()
               if line.startswith("torch=="))
    said = install_dry_run(env)
    pip_line = next(line for line in said.splitlines() if "would run:" in line and " pip install " in line)
    assert pip_line.endswith(f"-r requirements.txt torch=={pin}+cpu") or "--extra-index-url" in pip_line, said
    assert f"torch=={pin}+cpu" in pip_line

    said = install_dry_run(dict(env, SLB_TORCH="auto"))
    pip_line = next(line for line in said.splitlines() if "would run:" in line and " pip install " in line)
    assert pip_line.endswith("-r requirements.txt"), said
    assert "SLB_TORCH=auto and nvidia-smi works" in said
