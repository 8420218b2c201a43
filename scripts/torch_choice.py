"""Which torch build the app machine installs: CPU-only unless the user asks for a GPU build.

    python scripts/torch_choice.py [--requirements requirements.txt]

Prints, one per line, the pip arguments that ``scripts/install.sh`` adds to ``pip install -r ...``
(nothing for the plain PyPI build). The app embeds with MiniLM on the CPU; against the plain index,
``torch==X`` on Linux resolves the CUDA wheel plus ~16 ``nvidia-*`` packages and triton (several GB).

``SLB_TORCH`` chooses: ``cpu`` (default), ``cuda`` (the plain PyPI build, with CUDA on Linux) or ``auto``
(``cuda`` only when ``nvidia-smi`` runs and exits 0). A CPU build is asked for as ``torch==X+cpu``
(a local version ``+cpu`` satisfies the ``torch==X`` pin of requirements.txt). It comes from the
indexes pip is already configured with when they have it (checked with a quick ``pip install
--dry-run``), otherwise from the PyTorch CPU index (``--extra-index-url``). Standard library only: it
runs before anything is installed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

logger = logging.getLogger("install")

PYTORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CHOICES = ("cpu", "cuda", "auto")
CHECK_TIMEOUT_S = 60.0
ROOT = Path(__file__).resolve().parents[1]


def pinned_torch_version(requirements: Path) -> str | None:
    """The ``torch==X`` pin of a requirements file, following ``-r`` includes; None when torch is not pinned."""
    for raw in requirements.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        include = re.match(r"^(-r|--requirement)\s+(\S+)$", line)
        if include:
            found = pinned_torch_version(requirements.parent / include.group(2))
            if found:
                return found
            continue
        pin = re.match(r"^torch\s*==\s*([0-9][^\s;+]*)", line)
        if pin:
            return pin.group(1)
    return None


def nvidia_smi_works() -> bool:
    """True when ``nvidia-smi`` is on PATH and exits 0 (a driver that talks to a GPU)."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return False
    try:
        return subprocess.run([binary], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=20, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def wanted_build(choice: str) -> tuple[str, str]:
    """``("cpu" | "cuda", why)`` for an ``SLB_TORCH`` value."""
    if choice not in CHOICES:
        raise ValueError(f"SLB_TORCH={choice!r}: use one of {', '.join(CHOICES)}")
    if choice == "cuda":
        return "cuda", "SLB_TORCH=cuda"
    if choice == "auto":
        if nvidia_smi_works():
            return "cuda", "SLB_TORCH=auto and nvidia-smi works"
        return "cpu", "SLB_TORCH=auto and nvidia-smi is missing or fails"
    return "cpu", "SLB_TORCH=cpu, the default; SLB_TORCH=cuda or auto for a GPU build"


def installed_torch() -> str | None:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def configured_indexes_have(requirement: str) -> bool:
    """True when pip, with the indexes and find-links it is configured with, can resolve ``requirement``.

    A dry run of that one package: nothing is installed, and a local wheel answers in about a second.
    """
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed", "--quiet",
               "--disable-pip-version-check", "--retries", "1", "--timeout", "15", requirement]
    try:
        return subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=CHECK_TIMEOUT_S, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def torch_pip_arguments(requirements: Path, choice: str) -> tuple[list[str], str]:
    """The extra pip arguments for ``pip install -r requirements`` and a line that says why."""
    version = pinned_torch_version(requirements)
    if version is None:
        return [], f"{requirements.name} pins no torch"
    build, why = wanted_build(choice)
    if build == "cuda":
        if (installed_torch() or "").endswith("+cpu"):
            logger.warning("the CPU-only torch %s is installed and satisfies the pin, so pip keeps it; for the "
                           "GPU build run '%s -m pip uninstall -y torch' and install again", installed_torch(),
                           sys.executable)
        return [], f"torch {version}: the plain PyPI build (with CUDA on Linux), because {why}"
    if not sys.platform.startswith("linux"):
        return [], f"torch {version}: the plain PyPI build, which has no CUDA on {sys.platform}"
    requirement = f"torch=={version}+cpu"
    if installed_torch() == f"{version}+cpu":
        return [requirement], f"torch {version}+cpu is installed already ({why})"
    if configured_indexes_have(requirement):
        return [requirement], f"torch {version}+cpu from pip's configured indexes ({why})"
    return ([requirement, "--extra-index-url", PYTORCH_CPU_INDEX],
            f"torch {version}+cpu from the PyTorch CPU index {PYTORCH_CPU_INDEX} ({why})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requirements", type=Path, default=ROOT / "requirements.txt",
                        help="requirements file whose torch pin is used (default: requirements.txt)")
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[install] %(message)s", stream=sys.stderr)
    try:
        choice = (os.environ.get("SLB_TORCH") or "cpu").strip().lower()
        arguments, why = torch_pip_arguments(options.requirements, choice)
    except ValueError as error:
        logger.error("%s", error)
        return 2
    logger.info("%s", why)
    sys.stdout.write("".join(f"{argument}\n" for argument in arguments))
    return 0


if __name__ == "__main__":
    sys.exit(main())
