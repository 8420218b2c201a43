"""The one MQTT connection layer, shared by agent and coordinator (paho-mqtt 2.x).

Why it looks like this:

* paho runs on the owner's asyncio loop through its external-loop API (socket
  callbacks + ``loop_read`` / ``loop_write`` / ``loop_misc``), as in aiomqtt and
  Home Assistant: no network thread, so no hand-off per message in either
  direction. Handlers must not block the loop. Synchronous tests and benchmarks
  borrow a loop from ``tests/support/loops.py``.
* MQTT v5 by default (a refused publish comes back as a reason code), with a
  fall back to 3.1.1 for brokers that only speak that (the embedded amqtt).
* On every (re)connect: subscribe to everything again, then publish the birth
  message, then flush what was queued while offline. The last will says
  ``offline``; a clean stop publishes ``offline`` itself.
* TCP_NODELAY on the socket: a QoS 1 round trip on loopback takes ~0.35 ms
  instead of ~87 ms (Nagle on both ends; ``bench/bench_mqtt_rtt.py``).
* Refused credentials stop the client with a clear message instead of
  retrying forever.
* Received QoS 1 messages are acknowledged up to ``ACK_DELAY_S`` after their
  handler, in a batch: the PUBACK's write no longer goes ahead of the work the
  message started (docs/protocol.md, docs/benchmarks.md §1).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from broker.mqtt.messages import (  # noqa: F401 - re-exported: this layer's public names
    InboundMessage,
    MqttAuthError,
    MqttError,
    MqttPublishRefused,
    OutboundMessage,
    PublishTicket,
)
from broker.mqtt.settings import MqttSettings
from broker.protocol.codec import encode
from broker.protocol.messages import Message

logger = logging.getLogger(__name__)


class _PahoNoiseFilter(logging.Filter):
    """paho logs an ERROR for every loop pass while reconnecting; that is normal here, not an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Client is not connected")


_paho_logger = logging.getLogger(f"{__name__}.paho")
_paho_logger.addFilter(_PahoNoiseFilter())

_AUTH_FAILURES = {134: "bad user name or password", 135: "not authorized", 138: "banned"}
_UNSUPPORTED_PROTOCOL = 132
_client_counter = itertools.count(1)


MessageHandler = Callable[[InboundMessage], None]
Hook = Callable[[], None]

ACK_DELAY_S = 0.002
"""How long a received QoS 1 message's PUBACK waits, so the work it started goes out first (see ``_handle_message``)."""


class MqttConnection:
    """A resilient MQTT client: subscriptions, presence, offline queue, acknowledged publishes.

    paho runs on ``loop`` through its external-loop API: the socket is registered with the loop
    (``add_reader`` / ``add_writer``), ``loop_read`` / ``loop_write`` run when it is ready and ``loop_misc``
    once a second (keepalive). There is no network thread, so a message reaches ``on_message`` in the same
    loop iteration that read it and a publish from the loop is written in the next one — no hand-off through
    a self-pipe in either direction (``bench/bench_overhead.py``). Every paho call happens on the loop; the
    public methods may be called from any thread and hand their work to the loop. Only the TCP (and TLS)
    connect runs in the loop's default executor, because it blocks.

    Reconnection backs off from ``reconnect_min_s`` to at most ``reconnect_max_s`` (5 s): a home cluster has
    a handful of clients, and after a broker restart they should be back within seconds, not after a
    30 s back-off step (measured in docs/reliability.md).
    """

    def __init__(
        self,
        settings: MqttSettings,
        client_id: str,
        *,
        on_message: MessageHandler,
        loop: asyncio.AbstractEventLoop,
        subscriptions: list[tuple[str, int]] | None = None,
        will: OutboundMessage | None = None,
        birth: OutboundMessage | Callable[[], OutboundMessage | None] | None = None,
        on_ready: Hook | None = None,
        on_disconnected: Hook | None = None,
        on_fatal: Callable[[Exception], None] | None = None,
        max_offline_queue: int = 1000,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 5.0,
    ) -> None:
        self.settings = settings
        self.client_id = client_id
        self._address = settings.broker
        self._on_message = on_message
        self._subscriptions: dict[str, int] = dict(subscriptions or [])
        self._will = will
        self._birth = birth
        self._on_ready = on_ready
        self._on_disconnected = on_disconnected
        self._on_fatal = on_fatal
        self._loop = loop
        self._offline: collections.deque[tuple[str, bytes, int, bool, PublishTicket]] = collections.deque()
        self._max_offline_queue = max_offline_queue
        self.offline_dropped = 0
        self._reconnect = (reconnect_min_s, reconnect_max_s)
        self._backoff_s = reconnect_min_s
        self._lock = threading.RLock()
        self._tickets: dict[int, PublishTicket] = {}
        self._pending_subscribe_mid: int | None = None
        self._connected = threading.Event()
        self._closed = threading.Event()  # set whenever no socket is open (before start, between attempts, after stop)
        self._closed.set()
        self._ever_connected = False
        self._socket_opened_at: float | None = None
        self._fell_back = False
        self._last_fail_warning = -1e9
        self._stopping = False
        self._started = False
        self._connecting = False
        self._reading = False  # inside paho's loop_read (its callbacks must not write: paho is not re-entrant there)
        self._registered_fd: int | None = None
        self._writer_fd: int | None = None
        self._misc_timer: asyncio.TimerHandle | None = None
        self._retry_timer: asyncio.TimerHandle | None = None
        self._acks: list[tuple[mqtt.Client, int, int]] = []
        self._ack_timer: asyncio.TimerHandle | None = None
        self.fatal_error: Exception | None = None
        self.connect_count = 0
        self._protocol = self._initial_protocol()
        self._client = self._make_client()

    # ------------------------------------------------------------------ setup

    def _initial_protocol(self) -> MQTTProtocolVersion:
        return MQTTProtocolVersion.MQTTv311 if self.settings.mqtt_protocol == "3.1.1" else MQTTProtocolVersion.MQTTv5

    @property
    def protocol(self) -> str:
        return "5" if self._protocol == MQTTProtocolVersion.MQTTv5 else "3.1.1"

    def _make_client(self) -> mqtt.Client:
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=self._protocol,
            reconnect_on_failure=False,  # this class reconnects, on the loop
            manual_ack=True,  # acknowledged a moment after the handler (_handle_message)
        )
        client.enable_logger(_paho_logger)
        username = self.settings.mqtt_username or self._address.username
        password = (
            self.settings.mqtt_password.get_secret_value() if self.settings.mqtt_password else self._address.password
        )
        if username:
            client.username_pw_set(username, password)
        if self._address.tls:
            context = ssl.create_default_context(
                cafile=str(self.settings.mqtt_tls_ca) if self.settings.mqtt_tls_ca else None
            )
            if self.settings.mqtt_tls_insecure:
                context.check_hostname = False
            client.tls_set_context(context)
        if self._will is not None:
            client.will_set(self._will.topic, self._will.payload, qos=self._will.qos, retain=self._will.retain)
        client.max_inflight_messages_set(100)
        client.on_socket_open = self._handle_socket_open
        client.on_socket_close = self._handle_socket_close
        client.on_socket_register_write = self._handle_register_write
        client.on_socket_unregister_write = self._handle_unregister_write
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish
        client.on_subscribe = self._handle_subscribe
        client.connect_async(self._address.host, self._address.port, keepalive=self.settings.mqtt_keepalive,
                             clean_start=True if self._protocol == MQTTProtocolVersion.MQTTv5 else
                             mqtt.MQTT_CLEAN_START_FIRST_ONLY)
        return client

    # ------------------------------------------------------------------ threads

    def _on_loop(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    def _call(self, function: Callable[..., object], *args: object) -> None:
        """Run ``function`` on the loop: now if we are on it, else handed over (or here if the loop is closed)."""
        if self._on_loop():
            function(*args)
            return
        try:
            self._loop.call_soon_threadsafe(function, *args)
        except RuntimeError:  # the loop is closed: nothing else can touch paho any more
            function(*args)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Connect in the background; reconnects forever with back-off until :meth:`stop`."""
        logger.info("connecting to %s as %s (MQTT %s)", self._address, self.client_id, self.protocol)
        self._started = True
        self._call(self._attempt)

    def wait_connected(self, timeout: float) -> bool:
        """Wait until subscribed and the birth message is out; raise :class:`MqttAuthError` if refused.

        Blocks: call it from another thread than the loop's (``asyncio.to_thread`` in a coroutine).
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.fatal_error is not None:
                raise self.fatal_error
            if self._connected.wait(0.05):
                return True
        if self.fatal_error is not None:
            raise self.fatal_error
        return False

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def running(self) -> bool:
        """True while the connection has an open socket registered with the loop (what a fuzz test checks)."""
        return self._registered_fd is not None and not self._stopping

    def stop(self, final: OutboundMessage | None = None, timeout: float = 2.0) -> None:
        """Stop cleanly: publish ``final`` (e.g. retained offline status) and wait for it, then disconnect.

        From another thread it waits for the acknowledgement and the close; on the loop itself it cannot
        wait, so it writes ``final`` and the DISCONNECT at once and returns.
        """
        on_loop = self._on_loop()
        self._stopping = True
        if final is not None and self.connected:
            try:
                ticket = self.publish(final.topic, final.payload, qos=final.qos, retain=final.retain)
                if not on_loop:
                    ticket.wait(timeout)
            except (MqttError, TimeoutError) as error:
                logger.warning("final message not acknowledged: %s", error)
        self._call(self._shutdown)
        if on_loop:
            self._flush_now()
        elif not self._closed.wait(timeout):
            self._call(self._close_socket)  # no answer to DISCONNECT (or the loop is not running): just close
            self._closed.wait(0.5)
        self._connected.clear()

    def kill(self) -> None:
        """Drop the connection without DISCONNECT, so the broker publishes the will (tests, crash drills)."""
        self._stopping = True
        self._connected.clear()
        sock = self._client.socket()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._call(self._close_socket)

    # ------------------------------------------------------------------ API

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Add a subscription; it is also renewed on every reconnect."""
        with self._lock:
            self._subscriptions[topic] = qos
        if self.connected:
            self._call(self._client_call, "subscribe", topic, qos)

    def unsubscribe(self, topic: str) -> None:
        with self._lock:
            self._subscriptions.pop(topic, None)
        if self.connected:
            self._call(self._client_call, "unsubscribe", topic)

    def publish(
        self,
        topic: str,
        payload: bytes | Message,
        *,
        qos: int = 1,
        retain: bool = False,
        queue_if_offline: bool = True,
    ) -> PublishTicket:
        """Publish without blocking; the ticket can wait for the broker's acknowledgement.

        While disconnected the message waits in a bounded queue (oldest dropped
        first) unless ``queue_if_offline`` is false (telemetry: stale is useless).
        """
        data = encode(payload) if isinstance(payload, Message) else payload
        ticket = PublishTicket(topic, qos)
        with self._lock:
            if not self.connected:
                if not queue_if_offline or self._stopping:
                    ticket._complete(-1, "dropped while disconnected")
                    return ticket
                if len(self._offline) >= self._max_offline_queue:
                    *_, old_ticket = self._offline.popleft()
                    old_ticket._complete(-1, "dropped: offline queue full")
                    self.offline_dropped += 1
                self._offline.append((topic, data, qos, retain, ticket))
                return ticket
        self._call(self._send, topic, data, qos, retain, ticket)
        return ticket

    def publish_and_wait(
        self, topic: str, payload: bytes | Message, *, qos: int = 1, retain: bool = False, timeout: float = 5.0
    ) -> int:
        """Publish and wait for the acknowledgement; raises :class:`MqttPublishRefused` or ``TimeoutError``.

        Blocks: not for the loop's own thread.
        """
        return self.publish(topic, payload, qos=qos, retain=retain).wait(timeout)

    @property
    def offline_queue_length(self) -> int:
        return len(self._offline)

    # ------------------------------------------------------------------ connecting (loop)

    def _attempt(self) -> None:
        """One connection attempt: the blocking TCP/TLS connect in the executor, the rest on the loop."""
        self._retry_timer = None
        if self._stopping or self._connecting or self._registered_fd is not None:
            return
        self._connecting = True
        client = self._client
        future = self._loop.run_in_executor(None, client.reconnect)
        future.add_done_callback(lambda done: self._attempt_done(client, done))

    def _attempt_done(self, client: mqtt.Client, future: asyncio.Future[object]) -> None:
        self._connecting = False
        if future.cancelled():  # the loop's executor shut down
            return
        error = future.exception()
        if client is not self._client or self._stopping:  # replaced (fallback) or stopped meanwhile
            if error is None:
                self._close_socket(client)
            return
        if error is not None:
            self._connect_failed(error)
            return
        sock = client.socket()
        if sock is None:
            self._retry_later()
            return
        fd = sock.fileno()
        self._registered_fd = fd
        self._closed.clear()
        self._loop.add_reader(fd, self._readable, client)
        if client.want_write():  # the CONNECT packet, queued by reconnect()
            self._add_writer(fd, client)
        self._schedule_misc()
        if self._can_fall_back():
            self._loop.call_later(1.0, self._check_connack, client)

    def _connect_failed(self, error: BaseException) -> None:
        now = time.monotonic()
        if now - self._last_fail_warning > 30:
            self._last_fail_warning = now
            hint = " (TLS: is --mqtt-tls-ca the CA that signed the broker's certificate?)" if self._address.tls else ""
            logger.warning("cannot connect to broker %s yet (%s); retrying with back-off%s", self._address,
                           error or type(error).__name__, hint)
        else:
            logger.debug("connection to %s failed (%s); retrying with back-off", self._address, error)
        self._retry_later()

    def _retry_later(self) -> None:
        if self._stopping or self._retry_timer is not None:
            return
        delay, self._backoff_s = self._backoff_s, min(self._backoff_s * 2, self._reconnect[1])
        self._retry_timer = self._loop.call_later(delay, self._attempt)

    def _check_connack(self, client: mqtt.Client) -> None:
        """A 3.1.1-only broker may sit silent on a v5 CONNECT until keepalive; don't wait that long."""
        if client is self._client and not self._stopping and not self._ever_connected and self._can_fall_back():
            self._fall_back()

    # ------------------------------------------------------------------ socket events (loop)

    def _readable(self, client: mqtt.Client) -> None:
        self._reading = True
        try:
            client.loop_read()
        finally:
            self._reading = False
        if client.want_write():  # what the handlers published (and PUBACKs): out in this iteration, not the next
            client.loop_write()
        sock = client.socket()
        # TLS may hold decrypted bytes the selector cannot see: read them now, not at the next packet.
        pending = getattr(sock, "pending", None)
        if pending is not None and pending() > 0:
            self._loop.call_soon(self._readable, client)

    def _writable(self, client: mqtt.Client) -> None:
        client.loop_write()

    def _add_writer(self, fd: int, client: mqtt.Client) -> None:
        if self._writer_fd != fd:
            self._loop.add_writer(fd, self._writable, client)
            self._writer_fd = fd

    def _remove_writer(self) -> None:
        if self._writer_fd is not None:
            self._loop.remove_writer(self._writer_fd)
            self._writer_fd = None

    def _schedule_misc(self) -> None:
        self._misc_timer = self._loop.call_later(1.0, self._misc)

    def _misc(self) -> None:
        """Keepalive pings and the check that the broker still answers them."""
        self._misc_timer = None
        if self._registered_fd is None:
            return
        self._client.loop_misc()
        if self._registered_fd is not None:
            self._schedule_misc()

    def _flush_now(self) -> None:
        """Write what is queued at once (stop on the loop, where nobody waits for the next iteration)."""
        if self._client.socket() is not None and self._client.want_write():
            with contextlib.suppress(Exception):
                self._client.loop_write()

    def _shutdown(self) -> None:
        """Cancel the timers and send DISCONNECT; the socket closes once it is written."""
        for timer in (self._retry_timer, self._misc_timer, self._ack_timer):
            if timer is not None:
                timer.cancel()
        self._retry_timer = self._misc_timer = self._ack_timer = None
        self._send_acks()
        if self._client.is_connected():
            try:
                self._client.disconnect()
                return
            except Exception:  # noqa: BLE001 - best effort while shutting down
                logger.debug("disconnect failed", exc_info=True)
        self._close_socket()

    def _close_socket(self, client: mqtt.Client | None = None) -> None:
        """Close without DISCONNECT (after a kill, a fallback, or when DISCONNECT could not be sent)."""
        client = client or self._client
        if client is self._client:
            for timer in (self._retry_timer, self._misc_timer):
                if timer is not None:
                    timer.cancel()
            self._retry_timer = self._misc_timer = None
        sock = client.socket()
        if sock is None:
            if client is self._client and self._registered_fd is None:
                self._closed.set()
            return
        with contextlib.suppress(OSError, ValueError):
            fd = sock.fileno()
            if fd >= 0:
                self._unregister(fd)
        with contextlib.suppress(OSError):
            sock.close()
        if client is self._client:
            self._closed.set()

    def _unregister(self, fd: int) -> None:
        if self._writer_fd == fd:
            self._remove_writer()
        if self._registered_fd == fd:
            self._loop.remove_reader(fd)
            self._registered_fd = None

    # ------------------------------------------------------------------ internals (loop)

    def _client_call(self, method: str, *args: object) -> None:
        getattr(self._client, method)(*args)

    def _send(self, topic: str, data: bytes, qos: int, retain: bool, ticket: PublishTicket) -> None:
        info = self._client.publish(topic, data, qos=qos, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            ticket._complete(-1, mqtt.error_string(info.rc))
            return
        if qos != 0:
            self._tickets[info.mid] = ticket
        if not self._reading and self._registered_fd is not None and self._client.want_write():
            # Write now rather than in the loop's next iteration (inside paho's read callbacks, _readable does it).
            self._client.loop_write()
        if qos == 0:
            ticket._complete(0, "sent")

    def _run_item(self, item: InboundMessage | Hook) -> None:
        try:
            if isinstance(item, InboundMessage):
                self._on_message(item)
            else:
                item()
        except Exception:  # noqa: BLE001 - a handler bug must not stop the handling of later messages
            logger.exception("MQTT handler failed")

    def _run_hook(self, hook: Hook) -> None:
        """Hooks run as their own loop callbacks, after paho has finished with the packet that caused them."""
        self._loop.call_soon(self._run_item, hook)

    # ------------------------------------------------------------------ paho callbacks (loop, or the connect thread)

    def _handle_socket_open(self, client: mqtt.Client, userdata: object, sock: socket.socket) -> None:
        # Runs in the executor thread that connects; the loop registers the socket when the connect returns.
        self._socket_opened_at = time.monotonic()
        if not self.settings.mqtt_tcp_nodelay:
            return
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            logger.debug("could not set TCP_NODELAY on %r", sock)

    def _handle_socket_close(self, client: mqtt.Client, userdata: object, sock: socket.socket) -> None:
        if not self._on_loop():  # the connect thread closing a half-open socket it never handed over
            return
        with contextlib.suppress(OSError, ValueError):
            self._unregister(sock.fileno())
        if client is self._client:
            self._closed.set()

    def _handle_register_write(self, client: mqtt.Client, userdata: object, sock: socket.socket) -> None:
        if self._on_loop() and client is self._client and self._registered_fd is not None:
            self._add_writer(self._registered_fd, client)
        # Off the loop this is the CONNECT queued by the connect thread: _attempt_done registers it.

    def _handle_unregister_write(self, client: mqtt.Client, userdata: object, sock: socket.socket) -> None:
        if self._on_loop() and client is self._client:
            self._remove_writer()

    def _handle_connect(
        self, client: mqtt.Client, userdata: object, flags: object, reason_code: ReasonCode, properties: object
    ) -> None:
        if client is not self._client:
            return
        code = int(reason_code.value)
        if reason_code.is_failure:
            if code in _AUTH_FAILURES:
                self._fail(MqttAuthError(
                    f"broker {self._address} refused client {self.client_id!r}: {_AUTH_FAILURES[code]} "
                    f"(check SLB_MQTT_USERNAME / SLB_MQTT_PASSWORD and the broker's password file and ACL)"
                ))
                return
            if code in (_UNSUPPORTED_PROTOCOL, 1) and self._can_fall_back():
                self._fall_back()
                return
            logger.warning("broker %s refused connection: %s", self._address, reason_code)
            return
        self._ever_connected = True
        self._backoff_s = self._reconnect[0]
        self.connect_count += 1
        with self._lock:
            subscriptions = list(self._subscriptions.items())
        if subscriptions:
            result, mid = client.subscribe(subscriptions)
            self._pending_subscribe_mid = mid
        else:
            self._on_subscribed()
        logger.info("connected to %s (MQTT %s, connection #%d)", self._address, self.protocol, self.connect_count)

    def _handle_subscribe(
        self, client: mqtt.Client, userdata: object, mid: int, reason_codes: list[ReasonCode], properties: object
    ) -> None:
        refused = [str(code) for code in reason_codes if code.is_failure]
        if refused:
            logger.error("broker refused %d subscription(s): %s", len(refused), ", ".join(refused))
        if mid == self._pending_subscribe_mid:
            self._pending_subscribe_mid = None
            self._on_subscribed()

    def _on_subscribed(self) -> None:
        birth = self._birth() if callable(self._birth) else self._birth
        if birth is not None:
            self._send(birth.topic, birth.payload, birth.qos, birth.retain, PublishTicket(birth.topic, birth.qos))
        with self._lock:
            self._connected.set()
            backlog = list(self._offline)
            self._offline.clear()
        for topic, data, qos, retain, ticket in backlog:
            self._send(topic, data, qos, retain, ticket)
        if self._on_ready is not None:
            self._run_hook(self._on_ready)

    def _handle_disconnect(
        self, client: mqtt.Client, userdata: object, flags: object, reason_code: ReasonCode, properties: object
    ) -> None:
        if client is not self._client:
            return
        was_connected = self._connected.is_set()
        self._connected.clear()
        if self._stopping:
            return
        if not self._ever_connected and self._can_fall_back():
            self._fall_back()
            return
        if was_connected:
            logger.warning("disconnected from %s (%s); reconnecting", self._address, reason_code)
            if self._on_disconnected is not None:
                self._run_hook(self._on_disconnected)
        self._retry_later()

    def _handle_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        """Straight to the handler (we are on the loop, in the iteration that read the packet); the PUBACK later.

        Sent at once, the PUBACK's write (a system call that wakes the broker, 0.1–0.3 ms on a small VM) came
        before the work the message started: the agent's request to its runtime, the coordinator's first token
        to its HTTP client. Held for :data:`ACK_DELAY_S` and sent in one batch, it is off that path; the broker's
        in-flight window (100 in mosquitto/mosquitto.conf) is far from filled in that time.
        """
        self._run_item(InboundMessage(message.topic, bytes(message.payload), message.qos, bool(message.retain)))
        if message.qos:
            self._acks.append((client, message.mid, message.qos))
            if self._ack_timer is None:
                self._ack_timer = self._loop.call_later(ACK_DELAY_S, self._send_acks)

    def _send_acks(self) -> None:
        self._ack_timer = None
        acks, self._acks = self._acks, []
        for client, mid, qos in acks:
            if client is self._client and client.is_connected():  # after a reconnect the broker sends them again
                client.ack(mid, qos)
        if self._registered_fd is not None and self._client.want_write():
            self._client.loop_write()

    def _handle_publish(
        self, client: mqtt.Client, userdata: object, mid: int, reason_code: ReasonCode, properties: object
    ) -> None:
        ticket = self._tickets.pop(mid, None)
        if ticket is not None:
            ticket._complete(int(reason_code.value), str(reason_code))

    # ------------------------------------------------------------------ fallback and fatal errors (loop)

    def _can_fall_back(self) -> bool:
        return (
            self.settings.mqtt_protocol == "auto"
            and self._protocol == MQTTProtocolVersion.MQTTv5
            and not self._ever_connected
        )

    def _fall_back(self) -> None:
        if self._fell_back:
            return
        self._fell_back = True
        logger.warning("broker %s does not speak MQTT 5; falling back to 3.1.1", self._address)
        old = self._client
        self._protocol = MQTTProtocolVersion.MQTTv311
        self._client = self._make_client()
        self._close_socket(old)
        self._backoff_s = self._reconnect[0]
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None
        if not self._stopping:
            self._attempt()

    def _fail(self, error: Exception) -> None:
        logger.error("%s", error)
        self.fatal_error = error
        self._stopping = True
        self._shutdown()
        if self._on_fatal is not None:
            on_fatal = self._on_fatal
            self._run_hook(lambda: on_fatal(error))


def unique_client_id(role: str, name: str) -> str:
    """Client ids must be unique per broker; add the pid and a counter for several clients per process."""
    import os

    return f"{role}-{name}-{os.getpid()}-{next(_client_counter)}"
