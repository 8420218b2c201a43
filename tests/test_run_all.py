"""Smoke test of ``run_all.py``: the whole local cluster comes up, answers, and stops cleanly on SIGTERM.

Broker, web app and local agent are the real ones; the agent's backend is
the Ollama test double.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.ollama_double import OllamaDouble, reply_text
from tests.support.processes import REPO, child_env, free_port, stop_in_time

pytestmark = pytest.mark.slow


def test_run_all_comes_up_answers_and_stops(tmp_path: Path) -> None:
    port, mqtt_port = free_port(), free_port()
    log_path = tmp_path / "run_all.log"
    with OllamaDouble(tokens_per_s=500) as double, log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable, "run_all.py", "--no-browser", "--port", str(port), "--mqtt-port", str(mqtt_port),
                "--data-dir", str(tmp_path / "data"), "--backend-url", double.url, "--agent-id", "local-agent",
            ],
            cwd=REPO, env=child_env(), stdout=log, stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            healthy = False
            while time.monotonic() < deadline and process.poll() is None:
                try:
                    healthy = httpx.get(f"{url}/health", timeout=2).json().get("healthy", False)
                except (httpx.HTTPError, ValueError):
                    healthy = False
                if healthy:
                    break
                time.sleep(0.5)
            assert healthy, f"the cluster did not become healthy:\n{log_path.read_text(errors='replace')[-5000:]}"
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
            completion = client.chat.completions.create(
                model="auto", messages=[{"role": "user", "content": "is the whole cluster up"}]
            )
            assert completion.choices[0].message.content == reply_text("is the whole cluster up")
            assert (completion.model_extra or {})["slb"]["agents"] == ["local-agent"]
        finally:
            code = stop_in_time(process, 40, lambda: log_path.read_text()[-5000:])
    assert code == 0, log_path.read_text(errors="replace")[-5000:]
    text = log_path.read_text(errors="replace")
    assert "Traceback" not in text, text[-5000:]
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/health", timeout=2)
