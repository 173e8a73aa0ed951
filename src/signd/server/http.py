"""The metrics endpoint: ``GET /metrics``, ``/healthz`` and ``/readyz`` over HTTP/1.1.

``Endpoint`` is sans-IO (an ``h11.Request`` in, an ``Answer`` out); the rest
is the trio wrapper that accepts, bounds and times out its clients.
``serve_http`` is what the daemon starts.
"""

from __future__ import annotations

import errno
import hmac
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import h11
import trio
from prometheus_client import generate_latest

from ..metrics import Metrics, Snapshot

__all__ = ["Answer", "Endpoint", "serve_http"]

log = logging.getLogger("signd")

#: Longest request head the endpoint reads, and how long it waits for it.
MAX_HEAD: Final = 8192
HEAD_TIMEOUT: Final = 5.0
#: How long an answer may take to leave (a client that does not read is dropped).
SEND_TIMEOUT: Final = 10.0
#: Connections served at once.  Beyond that, a new connection closes the
#: oldest one still sending its request head (a scrape sends its head at
#: once, so only a connection that holds it back loses), or is itself closed.
MAX_CLIENTS: Final = 16
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
#: Host names always accepted in the ``Host`` header, with or without a port.
LOCAL_HOSTS: Final = frozenset({"localhost", "127.0.0.1", "::1"})
#: accept() failures that mean "out of descriptors or memory": wait, go on
ACCEPT_CAPACITY_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


@dataclass(frozen=True, slots=True)
class Answer:
    """One HTTP answer; the body never varies with anything but the path."""

    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


class Endpoint:
    """What ``/metrics``, ``/healthz`` and ``/readyz`` answer: sans-IO, an
    ``h11.Request`` in, an ``Answer`` out.

    - ``Host`` must name this endpoint: ``localhost``, ``127.0.0.1``,
      ``[::1]``, the configured listen host, or the address the connection
      came in on (an IP literal), with no port or the bound one.  Anything
      else (a name a web page resolved to 127.0.0.1: DNS rebinding) is 421.
    - With a ``token``, ``/metrics`` wants ``Authorization: Bearer TOKEN``
      (401 without it) and shows every per-key series.  Without one it shows
      no key names (see ``Collector``).  ``/healthz`` and ``/readyz`` are
      open and name no key.
    """

    def __init__(
        self,
        metrics: Metrics,
        snapshot: Callable[[], Snapshot],
        ready: Callable[[], bool],
        *,
        host: str,
        port: int,
        token: bytes | None = None,
    ) -> None:
        self.ready = ready
        self.port = port
        self.token = token
        self.full = metrics.registry(snapshot, per_key=True)
        self.public = metrics.registry(snapshot, per_key=False)
        hosts = {_normal_host(h) for h in LOCAL_HOSTS}
        if host not in ("0.0.0.0", "::", ""):  # noqa: S104 - a check, not a bind
            hosts.add(_normal_host(host))
        self.hosts = frozenset(hosts)

    def answer(self, request: h11.Request, local_address: str | None = None) -> Answer:
        headers = {name: value for name, value in request.headers}  # lower-cased by h11
        if not self.host_allowed(headers.get(b"host"), local_address):
            return Answer(421, b"misdirected request: unknown Host\n")
        if request.method not in (b"GET", b"HEAD"):
            return Answer(405, b"only GET\n", headers=(("allow", "GET, HEAD"),))
        path = request.target.split(b"?", 1)[0]
        if path == b"/metrics":
            registry = self.public
            if self.token is not None:
                if not self._authorized(headers.get(b"authorization")):
                    return Answer(
                        401,
                        b"unauthorized: send the metrics token as a bearer token\n",
                        headers=(("www-authenticate", 'Bearer realm="signd metrics"'),),
                    )
                registry = self.full
            return Answer(200, generate_latest(registry), CONTENT_TYPE)
        if path == b"/healthz":
            return Answer(200, b"live\n")
        if path == b"/readyz":
            return Answer(200, b"ready\n") if self.ready() else Answer(503, b"not ready\n")
        return Answer(404, b"not found: try /metrics\n")

    def _authorized(self, value: bytes | None) -> bool:
        assert self.token is not None
        scheme, _, credentials = (value or b"").strip().partition(b" ")
        given = credentials.strip() if scheme.lower() == b"bearer" else b""
        # compare_digest even for a missing token: the time says nothing
        return hmac.compare_digest(given, self.token) and bool(given)

    def host_allowed(self, value: bytes | None, local_address: str | None) -> bool:
        if value is None:
            return False
        try:
            text = value.decode("ascii").strip().lower()
        except UnicodeDecodeError:
            return False
        port: str | None
        if text.startswith("["):
            name, end, rest = text[1:].partition("]")
            if not end or (rest and not rest.startswith(":")):
                return False
            port = rest[1:] if rest else None
        else:
            name, colon, after = text.partition(":")
            if ":" in after:  # an IPv6 address must come in brackets
                return False
            port = after if colon else None
        if port is not None and not (port.isdigit() and int(port) == self.port):
            return False
        name = _normal_host(name)
        if name in self.hosts:
            return True
        return local_address is not None and name == _normal_host(local_address)


def _normal_host(name: str) -> str:
    """An IP address in its one canonical form (IPv4-mapped IPv6 as IPv4); a
    host name lower-cased."""
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        return name.lower()
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


@dataclass(eq=False, slots=True)
class _Client:
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    #: still waiting for its request head (the only state in which it may be evicted)
    reading: bool = True
    evicted: bool = False


class _Server:
    """Accepts connections, at most ``max_clients`` served at once, each
    with a deadline for its request head and one for its answer."""

    def __init__(self, endpoint: Endpoint, max_clients: int) -> None:
        self.endpoint = endpoint
        self.max_clients = max_clients
        self.clients: dict[_Client, None] = {}  # oldest first
        self.evicted = 0

    async def accept(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                log.warning("metrics endpoint: accept failed", extra={"error": str(exc)})
                await trio.sleep(0.1)  # out of descriptors: let some close
                continue
            if not self._make_room():
                await stream.aclose()
                continue
            client = _Client()
            self.clients[client] = None
            nursery.start_soon(self.serve, stream, client)

    def _make_room(self) -> bool:
        live = len(self.clients) - self.evicted
        if live < self.max_clients:
            # Evicted connections close at their next turn; never more of them than the cap.
            return len(self.clients) < 2 * self.max_clients
        for c in self.clients:
            if c.reading and not c.evicted:
                c.evicted = True
                self.evicted += 1
                c.scope.cancel()
                return len(self.clients) < 2 * self.max_clients
        return False

    async def serve(self, stream: trio.SocketStream, client: _Client) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        try:
            out = b""
            with client.scope, trio.move_on_after(HEAD_TIMEOUT):
                try:
                    request = await _read_head(conn, stream)
                except h11.RemoteProtocolError as exc:
                    out = _encode(conn, None, Answer(exc.error_status_hint, b"bad request\n"))
                else:
                    if request is not None:
                        local = stream.socket.getsockname()[0]
                        answer = self.endpoint.answer(request, local)
                        out = _encode(conn, request.method, answer)
            client.reading = False
            if out and not client.scope.cancelled_caught:
                with trio.move_on_after(SEND_TIMEOUT):
                    await stream.send_all(out)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            del self.clients[client]
            if client.evicted:
                self.evicted -= 1
            await stream.aclose()


async def _read_head(conn: h11.Connection, stream: trio.SocketStream) -> h11.Request | None:
    """The request head, or None if the peer closed first.

    Raises: h11.RemoteProtocolError (not HTTP, or a head over ``MAX_HEAD``).
    """
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(MAX_HEAD))
        elif isinstance(event, h11.Request):
            return event
        else:  # ConnectionClosed
            return None


def _encode(conn: h11.Connection, method: bytes | None, answer: Answer) -> bytes:
    """The bytes of ``answer`` (no body for HEAD); nothing if h11 cannot send one now."""
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return b""
    headers = [
        ("content-type", answer.content_type),
        ("content-length", str(len(answer.body))),
        ("connection", "close"),
        *answer.headers,
    ]
    out = conn.send(h11.Response(status_code=answer.status, headers=headers)) or b""
    if method != b"HEAD":
        out += conn.send(h11.Data(data=answer.body)) or b""
    return out + (conn.send(h11.EndOfMessage()) or b"")


async def serve_http(
    host: str,
    port: int,
    metrics: Metrics,
    snapshot: Callable[[], Snapshot],
    ready: Callable[[], bool],
    *,
    token: bytes | None = None,
    max_clients: int = MAX_CLIENTS,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` (and ``/healthz``, ``/readyz``) on ``host:port``
    (see ``Endpoint``): HTTP/1.1 through h11, one request per connection.
    Reports the port it bound (``port`` 0 picks a free one).

    Raises: OSError if the address cannot be bound.
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    server = _Server(
        Endpoint(metrics, snapshot, ready, host=host, port=bound, token=token), max_clients
    )
    task_status.started(bound)
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(server.accept, listener, nursery)
