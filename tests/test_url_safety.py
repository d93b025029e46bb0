"""URL intake cannot reach inside the network: address policy, redirects, deadlines and size caps.

Everything here talks to loopback servers only. Host names ending in `.test` are answered by a fake
resolver (socket.getaddrinfo patched), which is how a name can "resolve" to 10.0.0.5 or
169.254.169.254 without any such host existing; a guard on socket.connect fails the test if any
connection to a non-loopback address is ever attempted.
"""
from __future__ import annotations

import datetime
import http.server
import ipaddress
import socket
import ssl
import threading
import time
from urllib.parse import parse_qs, urlsplit

import pytest

from conftest import LoopbackHTTPServer, with_settings
from s2v_worker import media, net
from s2v_worker.job import MediaSource
from s2v_worker.media import MediaError
from s2v_worker.net import address_is_allowed
from s2v_worker.settings import Settings, SettingsError

load_image, load_audio = with_settings(media.load_image), with_settings(media.load_audio)


def allowed_networks(text: str):
    """ALLOWED_PRIVATE_NETWORKS as the worker reads it."""
    return Settings.from_env({"ALLOWED_PRIVATE_NETWORKS": text}).network.allowed_private_networks

NOWHERE = Settings.from_env({})  # the default: no private network allowed
LOCAL = NOWHERE.replace(allowed_private_networks="127.0.0.0/8")
PRIVATE = r"private or local address \(not allowed\)"  # a regex


# --- guards and fakes -----------------------------------------------------------------------------

def _is_loopback(host: str) -> bool:
    ip = ipaddress.ip_address(host.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_loopback


@pytest.fixture(autouse=True)
def connections(monkeypatch):
    """Every TCP connect attempted during the test, as (host, port); non-loopback ones are refused
    (and fail the test) so that nothing here can ever leave the machine."""
    attempts: list[tuple[str, int]] = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def guarded(real):
        def connect(sock, address):
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                attempts.append((address[0], address[1]))
                if not _is_loopback(address[0]):
                    raise ConnectionRefusedError(f"test guard: no connections to {address[0]}")
            return real(sock, address)
        return connect

    monkeypatch.setattr(socket.socket, "connect", guarded(real_connect))
    monkeypatch.setattr(socket.socket, "connect_ex", guarded(real_connect_ex))
    yield attempts
    outside = [a for a in attempts if not _is_loopback(a[0])]
    assert not outside, f"connections were attempted outside loopback: {outside}"


class FakeDNS:
    """Answers `*.test` names (and localhost) from a table; a name given several answers gets the
    next one at each lookup. Anything else goes to the real resolver as a numeric host only
    (AI_NUMERICHOST), so no test can send a DNS query."""

    def __init__(self, real):
        self.real = real
        self.table: dict[str, list[list[str]]] = {}
        self.lookups: list[str] = []
        self.answered: list[str] = []  # lookups that returned (or failed), in order
        self.delay_s: dict[str, float] = {}  # a slow name server, per name
        self.released = threading.Event()  # ends every delay (the fixture's teardown)

    def set(self, name: str, *answers: list[str]) -> None:
        self.table[name] = list(answers)

    def __call__(self, host, port, family=0, type=0, proto=0, flags=0):
        if not str(host).endswith(".test") and host != "localhost":
            return self.real(host, port, family, type, proto, flags | socket.AI_NUMERICHOST)
        self.lookups.append(host)
        self.released.wait(self.delay_s.get(host, 0.0))
        self.answered.append(host)
        answers = self.table.get(host)
        if not answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        addresses = answers.pop(0) if len(answers) > 1 else answers[0]
        infos = []
        for address in addresses:
            if ":" in address:
                infos.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port, 0, 0)))
            else:
                infos.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)))
        return infos


@pytest.fixture(autouse=True)
def dns(monkeypatch):
    fake = FakeDNS(socket.getaddrinfo)
    fake.set("localhost", ["127.0.0.1", "::1"])
    monkeypatch.setattr(socket, "getaddrinfo", fake)
    yield fake
    fake.released.set()  # a look-up the download gave up on ends now, not after its delay


# --- the loopback server --------------------------------------------------------------------------

PAYLOAD = bytes(range(256)) * 40  # 10240 bytes


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    requests: list[tuple[str, str]] = []  # (path, Host header) of each request handled

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        Handler.requests.append((self.path, self.headers.get("Host", "")))
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        route = getattr(self, "route_" + url.path.strip("/").split("/")[0], None)
        if route is None:
            self.send_error(404)
            return
        try:
            route(url.path, query)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the worker hung up, as it should on an oversized or slow download

    def _send(self, body: bytes, content_length: bool = True, status: int = 200):
        self.send_response(status)
        if content_length:
            self.send_header("Content-Length", str(len(body)))
        else:
            self.send_header("Connection", "close")  # body ends when the connection closes
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def route_file(self, path, query):
        self._send(media_file(query.get("name", "payload")))

    def route_redirect(self, path, query):
        self.send_response(int(query.get("status", "302")))
        self.send_header("Location", query["to"])
        self.send_header("Content-Length", "0")
        self.end_headers()

    def route_nolocation(self, path, query):
        self.send_response(302)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def route_chain(self, path, query):  # /chain/3 -> /chain/2 -> /chain/1 -> /chain/0 = the file
        left = int(path.strip("/").split("/")[1])
        if left == 0:
            self._send(PAYLOAD)
            return
        self.route_redirect(path, {"to": f"/chain/{left - 1}"})

    def route_relative(self, path, query):  # /relative/deeper -> ../file?name=payload
        self.route_redirect(path, {"to": "../file?name=payload", "status": "301"})

    def route_big(self, path, query):
        size = int(query["size"])
        if query.get("chunked"):
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(size // 4096):
                self.wfile.write(b"1000\r\n" + b"x" * 4096 + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        else:
            self._send(b"x" * size, content_length=query.get("length") == "1")

    def route_raw(self, path, query):
        """A hand-written answer: a malformed Location, too many headers, an endless header line."""
        kind = query["kind"]
        head = {"badlocation": b"HTTP/1.1 302 Found\r\nLocation: http://[::1\r\n",
                "manyheaders": b"HTTP/1.1 200 OK\r\n" + b"X-Pad: 1\r\n" * 150,
                "longheader": b"HTTP/1.1 200 OK\r\nX-Pad: " + b"x" * 70_000 + b"\r\n",
                "notHTTP": b"SSH-2.0-OpenSSH_9.6\r\n"}[kind]
        self.wfile.write(head + b"Content-Length: 0\r\n\r\n")
        self.close_connection = True

    def route_empty(self, path, query):
        self._send(b"")

    def route_drip(self, path, query):
        """A byte every `every` s: each read is quick, the whole download never ends in time."""
        every = float(query.get("every", "0.05"))
        where = query.get("where")
        if where in ("headers", "status", "lines", "continue"):
            dripped = {"headers": b"HTTP/1.1 200 OK\r\n" + b"X" * 10_000,  # one endless header
                       "status": b"HTTP/1.1 200 " + b"O" * 10_000,
                       "lines": b"HTTP/1.1 200 OK\r\n" + b"X-Pad: 1\r\n" * 90 + b"X" * 10_000,
                       "continue": b"HTTP/1.1 100 Continue\r\n\r\n" * 1000}[where]
            for byte in dripped:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(every)
            return
        self.send_response(200)
        if query.get("length") == "1":
            self.send_header("Content-Length", str(len(PAYLOAD)))
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        for byte in PAYLOAD:
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            time.sleep(every)


MEDIA: dict[str, bytes] = {}


def media_file(name: str) -> bytes:
    return MEDIA[name] if name in MEDIA else PAYLOAD


@pytest.fixture(scope="module")
def server():
    """The port of a loopback server with Handler's routes."""
    with LoopbackHTTPServer(Handler) as httpd:
        yield httpd.port


@pytest.fixture(autouse=True)
def fresh_requests():
    Handler.requests.clear()
    yield


@pytest.fixture
def fetch_url(tmp_path):
    def fetch(url: str, settings: Settings = LOCAL, field: str = "image_url",
              max_bytes: int = 1 << 20) -> bytes:
        dest = tmp_path / "download"
        net.download(field, url, dest, max_bytes, settings.network)
        return dest.read_bytes()
    return fetch


# --- address classification (pure: no DNS, no connection) -----------------------------------------

REFUSED = [
    "127.0.0.1", "127.255.255.254", "10.0.0.5", "172.16.0.1", "172.31.255.255", "192.168.1.1",
    "169.254.169.254",  # cloud metadata
    "169.254.0.1", "100.64.0.1", "100.100.100.200",  # link-local, carrier-grade NAT (Alibaba metadata)
    "0.0.0.0", "0.1.2.3", "224.0.0.1", "239.255.255.250", "240.0.0.1", "255.255.255.255",
    "192.0.0.170", "192.0.2.1", "198.18.0.1", "198.51.100.7", "203.0.113.9",
    "::1", "::", "::ffff:127.0.0.1", "::ffff:10.0.0.5", "::ffff:169.254.169.254", "::ffff:0.0.0.0",
    "::ffff:224.0.0.1", "fe80::1", "fe80::1%1", "fc00::1", "fd00:ec2::254",  # AWS IPv6 metadata
    "fec0::1", "ff02::1", "ff0e::1", "2001:db8::1", "100::1", "::a00:5", "::7f00:1",
    "64:ff9b::a00:5", "64:ff9b::7f00:1", "2002:a00:5::1", "2002:7f00:1::1", "2002:a9fe:a9fe::",
    "2001:0:4136:e378:8000:63bf:f5ff:fffa",  # Teredo: client 10.0.0.5
]
ALLOWED = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "151.101.1.69", "2606:4700::1111",
           "2001:4860:4860::8888", "2a00:1450:4001:80b::200e", "::ffff:8.8.8.8",
           "2002:808:808::1"]


@pytest.mark.parametrize("address", REFUSED)
def test_private_local_and_special_addresses_are_refused(address):
    assert not address_is_allowed(address)
    assert not address_is_allowed(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses_are_allowed(address, connections):
    assert address_is_allowed(address)
    assert connections == []  # classified, never contacted


@pytest.mark.parametrize("address, networks, allowed", [
    ("127.0.0.1", "127.0.0.0/8", True),
    ("::ffff:127.0.0.1", "127.0.0.0/8", True),  # the same socket as 127.0.0.1
    ("::1", "127.0.0.0/8", False),
    ("::1", "127.0.0.0/8, ::1/128", True),
    ("10.0.0.5", "10.0.0.0/24", True),
    ("10.0.1.5", "10.0.0.0/24", False),
    ("169.254.169.254", "10.0.0.0/8,192.168.0.0/16", False),
    ("fd00::5", "fd00::/8", True),
    ("8.8.8.8", "10.0.0.0/8", True),  # the allow list adds to the public internet, not replaces it
])
def test_allowed_private_networks(address, networks, allowed):
    assert address_is_allowed(address, allowed_networks(networks)) is allowed


def test_parse_allowed_networks():
    assert allowed_networks("") == ()
    assert allowed_networks(" , ") == ()
    assert [str(n) for n in allowed_networks("127.0.0.0/8, ::1, 10.1.2.3/8")] == [
        "127.0.0.0/8", "::1/128", "10.0.0.0/8"]
    with pytest.raises(SettingsError, match="ALLOWED_PRIVATE_NETWORKS: 'localhost' is not a CIDR"):
        allowed_networks("127.0.0.0/8,localhost")


def test_non_addresses_are_errors_not_allowed():
    with pytest.raises(ValueError):
        address_is_allowed("localhost")


# --- the address policy applied to downloads -----------------------------------------------------

def test_loopback_is_refused_without_connecting_unless_allowed(server, fetch_url, connections):
    url = f"http://127.0.0.1:{server}/file"
    with pytest.raises(MediaError, match=f"^'image_url' points to a {PRIVATE}$"):
        fetch_url(url, NOWHERE)
    assert connections == [] and Handler.requests == []
    assert fetch_url(url, LOCAL) == PAYLOAD
    assert connections == [("127.0.0.1", server)]


@pytest.mark.parametrize("url", ["http://[::1]:{port}/file", "http://[::ffff:127.0.0.1]:{port}/file",
                                 "http://0.0.0.0:{port}/file", "http://localhost:{port}/file",
                                 "http://2130706433:{port}/file", "http://0x7f.1:{port}/file",
                                 "http://017700000001:{port}/file"])
def test_local_spellings_are_refused(url, server, fetch_url, connections):
    """Bracketed, mapped, decimal, hex and octal spellings all resolve to loopback, and are refused."""
    with pytest.raises(MediaError, match=f"^'image_url' points to a {PRIVATE}$"):
        fetch_url(url.format(port=server), NOWHERE)
    assert connections == []


@pytest.mark.parametrize("address", ["10.0.0.5", "169.254.169.254", "::1", "0.0.0.0", "224.0.0.1",
                                     "::ffff:10.0.0.5", "fd00:ec2::254", "100.64.0.1"])
def test_names_resolving_inside_the_network_are_refused_before_connecting(address, dns, fetch_url,
                                                                          connections, server):
    dns.set("inside.test", [address])
    with pytest.raises(MediaError, match=f"'image_url' points to a {PRIVATE}"):
        fetch_url(f"http://inside.test:{server}/file", LOCAL)
    assert connections == []


def test_one_private_answer_among_public_ones_refuses_the_host(dns, fetch_url, connections):
    dns.set("mixed.test", ["8.8.8.8", "2606:4700::1111", "10.0.0.5"])
    with pytest.raises(MediaError, match=f"'image_url' points to a {PRIVATE}"):
        fetch_url("http://mixed.test/file", NOWHERE)
    assert connections == []  # refused on the check: not even the public addresses were tried


def test_connection_goes_to_the_checked_address_with_the_host_name_kept(dns, fetch_url, server,
                                                                       connections):
    dns.set("media.test", ["127.0.0.1"])
    assert fetch_url(f"http://media.test:{server}/file", LOCAL) == PAYLOAD
    assert connections == [("127.0.0.1", server)]
    assert Handler.requests == [("/file", f"media.test:{server}")]  # Host header is the name


def test_dns_rebinding_cannot_swap_the_address_after_the_check(dns, fetch_url, server, connections):
    # First answer checked and used; a second lookup would get the private one, but none is made.
    dns.set("rebind.test", ["127.0.0.1"], ["10.0.0.5"], ["10.0.0.5"])
    assert fetch_url(f"http://rebind.test:{server}/file", LOCAL) == PAYLOAD
    assert dns.lookups == ["rebind.test"] and connections == [("127.0.0.1", server)]
    # And the other way round: refused on the first answer, even though a later one is fine.
    dns.set("rebind2.test", ["10.0.0.5"], ["127.0.0.1"], ["127.0.0.1"])
    with pytest.raises(MediaError, match=PRIVATE):
        fetch_url(f"http://rebind2.test:{server}/file", LOCAL)
    assert dns.lookups == ["rebind.test", "rebind2.test"]


def test_unresolvable_and_invalid_urls(dns, fetch_url, connections):
    with pytest.raises(MediaError, match="'image_url' points to a host name that could not be resolved"):
        fetch_url("http://nowhere.test/file", LOCAL)
    with pytest.raises(MediaError, match="'image_url' points to an invalid URL"):
        fetch_url("http://exa mple.test/file", LOCAL)
    with pytest.raises(MediaError, match="'image_url' points to a URL that is not http or https"):
        fetch_url("ftp://127.0.0.1/file", LOCAL)
    assert connections == []


# --- redirects ------------------------------------------------------------------------------------

@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_to_another_loopback_path_is_followed(status, server, fetch_url):
    url = f"http://127.0.0.1:{server}/redirect?status={status}&to=/file"
    assert fetch_url(url) == PAYLOAD
    assert [path for path, _ in Handler.requests] == [f"/redirect?status={status}&to=/file", "/file"]


def test_relative_and_absolute_locations(server, fetch_url):
    assert fetch_url(f"http://127.0.0.1:{server}/relative/deeper") == PAYLOAD
    absolute = f"http://127.0.0.1:{server}/file"
    assert fetch_url(f"http://127.0.0.1:{server}/redirect?to={absolute}") == PAYLOAD


def test_redirect_limit(server, fetch_url, tmp_path):
    settings = LOCAL.replace(max_redirects=3)
    assert fetch_url(f"http://127.0.0.1:{server}/chain/3", settings) == PAYLOAD
    with pytest.raises(MediaError, match=r"^'image_url' redirected too many times \(more than 3, "
                                         r"MAX_REDIRECTS\)$"):
        fetch_url(f"http://127.0.0.1:{server}/chain/4", settings)
    assert len(Handler.requests) == 4 + 4  # the failing chain stopped after its 4th request
    with pytest.raises(MediaError, match="'image_url' redirected too many times"):
        fetch_url(f"http://127.0.0.1:{server}/chain/1", LOCAL.replace(max_redirects=0))
    # the field is named whichever input it is
    with pytest.raises(MediaError, match="^'audio_url' redirected too many times"):
        load_audio(MediaSource("audio_url", url=f"http://127.0.0.1:{server}/chain/9"), tmp_path,
                   settings)


@pytest.mark.parametrize("location", ["file:///etc/passwd", "ftp://127.0.0.1/x", "gopher://127.0.0.1/",
                                      "data:text/plain;base64,AAAA", "javascript:alert(1)"])
def test_redirect_to_other_schemes_is_refused(location, server, fetch_url):
    with pytest.raises(MediaError, match="^'image_url' redirected to a URL that is not http or https "
                                         r"\(not allowed\)$"):
        fetch_url(f"http://127.0.0.1:{server}/redirect?to={location}")


@pytest.mark.parametrize("address", ["10.0.0.5", "169.254.169.254", "::1", "0.0.0.0", "224.0.0.1",
                                     "::ffff:169.254.169.254"])
def test_redirect_into_the_network_is_refused_before_connecting(address, dns, server, fetch_url,
                                                                connections):
    dns.set("evil.test", [address])
    url = f"http://127.0.0.1:{server}/redirect?to=http://evil.test:{server}/file"
    with pytest.raises(MediaError, match=f"^'image_url' redirected to a {PRIVATE}$"):
        fetch_url(url)
    assert connections == [("127.0.0.1", server)]  # the first hop only


def test_redirect_to_a_loopback_literal_needs_the_allow_list_too(server, dns, fetch_url, connections):
    dns.set("public.test", ["127.0.0.1"])  # stands in for a public host that redirects inwards
    allowed_public = NOWHERE.replace(allowed_private_networks="127.0.0.1/32")
    url = f"http://public.test:{server}/redirect?to=http://127.0.0.2:{server}/file"
    with pytest.raises(MediaError, match=f"'image_url' redirected to a {PRIVATE}"):
        fetch_url(url, allowed_public)
    assert connections == [("127.0.0.1", server)]


def test_redirect_without_location(server, fetch_url):
    with pytest.raises(MediaError, match="^'image_url' redirected without a Location$"):
        fetch_url(f"http://127.0.0.1:{server}/nolocation")


# --- time limits ----------------------------------------------------------------------------------
# CI machines are loaded and slow: these check that each limit ends the download (by the message,
# which names the limit that did), and that it did not wait for what it should not have, never that
# it ended within a tight wall-clock bound. A missed limit is missed by far more than SLACK_S: the
# drips run for minutes and the slow name server answers after SLOW_DNS_S.

QUICK = LOCAL.replace(download_timeout_s=0.5)  # overall deadline: 3 x 0.5 = 1.5 s
QUICK_DEADLINE = r"'image_url' took longer than 1.5 s to download \(3 x DOWNLOAD_TIMEOUT_S\)"
SLACK_S = 30.0
SLOW_DNS_S = 120.0  # released at the end of the test


@pytest.mark.parametrize("query", ["length=1", "length=0", "where=headers", "where=status",
                                   "where=lines", "where=continue"])
def test_a_slow_drip_is_ended_by_the_overall_deadline(query, server, fetch_url):
    """Each byte comes well inside the read timeout (every 0.05 s, against 0.5 s), so only the
    overall deadline can end these: the body, one endless header, the status line, header lines,
    endless 100 Continue answers. Dripped to the end, each would take 500 s or more."""
    start = time.monotonic()
    with pytest.raises(MediaError, match=f"^{QUICK_DEADLINE}$"):
        fetch_url(f"http://127.0.0.1:{server}/drip?every=0.05&{query}", QUICK)
    assert time.monotonic() - start < 1.5 + SLACK_S


def test_a_slow_name_server_is_ended_by_the_overall_deadline(server, dns, fetch_url, connections):
    dns.set("slow-dns.test", ["127.0.0.1"])
    dns.delay_s["slow-dns.test"] = SLOW_DNS_S  # far past the 1.5 s deadline
    start = time.monotonic()
    with pytest.raises(MediaError, match=f"^{QUICK_DEADLINE}$"):
        fetch_url(f"http://slow-dns.test:{server}/file", QUICK)
    assert dns.answered == []  # given up while the look-up was still waiting for its answer
    assert time.monotonic() - start < 1.5 + SLACK_S and connections == []


def test_a_slow_name_server_on_a_redirect_counts_against_the_same_deadline(server, dns, fetch_url):
    dns.set("slow-dns.test", ["127.0.0.1"])
    dns.delay_s["slow-dns.test"] = SLOW_DNS_S
    start = time.monotonic()
    with pytest.raises(MediaError, match=f"^{QUICK_DEADLINE}$"):
        fetch_url(f"http://127.0.0.1:{server}/redirect?to=http://slow-dns.test:{server}/file", QUICK)
    assert dns.lookups == ["slow-dns.test"] and dns.answered == []
    assert time.monotonic() - start < 1.5 + SLACK_S


@pytest.mark.parametrize("kind, message", [
    ("badlocation", "'image_url' redirected to an invalid URL"),
    ("manyheaders", "'image_url' could not be downloaded: the server sent more than 100 response headers"),
    ("longheader", "'image_url' could not be downloaded: the server sent a response line or header "
                   "longer than 64 kB"),
    ("notHTTP", "'image_url' could not be downloaded: the server's answer is not HTTP"),
])
def test_malformed_answers_get_messages_that_say_what_was_wrong(kind, message, server, fetch_url):
    with pytest.raises(MediaError) as caught:
        fetch_url(f"http://127.0.0.1:{server}/raw?kind={kind}")
    assert str(caught.value) == message


def test_a_silent_server_hits_the_read_timeout(fetch_url):
    """The message is the read timeout's, not the overall deadline's: the read timeout ended it.
    At 1 s against a 3 s deadline, so that a loaded machine's slow hand-back cannot turn it into
    the deadline's."""
    # A listening socket that never accepts: the kernel completes the handshake, nothing is sent.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        start = time.monotonic()
        with pytest.raises(MediaError, match="^'image_url' could not be downloaded: timed out "
                                             "waiting for data$"):
            fetch_url(f"http://127.0.0.1:{listener.getsockname()[1]}/x",
                      LOCAL.replace(download_timeout_s=1.0))
        assert time.monotonic() - start < 1.0 + SLACK_S


# --- size caps ------------------------------------------------------------------------------------

@pytest.mark.parametrize("query", ["length=1", "length=0", "chunked=1"])
def test_more_bytes_than_the_cap_are_refused(query, server, fetch_url):
    with pytest.raises(MediaError, match="^'image_url' is larger than the 5000 byte limit$"):
        fetch_url(f"http://127.0.0.1:{server}/big?size=200000&{query}", max_bytes=5000)
    assert fetch_url(f"http://127.0.0.1:{server}/big?size=4096&{query}", max_bytes=5000) == b"x" * 4096


def test_http_errors_and_empty_bodies(server, fetch_url):
    with pytest.raises(MediaError, match="^'image_url' could not be downloaded: HTTP 404$"):
        fetch_url(f"http://127.0.0.1:{server}/missing")
    with pytest.raises(MediaError, match="^'image_url' is empty$"):
        fetch_url(f"http://127.0.0.1:{server}/empty")


def test_load_image_over_a_redirect(server, portrait_png, tmp_path):
    MEDIA["face.png"] = portrait_png.read_bytes()
    url = f"http://127.0.0.1:{server}/redirect?to=/file%3Fname%3Dface.png"
    image = load_image(MediaSource("image_url", url=url), tmp_path, LOCAL)
    assert (image.width, image.height) == (192, 256)


# --- TLS: the address is pinned, the certificate is still checked against the host name ----------

@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """An HTTPS server on loopback with a certificate for media.test from a throwaway CA."""
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = tmp_path_factory.mktemp("tls")
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(1)
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "media.test")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(2)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("media.test")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    (folder / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))

    server_names: list[str | None] = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    context.sni_callback = lambda sock, name, ctx: server_names.append(name)
    with LoopbackHTTPServer(Handler, tls=context) as httpd:
        yield httpd.port, folder / "ca.pem", server_names


def test_https_keeps_sni_and_certificate_check_on_the_host_name(tls_server, dns, fetch_url,
                                                                 monkeypatch, connections):
    port, ca, server_names = tls_server
    monkeypatch.setattr(net, "_ca_bundle", lambda: str(ca))
    dns.set("media.test", ["127.0.0.1"])
    dns.set("other.test", ["127.0.0.1"])
    assert fetch_url(f"https://media.test:{port}/file") == PAYLOAD
    assert server_names[-1] == "media.test"
    assert Handler.requests[-1] == ("/file", f"media.test:{port}")
    # same address, another name: the certificate does not match it
    with pytest.raises(MediaError, match="^'image_url' could not be downloaded: TLS handshake or "
                                         "certificate check failed$"):
        fetch_url(f"https://other.test:{port}/file")
    # an address literal gets no certificate check bypass either
    with pytest.raises(MediaError, match="TLS handshake or certificate check failed"):
        fetch_url(f"https://127.0.0.1:{port}/file")
    assert all(host == "127.0.0.1" for host, _ in connections)


def test_https_to_a_plain_http_server_fails_cleanly(server, fetch_url):
    with pytest.raises(MediaError, match="^'image_url' could not be downloaded: "):
        fetch_url(f"https://127.0.0.1:{server}/file")
