"""The real web app around a scripted coordinator whose agents say a lot, as a child process.

``python -m tests.app_heavy --port P --data-dir D --agents 300`` serves
``create_app`` with :class:`tests.app_scripted.ScriptedCoordinator` holding
agents with hundreds of GPUs, model names and long errors each (more than the
protocol lets one agent publish, so the app's own bounds are what is tested).
A child process of its own, so a test that loads it measures the app, not its
own threads competing for the GIL (tests/test_web_hardening.py, ``/status``
under polling).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import uvicorn  # noqa: E402

from app.server import create_app  # noqa: E402
from app.settings import AppSettings  # noqa: E402
from broker.coordinator.contract import AgentView, ModelAvailability, ModelHolder  # noqa: E402
from tests.app_scripted import ScriptedCoordinator, agent, answer  # noqa: E402


def heavy_agent(index: int, gpus: int, models: int, error_chars: int) -> AgentView:
    names = [f"family-{index}-{number}/model-with-a-long-name-{number}:q4_K_M" for number in range(models)]
    hardware = {
        "description": "a machine that says a lot " * 20,
        "cpu_brand": "CPU " * 50,
        "gpus": [{"name": f"NVIDIA H100 80GB HBM3 number {number}", "vendor": "nvidia", "vram_total_gb": 80.0,
                  "vram_free_gb": 79.5, "driver": "550.54.15", "uuid": f"GPU-{index:04d}-{number:08d}"}
                 for number in range(gpus)],
    }
    return agent(
        f"agent-{index:04d}", model=names[0] if names else "m", model_state="ready", hardware=hardware,
        hardware_summary=f"{gpus} × H100", local_models=names, loaded_models=names[: models // 2],
        available_models={name: "local" for name in names}, backend="ollama",
        backend_url=f"http://user:secret-{index}@10.0.0.{index % 250}:11434", backend_reachable=True,
        backend_error="e" * error_chars, placement_reason="r" * error_chars,
        runtime={"kind": "ollama", "version": "0.6.8", "detected_by": "d" * error_chars},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--agents", type=int, default=300)
    parser.add_argument("--gpus", type=int, default=400)
    parser.add_argument("--models", type=int, default=400)
    parser.add_argument("--error-chars", type=int, default=20_000)
    arguments = parser.parse_args()
    agents = [heavy_agent(index, arguments.gpus, arguments.models, arguments.error_chars)
              for index in range(arguments.agents)]
    available = [ModelAvailability(agents[0].model or "m", [ModelHolder(agents[0].id, agents[0].model or "m",
                                                                          "ready")])]
    coordinator = ScriptedCoordinator(agents=agents, available=available)
    coordinator.script = lambda request: answer(request, agents[0].id, agents[0].model or "m", ["ok"])
    settings = AppSettings(port=arguments.port, data_dir=arguments.data_dir, rag_warm_up=False)
    app = create_app(settings, coordinator=coordinator)
    uvicorn.run(app, host="127.0.0.1", port=arguments.port, log_level="warning")


if __name__ == "__main__":
    main()
