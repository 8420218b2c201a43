"""A lean HTTP/1.1 client for the one request on every answer's critical path: the runtime's streamed chat.

httpx (through httpcore and anyio) costs ~1.2 ms more to the first token than
plain asyncio streams on a kept-alive connection to the same server, on this
project's 2-core reference box (docs/benchmarks.md, *Overhead*). The agent
pays that on every answer, so streamed chat goes through this client; every
other call (health, lists, pulls, embeddings), ``https://`` runtimes and
runtimes behind a proxy from the environment stay on httpx.

It speaks only what a runtime's streaming endpoint needs: one request with a
JSON body, a response framed by ``Transfer-Encoding: chunked``,
``Content-Length`` or the end of the connection, kept-alive connections
reused (a pooled connection the server closed while idle is retried once on
a fresh one, as httpx does), and a connection closed, never reused, when the
caller stops reading early (that is how Ollama and llama.cpp learn to stop
generating). Failures raise httpx's own exception types so the backends map
them exactly as before.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import urllib.request
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httpx

MAX_HEAD_BYTES = 64 * 1024  # status line + headers
MAX_ERROR_BODY_BYTES = 1 << 20  # an error answer's body is read this far, then cut
MAX_IDLE_CONNECTIONS = 16
READ_SIZE = 65536


class _Connection:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def usable(self) -> bool:
        return not self.writer.is_closing() and not self.reader.at_eof()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class LeanResponse:
    """The answer's status and headers; its body read once, as lines or whole."""

    def __init__(self, connection: _Connection, status_code: int, headers: dict[str, str]) -> None:
        self._connection = connection
        self.status_code = status_code
        self.headers = headers
        self.complete = False  # the body was read to its end
        self.keep_alive = headers.get("connection", "").lower() != "close"
        self._content = b""
        encoding = headers.get("transfer-encoding", "").lower()
        self._chunked = "chunked" in encoding
        length = headers.get("content-length")
        self._length = int(length) if length is not None and length.strip().isdigit() and not self._chunked else None
        if not self._chunked and self._length is None:
            self.keep_alive = False  # the body ends with the connection
        if status_code in (204, 304) or 100 <= status_code < 200:
            self._length, self._chunked = 0, False

    async def _pieces(self) -> AsyncIterator[bytes]:
        """The body as it arrives, without its framing."""
        reader = self._connection.reader
        try:
            if self._chunked:
                while True:
                    size_line = await reader.readuntil(b"\r\n")
                    try:
                        size = int(size_line.split(b";", 1)[0].strip(), 16)
                    except ValueError:
                        raise httpx.RemoteProtocolError(f"bad chunk size {size_line[:40]!r}") from None
                    if size == 0:
                        while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, if any
                            pass
                        break
                    data = await reader.readexactly(size + 2)
                    if data[-2:] != b"\r\n":
                        raise httpx.RemoteProtocolError("chunk not followed by CRLF")
                    yield data[:-2]
            elif self._length is not None:
                remaining = self._length
                while remaining > 0:
                    data = await reader.read(min(remaining, READ_SIZE))
                    if not data:
                        raise httpx.RemoteProtocolError(
                            f"server closed the connection {remaining} bytes before the end of the body")
                    remaining -= len(data)
                    yield data
            else:
                while data := await reader.read(READ_SIZE):
                    yield data
        except asyncio.IncompleteReadError:
            raise httpx.RemoteProtocolError("server closed the connection in the middle of the body") from None
        except asyncio.LimitOverrunError:
            raise httpx.RemoteProtocolError("chunk header too long") from None
        except (ConnectionError, OSError) as error:
            raise httpx.ReadError(str(error) or type(error).__name__) from None
        self.complete = True

    async def aiter_lines(self) -> AsyncIterator[str]:
        """Lines as they arrive (``\\n`` or ``\\r\\n`` ended; the last one may have no ending)."""
        pending = b""
        async for piece in self._pieces():
            pending += piece
            if b"\n" not in piece:
                continue
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line.rstrip(b"\r").decode("utf-8", errors="replace")
        if pending:
            yield pending.rstrip(b"\r").decode("utf-8", errors="replace")

    async def aread(self) -> bytes:
        """The whole body (an error answer's, cut at :data:`MAX_ERROR_BODY_BYTES`)."""
        parts: list[bytes] = []
        size = 0
        async for piece in self._pieces():
            if size < MAX_ERROR_BODY_BYTES:
                parts.append(piece)
            size += len(piece)
        self._content = b"".join(parts)[:MAX_ERROR_BODY_BYTES]
        return self._content

    @property
    def text(self) -> str:
        return self._content.decode("utf-8", errors="replace")


class LeanHttp:
    """Streamed JSON POSTs to one ``http://`` server over a small pool of kept-alive connections."""

    def __init__(self, base_url: str, *, auth: tuple[str, str] | None = None, headers: dict[str, str] | None = None,
                 connect_timeout_s: float = 5.0, write_timeout_s: float = 30.0) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"lean HTTP speaks plain http:// to a host, not {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self._path = parts.path.rstrip("/")
        host_header = f"[{self.host}]" if ":" in self.host else self.host
        fixed = {"Host": f"{host_header}:{self.port}", "Accept": "*/*", "User-Agent": "slb-agent",
                 "Content-Type": "application/json"}
        fixed.update(headers or {})
        if auth is not None:  # as httpx: a login in the URL wins over an Authorization header
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode("ascii")
            fixed = {name: value for name, value in fixed.items() if name.lower() != "authorization"}  # any case
            fixed["Authorization"] = f"Basic {token}"
        self._head_lines = "".join(f"{name}: {value}\r\n" for name, value in fixed.items())
        self._connect_timeout_s = connect_timeout_s
        self._write_timeout_s = write_timeout_s
        self._idle: list[_Connection] = []
        self._closed = False

    async def _connect(self) -> _Connection:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, limit=MAX_HEAD_BYTES), self._connect_timeout_s)
        except asyncio.TimeoutError:
            raise httpx.ConnectTimeout(f"no connection to {self.host}:{self.port} within "
                                       f"{self._connect_timeout_s:g} s") from None
        except OSError as error:
            raise httpx.ConnectError(str(error) or type(error).__name__) from None
        return _Connection(reader, writer)

    def _take_idle(self) -> _Connection | None:
        while self._idle:
            connection = self._idle.pop()
            if connection.usable():
                return connection
            connection.close()
        return None

    async def _exchange(self, connection: _Connection, request: bytes) -> LeanResponse:
        """Send the request and read the response's head."""
        writer, reader = connection.writer, connection.reader
        writer.write(request)
        if writer.transport.get_write_buffer_size():
            try:
                await asyncio.wait_for(writer.drain(), self._write_timeout_s)
            except asyncio.TimeoutError:  # mapped here: on Python 3.11+ it is an OSError, taken for a broken read
                raise httpx.WriteTimeout(f"request not written within {self._write_timeout_s:g} s") from None
        status_line = await _read_line(reader)
        try:
            version, status, *_reason = status_line.decode("latin-1").split(" ", 2)
            status_code = int(status)
        except ValueError:
            raise httpx.RemoteProtocolError(f"not an HTTP status line: {status_line[:60]!r}") from None
        headers: dict[str, str] = {}
        size = len(status_line)
        while True:
            line = await _read_line(reader)
            size += len(line)
            if size > MAX_HEAD_BYTES:
                raise httpx.RemoteProtocolError(f"response head over {MAX_HEAD_BYTES} bytes")
            if line == b"\r\n":
                break
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if status_code == 100:  # Continue: the real answer follows
            return await self._exchange(connection, b"")
        response = LeanResponse(connection, status_code, headers)
        if version == "HTTP/1.0" and headers.get("connection", "").lower() != "keep-alive":
            response.keep_alive = False
        return response

    @contextlib.asynccontextmanager
    async def stream(self, method: str, path: str, *, json: Any) -> AsyncIterator[LeanResponse]:  # noqa: A002
        """``POST path`` with ``json`` as the body; the response's body must be read inside the block to keep the
        connection (leaving early closes it, which tells the runtime to stop)."""
        if self._closed:
            raise httpx.ConnectError("client closed")
        body = _dumps(json)
        request = (f"{method} {self._path}{path} HTTP/1.1\r\n{self._head_lines}Content-Length: {len(body)}\r\n\r\n"
                   .encode("latin-1") + body)
        connection = self._take_idle()
        reused = connection is not None
        if connection is None:
            connection = await self._connect()
        response: LeanResponse | None = None
        try:
            try:
                response = await self._exchange(connection, request)
            except (ConnectionError, OSError, asyncio.IncompleteReadError) as error:
                if not reused:
                    raise _read_error(error) from None
                # The server closed this kept-alive connection while it sat idle: it never saw the request.
                connection.close()
                connection = await self._connect()
                try:
                    response = await self._exchange(connection, request)
                except (ConnectionError, OSError, asyncio.IncompleteReadError) as again:
                    raise _read_error(again) from None
            yield response
        finally:
            if response is not None and response.complete and response.keep_alive and not self._closed \
                    and connection.usable() and len(self._idle) < MAX_IDLE_CONNECTIONS:
                self._idle.append(connection)
            else:
                connection.close()

    async def aclose(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()


async def _read_line(reader: asyncio.StreamReader) -> bytes:
    """One CRLF-ended line of the response head; a line over the reader's limit is a protocol error."""
    try:
        return await reader.readuntil(b"\r\n")
    except asyncio.LimitOverrunError:
        raise httpx.RemoteProtocolError(f"response head over {MAX_HEAD_BYTES} bytes") from None


def _read_error(error: BaseException) -> httpx.HTTPError:
    if isinstance(error, asyncio.IncompleteReadError):
        return httpx.RemoteProtocolError("server closed the connection without an answer")
    return httpx.ReadError(str(error) or type(error).__name__)


def _dumps(value: Any) -> bytes:
    """JSON as httpx sends it (UTF-8, no spaces, non-ASCII kept), so runtimes see the same bytes."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def lean_or_httpx(base_url: str) -> bool:
    """Whether streamed chat to ``base_url`` can go through :class:`LeanHttp`: plain http, and no proxy from the
    environment (``HTTP_PROXY`` / ``ALL_PROXY`` not bypassed by ``NO_PROXY``), which httpx would use and this
    client does not speak."""
    parts = urlsplit(base_url)
    if parts.scheme != "http":
        return False
    proxies = urllib.request.getproxies()
    return not (("http" in proxies or "all" in proxies) and not urllib.request.proxy_bypass(parts.hostname or ""))


def chat_client(base_url: str, fallback: httpx.AsyncClient, *, auth: tuple[str, str] | None,
                headers: dict[str, str] | None = None, connect_timeout_s: float) -> LeanHttp | httpx.AsyncClient:
    """The client a backend streams chat with: :class:`LeanHttp` where :func:`lean_or_httpx` allows, else
    ``fallback`` (the backend's httpx client, configured the same way)."""
    if lean_or_httpx(base_url):
        return LeanHttp(base_url, auth=auth, headers=headers, connect_timeout_s=connect_timeout_s)
    return fallback
