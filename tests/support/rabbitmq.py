"""Real RabbitMQ nodes with the MQTT plugin, started by the tests themselves (issue 16).

Debian's ``rabbitmq-server`` package (3.10) is run straight from ``/usr/lib/rabbitmq/bin/rabbitmq-server``: the
packaged wrappers in /usr/sbin switch to the ``rabbitmq`` user and read /etc/rabbitmq, which a test must not
depend on. Every node gets its own folder (config, enabled plugins, Mnesia, logs, an Erlang cookie in its own
``HOME``), free ports on 127.0.0.1 for AMQP, MQTT and Erlang distribution, and an ``epmd`` of its cluster on a
free port of its own, so nothing here meets a system RabbitMQ, and everything started is stopped by its pid
(and the cluster's epmd with ``epmd -kill``) at the end.

A two-node cluster is made the way the RabbitMQ docs say: start both, then on the second
``rabbitmqctl stop_app``, ``join_cluster <first>``, ``start_app``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from broker.mqtt.local_broker import free_port, stop_process, wait_for_port

logger = logging.getLogger(__name__)

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
SERVER = RABBITMQ_BIN / "rabbitmq-server"
CTL = RABBITMQ_BIN / "rabbitmqctl"
START_TIMEOUT_S = 90.0
"""A node boots in a few seconds when idle; the shared 2-core test box can take many times that."""


def available() -> bool:
    """Whether the RabbitMQ server is installed here (``apt-get install rabbitmq-server``, scripts/install.sh --dev)."""
    return SERVER.exists() and CTL.exists()


def _config(amqp_port: int, mqtt_port: int) -> str:
    """rabbitmq.conf of one test node: loopback only, anonymous MQTT clients act as guest, quiet logs in a file."""
    return "\n".join([
        f"listeners.tcp.local = 127.0.0.1:{amqp_port}",
        f"mqtt.listeners.tcp.local = 127.0.0.1:{mqtt_port}",
        "mqtt.allow_anonymous = true",
        "mqtt.default_user = guest",
        "mqtt.default_pass = guest",
        "mqtt.vhost = /",
        "mqtt.exchange = amq.topic",
        "loopback_users = none",
        "log.console = false",
        "log.file.level = info",
        # A test box has little free disk and memory; the defaults would block publishers on a busy CI machine.
        "disk_free_limit.absolute = 1MB",
        "vm_memory_high_watermark.relative = 0.9",
        "",
    ])


@dataclass
class RabbitNode:
    """One RabbitMQ node we started; ``url`` is its MQTT listener."""

    name: str
    folder: Path
    amqp_port: int
    mqtt_port: int
    dist_port: int
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    started_in_s: float = 0.0
    _launched_at: float = 0.0

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    def ctl(self, *arguments: str, timeout: float = 60.0) -> str:
        """Run ``rabbitmqctl -n <this node> <arguments>``; its output, or RuntimeError with it."""
        done = subprocess.run([str(CTL), "-n", self.name, *arguments], env=self.env, capture_output=True,
                              timeout=timeout, check=False)
        output = (done.stdout + done.stderr).decode(errors="replace")
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(arguments)} on {self.name} failed ({done.returncode}): "
                               f"{output.strip()[-2000:]}")
        return output

    def log_tail(self, characters: int = 3000) -> str:
        """The end of the node's console output and of its own log file (for failure messages)."""
        parts = []
        for path in [self.log_path, *sorted((self.folder / "log").glob("*.log"))]:
            with contextlib.suppress(OSError):
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-characters:]}")
        return "\n".join(parts)

    def launch(self) -> None:
        """Start booting the node (see :meth:`wait_started`); nodes of a cluster boot side by side."""
        self._launched_at = time.monotonic()
        with self.log_path.open("ab") as log:
            # A session of its own: the server script runs erl as its child, and both are ours to stop.
            self.process = subprocess.Popen([str(SERVER)], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, cwd=self.folder, start_new_session=True)

    def wait_started(self) -> None:
        """Wait until the node's MQTT listener accepts connections (the plugin starts last)."""
        try:
            wait_for_port("127.0.0.1", self.mqtt_port, START_TIMEOUT_S, self.process)
        except (RuntimeError, TimeoutError) as error:
            self.stop()
            raise RuntimeError(f"RabbitMQ node {self.name} did not start: {error}\n{self.log_tail()}") from error
        self.started_in_s = time.monotonic() - self._launched_at
        logger.info("RabbitMQ node %s up in %.1f s (MQTT on %d)", self.name, self.started_in_s, self.mqtt_port)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (the server script stops Erlang cleanly), then SIGKILL to what is left of our own session."""
        process, self.process = self.process, None
        if process is None:
            return
        stop_process(process, timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # the erl child, should the script have died before it


@dataclass
class RabbitCluster:
    """Nodes sharing one Erlang cookie and one epmd (on a port of their own)."""

    folder: Path
    epmd_port: int
    cookie: str
    nodes: list[RabbitNode] = field(default_factory=list)
    joined_in_s: float = 0.0

    def add_node(self, short_name: str) -> RabbitNode:
        """Configure (not start) one more node in this cluster's folder."""
        folder = self.folder / short_name
        home = folder / "home"
        (folder / "log").mkdir(parents=True, exist_ok=True)
        (folder / "mnesia").mkdir(exist_ok=True)
        home.mkdir(exist_ok=True)
        cookie = home / ".erlang.cookie"
        cookie.write_text(self.cookie)
        cookie.chmod(0o400)
        amqp_port, mqtt_port, dist_port = free_port(), free_port(), free_port()
        config = folder / "rabbitmq.conf"
        config.write_text(_config(amqp_port, mqtt_port))
        plugins = folder / "enabled_plugins"
        plugins.write_text("[rabbitmq_mqtt].\n")
        (folder / "rabbitmq-env.conf").write_text("")
        name = f"{short_name}@localhost"
        env = {name: value for name, value in os.environ.items() if not name.startswith(("RABBITMQ_", "ERL_"))}
        env.update({
            "HOME": str(home),
            "RABBITMQ_NODENAME": name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(amqp_port),
            "RABBITMQ_DIST_PORT": str(dist_port),
            "RABBITMQ_MNESIA_BASE": str(folder / "mnesia"),
            "RABBITMQ_LOG_BASE": str(folder / "log"),
            "RABBITMQ_CONFIG_FILE": str(config),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(folder / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(folder / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(plugins),
            # No busy-waiting schedulers: the test box shares its cores with everything else.
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1} "
                                                   "+sbwt none +sbwtdcpu none +sbwtdio none",
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_CRASH_DUMP": str(folder / "log" / "erl_crash.dump"),
        })
        node = RabbitNode(name=name, folder=folder, amqp_port=amqp_port, mqtt_port=mqtt_port, dist_port=dist_port,
                          env=env, log_path=folder / "log" / "console.out")
        self.nodes.append(node)
        return node

    def join(self, node: RabbitNode, to: RabbitNode) -> float:
        """Make ``node`` a member of ``to``'s cluster (stop_app, join_cluster, start_app); seconds it took."""
        started = time.monotonic()
        node.ctl("stop_app")
        node.ctl("join_cluster", to.name)
        node.ctl("start_app")
        wait_for_port("127.0.0.1", node.mqtt_port, START_TIMEOUT_S, node.process)
        return time.monotonic() - started

    def running_nodes(self, node: RabbitNode) -> list[str]:
        """The cluster's running nodes as ``node`` sees them."""
        output = node.ctl("cluster_status", "--formatter", "json")
        status = json.loads(output[output.index("{"):])
        return sorted(status.get("running_nodes", []))

    def stop(self) -> None:
        """Stop every node (the last one first), then this cluster's epmd."""
        for node in reversed(self.nodes):
            try:
                node.stop()
            except Exception:  # noqa: BLE001 - stop the others anyway
                logger.exception("stopping RabbitMQ node %s failed", node.name)
        epmd_env = {**os.environ, "ERL_EPMD_PORT": str(self.epmd_port)}
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(["epmd", "-port", str(self.epmd_port), "-kill"], env=epmd_env, capture_output=True,
                           timeout=10, check=False)


@contextlib.contextmanager
def rabbitmq_cluster(folder: Path, size: int = 1) -> Iterator[RabbitCluster]:
    """``size`` RabbitMQ nodes with the MQTT plugin, clustered when more than one; all stopped on exit."""
    if not available():
        raise RuntimeError("RabbitMQ is needed: apt-get install rabbitmq-server (scripts/install.sh --dev)")
    cluster = RabbitCluster(folder=folder, epmd_port=free_port(), cookie=secrets.token_hex(16).upper())
    try:
        nodes = [cluster.add_node(f"slb-rabbit-{index}-{secrets.token_hex(3)}") for index in range(size)]
        for node in nodes:
            node.launch()
        for node in nodes:
            node.wait_started()
        for node in nodes[1:]:
            cluster.joined_in_s = cluster.join(node, nodes[0])
        yield cluster
    finally:
        cluster.stop()
