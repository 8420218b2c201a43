"""Start a whole single-machine cluster: broker, web app (with the coordinator) and a local agent.

    python run_all.py                      # broker + app + local agent (Ollama backend)
    python run_all.py --demo               # ... plus three simulated machines (without Ollama: only them)
    python run_all.py --agent-only --broker-url mqtt://HOST:1883   # on every other machine
    python run_all.py --postgres           # chats (and documents) in this cluster's own PostgreSQL

Every part it starts is restarted when it dies (1 s, 2 s, 4 s ... at most 30 s apart); Ctrl-C stops them all.
The broker is its own (Mosquitto, or the embedded one) unless --broker-url names another; when --mqtt-port
(1883) is taken by something it did not start (a system Mosquitto service), its own runs on a free port.
Every flag has an environment twin: SLB_ + the flag in upper snake case
(``--mqtt-port`` <-> ``SLB_MQTT_PORT``); a flag wins over its variable.
Chats live in SQLite in --data-dir unless --postgres starts PostgreSQL in <data-dir>/postgres (supervised and
stopped like the rest) or --database-url names one; either way the app gets it as SLB_DATABASE_URL, and other
app instances given the same URL share the chats (docs/scale-out.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import webbrowser
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from broker.mqtt.cli import configure_logging, parse_settings
from broker.mqtt.local_broker import (
    LOOPBACK_HOSTS,
    RunningBroker,
    free_port,
    open_broker_warning,
    start_broker,
)
from broker.protocol.redaction import redact_url

if TYPE_CHECKING:
    from app.store.postgres_local import LocalPostgres

logger = logging.getLogger("run_all")
ROOT = Path(__file__).resolve().parent
PROFILES = ROOT / "agent" / "profiles"

DEMO_AGENTS = (
    # (agent id, hardware profile, simulated tokens/s, simulated time to first token ms)
    ("demo-gpu-desktop", "gpu-desktop.json", 120.0, 80.0),
    ("demo-laptop", "laptop.json", 25.0, 300.0),
    ("demo-raspberry-pi", "raspberry-pi.json", 6.0, 900.0),
)

DEMO_PULL_S = 0.5
DEMO_BENCHMARK_TOKENS = 4


class RunAllSettings(BaseSettings):
    """What run_all.py starts, and where."""

    model_config = SettingsConfigDict(env_prefix="SLB_", extra="ignore")

    port: int = Field(default=7860, description="Port of the web app (UI, Gradio API and HTTP API).")
    host: str = Field(default="127.0.0.1", description="Address the web app listens on (0.0.0.0 for the LAN).")
    mqtt_port: int = Field(default=1883, description="Port of the local MQTT broker.")
    mqtt_host: str = Field(default="127.0.0.1", description="Address the local broker listens on.")
    broker_url: str | None = Field(
        default=None, description="Use this broker (mqtt://HOST:PORT) instead of starting one."
    )
    broker_kind: Literal["auto", "mosquitto", "embedded"] = Field(
        default="auto", description="Local broker: Mosquitto if installed (auto), or force one."
    )
    data_dir: Path = Field(default=Path("./data"), description="Folder for all data (sessions, documents, broker).")
    app: bool = Field(default=True, description="Start the web app (and the coordinator inside it).")
    agent: bool = Field(default=True, description="Start the local agent.")
    agent_only: bool = Field(default=False, description="Start only an agent (other machines of the cluster).")
    browser: bool = Field(default=True, description="Open the browser at the app's URL once it is up.")
    demo: bool = Field(default=False, description="Add three simulated machines (GPU desktop, laptop, Raspberry Pi).")
    backend: Literal["ollama", "openai", "simulated"] = Field(default="ollama", description="Local agent's backend.")
    backend_url: str | None = Field(default=None, description="Local agent's backend URL (Ollama: :11434).")
    agent_id: str | None = Field(default=None, description="Local agent's id (default: from the hostname).")
    max_parallel: int | None = Field(
        default=None, ge=1, description="Local agent: most jobs at once (the runtime's measured slots may be fewer)."
    )
    max_queue: int | None = Field(default=None, ge=0, description="Local agent: jobs waiting beyond its slots.")
    runtime_kind: str | None = Field(
        default=None, description="Local agent: skip runtime detection (ollama, llama.cpp, llama-cpp-python, "
        "lm-studio, vllm, openai; see docs/runtimes.md).",
    )
    probe_runtime: bool = Field(
        default=True, description="Local agent: measure the runtime's slots and prefill continuation at warm-up."
    )
    keep_alive: str | None = Field(default=None, description="Local agent: how long Ollama keeps a model loaded.")
    hardware_profile: Path | None = Field(
        default=None, description="Local agent: declare hardware from this JSON file instead of probing it."
    )
    catalog: Path | None = Field(
        default=None, description="Model catalog JSON that extends or overrides the shipped one (docs/scheduling.md)."
    )
    postgres: bool = Field(
        default=False,
        description="Start this cluster's own PostgreSQL (127.0.0.1 only) in <data-dir>/postgres and keep chats and "
        "documents in it, so more app instances on this machine can share them (docs/scale-out.md).",
    )
    postgres_port: int | None = Field(
        default=None, ge=1, le=65535,
        description="Port of the PostgreSQL that --postgres starts (default: a free one; fix it so other instances "
        "can be given a URL that stays the same).",
    )
    database_url: str | None = Field(
        default=None,
        description="Keep chats and documents in this PostgreSQL (postgresql://user:password@host:5432/name) "
        "instead of SQLite; passed to the app as SLB_DATABASE_URL.",
    )
    log_level: str = Field(default="INFO", description="Logging level.")


RESTART_FIRST_DELAY_S = 1.0
RESTART_MAX_DELAY_S = 30.0
STABLE_AFTER_S = 60.0
"""A child that ran this long before it died counts as healthy again: its next restart waits the first delay."""


def restart_delay(quick_deaths: int, first: float = RESTART_FIRST_DELAY_S, cap: float = RESTART_MAX_DELAY_S) -> float:
    """Back-off before a restart: 1 s, 2 s, 4 s ... capped, so a child that dies at once cannot spin the CPU."""
    return float(min(cap, first * 2 ** max(0, quick_deaths - 1)))


@dataclass
class Child:
    """A process we started, restart when it dies, and stop at the end."""

    name: str
    command: list[str]
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    quick_deaths: int = 0
    """Deaths in a row, each before the child had run :data:`STABLE_AFTER_S`; sets the back-off."""
    started_at: float = 0.0
    restart_at: float | None = None
    """When the dead child is started again (monotonic); None while it runs."""

    def start(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(self.command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL)
        self.started_at = time.monotonic()
        self.restart_at = None
        logger.info("started %s (pid %d)", self.name, self.process.pid)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def supervise(self, env: dict[str, str], now: float, stable_after_s: float = STABLE_AFTER_S) -> None:
        """Notice a death and plan the restart with back-off; start the child again once its delay is over."""
        if self.process is not None and self.process.poll() is not None:
            code = self.process.returncode
            self.process = None
            self.quick_deaths = 1 if now - self.started_at >= stable_after_s else self.quick_deaths + 1
            delay = restart_delay(self.quick_deaths)
            self.restarts += 1
            self.restart_at = now + delay
            logger.error("%s exited with code %s; restarting it in %.0f s (restart %d)",
                         self.name, code, delay, self.restarts)
        elif self.process is None and self.restart_at is not None and now >= self.restart_at:
            self.start(env)

    def terminate(self) -> None:
        self.restart_at = None
        if self.running():
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop within %.0fs; killing it", self.name, timeout)
            self.process.kill()
            self.process.wait(5)


def module_available(name: str) -> bool:
    """True when ``python -m name`` would find a runnable package."""
    return importlib.util.find_spec(f"{name}.__main__") is not None


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.3):
            return True
    except OSError:
        return False


def ollama_reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/api/version", timeout=1.5) as response:  # noqa: S310
            return response.status == 200
    except OSError:
        return False


def explain_missing_ollama(url: str) -> None:
    logger.warning(
        "Ollama is not answering at %s. The local agent will keep retrying and shows as 'backend down' in the "
        "Cluster tab. To fix: install Ollama (see its website's download page; on Linux its install script, on "
        "macOS/Windows the app) and start it, or point the agent at another machine's Ollama with "
        "--backend-url http://HOST:11434. To watch the cluster work without Ollama, run: python run_all.py --demo",
        url,
    )


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310
            return response.status == 200
    except OSError:
        return False


def local_agent_flags(settings: RunAllSettings) -> list[str]:
    """The local agent's own settings, passed on only when given (the agent's defaults stay the agent's)."""
    flags: list[str] = []
    for name in ("backend_url", "agent_id", "max_parallel", "max_queue", "runtime_kind", "keep_alive"):
        value = getattr(settings, name)
        if value is not None:
            flags += [f"--{name.replace('_', '-')}", str(value)]
    if settings.hardware_profile is not None:
        flags += ["--hardware-profile", str(settings.hardware_profile.resolve())]
    if not settings.probe_runtime:
        flags.append("--no-probe-runtime")
    return flags


def build_children(settings: RunAllSettings, broker_url: str) -> list[Child]:
    python = sys.executable
    data_dir = str(settings.data_dir.resolve())
    children: list[Child] = []
    if settings.app and not settings.agent_only:
        if module_available("app"):
            command = [python, "-m", "app", "--port", str(settings.port), "--host", settings.host,
                       "--broker-url", broker_url, "--data-dir", data_dir, "--log-level", settings.log_level]
            if settings.catalog is not None:
                command += ["--catalog", str(settings.catalog.resolve())]
            children.append(Child("web app", command))
        else:
            logger.warning("not built yet: the web app (app/__main__.py is missing); starting without it")
    if settings.agent or settings.agent_only:
        if module_available("agent"):
            command = [python, "-m", "agent", "--broker-url", broker_url, "--backend", settings.backend,
                       "--data-dir", str(Path(data_dir) / "agent"), "--log-level", settings.log_level]
            command += local_agent_flags(settings)
            children.append(Child("local agent", command))
        else:
            logger.warning("not built yet: the agent (agent/__main__.py is missing); starting without it")
    if settings.demo and not settings.agent_only and module_available("agent"):
        for agent_id, profile, tokens_per_s, ttft_ms in DEMO_AGENTS:
            children.append(Child(f"demo agent {agent_id} (simulated)", [
                python, "-m", "agent", "--broker-url", broker_url, "--backend", "simulated",
                "--agent-id", agent_id, "--hardware-profile", str(PROFILES / profile),
                "--sim-tokens-per-s", str(tokens_per_s), "--sim-ttft-ms", str(ttft_ms),
                # ready within seconds: a short simulated pull and warm-up benchmark, no runtime probe
                "--sim-pull-s", str(DEMO_PULL_S), "--benchmark-tokens", str(DEMO_BENCHMARK_TOKENS),
                "--no-probe-runtime",
                "--data-dir", str(Path(data_dir) / agent_id), "--log-level", "WARNING",
            ]))
    return children


def choose_broker(settings: RunAllSettings) -> tuple[RunningBroker | None, str]:
    """The broker this cluster uses, said in one line with the reason: the one given, or one we start.

    A broker run_all did not start is used only when the user points at it (``--broker-url``). When the
    port of our own is taken (Debian's package starts a system Mosquitto on :1883, with its own config),
    our own starts on a free port instead, so the cluster never runs on a config nobody here chose.
    """
    if settings.broker_url:
        logger.info("broker: the one at %s, given by --broker-url (SLB_BROKER_URL); run_all.py starts none",
                    redact_url(settings.broker_url))
        return None, settings.broker_url
    port = settings.mqtt_port
    if port_open(settings.mqtt_host, port):
        port = free_port(settings.mqtt_host)
        logger.warning(
            "broker: %s:%d is taken by a process run_all.py did not start (a system Mosquitto service?), so this "
            "cluster runs its own broker on %s:%d instead; to use the other one: --broker-url mqtt://%s:%d",
            settings.mqtt_host, settings.mqtt_port, settings.mqtt_host, port, settings.mqtt_host,
            settings.mqtt_port,
        )
    broker = start_broker(settings.data_dir / "broker", port=port, host=settings.mqtt_host,
                          prefer=settings.broker_kind)
    reach = ("this machine only (--mqtt-host)" if settings.mqtt_host in LOOPBACK_HOSTS
             else f"agents on other machines: --broker-url mqtt://THIS-HOST:{broker.port}")
    logger.info("broker: this cluster's own %s at %s (started by run_all.py, stopped with it); %s",
                broker.kind, broker.url, reach)
    return broker, broker.url


def choose_database(settings: RunAllSettings) -> tuple[LocalPostgres | None, str | None]:
    """Where the app keeps chats, said in one line: a database given, our own PostgreSQL, or SQLite (None)."""
    if settings.database_url:
        if not settings.database_url.startswith(("postgresql://", "postgres://")):
            raise RuntimeError("--database-url must be a PostgreSQL URL (postgresql://user:password@host:port/name)")
        logger.info("store: PostgreSQL at %s, given by --database-url (SLB_DATABASE_URL); run_all.py starts none",
                    redact_url(settings.database_url))
        return None, settings.database_url
    if not settings.postgres:
        logger.info("store: SQLite and LanceDB in %s (one app instance; --postgres or --database-url lets several "
                    "share chats)", settings.data_dir.resolve())
        return None, None
    from app.store import postgres_local

    if not postgres_local.available():
        raise RuntimeError("--postgres: PostgreSQL is not installed (apt-get install postgresql)")
    port = settings.postgres_port or free_port("127.0.0.1")
    if port_open("127.0.0.1", port):
        raise RuntimeError(f"--postgres-port {port} is taken by a process run_all.py did not start; give another "
                           "port, or use that server with --database-url")
    server = postgres_local.start(settings.data_dir.resolve() / "postgres", port)
    logger.info("store: this cluster's own PostgreSQL at %s (data in %s; started by run_all.py, stopped with it)",
                server.url, server.data_dir)
    return server, server.url


def restart_database(database: LocalPostgres) -> LocalPostgres:
    """Start our PostgreSQL again on its folder and port (the app reconnects by itself); if that fails, the dead
    one is kept and tried again on the next round."""
    from app.store import postgres_local

    logger.error("PostgreSQL stopped (code %s); restarting it", database.process.returncode)
    try:
        return postgres_local.start(database.data_dir, database.port)
    except (RuntimeError, OSError, subprocess.CalledProcessError) as error:
        logger.error("PostgreSQL did not start again: %s", error)
        return database


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="run_all.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    settings, _ = parse_settings(RunAllSettings, argv, parser=parser)
    configure_logging(settings.log_level)
    settings.data_dir.mkdir(parents=True, exist_ok=True)

    if settings.agent_only and not settings.broker_url:
        logger.error("--agent-only needs --broker-url mqtt://HOST:PORT (the machine that runs the broker)")
        return 2
    if settings.postgres and settings.database_url:
        logger.error("give --postgres (start our own PostgreSQL) or --database-url (use one), not both")
        return 2
    if settings.agent_only and (settings.postgres or settings.database_url):
        logger.warning("--agent-only: agents keep no chats; --postgres / --database-url are ignored")
        settings.postgres, settings.database_url = False, None
    broker, broker_url = choose_broker(settings)
    try:
        database, database_url = choose_database(settings)
    except (RuntimeError, OSError, subprocess.CalledProcessError) as error:
        logger.error("%s", error)
        if broker is not None:
            broker.stop()
        return 1

    if (settings.agent or settings.agent_only) and settings.backend == "ollama":
        url = settings.backend_url or "http://127.0.0.1:11434"
        if ollama_reachable(url):
            pass
        elif settings.demo and not settings.agent_only:
            settings.agent = False
            logger.info("--demo: Ollama is not answering at %s, so only the simulated machines run; start Ollama "
                        "(or give --backend-url http://HOST:11434) and run again to add this machine's agent",
                        redact_url(url))
        else:
            explain_missing_ollama(redact_url(url))

    env = dict(os.environ, PYTHONUNBUFFERED="1", GRADIO_ANALYTICS_ENABLED="False")
    if database_url:
        env["SLB_DATABASE_URL"] = database_url  # the environment, not a flag: a password must not show in 'ps'
    children = build_children(settings, broker_url)
    stop = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        logger.info("stopping (signal %d)", signum)
        stop.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    for child in children:
        child.start(env)

    health_url: str | None = None
    health_deadline = time.monotonic() + 120
    if any(child.name == "web app" for child in children):
        shown_host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
        health_url = f"http://{shown_host}:{settings.port}/"
    elif not children:
        logger.info("only the broker runs (%s); nothing else was asked for or built", broker_url)
    exposed = open_broker_warning(broker.host, broker.port) if broker is not None else None
    if exposed and health_url is None:
        logger.warning("%s", exposed)  # again once started, where the scroll of the start-up logs cannot hide it

    # Every part is restarted when it dies, the web app too: the coordinator lives in it, so a cluster without
    # it cannot answer, and stopping everything would also drop the agents' warm models.
    while not stop.wait(0.3 if health_url else 1.0):
        now = time.monotonic()
        for child in children:
            child.supervise(env, now)
        if broker is not None and not broker.alive():
            logger.error("the broker stopped; restarting it")
            broker.start()
        if database is not None and database.process.poll() is not None:
            database = restart_database(database)
        if health_url is None:
            continue
        if http_ok(health_url + "health"):
            logger.info("the cluster is up: open %s", health_url)
            if settings.browser:
                threading.Thread(target=webbrowser.open, args=(health_url,), daemon=True).start()
        elif time.monotonic() < health_deadline:
            continue
        else:
            logger.error("the web app did not come up at %s within 120 s; see its log above", health_url)
        health_url = None
        if exposed:
            logger.warning("%s", exposed)  # again once started, where the scroll of the start-up logs cannot hide it

    for child in reversed(children):
        child.terminate()
    for child in reversed(children):
        child.wait(15)
    if database is not None:
        database.stop()
    if broker is not None:
        broker.stop()
    logger.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
