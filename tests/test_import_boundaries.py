"""Import boundaries: the agent loads only the wire layer; the pure scheduling code loads no running parts.

Why: the agent runs on small machines with ``agent/requirements.txt`` alone (no Gradio, LanceDB or torch),
and a stray import of the coordinator would pull in APScheduler and, through it, half the web app. The
scheduling modules are pure functions of a registry snapshot; importing the coordinator or the MQTT client
there would make them untestable without a broker.

Each check runs in a fresh interpreter (this test process has long imported everything), and each has a
twin that feeds it a known violation, so a check that silently sees nothing fails too.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from tests.support.processes import REPO, child_env

AGENT_MODULES = ("agent.__main__", "agent.agent", "agent.backends")
NOT_IN_THE_AGENT = (
    "broker.coordinator", "broker.scheduling", "app", "apscheduler", "gradio", "lancedb", "torch",
    "sentence_transformers",
)
NOT_IN_SCHEDULING = ("broker.coordinator", "broker.mqtt")
SCHEDULING = REPO / "broker" / "scheduling"

PROBE = """
import importlib, json, pkgutil, sys
for name in sys.argv[2:]:
    module = importlib.import_module(name)
    if name == "agent.backends":  # every backend, not only the ones make_backend() happened to import
        for info in pkgutil.iter_modules(module.__path__):
            importlib.import_module(f"agent.backends.{info.name}")
forbidden = json.loads(sys.argv[1])
print(json.dumps(sorted(name for name in sys.modules
                        if any(name == bad or name.startswith(bad + ".") for bad in forbidden))))
"""


def loaded(modules: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    """Import ``modules`` in a fresh interpreter; the modules of ``forbidden`` packages that got loaded."""
    result = subprocess.run([sys.executable, "-c", PROBE, json.dumps(forbidden), *modules], cwd=REPO,
                            env=child_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def imported_names(path: Path, package: str) -> set[str]:
    """Every module ``path`` imports, at the top or inside functions, relative imports made absolute."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def violations(folder: Path, package: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in sorted(folder.glob("*.py")):
        bad = sorted(name for name in imported_names(path, package)
                     if any(name == prefix or name.startswith(prefix + ".") for prefix in forbidden))
        if bad:
            found[path.name] = bad
    return found


def test_the_agent_loads_no_coordinator_web_store_or_torch_module() -> None:
    assert loaded(AGENT_MODULES, NOT_IN_THE_AGENT) == []


def test_the_agent_probe_sees_a_forbidden_import() -> None:
    assert "broker.coordinator.runtime" in loaded((*AGENT_MODULES, "broker.coordinator.runtime"), NOT_IN_THE_AGENT)


def test_scheduling_modules_import_neither_the_coordinator_nor_the_mqtt_client() -> None:
    assert violations(SCHEDULING, "broker.scheduling", NOT_IN_SCHEDULING) == {}


def test_scheduling_modules_load_neither_the_coordinator_nor_the_mqtt_client() -> None:
    modules = tuple(f"broker.scheduling.{path.stem}" for path in sorted(SCHEDULING.glob("*.py"))
                    if path.stem != "__init__")
    assert loaded(modules, NOT_IN_SCHEDULING) == []


def test_the_static_check_sees_a_forbidden_import() -> None:
    found = violations(REPO / "broker" / "coordinator", "broker.coordinator", NOT_IN_SCHEDULING)
    assert any(name.startswith("broker.mqtt") for names in found.values() for name in names), found
