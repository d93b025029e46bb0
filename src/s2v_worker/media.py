"""Media intake: turn the job's image, audio and pose video (URL or base64) into checked local files.

Every input is proven by decoding it before any model work: the image through Pillow, the audio
through ffmpeg, streamed and resampled into the mono 16 kHz WAV that the model stage reads, the pose
video through decord. A bad input raises `MediaError`, whose message names the job field and says
what is wrong; it is safe to return to the client. Files are written inside the job's own
temporary folder only, under fixed names: nothing in a path comes from the job.

URLs are fetched so that no job can make the worker reach inside its own network (SSRF): see
`download` for how every address is checked, and pinned, before it is connected to.
"""
from __future__ import annotations

import base64
import binascii
import functools
import http.client
import ipaddress
import json
import logging
import os
import selectors
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Sequence, Union
from urllib.parse import urljoin, urlsplit

import imageio_ffmpeg
import librosa
import numpy as np
import soundfile
import soxr
from PIL import Image, ImageOps
from urllib3 import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import (ConnectTimeoutError, HTTPError, LocationParseError,
                                NewConnectionError, ProtocolError, ReadTimeoutError, SSLError)
from urllib3.util import Timeout, make_headers, parse_url
from urllib3.util.url import Url

from .errors import JobError
from .job import MediaSource
from .settings import Settings, SettingsError

logger = logging.getLogger(__name__)

MIN_IMAGE_SIDE = 16
# ffmpeg and the decord probe run in child processes with this limit: a hostile file can make a
# decoder crawl (or crash), and neither may hold or take down the job.
DECODE_TIMEOUT_S = 120.0
DEADLINE_FACTOR = 3  # a whole download, redirects included, may take this many DOWNLOAD_TIMEOUT_S
USER_AGENT = "wan-s2v-worker"
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_DOWNLOAD_CHUNK = 1 << 16

# Pillow formats refused although Pillow knows them: EPS is rendered by running Ghostscript.
_REFUSED_IMAGE_FORMATS = frozenset({"EPS"})

# The model reads speech as the official AudioEncoder loads it: librosa.load(path, sr=16000), i.e. the
# float32 samples, averaged over channels, resampled by soxr at "soxr_hq".
AUDIO_MODEL_RATE = 16_000
# Below this there is no speech for wav2vec2 to hear (telephone audio is 8 kHz); it also keeps the
# resampler's upsampling ratio sane.
MIN_AUDIO_SAMPLE_RATE = 4_000
_AUDIO_BLOCK_FRAMES = 1 << 16  # source frames downmixed and resampled at a time
_PIPE_READ_BYTES = 1 << 20
_WAV_CHUNK_LIMIT = 1 << 16  # ffmpeg's header chunks (fmt, LIST) are far smaller
_STDERR_KEPT_BYTES = 1 << 14

# Demuxers ffmpeg may use for the audio. Playlist and script formats (hls, concat, ...) are left
# out: they make ffmpeg open further files or URLs named inside the input.
AUDIO_DEMUXERS = ("wav", "w64", "mp3", "flac", "ogg", "mov", "matroska", "aac", "aiff", "caf",
                  "amr", "asf", "avi", "mpegts", "ac3", "eac3", "wv", "au")

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


class MediaError(JobError, ValueError):
    """An input could not be fetched or decoded. The message is safe to return to the client."""


@dataclass(frozen=True)
class ImageInput:
    path: Path  # RGB PNG, EXIF orientation applied
    width: int
    height: int


@dataclass(frozen=True)
class AudioInput:
    original_path: Path  # as received; muxed into the MP4
    model_path: Path  # mono float32 at 16 kHz: what librosa.load(original, sr=16000) returns
    duration_s: float
    sample_rate: int  # the source's
    channels: int  # the source's


# --- address policy ------------------------------------------------------------------------------

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated ::a.b.c.d form


@functools.lru_cache(maxsize=8)
def parse_allowed_networks(text: str) -> tuple[IPNetwork, ...]:
    """ALLOWED_PRIVATE_NETWORKS ("127.0.0.0/8, ::1/128") as networks; empty text: none."""
    networks = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise SettingsError(f"ALLOWED_PRIVATE_NETWORKS: {part!r} is not a CIDR range") from None
    return tuple(networks)


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


# --- fetching ------------------------------------------------------------------------------------

def _decode_base64(source: MediaSource, max_bytes: int) -> bytes:
    text = source.base64.strip()
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or ";base64" not in header:
            raise MediaError(f"'{source.field}' is a data URI without ';base64,' data")
    text = "".join(text.split())
    if len(text) * 3 // 4 > max_bytes:
        raise MediaError(f"'{source.field}' is larger than the {max_bytes} byte limit")
    try:
        data = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(f"'{source.field}' is not valid base64") from None
    if not data:
        raise MediaError(f"'{source.field}' decodes to no data")
    return data


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


def download(field: str, url: str, dest: Path, max_bytes: int, settings: Settings) -> int:
    """GET `url` into `dest`, at most `max_bytes`; returns the byte count.

    Address policy (no URL reaches inside the network): each hop's host is resolved once, every
    address it resolves to must be public unicast (or inside ALLOWED_PRIVATE_NETWORKS), and the
    socket is then opened to those very addresses by `_CheckedHTTPConnection`; nothing resolves the
    name a second time, so a DNS answer that changes between check and connect (rebinding) cannot
    slip through. Redirects are followed here, not by urllib3, so every hop is checked the same way.
    Environment proxies are ignored on purpose: through a proxy the check would be meaningless.
    """
    allowed = parse_allowed_networks(settings.allowed_private_networks)
    timeout = Timeout(connect=settings.download_timeout_s, read=settings.download_timeout_s)
    deadline = _Deadline(settings.download_timeout_s * DEADLINE_FACTOR)
    max_redirects = max(0, settings.max_redirects)
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


def fetch(source: MediaSource, dest: Path, max_bytes: int, settings: Settings) -> Path:
    """Write the source's bytes (downloaded or base64-decoded) to `dest`, at most `max_bytes`."""
    if source.url:
        size = download(source.field, source.url, dest, max_bytes, settings)
    else:
        data = _decode_base64(source, max_bytes)
        dest.write_bytes(data)
        size = len(data)
    logger.info("%s: received %d bytes", source.field, size)
    return dest


# --- what a file looks like ----------------------------------------------------------------------

def _sniff(head: bytes) -> str | None:
    """A rough kind for error messages ("an MP3 given as image"); None when unknown."""
    start = head.lstrip()[:64].lower()
    if start.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "an HTML page"
    if start.startswith((b"{", b"[")):
        return "JSON text"
    if start.startswith(b"<?xml"):
        return "an XML document"
    if head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"II*\0", b"MM\0*")) or (
            head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return "an image"
    if head.startswith((b"ID3", b"fLaC", b"OggS", b"\xff\xfb", b"\xff\xf3", b"\xff\xf2")) or (
            head[:4] == b"RIFF" and head[8:12] == b"WAVE"):
        return "audio"
    if head[4:8] == b"ftyp" or head.startswith(b"\x1aE\xdf\xa3") or (
            head[:4] == b"RIFF" and head[8:12] == b"AVI "):
        return "a video (or audio) container"
    return None


def _unreadable(field: str, what: str, path: Path, expected: str, detail: str = "") -> MediaError:
    """"'audio_url' is not a readable audio file: it looks like an HTML page", or with `detail`."""
    with open(path, "rb") as f:
        kind = _sniff(f.read(64))
    if kind and kind != expected:
        return MediaError(f"'{field}' is not a readable {what}: it looks like {kind}")
    return MediaError(f"'{field}' is not a readable {what}{f' ({detail})' if detail else ''}")


def _error_summary(stderr: bytes) -> str:
    lines = [line for line in stderr.decode("utf-8", "replace").splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no error text"


# --- decoding ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _image_formats() -> tuple[str, ...]:
    Image.init()
    return tuple(sorted(set(Image.OPEN) - _REFUSED_IMAGE_FORMATS))


def load_image(source: MediaSource, work_dir: Path, settings: Settings) -> ImageInput:
    raw = fetch(source, work_dir / "image.input", settings.max_image_bytes, settings)
    max_pixels = settings.max_image_pixels
    try:
        with Image.open(raw, formats=_image_formats()) as probe:
            width, height = probe.size
            if width * height > max_pixels:  # from the header, before any pixel is decoded
                raise MediaError(f"'{source.field}' has {width}x{height} pixels; the limit is "
                                 f"{max_pixels} (MAX_IMAGE_PIXELS)")
            probe.load()  # decodes every pixel: truncated files fail here
            # In place, and converted only when not RGB yet: at most two copies of the pixels are
            # alive at once (Pillow keeps 4 bytes a pixel: 512 MB at the 64 Mpx default limit).
            ImageOps.exif_transpose(probe, in_place=True)
            image = probe if probe.mode == "RGB" else probe.convert("RGB")
    except MediaError:
        raise
    except Image.DecompressionBombError:
        raise MediaError(f"'{source.field}' has more pixels than Pillow's decompression-bomb "
                         "limit") from None
    except Exception as exc:  # Pillow's decoders raise many types on corrupt input (OSError,
        # SyntaxError, struct.error, EOFError, ...): each means the same thing here
        raise _unreadable(source.field, "image", raw, "an image", type(exc).__name__) from None
    if min(image.size) < MIN_IMAGE_SIDE:
        raise MediaError(f"'{source.field}' is {image.width}x{image.height}; both sides must be at "
                         f"least {MIN_IMAGE_SIDE} pixels")
    path = work_dir / "image.png"
    image.save(path)
    raw.unlink()
    return ImageInput(path=path, width=image.width, height=image.height)


def _run_decoder(field: str, command: list[str], what: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, capture_output=True, timeout=DECODE_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:  # run() has killed the child already
        raise MediaError(f"'{field}' took longer than {DECODE_TIMEOUT_S:g} s to {what}") from None


class DecoderOutputEnded(Exception):
    """A decoder's output ended before what the reader needed."""


class DecoderPipe:
    """A decoding child's stdout, read within DECODE_TIMEOUT_S (from the start, or from the last
    `restart_clock`). Its stderr is read in the same wait (only the end is kept), so that the child
    can never block on a full stderr pipe, without a thread. Used for ffmpeg's audio and for the
    pose frames."""

    def __init__(self, process: subprocess.Popen, field: str, what: str = "decode") -> None:
        self.process, self.field, self.what = process, field, what
        self.deadline = time.monotonic() + DECODE_TIMEOUT_S
        self.stderr = bytearray()
        self._stdout, self._stderr = process.stdout.fileno(), process.stderr.fileno()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._stdout, selectors.EVENT_READ)
        self._selector.register(self._stderr, selectors.EVENT_READ)
        self._closed = False

    def restart_clock(self) -> None:
        self.deadline = time.monotonic() + DECODE_TIMEOUT_S

    def _keep_stderr(self) -> bool:
        """Read what stderr has; False once it has ended."""
        piece = os.read(self._stderr, 4096)
        if not piece:
            self._selector.unregister(self._stderr)
            return False
        self.stderr += piece
        del self.stderr[:-_STDERR_KEPT_BYTES]
        return True

    def read(self, size: int = _PIPE_READ_BYTES) -> bytes:
        """Up to `size` bytes; b"" at the end of the output."""
        while True:
            remaining = self.deadline - time.monotonic()
            ready = self._selector.select(remaining) if remaining > 0 else []
            if not ready:
                raise MediaError(f"'{self.field}' took longer than {DECODE_TIMEOUT_S:g} s to "
                                 f"{self.what}")
            for key, _ in ready:
                if key.fd == self._stderr:
                    self._keep_stderr()
            if any(key.fd == self._stdout for key, _ in ready):
                return os.read(self._stdout, size)

    def read_exact(self, size: int) -> bytes:
        data = bytearray(size)
        self.read_into(memoryview(data))
        return bytes(data)

    def read_into(self, buffer: memoryview) -> None:
        """Fill `buffer` (bytes) from the output, without an intermediate copy of it all."""
        filled = 0
        while filled < len(buffer):
            piece = self.read(min(len(buffer) - filled, _PIPE_READ_BYTES))
            if not piece:
                raise DecoderOutputEnded()
            buffer[filled:filled + len(piece)] = piece
            filled += len(piece)

    def close(self) -> int:
        """Stop the child if it still runs; its exit status (stderr read to its end, for the
        log). Safe to call again."""
        if self.process.poll() is None:
            self.process.kill()
        returncode = self.process.wait()
        if not self._closed:
            self._closed = True
            # The child is gone: its stderr holds what it wrote, then ends.
            while self._stderr in self._selector.get_map() and self._keep_stderr():
                pass
            self._selector.close()
            self.process.stdout.close()
            self.process.stderr.close()
        return returncode

    def close_for_log(self) -> str:
        """`close`, then why the child failed, for the log: its exit status and stderr's end."""
        returncode = self.close()
        return f"exit status {returncode}: {_error_summary(bytes(self.stderr))}"


def _wav_stream_format(pipe: DecoderPipe) -> tuple[int, int]:
    """(channels, sample rate) from the WAV header ffmpeg writes, leaving `pipe` at the samples."""
    riff = pipe.read_exact(12)
    if riff[:4] != b"RIFF" or riff[8:12] != b"WAVE":
        raise RuntimeError("ffmpeg did not write a WAV stream")
    fmt = None
    while True:
        chunk_id, size = struct.unpack("<4sI", pipe.read_exact(8))
        if chunk_id == b"data":  # its size is a placeholder on a pipe: the samples run to the end
            break
        if size > _WAV_CHUNK_LIMIT:
            raise RuntimeError(f"ffmpeg wrote a {size}-byte {chunk_id!r} WAV chunk")
        body = pipe.read_exact(size + (size & 1))
        if chunk_id == b"fmt ":
            fmt = body
    if fmt is None or len(fmt) < 16 or struct.unpack_from("<H", fmt, 14)[0] != 32:
        raise RuntimeError("ffmpeg's WAV stream is not 32-bit float")
    _, channels, rate = struct.unpack_from("<HHI", fmt)
    return channels, rate


class _ModelAudioWriter:
    """Turns float32 blocks of the source (any channels, any rate) into the mono 16 kHz WAV the
    model reads, with librosa.load's own steps so the samples are the ones it would return:
    `librosa.to_mono` on each block (a mean over channels, sample by sample), then soxr at
    "soxr_hq" as a stream (soxr's output does not depend on how its input is cut; checked against
    librosa.load in tests/test_media.py), then librosa's length fix (ceil of frames * ratio)."""

    def __init__(self, path: Path, field: str, channels: int, rate: int) -> None:
        self.field, self.channels, self.rate = field, channels, rate
        self.frames_in = 0
        self._resampler = (None if rate == AUDIO_MODEL_RATE else
                           soxr.ResampleStream(rate, AUDIO_MODEL_RATE, 1, dtype="float32",
                                               quality="soxr_hq"))
        self._out = soundfile.SoundFile(str(path), "w", samplerate=AUDIO_MODEL_RATE, channels=1,
                                        subtype="FLOAT")

    def write(self, raw: bytes | bytearray, last: bool) -> None:
        block = np.frombuffer(raw, dtype="<f4").reshape(-1, self.channels)
        if not np.isfinite(block).all():
            raise MediaError(f"'{self.field}' has samples that are not finite numbers (NaN or "
                             "infinity)")
        self.frames_in += len(block)
        mono = block[:, 0] if self.channels == 1 else librosa.to_mono(block.T)
        if self._resampler is not None:
            mono = self._resampler.resample_chunk(mono, last=last)
        self._out.write(mono)

    def finish(self) -> None:
        if self._resampler is not None:  # librosa.resample's fix_length, to the same count
            expected = int(np.ceil(self.frames_in * (float(AUDIO_MODEL_RATE) / self.rate)))
            written = self._out.frames
            if written > expected:
                self._out.truncate(expected)
            elif written < expected:
                self._out.write(np.zeros(expected - written, dtype=np.float32))
        self._out.close()

    def close(self) -> None:
        self._out.close()


def load_audio(source: MediaSource, work_dir: Path, settings: Settings) -> AudioInput:
    """The audio as received (for the MP4) and as the model reads it, decoded in bounded memory.

    ffmpeg decodes the file to float32 WAV on a pipe, at the source's own rate and channels, and
    the samples are downmixed and resampled here block by block (`_ModelAudioWriter`), so nothing
    larger than one block is ever held and the only file written is the model's own input (64 kB
    per second of audio). Before that, the stream's channels and rate are checked against
    MAX_AUDIO_CHANNELS and MAX_AUDIO_SAMPLE_RATE, and decoding stops a second past
    MAX_AUDIO_SECONDS.
    """
    field = source.field
    original = fetch(source, work_dir / "audio.input", settings.max_audio_bytes, settings)
    model_path = work_dir / "audio.wav"
    model_path.unlink(missing_ok=True)
    # Decode at most a second past the limit: enough to tell that the audio is too long.
    cap_s = settings.max_audio_seconds + 1.0
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error",
               "-protocol_whitelist", "file", "-format_whitelist", ",".join(AUDIO_DEMUXERS),
               "-i", str(original), "-t", f"{cap_s:g}",
               "-map", "0:a:0", "-vn", "-c:a", "pcm_f32le", "-f", "wav", "pipe:1"]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    pipe = DecoderPipe(process, field)
    writer = None
    try:
        try:
            channels, rate = _wav_stream_format(pipe)
        except DecoderOutputEnded:
            logger.info("%s: audio decode failed (%s)", field, pipe.close_for_log())
            raise _unreadable(field, "audio file", original, "audio") from None
        _check_audio_format(field, channels, rate, settings)
        writer = _ModelAudioWriter(model_path, field, channels, rate)
        block_bytes = _AUDIO_BLOCK_FRAMES * channels * 4
        pending = bytearray()
        while piece := pipe.read():
            pending += piece
            while len(pending) >= block_bytes:
                writer.write(pending[:block_bytes], last=False)
                del pending[:block_bytes]
        writer.write(pending[:len(pending) - len(pending) % (channels * 4)], last=True)
        if pipe.close() != 0:
            logger.info("%s: audio decode failed (%s)", field, pipe.close_for_log())
            raise _unreadable(field, "audio file", original, "audio")
        writer.finish()
    finally:
        pipe.close()
        if writer is not None:
            writer.close()
    duration = writer.frames_in / rate
    if duration < settings.min_audio_seconds:
        raise MediaError(f"'{field}' is {duration:.2f} s long; the minimum is "
                         f"{settings.min_audio_seconds} s (MIN_AUDIO_SECONDS)")
    if duration > settings.max_audio_seconds:
        length = f"{duration:.1f} s" if duration < cap_s - 0.01 else f"more than {cap_s:g} s"
        raise MediaError(f"'{field}' is {length} long; the maximum is "
                         f"{settings.max_audio_seconds} s (MAX_AUDIO_SECONDS)")
    logger.info("%s: %.2f s of audio, %d channel(s) at %d Hz, decoded for the model", field,
                duration, channels, rate)
    return AudioInput(original_path=original, model_path=model_path, duration_s=duration,
                      sample_rate=rate, channels=channels)


def _check_audio_format(field: str, channels: int, rate: int, settings: Settings) -> None:
    if channels < 1:
        raise MediaError(f"'{field}' is not a readable audio file (no channels)")
    if channels > settings.max_audio_channels:
        raise MediaError(f"'{field}' has {channels} channels; the limit is "
                         f"{settings.max_audio_channels} (MAX_AUDIO_CHANNELS)")
    if rate > settings.max_audio_sample_rate:
        raise MediaError(f"'{field}' is sampled at {rate} Hz; the limit is "
                         f"{settings.max_audio_sample_rate} Hz (MAX_AUDIO_SAMPLE_RATE)")
    if rate < MIN_AUDIO_SAMPLE_RATE:
        raise MediaError(f"'{field}' is sampled at {rate} Hz; speech needs at least "
                         f"{MIN_AUDIO_SAMPLE_RATE} Hz")


def _is_video_container(head: bytes) -> bool:
    """MP4/MOV (ISO boxes), Matroska/WebM (EBML) or AVI, told by their first bytes.

    Why not leave it to decord: libavformat picks a demuxer by content, and decord's bundled copy
    reads an HLS playlist ("#EXTM3U ...") or an ffconcat script as a video whatever the file is
    called, then opens the files and URLs listed inside it, which would bypass every address check.
    Such formats cannot start with these signatures.
    """
    return (head[4:8] in (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip")
            or head.startswith(b"\x1aE\xdf\xa3")
            or (head[:4] == b"RIFF" and head[8:12] == b"AVI "))


# Runs in a child process: a hostile file can make decord loop or crash, which must not hang or kill
# the worker. Decoding the first frame proves the stream decodes and gives its size.
_POSE_PROBE = """
import json, sys
from decord import VideoReader
reader = VideoReader(sys.argv[1])
frames = len(reader)
height, width = reader[0].shape[:2]
print(json.dumps({"frames": frames, "width": int(width), "height": int(height)}))
"""


def load_pose_video(source: MediaSource, work_dir: Path, settings: Settings) -> Path:
    path = fetch(source, work_dir / "pose.mp4", settings.max_pose_video_bytes, settings)
    with open(path, "rb") as f:
        head = f.read(16)
    if not _is_video_container(head):
        kind = _sniff(head)
        raise MediaError(f"'{source.field}' is not an MP4, MOV, MKV, WebM or AVI video"
                         f"{f': it looks like {kind}' if kind else ''}")
    result = _run_decoder(source.field, [sys.executable, "-I", "-c", _POSE_PROBE, str(path)],
                          "open as a video")
    try:
        if result.returncode != 0:
            raise ValueError(f"exit status {result.returncode}")
        probe = json.loads(result.stdout.decode("utf-8", "replace").strip().splitlines()[-1])
        frames, width, height = int(probe["frames"]), int(probe["width"]), int(probe["height"])
    except (IndexError, KeyError, TypeError, ValueError) as exc:
        logger.info("%s: pose video probe failed (%s): %s", source.field, exc,
                    _error_summary(result.stderr))
        raise MediaError(f"'{source.field}' is not a readable video") from None
    if frames < 1:
        raise MediaError(f"'{source.field}' has no frames")
    if frames > settings.max_pose_video_frames:
        raise MediaError(f"'{source.field}' has {frames} frames; the limit is "
                         f"{settings.max_pose_video_frames} (MAX_POSE_VIDEO_FRAMES)")
    if max(width, height) > settings.max_pose_video_side:
        raise MediaError(f"'{source.field}' is {width}x{height}; the longest side may be "
                         f"{settings.max_pose_video_side} pixels (MAX_POSE_VIDEO_SIDE)")
    return path
