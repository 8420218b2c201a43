"""The lean HTTP/1.1 client (agent/backends/lean_http.py) against asyncio servers that frame every byte themselves."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from agent.backends import BackendError, ChatDelta
from agent.backends.lean_http import MAX_ERROR_BODY_BYTES, MAX_HEAD_BYTES, LeanHttp, lean_or_httpx
from agent.backends.ollama_backend import OllamaBackend
from broker.mqtt.local_broker import free_port
from broker.protocol import ChatMessage
from tests.ollama_double import OllamaDouble, reply_text


@dataclass
class Request:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes
    conn: int  # index of the TCP connection it came on

    def header(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name]


@dataclass
class Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    index: int
    served: int = 0  # requests answered on it so far


Handler = Callable[[Request, Conn], Awaitable[bool]]  # answers; returns whether to keep the connection open


async def read_request(reader: asyncio.StreamReader, conn: int) -> Request | None:
    line = await reader.readline()
    if not line:
        return None
    assert line.endswith(b"\r\n")
    method, path, version = line[:-2].decode("latin-1").split(" ")
    assert version == "HTTP/1.1"
    headers = []
    while (line := await reader.readline()) != b"\r\n":
        assert line.endswith(b"\r\n"), line
        name, _, value = line[:-2].decode("latin-1").partition(":")
        headers.append((name, value.strip()))
    request = Request(method, path, headers, b"", conn)
    request.body = await reader.readexactly(int((request.header("content-length") or ["0"])[0]))
    return request


class Server:
    """HTTP/1.1 on a free 127.0.0.1 port; counts accepted connections and the EOFs it reads from clients."""

    def __init__(self, handler: Handler | None = None, *, raw: Callable[[Conn], Awaitable[None]] | None = None):
        self.handler, self.raw, self.accepted, self.eofs = handler, raw, 0, 0
        self.requests: list[Request] = []
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._server.close()
        for writer in self._writers:
            writer.close()
        await asyncio.sleep(0.01)  # let the handlers read their EOF and end

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(reader, writer, self.accepted)
        self.accepted += 1
        self._writers.append(writer)
        try:
            if self.raw is not None:
                return await self.raw(conn)
            while (request := await read_request(reader, conn.index)) is not None:
                self.requests.append(request)
                if not await self.handler(request, conn):  # type: ignore[misc]
                    return
                conn.served += 1
            self.eofs += 1
        except (ConnectionError, asyncio.IncompleteReadError):
            self.eofs += 1
        finally:
            writer.close()


def head(status: int = 200, **headers: object) -> bytes:
    lines = [f"HTTP/1.1 {status} {'OK' if status == 200 else 'Oops'}"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


END, CHUNKED = b"0\r\n\r\n", head(Transfer_Encoding="chunked")


async def send(conn: Conn, *pieces: bytes, pause: float = 0.0) -> None:
    for piece in pieces:
        conn.writer.write(piece)
        await conn.writer.drain()
        if pause:
            await asyncio.sleep(pause)


def answer(*pieces: bytes, keep: bool = True) -> Handler:
    async def handler(request: Request, conn: Conn) -> bool:
        await send(conn, *pieces)
        return keep
    return handler


async def post(client: LeanHttp, body: Any = None, path: str = "/api/chat") -> list[str]:
    async with client.stream("POST", path, json={"q": 1} if body is None else body) as response:
        assert response.status_code == 200
        return [line async for line in response.aiter_lines()]


async def wait_until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def test_chunked_lines_across_and_within_chunks_stream_as_they_come() -> None:
    first_seen, in_time = asyncio.Event(), []

    async def handler(request: Request, conn: Conn) -> bool:
        await send(conn, CHUNKED[:20], CHUNKED[20:] + chunk(b'{"a":'), chunk(b'1}\r'), chunk(b"\n"))
        with contextlib.suppress(asyncio.TimeoutError):  # the first line reaches the caller before the rest is sent
            in_time.append(await asyncio.wait_for(first_seen.wait(), 1))
        await send(conn, chunk(b'{"b":2}\n{"c"')[:4], chunk(b'{"b":2}\n{"c"')[4:], chunk(b':3}\r\n\n{"d":4}\r\n'),
                   b"3;ext=1\r\nta\xc3\r\n", chunk(b"\xa9il") + b"0\r\nX-Trailer: 1\r\n\r\n", pause=0.002)
        return True

    async with Server(handler) as server:
        client = LeanHttp(server.url)
        lines: list[str] = []
        async with client.stream("POST", "/api/chat", json={}) as response:
            async for line in response.aiter_lines():
                lines.append(line)
                first_seen.set()
        assert lines == ['{"a":1}', '{"b":2}', '{"c":3}', "", '{"d":4}', "taéil"] and in_time == [True]
        server.handler = answer(CHUNKED + chunk(b"again") + END)  # trailers consumed: the connection is clean
        assert await post(client) == ["again"] and server.accepted == 1
        await client.aclose()


async def test_keep_alive_reuses_one_connection_for_chunked_and_length_bodies() -> None:
    async def handler(request: Request, conn: Conn) -> bool:
        n = json.loads(request.body)["n"]
        body = f"line {n}\nend {n}".encode()
        await send(conn, CHUNKED + chunk(body) + END if n % 2 else head(Content_Length=len(body)) + body)
        return True

    async with Server(handler) as server:
        client = LeanHttp(server.url)
        for n in range(6):
            assert await post(client, {"n": n}) == [f"line {n}", f"end {n}"]
        assert server.accepted == 1 and len(server.requests) == 6 and server.eofs == 0
        held = list(client._idle)  # referenced here, so only aclose can close it (not the garbage collector)
        assert len(held) == 1
        await client.aclose()  # the idle pooled connection is closed: the server reads EOF
        await wait_until(lambda: server.eofs == 1)
        with pytest.raises(httpx.ConnectError):
            await post(client)
        assert server.accepted == 1


async def test_body_ended_by_close_and_connection_close_are_not_pooled() -> None:
    async with Server(answer(head() + b"one\ntwo", keep=False)) as server:
        client = LeanHttp(server.url)
        async with client.stream("POST", "/x", json={}) as response:
            assert [line async for line in response.aiter_lines()] == ["one", "two"]
            assert response.keep_alive is False
        assert client._idle == []
        assert await post(client) == ["one", "two"] and server.accepted == 2
        # "Connection: close" is honoured even when the server keeps the connection open
        server.handler = answer(head(Content_Length=2, Connection="close") + b"ok")
        assert await post(client) == ["ok"] and await post(client) == ["ok"] and server.accepted == 4
        await client.aclose()


@pytest.mark.parametrize("when", ["while idle", "on the next request"])
async def test_pooled_connection_closed_by_the_server_is_retried_once(when: str) -> None:
    async def handler(request: Request, conn: Conn) -> bool:
        if conn.served:  # read the request, then hang up without an answer (client can't tell it from idle close)
            return False
        await send(conn, head(Content_Length=5) + b"hello")
        return when != "while idle"

    async with Server(handler) as server:
        client = LeanHttp(server.url)
        assert await post(client) == ["hello"]
        if when == "while idle":
            await asyncio.sleep(0.02)
        assert await post(client) == ["hello"]
        assert server.accepted == 2
        assert [r.conn for r in server.requests] == ([0, 1] if when == "while idle" else [0, 0, 1])
        await client.aclose()


async def test_no_retry_on_a_fresh_connection_and_only_one_on_a_pooled_one() -> None:
    async with Server(answer(head(Content_Length=2) + b"ok")) as server:
        client = LeanHttp(server.url)
        assert await post(client) == ["ok"]
        server.handler = answer(keep=False)  # from now on: read the request, hang up without an answer
        with pytest.raises(httpx.RemoteProtocolError):  # pooled: retried once on a new connection, closed again
            await post(client)
        assert server.accepted == 2 and len(server.requests) == 3
        with pytest.raises(httpx.RemoteProtocolError):  # fresh: never retried
            await post(client)
        assert server.accepted == 3 and len(server.requests) == 4
        await client.aclose()


async def test_leaving_early_closes_the_connection_and_the_next_request_opens_another() -> None:
    async with Server(answer(CHUNKED + chunk(b"first\nsecond\n"))) as server:  # ...and the body never ends
        client = LeanHttp(server.url)
        async with client.stream("POST", "/api/chat", json={}) as response:
            async for line in response.aiter_lines():
                assert line == "first"
                break
        await wait_until(lambda: server.eofs == 1)  # the runtime learns the caller stopped
        server.handler = answer(CHUNKED + chunk(b"fresh") + END)
        assert await post(client) == ["fresh"] and server.accepted == 2
        await client.aclose()


async def test_error_status_body_is_read_and_a_huge_one_cut() -> None:
    small = b'{"error":"model \\"x\\" not found"}'
    huge = b"0123456789abcdef" * ((MAX_ERROR_BODY_BYTES + 5000) // 16)

    async with Server(answer(head(404, Content_Length=len(small)) + small)) as server:
        client = LeanHttp(server.url)
        async with client.stream("POST", "/api/chat", json={}) as response:
            assert response.status_code == 404
            assert await response.aread() == small and response.text == small.decode()
        pieces = b"".join(chunk(huge[i:i + 50000]) for i in range(0, len(huge), 50000))
        server.handler = answer(head(500, Transfer_Encoding="chunked") + pieces + END)
        async with client.stream("POST", "/api/chat", json={}) as response:
            assert response.status_code == 500
            assert await response.aread() == huge[:MAX_ERROR_BODY_BYTES]
            assert len(response.text) == MAX_ERROR_BODY_BYTES
        assert server.accepted == 1  # both bodies were read to their end, so the connection stayed
        await client.aclose()


@pytest.mark.parametrize(("reply", "came"), [
    (CHUNKED + chunk(b"one\n") + b"10\r\npart", ["one"]),  # closed inside a chunk
    (CHUNKED + chunk(b"one\n"), ["one"]),  # closed between chunks
    (CHUNKED + chunk(b"one\n") + b"zz\r\n", ["one"]),  # bad chunk size
    (CHUNKED + b"4\r\none\nXX" + END, []),  # chunk data longer than its size
    (head(Content_Length=100) + b"one\npartial", ["one"]),  # closed before Content-Length bytes
], ids=["in-chunk", "between-chunks", "bad-chunk-size", "no-crlf-after-chunk", "short-length"])
async def test_broken_body_raises_after_the_lines_that_came(reply: bytes, came: list[str]) -> None:
    async with Server(answer(reply, keep=False)) as server:
        client = LeanHttp(server.url)
        lines: list[str] = []
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            async with client.stream("POST", "/api/chat", json={}) as response:
                async for line in response.aiter_lines():
                    lines.append(line)
        assert lines == came and client._idle == []
        await client.aclose()


@pytest.mark.parametrize("reply", [
    b"garbage\r\n\r\n",
    b"HTTP/1.1 abc OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n" + (b"X-Pad: " + b"a" * 1000 + b"\r\n") * 70 + b"\r\n",
    b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * (MAX_HEAD_BYTES + 10) + b"\r\n\r\n",
], ids=["garbage", "bad-status", "many-headers", "one-long-header"])
async def test_bad_head_raises_protocol_error_and_drops_the_connection(reply: bytes) -> None:
    async with Server(answer(reply)) as server:
        client = LeanHttp(server.url)
        with pytest.raises(httpx.RemoteProtocolError):
            await asyncio.wait_for(post(client), 2)
        await wait_until(lambda: server.eofs == 1)
        await client.aclose()


async def test_write_timeout_when_the_server_never_reads() -> None:
    release = asyncio.Event()
    async with Server(raw=lambda conn: release.wait()) as server:
        client = LeanHttp(server.url, write_timeout_s=0.2)
        try:
            with pytest.raises(httpx.WriteTimeout):
                await post(client, {"x": "a" * (8 << 20)})
        finally:
            release.set()
        await client.aclose()


@pytest.mark.parametrize("given", ["Authorization", "authorization"])
async def test_request_bytes_match_httpx(given: str) -> None:
    sent = {"model": "m", "messages": [{"role": "user", "content": "héllo ✓ 日本"}], "n": 1.5, "ok": True}
    async with Server(answer(head(Content_Length=0))) as server:
        client = LeanHttp(server.url + "/ollama/", auth=("user", "pa:ss"), headers={given: "Bearer k", "X-Extra": "1"})
        assert await post(client, sent) == []
        async with httpx.AsyncClient(base_url=server.url + "/ollama/", auth=("user", "pa:ss"),
                                     headers={given: "Bearer k", "X-Extra": "1"}) as reference:
            async with reference.stream("POST", "/api/chat", json=sent) as response:
                await response.aread()
        bearer_only = LeanHttp(server.url, headers={"Authorization": "Bearer k"})
        assert await post(bearer_only, sent) == []
        mine, theirs, bearer = server.requests
        assert (mine.method, mine.path) == ("POST", "/ollama/api/chat") == (theirs.method, theirs.path)
        assert mine.header("host") == [f"127.0.0.1:{server.port}"]
        assert mine.header("content-length") == [str(len(mine.body))]
        assert json.loads(mine.body) == sent and "héllo ✓ 日本".encode() in mine.body
        assert mine.body == theirs.body
        token = base64.b64encode(b"user:pa:ss").decode()
        assert mine.header("authorization") == [f"Basic {token}"] == theirs.header("authorization")
        assert mine.header("x-extra") == ["1"] and mine.header("content-type") == ["application/json"]
        assert bearer.header("authorization") == ["Bearer k"] and bearer.path == "/api/chat"
        await client.aclose()
        await bearer_only.aclose()


def test_a_proxy_from_the_environment_keeps_httpx(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert lean_or_httpx("http://gpu-box:11434")
    monkeypatch.setenv("http_proxy", "http://proxy.example:3128")
    assert not lean_or_httpx("http://gpu-box:11434")  # httpx would go through the proxy; the lean client cannot
    monkeypatch.setenv("no_proxy", "gpu-box,localhost")
    assert lean_or_httpx("http://gpu-box:11434") and not lean_or_httpx("http://other-box:11434")


async def test_lean_only_for_plain_http_and_refused_is_connect_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert lean_or_httpx("http://127.0.0.1:11434") and lean_or_httpx("http://u:p@host/ollama")
    assert not lean_or_httpx("https://127.0.0.1:11434")
    for url in ("https://x", "http://", "ftp://x"):
        with pytest.raises(ValueError):
            LeanHttp(url)
    with pytest.raises(httpx.ConnectError):
        await post(LeanHttp(f"http://127.0.0.1:{free_port()}"))


def user(text: str) -> list[ChatMessage]:
    return [ChatMessage(role="user", content=text)]


async def test_ollama_backend_streams_five_chats_on_one_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    with OllamaDouble(models=["llama3.2:1b"], tokens_per_s=0) as double:
        opened, track = [], double._track
        # the double's handler calls _track(add=True) once per accepted connection
        monkeypatch.setattr(double, "_track", lambda conn, *, add: (add and opened.append(conn), track(conn, add=add)))
        backend = OllamaBackend(double.url)
        assert isinstance(backend._chat_client, LeanHttp)
        for n in range(5):
            prompt = f"question number {n} é"
            pieces = [e.text async for e in backend.chat("llama3.2:1b", user(prompt)) if isinstance(e, ChatDelta)]
            assert "".join(pieces) == reply_text(prompt)
        assert len(opened) == 1 and len(double.requests_to("/api/chat")) == 5
        await backend.close()


async def test_ollama_error_line_mid_stream_maps_as_with_httpx() -> None:
    token = json.dumps({"message": {"role": "assistant", "content": "Hel"}, "done": False}).encode() + b"\n"
    error = b'{"error":"an error was encountered while running the model: unexpected EOF"}\n'
    async with Server(answer(head(Transfer_Encoding="chunked", Content_Type="application/x-ndjson")
                             + chunk(token) + chunk(error) + END)) as server:
        outcomes = []
        for lean in (True, False):
            backend = OllamaBackend(server.url)
            if not lean:
                backend._chat_client = backend._stream_client  # the httpx path, as before the lean client
            pieces: list[str] = []
            with pytest.raises(BackendError) as caught:
                async for event in backend.chat("m", user("hi")):
                    pieces += [event.text] if isinstance(event, ChatDelta) else []
            outcomes.append((type(caught.value), str(caught.value), pieces))
            await backend.close()
        assert outcomes[0] == outcomes[1]
        assert outcomes[0] == (BackendError, "an error was encountered while running the model: unexpected EOF",
                               ["Hel"])
