"""Before/after screenshots of a project tree's demo, for issue 14's numbered problems.

Usage (from any folder; TREE is a checkout or an exported tree of this project):

    python scripts/screenshots.py TREE OUT_DIR
    # e.g. the tree before issue 14 and the one after:
    mkdir -p /tmp/before && git archive fa2b19a | tar -x -C /tmp/before
    python scripts/screenshots.py /tmp/before /work/notes/screens/before
    mkdir -p /tmp/after && git archive HEAD | tar -x -C /tmp/after
    python scripts/screenshots.py /tmp/after /work/notes/screens/after

It starts TREE's own ``run_all.py --demo`` (TREE's Python files, this interpreter's packages) on free ports with
its data in a temporary folder and a backend URL where no Ollama answers, drives Debian's Chromium through
Playwright at 1440x900 and 390x844, and writes PNGs, short terminal captures (``*.txt``) and ``index.md``
(what each picture shows, which problem it belongs to, and notes for every step that could not be done)
into OUT_DIR. It finds things by tab names, labels, button names and Gradio's own markup, never by element
ids that only a newer tree has; a missing element becomes a note, not a crash. Takes 3-5 minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from playwright.sync_api import Browser, Locator, Page, sync_playwright

logger = logging.getLogger("screenshots")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DESKTOP = {"width": 1440, "height": 900}
PHONE = {"width": 390, "height": 844}
STEP_TIMEOUT_MS = 15_000
DEMO_READY_LIMIT_S = 90.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get_json(url: str, timeout: float = 3.0) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


def tree_env(tree: Path) -> dict[str, str]:
    """The tree's own modules first, nothing downloaded, no setting of the caller's shell."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("SLB_") and name not in ("OLLAMA_HOST", "OLLAMA_NUM_PARALLEL")}
    env.update({"PYTHONPATH": str(tree), "PYTHONUNBUFFERED": "1", "GRADIO_ANALYTICS_ENABLED": "False",
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    return env


def children_of(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def command_line(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@dataclass
class Shots:
    """Pictures and notes of one run; written as index.md."""

    out: Path
    entries: list[tuple[str, str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def shot(self, page: Page, name: str, problems: str, caption: str, *, full: bool = False) -> None:
        try:
            page.screenshot(path=str(self.out / f"{name}.png"), full_page=full)
            self.entries.append((f"{name}.png", problems, caption))
        except Exception as error:  # noqa: BLE001 - a picture that cannot be taken is a note
            self.note(f"{name}.png not taken: {first_line(error)}")

    def text(self, name: str, problems: str, caption: str, body: str) -> None:
        (self.out / f"{name}.txt").write_text(body)
        self.entries.append((f"{name}.txt", problems, caption))

    def note(self, line: str) -> None:
        logger.info("note: %s", line)
        self.notes.append(line)

    def write_index(self, tree: Path) -> None:
        lines = [f"# Screens of `{tree}`", "", f"Taken {time.strftime('%Y-%m-%d %H:%M')} by scripts/screenshots.py "
                 "(run_all.py --demo, no Ollama; Chromium 1440x900 and 390x844).", "",
                 "| file | problem | what it shows |", "| --- | --- | --- |"]
        lines += [f"| {name} | {problems} | {caption} |" for name, problems, caption in self.entries]
        lines += ["", "## Notes", ""] + [f"- {note}" for note in self.notes or ["none"]]
        (self.out / "index.md").write_text("\n".join(lines) + "\n")


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


@contextlib.contextmanager
def step(shots: Shots, what: str) -> Iterator[None]:
    """Run one step; a failure becomes a note and the run goes on."""
    logger.info("step: %s", what)
    try:
        yield
    except Exception as error:  # noqa: BLE001 - tolerant on purpose: old and new trees differ
        shots.note(f"{what}: could not be done ({first_line(error)})")


class Demo:
    """The tree's run_all.py --demo, on free ports, with its data in a temporary folder."""

    def __init__(self, tree: Path, work: Path) -> None:
        self.tree = tree
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = work / "run_all-demo.log"
        command = [sys.executable, "run_all.py", "--demo", "--no-browser", "--port", str(self.port),
                   "--mqtt-port", str(free_port()), "--data-dir", str(work / "data"),
                   "--backend-url", f"http://127.0.0.1:{free_port()}"]
        self.log = self.log_path.open("wb")
        self.process = subprocess.Popen(command, cwd=tree, env=tree_env(tree), stdout=self.log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        logger.info("started %s in %s (pid %d), log %s", " ".join(command[1:]), tree, self.process.pid,
                    self.log_path)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, limit_s: float = 180.0) -> float:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline and self.process.poll() is None:
            body = get_json(f"{self.url}/health", timeout=2)
            if isinstance(body, dict):
                return time.monotonic()
            time.sleep(0.5)
        raise RuntimeError(f"the demo did not come up at {self.url}:\n{self.log_text()[-3000:]}")

    def agents(self) -> dict[str, dict[str, Any]]:
        body = get_json(f"{self.url}/status")
        agents = body.get("agents", []) if isinstance(body, dict) else []
        return {agent.get("id", "?"): agent for agent in agents if isinstance(agent, dict)}

    def demo_ready(self) -> bool:
        demo = {agent_id: agent for agent_id, agent in self.agents().items() if agent_id.startswith("demo-")}
        return len(demo) >= 3 and all(agent.get("online") and agent.get("model_state") == "ready"
                                      for agent in demo.values())

    def agent_pids(self) -> dict[int, str]:
        """Agent processes run_all started (simulated and local), by pid, with their command lines."""
        return {pid: line for pid in children_of(self.process.pid)
                if " -m agent " in (line := command_line(pid))}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.log.close()


# ---- page helpers: names and labels, never new element ids


def open_tab(page: Page, name: str) -> None:
    page.get_by_role("tab", name=re.compile(rf"^\s*{name}", re.IGNORECASE)).first.click()
    page.wait_for_timeout(800)


def message_box(page: Page) -> Locator:
    by_placeholder = page.get_by_placeholder(re.compile(r"question|message|ask", re.IGNORECASE))
    for candidate in (page.locator("#slb-message textarea"), by_placeholder.locator("visible=true")):
        if candidate.count():
            return candidate.first
    return page.locator("textarea:visible").last


def button(page: Page, pattern: str) -> Locator:
    return page.get_by_role("button", name=re.compile(pattern, re.IGNORECASE)).locator("visible=true")


def first_button(page: Page, *patterns: str) -> Locator:
    """The first visible button matching the first pattern that matches any (most specific first)."""
    for pattern in patterns:
        found = button(page, pattern)
        if found.count():
            return found.first
    raise LookupError(f"no visible button matches any of {patterns}")


def visible_button(page: Page, pattern: str, opener: str) -> Locator:
    """The first visible button matching ``pattern``; opens a closed accordion whose label matches ``opener``."""
    found = button(page, pattern)
    if not found.count():
        page.get_by_text(re.compile(opener, re.IGNORECASE)).locator("visible=true").first.click()
        page.wait_for_timeout(600)
        found = button(page, pattern)
    return found.first


def ask(page: Page, question: str) -> None:
    box = message_box(page)
    box.fill(question)
    send = button(page, r"^\s*send\s*$")
    if send.count():
        send.first.click()
    else:
        box.press("Enter")


def bot_messages(page: Page) -> Locator:
    return page.locator('[data-testid="bot"]')


def wait_answer_settles(page: Page, limit_s: float = 60.0, still_s: float = 2.5) -> str:
    """Wait until the last bot message exists and stops changing; its text."""
    deadline = time.monotonic() + limit_s
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        messages = bot_messages(page)
        text = messages.last.inner_text() if messages.count() else ""
        if text != last:
            last, since = text, time.monotonic()
        elif text and time.monotonic() - since >= still_s:
            return text
        page.wait_for_timeout(300)
    return last or ""


def revealed(page: Page, target: Locator, opener: str = r"chat settings|options|settings") -> Locator:
    """``target``'s first visible match; opens closed accordions whose label matches ``opener`` until it shows."""
    if target.locator("visible=true").count():
        return target.locator("visible=true").first
    openers = page.get_by_role("button", name=re.compile(opener, re.IGNORECASE)).locator("visible=true")
    for index in range(min(openers.count(), 4)):
        openers.nth(index).click()
        page.wait_for_timeout(600)
        if target.locator("visible=true").count():
            return target.locator("visible=true").first
    return target.first


def choose_mode(page: Page, pattern: str) -> None:
    field_ = revealed(page, page.get_by_label(re.compile(r"^\s*mode", re.IGNORECASE)))
    field_.click()
    page.get_by_role("option", name=re.compile(pattern, re.IGNORECASE)).first.click()
    page.wait_for_timeout(300)


def new_page(browser: Browser, viewport: dict[str, int], url: str, *, phone: bool = False) -> Page:
    context = browser.new_context(viewport=viewport, is_mobile=phone, has_touch=phone)
    page = context.new_page()
    page.set_default_timeout(STEP_TIMEOUT_MS)
    page.goto(url)
    message_box(page).wait_for(state="visible")
    page.wait_for_timeout(1500)
    return page


# ---- the run


def capture_browser(demo: Demo, shots: Shots, browser: Browser) -> None:
    opened = demo.wait_healthy()
    desktop = new_page(browser, DESKTOP, demo.url)
    shots.shot(desktop, "02-chat-on-open-desktop", "2", "chat tab right after the page opened (notice/banner)")
    with step(shots, "cluster tab at open"):
        open_tab(desktop, "Cluster")
        shots.shot(desktop, "02-cluster-at-open-desktop", "2, 9", "cluster tab seconds after opening", full=True)
        open_tab(desktop, "Chat")
    phone = new_page(browser, PHONE, demo.url, phone=True)
    shots.shot(phone, "02-chat-on-open-phone", "2, 5", "phone: first screen of the chat tab")

    deadline = opened + DEMO_READY_LIMIT_S
    while time.monotonic() < deadline and not demo.demo_ready():
        time.sleep(0.5)
    if demo.demo_ready():
        shots.note(f"the three demo machines were ready {time.monotonic() - opened:.0f} s after the app answered "
                   "(page open) (upper bound: polled while taking the first pictures)")
    else:
        shots.note(f"the demo machines were not all ready {DEMO_READY_LIMIT_S:.0f} s after the page opened: "
                   f"{ {key: value.get('model_state') for key, value in demo.agents().items()} }")
    states = {key: (value.get("online"), value.get("model_state")) for key, value in demo.agents().items()}
    shots.note(f"/status agents (online, model state) when ready: {states}")

    with step(shots, "cluster tab when ready"):
        open_tab(desktop, "Cluster")
        desktop.wait_for_timeout(2500)
        shots.shot(desktop, "02-cluster-ready-desktop", "2, 9", "cluster tab with the demo ready: states, counts, "
                   "table (first screen)")
        shots.shot(desktop, "09-cluster-ready-full-desktop", "9", "whole cluster tab: table, reasons, plots",
                   full=True)
        open_tab(desktop, "Chat")

    with step(shots, "answer in auto mode and the chat's controls"):
        ask(desktop, "What does this cluster do with my question?")
        wait_answer_settles(desktop)
        shots.shot(desktop, "07-chat-answered-desktop", "7", "an answer in auto mode and the chat's controls",
                   full=True)
        bot_messages(desktop).last.hover()
        desktop.wait_for_timeout(500)
        shots.shot(desktop, "07-chat-controls-hover-desktop", "7", "mouse over the answer: the message actions")
        names = sorted({" ".join(name.split()) for name in desktop.get_by_role("button").locator("visible=true")
                        .evaluate_all("els => els.map(e => e.getAttribute('aria-label') || e.innerText)") if name})
        shots.note(f"visible buttons on the chat tab (problem 7): {', '.join(names)[:900]}")
        with contextlib.suppress(Exception):  # settings folded away in an accordion count as present
            revealed(desktop, desktop.get_by_label(re.compile(r"^\s*mode", re.IGNORECASE)))
        for control in ("regenerate|retry", "edit", "undo", "system prompt", "temperature", "dark|theme"):
            found = desktop.get_by_text(re.compile(control, re.IGNORECASE)).count() + \
                button(desktop, control).count() + desktop.get_by_label(re.compile(control, re.IGNORECASE)).count()
            shots.note(f"chat control /{control}/: {'found' if found else 'not found'} on the page")

    with step(shots, "fan-out answer streaming, Enter pressed again"):
        choose_mode(desktop, r"^\s*all")
        ask(desktop, "Explain fan-out to every machine in one paragraph.")
        desktop.wait_for_timeout(1500)
        shots.shot(desktop, "06-streaming-desktop", "6", "an answer streaming (mode all)")
        box = message_box(desktop)
        box.fill("A second question while the first streams")
        box.press("Enter")
        desktop.wait_for_timeout(700)
        shots.shot(desktop, "06-enter-again-while-streaming-desktop", "6",
                   "Enter pressed again while the answer streams: what the user sees")
        wait_answer_settles(desktop, limit_s=60)
        shots.shot(desktop, "06-after-streaming-desktop", "6", "after the stream: was the second question kept?")

    with step(shots, "phone: options, fan-out streaming, cluster"):
        shots.shot(phone, "05-chat-options-phone", "5", "phone: the chat's options (labels)", full=True)
        choose_mode(phone, r"^\s*all")
        ask(phone, "Where does a fan-out answer show on a phone?")
        phone.wait_for_timeout(2500)
        shots.shot(phone, "05-fanout-streaming-phone", "5", "phone: a fan-out answer streaming (first screen)")
        wait_answer_settles(phone, limit_s=60)
        shots.shot(phone, "05-fanout-done-phone-full", "5", "phone: the whole page after the fan-out", full=True)
        open_tab(phone, "Cluster")
        phone.wait_for_timeout(2000)
        shots.shot(phone, "05-cluster-phone", "5, 9", "phone: cluster tab (first screen)")
        shots.shot(phone, "05-cluster-phone-full", "5, 9", "phone: whole cluster tab (table columns)", full=True)

    with step(shots, "a second browser's chat list"):
        other = new_page(browser, DESKTOP, demo.url)
        shots.shot(other, "08-second-browser-chat-list-desktop", "8",
                   "a different browser (no shared cookies): whose chats does it list?")
        other.context.close()

    with step(shots, "documents: add two, search"):
        open_tab(desktop, "Documents")
        folder = demo.log_path.parent / "documents"
        folder.mkdir(exist_ok=True)
        (folder / "cluster-notes.md").write_text(
            "# Cluster notes\n\nThe coordinator scores every machine from 0 to 100 and places the largest model "
            "that fits. A Raspberry Pi gets a 1B model; a GPU desktop gets an 8B model.\n")
        (folder / "pancakes.md").write_text(
            "# Pancakes\n\nMix flour, milk and two eggs. Rest the batter, then fry in butter until golden.\n")
        desktop.locator("input[type=file]").first.set_input_files([str(path) for path in sorted(folder.iterdir())])
        desktop.wait_for_timeout(1500)
        first_button(desktop, r"add to library", r"^\s*add\b", r"^\s*upload\s*$").click()
        desktop.wait_for_timeout(2000)
        shots.shot(desktop, "10-documents-adding-desktop", "10", "documents tab while two files are added "
                   "(progress, time left?)")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not desktop.get_by_text("pancakes.md").locator("visible=true").count():
            desktop.wait_for_timeout(1000)
        desktop.wait_for_timeout(1500)
        search = desktop.get_by_role("textbox", name=re.compile(r"search", re.IGNORECASE)).locator("visible=true").first
        search.fill("which model does a raspberry pi get")
        button(desktop, r"^\s*search\s*$").first.click()
        desktop.wait_for_timeout(4000)
        shots.shot(desktop, "10-documents-search-desktop", "10", "documents tab: two documents, a search and its "
                   "hits (is the unrelated recipe listed, what does its score say)", full=True)

    with step(shots, "chat with documents: citations"):
        open_tab(desktop, "Chat")
        button(desktop, r"new chat").first.click()
        desktop.wait_for_timeout(800)
        choose_mode(desktop, r"^\s*auto")
        revealed(desktop, desktop.get_by_label(re.compile(r"use my doc|rag", re.IGNORECASE))).check()
        ask(desktop, "Which model does a Raspberry Pi get?")
        wait_answer_settles(desktop)
        shots.shot(desktop, "10-rag-answer-citations-desktop", "10", "an answer with my documents: its citations")
        with step(shots, "open the answer's sources"):
            sources = bot_messages(desktop).last.get_by_text(re.compile(r"^\s*(sources|citations)", re.IGNORECASE))
            sources.locator("visible=true").first.click()
            desktop.wait_for_timeout(800)
            shots.shot(desktop, "10-rag-sources-open-desktop", "10", "the answer's sources opened: which passages, "
                       "how relevant")

    failed_question = "This question fails: every machine is frozen"
    stopped: list[int] = []
    with step(shots, "a failed answer while it happens"):
        button(desktop, r"new chat").first.click()
        desktop.wait_for_timeout(800)
        stopped = list(demo.agent_pids())
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline and any(agent.get("online") for agent in demo.agents().values()):
            time.sleep(1)
        shots.note(f"froze {len(stopped)} agent processes (SIGSTOP); online after waiting: "
                   f"{[key for key, value in demo.agents().items() if value.get('online')]}")
        ask(desktop, failed_question)
        wait_answer_settles(desktop, limit_s=90, still_s=4)
        shots.shot(desktop, "04-failed-answer-live-desktop", "4", "a question no machine can answer: what the "
                   "chat shows while it happens")
    for pid in stopped:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)

    with step(shots, "the failed chat reopened"):
        button(desktop, r"new chat").first.click()
        desktop.wait_for_timeout(1500)
        desktop.get_by_text(failed_question[:30]).first.click()
        desktop.wait_for_timeout(2500)
        shots.shot(desktop, "04-failed-answer-reopened-desktop", "4", "the same chat reopened from the list: "
                   "is the error still there?")

    with step(shots, "delete chat clicked"):
        before = desktop.get_by_text(failed_question[:30]).count()
        visible_button(desktop, r"delete chat|^\s*delete\s*$", r"delete").click()
        desktop.wait_for_timeout(1500)
        shots.shot(desktop, "07-delete-chat-clicked-desktop", "7", "right after clicking Delete chat: "
                   "confirmation, undo, or gone at once?")
        shots.note(f"delete chat: the chat's title appeared {before} times before the click, "
                   f"{desktop.get_by_text(failed_question[:30]).count()} times 1.5 s after")

    with step(shots, "an agent killed with SIGKILL"):
        victim = next((pid for pid, line in demo.agent_pids().items() if "demo-laptop" in line), None)
        if victim is None:
            raise RuntimeError("no demo-laptop agent process found")
        log_mark = len(demo.log_text())
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        samples = []
        open_tab(desktop, "Cluster")
        for after_s in (8, 15, 30, 45):
            while time.monotonic() - killed < after_s:
                time.sleep(0.5)
            agent = demo.agents().get("demo-laptop", {})
            samples.append(f"+{after_s:>2} s: online={agent.get('online')} model_state={agent.get('model_state')} "
                           f"{ {key: value for key, value in agent.items() if 'job' in key} }")
            if after_s in (8, 45):
                shots.shot(desktop, f"03-cluster-{after_s}s-after-kill-desktop", "3",
                           f"cluster tab {after_s} s after demo-laptop's agent was killed (SIGKILL)", full=True)
        log_after = "\n".join(line for line in demo.log_text()[log_mark:].splitlines()
                              if re.search(r"exit|restart|start|demo-laptop", line))
        shots.text("03-agent-killed", "3", "terminal: run_all.py after an agent was killed, and /status samples",
                   f"$ kill -9 {victim}   # demo-laptop's agent, started by run_all.py --demo\n\n"
                   f"run_all.py's terminal in the 45 s after:\n{log_after or '(nothing)'}\n\n"
                   "GET /status, agent demo-laptop:\n" + "\n".join(samples) + "\n")


def capture_broker(tree: Path, shots: Shots, work: Path) -> None:
    """run_all.py when the MQTT port is taken by a Mosquitto it did not start (as Debian's service takes :1883)."""
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    system = subprocess.Popen([mosquitto, "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1)
        command = [sys.executable, "run_all.py", "--no-app", "--no-agent", "--no-browser", "--mqtt-port", str(port),
                   "--data-dir", str(work / "broker-data")]
        run = subprocess.Popen(command, cwd=tree, env=tree_env(tree), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
        time.sleep(5)
        run.send_signal(signal.SIGTERM)
        output = run.communicate(timeout=30)[0].decode(errors="replace")
    finally:
        system.terminate()
        system.wait(10)
    shots.text("01-broker-port-taken", "1", "terminal: run_all.py when its MQTT port is taken by a Mosquitto "
               "it did not start", f"# a Mosquitto run_all.py did not start listens on 127.0.0.1:{port}\n"
               f"$ python {' '.join(command[1:])}\n{output}")


def capture_install(tree: Path, shots: Shots) -> None:
    """What the tree's install does about torch, python3-venv and a system Mosquitto."""
    install = tree / "scripts" / "install.sh"
    script = install.read_text() if install.exists() else ""
    parts = [f"# {install}"]
    if "--dry-run" in script:
        for env_extra in ({}, {"SLB_TORCH": "auto"}):
            result = subprocess.run(["bash", str(install), "--dry-run"], cwd=tree, env=dict(tree_env(tree),
                                    **env_extra), capture_output=True, text=True, timeout=300, check=False)
            shown = " ".join(f"{key}={value}" for key, value in env_extra.items())
            parts.append(f"$ {shown + ' ' if shown else ''}scripts/install.sh --dry-run   (exit {result.returncode})\n"
                         f"{result.stderr}{result.stdout}")
    else:
        parts.append("(this install.sh has no --dry-run; the lines that install Python packages:)")
        parts += [line for line in script.splitlines() if "pip install" in line or "pip:" in line]
    requirements = tree / "requirements.txt"
    pins = [line for line in requirements.read_text().splitlines() if line.startswith("torch")] \
        if requirements.exists() else []
    parts.append(f"requirements.txt torch line(s): {pins}")
    parts.append("install.sh mentions python3-venv: " + ("yes" if "python3-venv" in script else "no"))
    parts.append("install.sh says what to do about apt's system Mosquitto on :1883: "
                 + ("yes" if "systemctl" in script else "no"))
    parts.append("(This machine has no internet: pip cannot show here what plain PyPI resolves for torch. On "
                 "Linux x86_64, PyPI's torch==2.13.0 wheel depends on the nvidia-* CUDA packages and triton.)")
    shots.text("01-install", "1", "terminal: what the install does about torch, python3-venv, Mosquitto",
               "\n\n".join(parts) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tree", type=Path, help="project tree whose run_all.py --demo is shown")
    parser.add_argument("out", type=Path, help="folder for the PNGs, the text captures and index.md")
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    tree = options.tree.resolve()
    if not (tree / "run_all.py").exists():
        parser.error(f"{tree} has no run_all.py")
    if not Path(CHROMIUM).exists():
        parser.error(f"{CHROMIUM} is missing (apt-get install chromium)")
    options.out.mkdir(parents=True, exist_ok=True)
    shots = Shots(options.out)
    with tempfile.TemporaryDirectory(prefix="slb-screens-") as folder:
        work = Path(folder)
        with step(shots, "install capture"):
            capture_install(tree, shots)
        with step(shots, "broker capture"):
            capture_broker(tree, shots, work)
        demo = Demo(tree, work)
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                try:
                    with step(shots, "browser run"):
                        capture_browser(demo, shots, browser)
                finally:
                    browser.close()
        finally:
            demo.stop()
            shutil.copy(demo.log_path, options.out / "run_all-demo.log")
            shots.entries.append(("run_all-demo.log", "2, 3", "run_all.py --demo's whole terminal output"))
    shots.write_index(tree)
    logger.info("wrote %d files and index.md to %s", len(shots.entries), options.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

