"""The network policy of every download and upload: what the worker may connect to, and for how
long. Media (media.py) and LoRA files (lora.py) are fetched with `download`; the bucket endpoint
(storage.py) is held to the same address policy (`address_is_allowed`, `refused_address`).

No job can make the worker reach inside its own network (SSRF): each hop's host is resolved once,
every address must be public unicast or inside ALLOWED_PRIVATE_NETWORKS, and the socket is opened to
those very addresses. A whole download, redirects and host name look-ups included, has a deadline.
"""
from __future__ import annotations

import http.client
import ipaddress
import logging
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Sequence, Union
from urllib.parse import urljoin, urlsplit

from urllib3 import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import (ConnectTimeoutError, HTTPError, LocationParseError,
                                NewConnectionError, ProtocolError, ReadTimeoutError, SSLError)
from urllib3.util import Timeout, make_headers, parse_url
from urllib3.util.url import Url

from .errors import MediaError
from .settings import IPNetwork, NetworkSettings

logger = logging.getLogger(__name__)

DEADLINE_FACTOR = 3  # a whole download, redirects included, may take this many DOWNLOAD_TIMEOUT_S
USER_AGENT = "wan-s2v-worker"
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_DOWNLOAD_CHUNK = 1 << 16

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

# --- address policy ------------------------------------------------------------------------------

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated ::a.b.c.d form


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address that 6to4, NAT64 and Teredo addresses are translated to on the way."""
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.teredo is not None:
        return ip.teredo[1]
    return None


def _is_public(ip: IPAddress) -> bool:
    # `is_global` alone is not enough: Python counts multicast (224.0.0.1) as global.
    if (not ip.is_global or ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
            or ip.is_reserved or ip.is_unspecified):
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.is_site_local or ip in _IPV4_COMPATIBLE:
            return False
        embedded = _embedded_ipv4(ip)
        if embedded is not None and not _is_public(embedded):
            return False
    return True


def address_is_allowed(address: str | IPAddress, allowed: Sequence[IPNetwork] = ()) -> bool:
    """Whether the worker may connect to `address`: public unicast, or inside `allowed`.

    Pure: no connection and no DNS. A string that is not an IP address raises ValueError.
    """
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is a socket to 127.0.0.1 itself
    if any(ip.version == net.version and ip in net for net in allowed):
        return True
    return _is_public(ip)


def refused_address(infos: Sequence[tuple[Any, ...]], allowed: Sequence[IPNetwork]) -> str | None:
    """The first address among `socket.getaddrinfo` answers that the policy refuses; None when
    every one is allowed. One bad answer refuses the host: which answer a connection would use is
    not the checker's to choose."""
    for info in infos:
        address = str(info[4][0])
        try:
            if not address_is_allowed(address, allowed):
                return address
        except ValueError:
            return address
    return None



# --- downloading --------------------------------------------------------------------------------


class _Deadline:
    """The overall time limit of one download, redirects included.

    Socket timeouts bound each single read only, so a server that drips a byte now and then
    could hold a job for ever. A timer shuts down the download's sockets when the limit passes,
    which wakes whatever read, TLS handshake or header parse is blocked on them; host name
    look-ups, which no socket timeout covers, are waited for until the limit only
    (`_getaddrinfo_by`). tests/test_url_safety.py drips the status line, header lines, a single
    endless header, endless "100 Continue" answers and the body, and delays the look-up.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._end = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._fired = False
        self._socks: list[socket.socket] = []
        self._timer = threading.Timer(seconds, self.expire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        return self._end - time.monotonic()

    @property
    def expired(self) -> bool:
        return self._fired or self.remaining() <= 0

    def watch(self, sock: socket.socket) -> None:
        # A duplicate descriptor stays valid whatever urllib3 later does with the original, so the
        # timer can never shut down a descriptor number meanwhile reused by another connection.
        duplicate = sock.dup()
        with self._lock:
            if self._fired:
                duplicate.close()
                raise socket.timeout("download deadline passed")
            self._socks.append(duplicate)

    def expire(self) -> None:
        """The limit has passed (the timer's call, or a wait that ran to it)."""
        with self._lock:
            self._fired = True
            for sock in self._socks:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already closed by the peer

    def close(self) -> None:
        self._timer.cancel()
        with self._lock:
            for sock in self._socks:
                sock.close()
            self._socks.clear()


@dataclass(frozen=True)
class _Hop:
    """One request of a download: the addresses its host resolved to, every one already checked."""

    addresses: tuple[tuple[Any, ...], ...]  # getaddrinfo entries: family, type, proto, _, sockaddr
    deadline: _Deadline


def _connect_checked(conn: HTTPConnection, hop: _Hop) -> socket.socket:
    """Open a TCP socket to one of the hop's checked addresses (never to a fresh DNS answer)."""
    connect_timeout = conn.timeout if isinstance(conn.timeout, (int, float)) else None
    last_error: OSError | None = None
    for family, type_, proto, _, sockaddr in hop.addresses:
        remaining = hop.deadline.remaining()
        if remaining <= 0:
            break
        sock = socket.socket(family, type_, proto)
        try:
            for option in conn.socket_options or ():
                sock.setsockopt(*option)
            sock.settimeout(min(connect_timeout or remaining, remaining))
            sock.connect(sockaddr)
            hop.deadline.watch(sock)
        except OSError as exc:
            sock.close()
            last_error = exc
            continue
        return sock
    if last_error is None or isinstance(last_error, socket.timeout):
        raise ConnectTimeoutError(conn, "connection timed out")
    raise NewConnectionError(conn, f"could not connect: {last_error.strerror or last_error}")


class _CheckedConnection:
    """Mixed into urllib3's connections: connect to the hop's checked addresses instead of
    resolving `host`.

    `host` stays the URL's host name, so the Host header is unchanged; for HTTPS urllib3 also keeps
    TLS SNI and the certificate check on the host name, as it does them after `_new_conn` from
    `self.host`.
    """

    def __init__(self, *args: Any, hop: _Hop, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._hop = hop

    def _new_conn(self) -> socket.socket:
        return _connect_checked(self, self._hop)


class _CheckedHTTPConnection(_CheckedConnection, HTTPConnection):
    pass


class _CheckedHTTPSConnection(_CheckedConnection, HTTPSConnection):
    pass


class _CheckedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _CheckedHTTPConnection


class _CheckedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _CheckedHTTPSConnection


def _ca_bundle() -> str | None:
    try:
        import certifi  # what requests verifies against; else the system store
    except ImportError:
        return None
    return certifi.where()


def _parse_http_url(field: str, url: str, hop: int) -> Url:
    where = "points to" if hop == 0 else "redirected to"
    try:
        scheme = urlsplit(url).scheme.lower()  # first: parse_url balks at some other schemes
        parsed = parse_url(url) if scheme in ("http", "https") else None
    except (LocationParseError, ValueError):
        raise MediaError(f"'{field}' {where} an invalid URL") from None
    if parsed is None:
        raise MediaError(f"'{field}' {where} a URL that is not http or https (not allowed)")
    if not parsed.host:
        raise MediaError(f"'{field}' {where} a URL without a host")
    return parsed


def _getaddrinfo_by(deadline: "_Deadline", host: str, port: int) -> list[tuple[Any, ...]]:
    """socket.getaddrinfo, given up at the deadline: a look-up has no timeout of its own, and a
    name server that answers slowly (the URL's owner may run it) must not outlast the download's
    limit. The look-up thread is left to finish on its own."""
    outcome: dict[str, Any] = {}

    def resolve() -> None:
        try:
            outcome["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except BaseException as exc:  # handed to the caller's thread below
            outcome["error"] = exc

    thread = threading.Thread(target=resolve, name="media-dns", daemon=True)
    thread.start()
    thread.join(max(0.0, deadline.remaining()))
    if thread.is_alive():
        deadline.expire()
        raise socket.timeout("the host name look-up outlasted the download deadline")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["infos"]


def _resolve_checked(field: str, url: Url, hop: int, allowed: Sequence[IPNetwork],
                     deadline: "_Deadline") -> tuple[tuple[Any, ...], ...]:
    """Resolve the URL's host once and check every answer: one bad address refuses the host."""
    where = "points to" if hop == 0 else "redirected to"
    host = url.host.strip("[]")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        infos = _getaddrinfo_by(deadline, host, port)
    except (socket.gaierror, UnicodeError, ValueError):
        raise MediaError(f"'{field}' {where} a host name that could not be resolved") from None
    refused = refused_address(infos, allowed)
    if refused is not None:
        logger.warning("%s: refused address %s of %s", field, refused, host)
        raise MediaError(f"'{field}' {where} a private or local address (not allowed)")
    if not infos:
        raise MediaError(f"'{field}' {where} a host name that could not be resolved")
    return tuple(dict.fromkeys(tuple(i) for i in infos))


def _failure_reason(exc: BaseException) -> str:
    if isinstance(exc, NewConnectionError):  # before ConnectTimeoutError: it is a subclass
        return "could not connect"
    if isinstance(exc, ConnectTimeoutError):
        return "connection timed out"
    if isinstance(exc, ReadTimeoutError):
        return "timed out waiting for data"
    if isinstance(exc, SSLError):
        return "TLS handshake or certificate check failed"
    # urllib3 wraps what http.client raised while reading the answer: ProtocolError(text, cause).
    cause = exc.args[1] if isinstance(exc, ProtocolError) and len(exc.args) > 1 else exc
    if isinstance(cause, http.client.LineTooLong):
        return "the server sent a response line or header longer than 64 kB"
    if type(cause) is http.client.HTTPException and "headers" in str(cause):
        return "the server sent more than 100 response headers"
    if isinstance(cause, http.client.BadStatusLine) and not isinstance(cause, ConnectionError):
        return "the server's answer is not HTTP"
    if isinstance(exc, ProtocolError):
        return "the connection broke off"
    return type(exc).__name__


def _stream_body(field: str, response: Any, out: BinaryIO, max_bytes: int,
                 deadline: _Deadline) -> int:
    declared = response.headers.get("Content-Length")
    if declared and declared.strip().isdigit() and int(declared) > max_bytes:
        raise MediaError(f"'{field}' is larger than the {max_bytes} byte limit")
    received = 0
    for chunk in response.stream(_DOWNLOAD_CHUNK, decode_content=True):
        received += len(chunk)
        if received > max_bytes:  # counted as it arrives: Content-Length may be absent or a lie
            raise MediaError(f"'{field}' is larger than the {max_bytes} byte limit")
        if deadline.expired:
            break
        out.write(chunk)
    return received


def download(field: str, url: str, dest: Path, max_bytes: int, network: NetworkSettings) -> int:
    """GET `url` into `dest`, at most `max_bytes`; returns the byte count.

    Address policy (no URL reaches inside the network): each hop's host is resolved once, every
    address it resolves to must be public unicast (or inside ALLOWED_PRIVATE_NETWORKS), and the
    socket is then opened to those very addresses by `_CheckedHTTPConnection`; nothing resolves the
    name a second time, so a DNS answer that changes between check and connect (rebinding) cannot
    slip through. Redirects are followed here, not by urllib3, so every hop is checked the same way.
    Environment proxies are ignored on purpose: through a proxy the check would be meaningless.
    """
    allowed = network.allowed_private_networks
    timeout = Timeout(connect=network.download_timeout_s, read=network.download_timeout_s)
    deadline = _Deadline(network.download_timeout_s * DEADLINE_FACTOR)
    max_redirects = max(0, network.max_redirects)
    try:
        with open(dest, "wb") as out:
            for hop in range(max_redirects + 1):
                parsed = _parse_http_url(field, url, hop)
                checked = _Hop(_resolve_checked(field, parsed, hop, allowed, deadline), deadline)
                pool_cls, tls = ((_CheckedHTTPSPool, {"cert_reqs": "CERT_REQUIRED",
                                                      "ca_certs": _ca_bundle()})
                                 if parsed.scheme == "https" else (_CheckedHTTPPool, {}))
                headers = {"User-Agent": USER_AGENT}
                if parsed.auth:
                    headers.update(make_headers(basic_auth=parsed.auth))
                with pool_cls(parsed.host, parsed.port, timeout=timeout, maxsize=1, retries=False,
                              hop=checked, **tls) as pool:
                    response = pool.urlopen("GET", parsed.request_uri, headers=headers,
                                            redirect=False, retries=False, preload_content=False,
                                            assert_same_host=False)
                    try:
                        if response.status in REDIRECT_STATUSES:
                            location = response.headers.get("Location")
                            if not location:
                                raise MediaError(f"'{field}' redirected without a Location")
                            try:
                                url = urljoin(parsed.url, location.strip())
                            except ValueError:  # e.g. "http://[::1": an unclosed IPv6 bracket
                                raise MediaError(f"'{field}' redirected to an invalid URL") from None
                            continue
                        if response.status != 200:
                            raise MediaError(f"'{field}' could not be downloaded: HTTP "
                                             f"{response.status}")
                        received = _stream_body(field, response, out, max_bytes, deadline)
                    finally:
                        response.release_conn()
                if deadline.expired:  # a body cut short by the timer must not pass as complete
                    break
                if not received:
                    raise MediaError(f"'{field}' is empty")
                return received
            else:
                raise MediaError(f"'{field}' redirected too many times (more than "
                                 f"{max_redirects}, MAX_REDIRECTS)")
    except MediaError:
        if not deadline.expired:
            raise
    except (HTTPError, http.client.HTTPException, OSError, ValueError) as exc:
        if not deadline.expired:
            raise MediaError(f"'{field}' could not be downloaded: {_failure_reason(exc)}") from None
    finally:
        deadline.close()
    raise MediaError(f"'{field}' took longer than {deadline.seconds:g} s to download "
                     f"({DEADLINE_FACTOR} x DOWNLOAD_TIMEOUT_S)")


