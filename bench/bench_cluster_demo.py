"""How soon ``python run_all.py --demo`` shows three ready machines in the Cluster tab (issue 14: within 40 s).

Starts run_all with ``--demo`` on free ports and a fresh data folder, with the local agent pointed at a port where
no Ollama listens (what a machine without Ollama sees), opens the page in Debian's Chromium as soon as the app
answers (when run_all would open the browser), clicks the Cluster tab and waits until the summary says three
ready agents and the table shows three green dots. Screenshots at 1440×900 and 390×844 go to
tests/artifacts/demo_cluster_*.png.

    python -m bench.bench_cluster_demo

Figures (logged, and written to bench/results/quick/cluster_demo.json): seconds from start to the app answering,
from page open to three ready machines, and from start to three ready machines.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from playwright.sync_api import expect, sync_playwright

from broker.mqtt.local_broker import free_port
from tests.support.processes import REPO, child_env, stop_in_time

logger = logging.getLogger(__name__)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
GOAL_S = 40.0
ARTIFACTS = REPO / "tests" / "artifacts"
RESULTS = REPO / "bench" / "results" / "quick" / "cluster_demo.json"


def app_answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def ask_a_few(url: str, count: int = 6) -> None:
    """``count`` questions at once through ``/v1/chat/completions`` (the demo's simulated machines answer)."""
    def ask(index: int) -> None:
        body = {"model": "auto", "messages": [{"role": "user", "content": f"Tell me a long story, number {index}."}],
                "max_tokens": 120}
        try:
            httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        except httpx.HTTPError as error:
            logger.warning("question %s failed: %s", index, error)

    threads = [threading.Thread(target=ask, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def measure(folder: Path) -> dict[str, float]:
    port, mqtt_port, no_ollama = free_port(), free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = folder / "run_all.log"
    with log_path.open("wb") as log:
        started = time.monotonic()
        process = subprocess.Popen(
            [sys.executable, "run_all.py", "--demo", "--no-browser", "--port", str(port), "--mqtt-port",
             str(mqtt_port), "--data-dir", str(folder / "data"), "--backend-url", f"http://127.0.0.1:{no_ollama}"],
            cwd=REPO, env=child_env(), stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            while not app_answers(url):
                if process.poll() is not None or time.monotonic() - started > 120:
                    raise RuntimeError(log_path.read_text(errors="replace")[-3000:])
                time.sleep(0.2)
            app_up = time.monotonic() - started
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1440, "height": 900})
                opened = time.monotonic()
                page.goto(url)
                page.get_by_role("tab", name="Cluster").click()
                expect(page.locator("#slb-cluster-summary")).to_contain_text("3 of 3 agents online · 3 ready",
                                                                             timeout=120_000)
                expect(page.locator("#slb-agents .slb-dot.slb-is-ready")).to_have_count(3)
                ready_after_open = time.monotonic() - opened
                ready_after_start = time.monotonic() - started
                ARTIFACTS.mkdir(exist_ok=True)
                asking = threading.Thread(target=ask_a_few, args=(url,), daemon=True)
                asking.start()  # some answers running, so the tokens/s and jobs plots show activity
                time.sleep(6)
                page.screenshot(path=str(ARTIFACTS / "demo_cluster_desktop.png"), full_page=True)
                page.set_viewport_size({"width": 390, "height": 844})
                time.sleep(1)
                page.screenshot(path=str(ARTIFACTS / "demo_cluster_phone.png"), full_page=True)
                browser.close()
                asking.join(timeout=60)
        finally:
            stop_in_time(process, 40, lambda: log_path.read_text(errors="replace")[-3000:])
    return {"app_up_s": round(app_up, 1), "ready_after_page_open_s": round(ready_after_open, 1),
            "ready_after_start_s": round(ready_after_start, 1), "goal_s": GOAL_S}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory(prefix="slb-bench-demo-") as name:
        figures = measure(Path(name))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    logger.info("demo: app answers after %.1f s; three ready machines %.1f s after the page opened "
                "(%.1f s after start; goal %.0f s)", figures["app_up_s"], figures["ready_after_page_open_s"],
                figures["ready_after_start_s"], GOAL_S)


if __name__ == "__main__":
    main()
