"""An asyncio loop in a background thread, for code that has none: synchronous tests, chaos runs, benchmarks.

:class:`~broker.mqtt.client.MqttConnection` hands every callback to an event loop, and
:class:`~agent.agent.Agent` runs on one (``await agent.run()``). Production code always has that loop; a
synchronous test or a benchmark borrows one here (:func:`shared_loop`, :class:`LoopThread`) or runs a whole
agent on a thread of its own (:class:`AgentThread`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from broker.mqtt.client import MqttConnection
from broker.mqtt.settings import MqttSettings

if TYPE_CHECKING:
    from agent.agent import Agent

logger = logging.getLogger(__name__)
T = TypeVar("T")


class LoopThread:
    """An event loop running forever in a daemon thread until :meth:`close`."""

    def __init__(self, name: str = "background-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coroutine`` on the loop and wait for its result (from any other thread)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the loop, join the thread, close the loop (callbacks still queued are dropped)."""
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()

    def __enter__(self) -> LoopThread:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


_shared: LoopThread | None = None
_shared_lock = threading.Lock()


def shared_loop() -> asyncio.AbstractEventLoop:
    """One loop for every test-side MQTT client of this process (started on first use, never stopped).

    Handlers of different connections take turns on it, as they do on the coordinator's loop; a handler
    must not block.
    """
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = LoopThread("test-mqtt-loop")
        return _shared.loop


def mqtt_connection(settings: MqttSettings, client_id: str, **kwargs: Any) -> MqttConnection:
    """An :class:`MqttConnection` whose callbacks run on :func:`shared_loop` (not started yet)."""
    return MqttConnection(settings, client_id, loop=shared_loop(), **kwargs)


class AgentThread:
    """An :class:`~agent.agent.Agent` run by ``asyncio.run`` in a daemon thread (in-process agents for tests).

    The agent process itself runs ``await agent.run()`` on its main thread; this is the same coroutine, on
    a thread of its own so that synchronous code can start it, watch it and stop it.
    """

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        try:
            asyncio.run(self.agent.run())
        except Exception:  # noqa: BLE001 - report the crash; alive() then says False
            logger.exception("agent %s crashed", self.agent.agent_id)
            self.agent.exit_code = 1

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = 10.0) -> bool:
        """Start the agent; True once it is connected to the broker within ``timeout``."""
        if self._thread is not None:
            raise RuntimeError("agent already started")
        self._thread = threading.Thread(target=self._run, name=f"agent-{self.agent.agent_id}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.alive():
            connection = self.agent.connection
            if connection is not None and connection.connected:
                return True
            time.sleep(0.05)
        return False

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the agent as SIGTERM does (error chunks for running jobs, offline status, disconnect); join it."""
        thread = self._thread
        if thread is None:
            return
        while thread.is_alive() and self.agent._stop is None:  # run() has not set up its stop event yet
            time.sleep(0.01)
        self.agent.request_stop()
        thread.join(timeout)
        self._thread = None
