"""A fault-injecting HTTP proxy in front of the FHIR server, and a TCP forwarder that can go down (for a
hospital database), for the fault suite.

It forwards every request to the real server, unless a fault is set: answer a status (500, 503, 429
with Retry-After), hang past the client's timeout, close the connection without answering, apply the
request and then drop the answer (an ambiguous write), or be down altogether (connection refused).
Faults apply to writes (PUT, POST, DELETE) or to every request, for the next N requests or until cleared.
It can also leave out request headers, as a gateway may (dropped_headers).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import weakref
from dataclasses import dataclass

import aiohttp
from aiohttp import web

# Not forwarded: hop-by-hop headers, and the encoding (the proxy's client decompresses what it gets).
_HOP_HEADERS = {
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "content-encoding",
    "accept-encoding",
}


@dataclass
class Fault:
    kind: str  # status | hang | close | ambiguous
    status: int = 503
    writes_only: bool = True
    remaining: int | None = None  # None: until cleared
    retry_after: str | None = None
    path_contains: str | None = None  # only requests whose path (or transaction body) names this
    hang_seconds: float = 60.0  # kind "hang": longer than the client's timeout


class FaultProxy:
    """Run in a thread of its own; control it from the test with set/clear/down/up."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.fault: Fault | None = None
        self.dropped_headers: set[str] = set()  # request headers not forwarded (lower case), as a gateway may
        self.counts: dict[str, int] = {"forwarded": 0, "faulted": 0, "applied_then_dropped": 0}
        self._transports: weakref.WeakSet[asyncio.BaseTransport] = weakref.WeakSet()
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._session: aiohttp.ClientSession | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._call(self._start())

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    def _call(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    async def _start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        await self._listen()

    async def _listen(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await self._site.start()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.transport is not None:
            self._transports.add(request.transport)
        fault = self.fault
        applies = fault is not None and (not fault.writes_only or request.method in ("PUT", "POST", "DELETE"))
        if applies and fault is not None and fault.path_contains is not None:
            applies = fault.path_contains in request.path or fault.path_contains.encode() in await request.read()
        if fault is not None and applies:
            if fault.remaining is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self.fault = None
            self.counts["faulted"] += 1
            if fault.kind == "status":
                headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
                return web.Response(status=fault.status, text="injected fault", headers=headers)
            if fault.kind == "hang":
                await asyncio.sleep(fault.hang_seconds)
            if fault.kind == "close":
                assert request.transport is not None
                request.transport.close()
                return web.Response(status=500)  # never reaches the client
            if fault.kind == "ambiguous":
                await self._forward(request)  # the server applies it...
                self.counts["applied_then_dropped"] += 1
                assert request.transport is not None
                request.transport.close()  # ...and the answer is lost
                return web.Response(status=500)
        return await self._forward(request)

    async def _forward(self, request: web.Request) -> web.Response:
        assert self._session is not None
        self.counts["forwarded"] += 1
        body = await request.read()
        dropped = _HOP_HEADERS | self.dropped_headers
        headers = {k: v for k, v in request.headers.items() if k.lower() not in dropped}
        url = self.upstream + request.path_qs.removeprefix("/fhir")
        async with self._session.request(request.method, url, data=body or None, headers=headers) as upstream:
            payload = await upstream.read()
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_HEADERS}
            return web.Response(status=upstream.status, body=payload, headers=out)

    def set(self, fault: Fault) -> None:
        self.fault = fault

    def clear(self) -> None:
        self.fault = None

    def down(self) -> None:
        """Stop listening and drop every open connection: refused, as if the server were gone."""
        assert self._site is not None

        async def gone() -> None:
            assert self._site is not None
            await self._site.stop()
            for transport in list(self._transports):
                transport.close()  # kept-alive connections would otherwise go on being served

        self._call(gone())

    def up(self) -> None:
        self._call(self._listen())

    def close(self) -> None:
        async def stop() -> None:
            if self._runner is not None:
                await self._runner.cleanup()
            if self._session is not None:
                await self._session.close()

        self._call(stop())
        self._loop.call_soon_threadsafe(self._loop.stop)


class TcpProxy:
    """A plain TCP forwarder (for a database), in threads of its own: down() refuses new connections and cuts the
    open ones, as a database server that went away; up() listens again on the same port."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.connections = 0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.up()

    def up(self) -> None:
        with self._lock:
            if self._listener is not None:
                return
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(64)
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            cut, self._open = self._open, set()
        for sock in [*([listener] if listener else []), *cut]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    close = down

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            try:
                server = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                if self._listener is not listener:  # went down meanwhile
                    client.close()
                    server.close()
                    return
                self._open |= {client, server}
                self.connections += 1
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open -= {source, sink}
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
