"""The Cluster tab in Debian's Chromium at 1440×900 and 390×844 (issue 14, items 2, 3, 5 and 9).

The real web app around a scripted coordinator (tests/app_scripted.py): the states a real cluster shows only
now and then — a model that failed, an agent gone offline, a pull half done, a busy machine — are on screen
at once and change on demand. What the coordinator puts into those views (an offline agent's jobs cleared, a
reason that quotes an older score) is covered against the real registry in tests/test_app_units.py.
Screenshots: tests/artifacts/ui_cluster_*.png.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Locator, Page, expect

from app.sampler import ClusterSampler
from broker.coordinator.contract import AgentView
from broker.scheduling.placement import nothing_placed
from tests.app_scripted import ScriptedCoordinator, ServedApp, agent, serve
from tests.app_support import ARTIFACTS
from tests.test_ui_browser import TIMEOUT_MS, browser  # noqa: F401 - the module's browser fixture

pytestmark = [pytest.mark.browser, pytest.mark.slow]

DESKTOP = {"width": 1440, "height": 900}
PHONE = {"width": 390, "height": 844}
FAILED_ERROR = "pull llama3.2:1b: connection refused"
BREAKDOWN = {"cpu": 17.5, "ram": 24.0, "gpu": 8.0, "speed": 23.3}


def cluster_agents() -> list[AgentView]:
    """Five machines, one of each condition: two ready (one busy), one pulling, one whose model failed, one
    offline for three minutes."""
    return [
        agent("gpu-desktop", simulated=True, score=100.0, model="llama3.1:8b", model_state="ready",
              score_breakdown={"cpu": 20.0, "ram": 25.0, "gpu": 25.0, "speed": 30.0}, jobs_running=2,
              jobs_queued=1, slots=4, tokens_per_s=151.2, speed_source="measured", cpu_percent=63.0,
              ram_free_gb=41.5, vram_free_gb=9.8, hardware_summary="Ryzen 9 7950X · 16 cores · 64 GB RAM · "
              "RTX 4090 24 GB", backend="simulated", last_seen_s=0.3,
              placement_reason="score 100.0 → large (80+): llama3.1:8b"),
        agent("laptop-with-a-long-name", score=72.8, model="llama3.2:3b", model_state="ready",
              score_breakdown=BREAKDOWN, slots=4, tokens_per_s=24.0, speed_source="claimed", cpu_percent=12.0,
              ram_free_gb=9.1, hardware_summary="i7-1260P · 12 cores · 16 GB RAM", backend="ollama",
              last_seen_s=0.4, placement_reason="score 72.8 → medium (60–80): llama3.2:3b"),
        agent("new-box", score=55.0, model="qwen2.5:3b", model_state="pulling", model_progress=0.42,
              score_breakdown={"cpu": 15.0, "ram": 18.0, "gpu": 0.0, "speed": 22.0}, backend="ollama",
              last_seen_s=0.2, placement_reason="score 55.0 → small (0–60): qwen2.5:3b"),
        agent("ollama-here", score=61.0, model="llama3.2:1b", model_state="failed", model_error=FAILED_ERROR,
              score_breakdown={"cpu": 16.0, "ram": 24.0, "gpu": 0.0, "speed": 21.0}, backend="ollama",
              cpu_percent=5.0, ram_free_gb=12.0, last_seen_s=0.5,
              placement_reason=nothing_placed([f"llama3.2:1b failed here 3 s ago ({FAILED_ERROR})"])),
        agent("old-pi", online=False, score=34.0, model="llama3.2:1b", model_state=None,
              score_breakdown={"cpu": 10.0, "ram": 12.0, "gpu": 0.0, "speed": 12.0}, backend="simulated",
              simulated=True, tokens_per_s=6.0, speed_source="measured", last_seen_s=185.0,
              placement_reason="offline"),
    ]


@pytest.fixture(scope="module")
def cluster_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedApp]:
    coordinator = ScriptedCoordinator(agents=cluster_agents())
    with serve(coordinator, tmp_path_factory.mktemp("cluster-ui"), cluster_refresh_s=0.5) as served:
        yield served


def open_cluster(browser: Browser, url: str, viewport: dict[str, int]) -> Page:  # noqa: F811 - the imported fixture
    page = browser.new_context(viewport=viewport).new_page()  # type: ignore[arg-type]
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.get_by_role("tab", name="Cluster").click()
    expect(page.locator("#slb-agents")).to_be_visible()
    return page


def row(page: Page, agent_id: str) -> Locator:
    return page.locator("#slb-agents tbody tr", has=page.locator("td.slb-name", has_text=agent_id))


def test_states_and_counts_are_honest_on_a_desktop(browser: Browser, cluster_app: ServedApp) -> None:  # noqa: F811
    page = open_cluster(browser, cluster_app.url, DESKTOP)
    summary = page.locator("#slb-cluster-summary")
    expect(summary).to_contain_text("4 of 5 agents online · 2 ready · 1 starting · 1 failed · 1 offline")
    # Green only for the two ready machines; the failed one is red, the offline one grey.
    expect(page.locator("#slb-agents .slb-dot.slb-is-ready")).to_have_count(2)
    failed = row(page, "ollama-here")
    expect(failed.locator(".slb-dot")).to_have_class(re.compile(r"\bslb-is-failed\b"))
    expect(failed).to_contain_text("model failed")
    expect(failed).to_contain_text(FAILED_ERROR)
    reason = page.locator("#slb-placement li", has_text="ollama-here")
    expect(reason).to_contain_text(f"llama3.2:1b failed here 3 s ago ({FAILED_ERROR}); no other catalog model")
    expect(reason).not_to_contain_text("no catalog model fits")
    # Offline: greyed, since when, no jobs, not ready.
    offline = row(page, "old-pi")
    expect(offline).to_have_class(re.compile(r"\bslb-is-offline\b"))
    expect(offline.locator("td[data-label=Status]")).to_contain_text(re.compile(
        r"offline since \d\d:\d\d:\d\d \(3 min ago\)"))
    expect(offline.locator("td[data-label=Jobs]")).to_have_text("–")
    expect(offline).not_to_contain_text("ready")
    assert offline.evaluate("row => getComputedStyle(row.querySelector('td')).color") != \
        row(page, "gpu-desktop").evaluate("row => getComputedStyle(row.querySelector('td')).color")
    # Score, its parts and the live load; the table's score is the one the reason quotes.
    laptop = row(page, "laptop-with-a-long-name")
    expect(laptop.locator("td[data-label=Score]")).to_contain_text("72.8")
    expect(laptop.locator("td[data-label=Score]")).to_contain_text("cpu 17.5/20 · ram 24/25 · gpu 8/25 · speed 23.3/30")
    expect(page.locator("#slb-placement li", has_text="laptop-with-a-long-name")).to_contain_text("score 72.8")
    expect(row(page, "gpu-desktop").locator("td[data-label='Live load']")).to_have_text(
        "CPU 63% · 41.5 GB RAM free · 9.8 GB VRAM free")
    expect(row(page, "gpu-desktop").locator("td[data-label=Jobs]")).to_have_text("2 of 4 running · 1 queued")
    expect(row(page, "new-box")).to_contain_text("pulling")
    expect(page.locator("#slb-plot-legend")).to_contain_text("laptop-with-a-long-name")
    page.screenshot(path=str(ARTIFACTS / "ui_cluster_desktop.png"), full_page=True)
    _no_column_cut(page)
    _legends_inside(page)
    page.context.close()


def test_an_agent_that_goes_offline_is_shown_offline_and_its_plot_line_ends(browser: Browser,  # noqa: F811
                                                                          cluster_app: ServedApp) -> None:
    page = open_cluster(browser, cluster_app.url, DESKTOP)
    coordinator = cluster_app.coordinator
    expect(row(page, "gpu-desktop").locator(".slb-dot")).to_have_class(re.compile(r"\bslb-is-ready\b"))
    went_offline = time.time()
    coordinator.agents = [
        AgentView(**{**item.__dict__, "online": False, "model_state": None, "jobs_running": 0, "jobs_queued": 0,
                     "cpu_percent": None, "ram_free_gb": None, "vram_free_gb": None, "last_seen_s": 0.0})
        if item.id == "gpu-desktop" else item
        for item in coordinator.agents
    ]
    desktop = row(page, "gpu-desktop")
    expect(desktop).to_have_class(re.compile(r"\bslb-is-offline\b"))
    expect(desktop.locator("td[data-label=Jobs]")).to_have_text("–")
    expect(desktop.locator("td[data-label='Live load']")).to_have_text("–")
    expect(page.locator("#slb-cluster-summary")).to_contain_text("3 of 5 agents online · 1 ready")
    time.sleep(1.5)  # three more samples at 0.5 s
    samples = [sample for sample in _sampler(cluster_app).history() if sample.agent_id == "gpu-desktop"]
    assert samples and max(sample.at for sample in samples) < went_offline + 0.6, "no samples once offline"
    assert any(sample.tokens_per_s and sample.tokens_per_s > 300 for sample in samples), \
        "2 running answers at 151.2 tok/s each were drawn as generating"
    page.screenshot(path=str(ARTIFACTS / "ui_cluster_offline.png"), full_page=True)
    page.context.close()
    coordinator.agents = cluster_agents()


def test_phone_shows_every_column_of_every_agent(browser: Browser, cluster_app: ServedApp) -> None:  # noqa: F811
    page = open_cluster(browser, cluster_app.url, PHONE)
    first = page.locator("#slb-agents tbody tr").first
    for label in ("Agent", "Status", "Score", "Model", "Jobs", "tok/s", "Live load", "Hardware", "Runtime"):
        cell = first.locator(f"td[data-label='{label}']")
        expect(cell).to_be_visible()
        box = cell.bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], label
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], f"the page scrolls sideways ({width} px)"
    expect(row(page, "ollama-here")).to_contain_text("model failed")
    expect(page.locator("#slb-plot-legend")).to_contain_text("laptop-with-a-long-name")
    page.screenshot(path=str(ARTIFACTS / "ui_cluster_phone.png"), full_page=True)
    _legends_inside(page)
    page.context.close()


def _sampler(served: ServedApp) -> ClusterSampler:
    """The running app's cluster sampler (the app keeps its service on ``app.state``)."""
    return served.server.config.app.state.service.sampler


def _no_column_cut(page: Page) -> None:
    table = page.locator("#slb-agents").bounding_box()
    holder = page.locator("#slb-cluster-agents").bounding_box()
    assert table is not None and holder is not None
    assert table["x"] + table["width"] <= holder["x"] + holder["width"] + 1, "the table is wider than its place"


def _legends_inside(page: Page) -> None:
    """Every text of the three plots (titles, axis labels, legends) and every entry of the line plots' legend is
    drawn inside its plot's box, so none is cut off at the edge."""
    for plot in ("#slb-plot-speed", "#slb-plot-load", "#slb-plot-scores", "#slb-plot-legend"):
        container = page.locator(plot)
        expect(container.locator("svg, canvas, span").first).to_be_visible()
        cut = container.evaluate(
            """element => {
                 const box = element.getBoundingClientRect();
                 return [...element.querySelectorAll('text, span')].filter(item => {
                   const edge = item.getBoundingClientRect();
                   return edge.width > 0 && (edge.left < box.left - 1 || edge.right > box.right + 1
                                             || edge.right > window.innerWidth);
                 }).map(item => item.textContent);
               }""")
        assert not cut, f"{plot}: cut off: {cut}"
