"""Storage faults against real HTTP servers on loopback: no finished video is ever lost.

Each fault (endpoint down, 5xx answers, a server that never answers, wrong keys, a missing bucket)
is tried with a small video (falls back on base64), a large one with a network volume (falls back on
the volume) and a large one with nowhere to go (kept in the undelivered folder, named in the error).
"""
from __future__ import annotations

import base64
import errno
import json
import logging
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import parse_qs, urlsplit

import pytest

from conftest import S3_ACCESS_KEY as ACCESS_KEY, S3_SECRET_KEY as SECRET_KEY, deliver
from conftest import LoopbackHTTPServer, closed_port_url
from s2v_worker import bucket, storage
from s2v_worker.job import parse_job
from s2v_worker.settings import Settings
from s2v_worker.storage import StorageError

BUCKET = "fault-videos"
# Each attempt's connect and read timeout: what a server that answers (a fake here, moto for the
# missing bucket) must beat on a loaded machine, and what the silent server makes every attempt
# wait for.
TIMEOUT_S = 1.0
ATTEMPTS = 3
CAP = 4096  # max_inline_video_bytes in these tests
SMALL = bytes(range(256)) * 8  # 2 KiB: under the cap
LARGE = bytes(range(256)) * 256  # 64 KiB: over the cap
# CI machines are loaded and slow: botocore's own work (clients, signing, retries) can take
# seconds there, so a failing delivery is only held to the documented bound plus this slack.
SLACK_S = 30.0
# Far past the documented bound plus SLACK_S (22 + 30 s here): a client that did not honour its
# read timeout would wait this long for the first attempt alone. Released when the server closes.
SLOW_SERVER_HOLD_S = 60.0


# --- a misbehaving S3 endpoint -------------------------------------------------------------------

class FakeS3:
    """A real HTTP server on loopback that answers every request as `behaviour` says."""

    def __init__(self, behaviour: Callable[["_Handler", int], None]) -> None:
        self.behaviour = behaviour
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.closing = threading.Event()
        self.server = LoopbackHTTPServer(_Handler)
        self.server.fake = self  # type: ignore[attr-defined]
        self.server.handle_error = lambda request, address: None  # clients that gave up
        self.url = self.server.url

    def count(self, method: str) -> int:
        with self.lock:
            return sum(1 for m, _ in self.requests if m == method)

    def close(self) -> None:
        self.closing.set()  # releases the handlers that never answer
        self.server.close()


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 answers botocore's "Expect: 100-continue" at once, as S3 does (HTTP/1.0 would make
    # botocore wait 1 s before every body).
    protocol_version = "HTTP/1.1"

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        fake: FakeS3 = self.server.fake  # type: ignore[attr-defined]
        with fake.lock:
            fake.requests.append((self.command, self.path))
            number = len(fake.requests)
        fake.behaviour(self, number)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _serve

    def answer(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def s3_error(self, status: int, code: str, message: str, extra: str = "") -> None:
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                f"<Message>{message}</Message>{extra}<RequestId>4442587FB7D0A2F9</RequestId>"
                "</Error>").encode()
        self.answer(status, body, {"Content-Type": "application/xml"})

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - quiet test output
        pass


def error_500(handler: _Handler, number: int) -> None:
    handler.s3_error(500, "InternalError", "We encountered an internal error. Please try again.")


def error_503(handler: _Handler, number: int) -> None:
    handler.s3_error(503, "ServiceUnavailable", "Please reduce your request rate.")


def never_answers(handler: _Handler, number: int) -> None:
    handler.server.fake.closing.wait(SLOW_SERVER_HOLD_S)  # type: ignore[attr-defined]
    handler.close_connection = True


def wrong_keys(handler: _Handler, number: int) -> None:
    # S3's answer to an unknown key id (moto does not check signatures). Some S3-compatible
    # services echo the key id in the message too, which must not reach the client.
    handler.s3_error(403, "InvalidAccessKeyId",
                     f"The AWS Access Key Id {ACCESS_KEY} you provided does not exist in our "
                     "records.", extra=f"<AWSAccessKeyId>{ACCESS_KEY}</AWSAccessKeyId>")


# --- the faults ----------------------------------------------------------------------------------

@dataclass
class Fault:
    endpoint: str
    code: str  # what the warning and the error must name
    server: FakeS3 | None = None
    put_attempts: int | None = None  # PUTs the server must have seen, where it counts them


FAULTS = ("endpoint_down", "http_500", "http_503", "never_answers", "wrong_keys",
          "missing_bucket")


@pytest.fixture(params=FAULTS)
def fault(request: pytest.FixtureRequest) -> Iterator[Fault]:
    name = request.param
    if name == "endpoint_down":
        yield Fault(closed_port_url(), "EndpointConnectionError")
        return
    if name == "missing_bucket":  # the real moto server; the bucket is never created
        yield Fault(request.getfixturevalue("s3_server"), "NoSuchBucket")
        return
    behaviour, code, attempts = {
        "http_500": (error_500, "InternalError", ATTEMPTS),
        "http_503": (error_503, "ServiceUnavailable", ATTEMPTS),
        "never_answers": (never_answers, "ReadTimeoutError", ATTEMPTS),
        "wrong_keys": (wrong_keys, "InvalidAccessKeyId", 1),  # a 403 is not retried
    }[name]
    server = FakeS3(behaviour)
    try:
        yield Fault(server.url, code, server, attempts)
    finally:
        server.close()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings.from_env({}).replace(
        bucket_name=BUCKET, bucket_access_key_id=ACCESS_KEY, bucket_secret_access_key=SECRET_KEY,
        bucket_timeout_s=TIMEOUT_S, bucket_max_attempts=ATTEMPTS, max_inline_video_bytes=CAP,
        network_volume_dir=str(tmp_path / "no-volume"),
        undelivered_dir=str(tmp_path / "undelivered"),
        allowed_private_networks="127.0.0.0/8")  # every fake endpoint here is on loopback


def write_video(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / "job" / "video.mp4"
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    return path


def deliver_timed(path: Path, settings: Settings, fault: Fault):
    """deliver_video, its timeouts honoured; returns (output or None, error text or None).

    Only that the delivery gives up is checked, never how fast: the documented worst case plus
    SLACK_S for a loaded machine. A silent server holds each attempt far longer than that, so a
    read timeout that is not honoured still fails here."""
    settings = settings.replace(bucket_endpoint_url=fault.endpoint)
    started = time.monotonic()
    try:
        out, error = deliver(path, settings, None), None
    except StorageError as exc:
        out, error = None, str(exc)
    elapsed = time.monotonic() - started
    assert elapsed < bucket.failing_request_bound_s(settings.storage) + SLACK_S < SLOW_SERVER_HOLD_S
    if fault.code == "ReadTimeoutError":
        assert elapsed >= ATTEMPTS * TIMEOUT_S * 0.9  # every attempt waited for its timeout
    if fault.put_attempts is not None:
        assert fault.server is not None and fault.server.count("PUT") == fault.put_attempts
    return out, error


def expected_warning(fault: Fault, instead: str) -> str:
    return f"upload to bucket {BUCKET} at {fault.endpoint} failed ({fault.code}); {instead}"


def assert_no_keys(*texts: str) -> None:
    for text in texts:
        assert SECRET_KEY not in text and ACCESS_KEY not in text, text


# --- the three outcomes, for every fault ---------------------------------------------------------

def test_small_video_comes_back_inline_with_a_warning(fault: Fault, settings: Settings,
                                                      tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="s2v_worker")
    path = write_video(tmp_path, SMALL)
    out, error = deliver_timed(path, settings, fault)
    assert error is None and out is not None
    assert out["storage"] == "inline"
    assert base64.b64decode(out["video_base64"]) == SMALL
    assert "video_url" not in out and "object_key" not in out
    assert out["warnings"] == [expected_warning(fault, "the video is returned inline instead")]
    assert_no_keys(json.dumps(out), caplog.text)


def test_large_video_goes_to_the_volume_with_a_warning(fault: Fault, settings: Settings,
                                                       tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="s2v_worker")
    volume = tmp_path / "volume"
    volume.mkdir()
    path = write_video(tmp_path, LARGE)
    out, error = deliver_timed(path, settings.replace(network_volume_dir=str(volume)), fault)
    assert error is None and out is not None
    assert out["storage"] == "network_volume"
    saved = Path(out["video_path"])
    assert saved.parent == volume / "wan-s2v-outputs"
    assert saved.read_bytes() == LARGE
    assert out["warnings"] == [
        expected_warning(fault, "the video is on the network volume instead (video_path)")]
    assert_no_keys(json.dumps(out), caplog.text)


def test_large_video_with_nowhere_to_go_is_kept_and_named(fault: Fault, settings: Settings,
                                                          tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="s2v_worker")
    path = write_video(tmp_path, LARGE)
    out, error = deliver_timed(path, settings, fault)
    assert out is None and error is not None
    assert f"bucket '{BUCKET}'" in error and fault.endpoint in error
    assert f"failed: {fault.code}" in error
    assert str(len(LARGE)) in error and str(CAP) in error
    match = re.search(r"kept on the worker at (\S+\.mp4)", error)
    assert match, error
    kept = Path(match.group(1))
    assert kept.is_absolute() and kept.parent == tmp_path / "undelivered"
    assert re.fullmatch(r"[0-9a-f]{32}\.mp4", kept.name)
    assert kept.read_bytes() == LARGE
    assert_no_keys(error, caplog.text)


# --- retries, bounds and the undelivered folder ------------------------------------------------

def test_one_transient_503_is_retried_and_the_upload_succeeds(settings: Settings,
                                                              tmp_path: Path) -> None:
    def flaky(handler: _Handler, number: int) -> None:
        if number == 1:
            handler.s3_error(503, "SlowDown", "Please reduce your request rate.")
        else:
            handler.answer(200, headers={"ETag": '"9b2cf535f27731c974343645a3985328"'})

    server = FakeS3(flaky)
    try:
        path = write_video(tmp_path, LARGE)
        out = deliver(path, settings.replace(bucket_endpoint_url=server.url), None)
        assert server.count("PUT") == 2
        assert [m for m, _ in server.requests] == ["PUT", "PUT"]
        first, second = (p for _, p in server.requests)
        assert first == second and first.startswith(f"/{BUCKET}/wan-s2v/")
    finally:
        server.close()
    assert out["storage"] == "s3" and "warnings" not in out
    assert urlsplit(out["video_url"]).path == f"/{BUCKET}/{out['object_key']}"
    assert parse_qs(urlsplit(out["video_url"]).query)["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert path.read_bytes() == LARGE  # a delivered video is left where it was


def test_bound_of_a_failing_request_with_the_defaults() -> None:
    # 3 attempts * (30 s connect + 30 s read + 1 s "100 Continue") + backoffs (1 + 5) + (2 + 5).
    assert bucket.failing_request_bound_s(Settings.from_env({}).storage) == 196


def test_default_undelivered_folder_is_in_the_temp_folder(settings: Settings, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    temp = tmp_path / "system-temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    settings = settings.replace(undelivered_dir=None, bucket_endpoint_url=closed_port_url())
    path = write_video(tmp_path, LARGE)
    with pytest.raises(StorageError) as caught:
        deliver(path, settings, None)
    message = str(caught.value)
    kept = Path(re.search(r"kept on the worker at (\S+\.mp4)", message)[1])
    assert kept.parent == temp / "wan-s2v-undelivered"
    assert kept.read_bytes() == LARGE
    assert (kept.parent.stat().st_mode & 0o777) == 0o700
    assert not path.exists()


def test_kept_across_file_systems_by_copying(settings: Settings, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def cross_device(src, dst, *args, **kwargs):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(storage.os, "rename", cross_device)
    path = write_video(tmp_path, LARGE)
    with pytest.raises(StorageError) as caught:
        deliver(path, settings.replace(bucket_endpoint_url=closed_port_url()), None)
    kept = Path(re.search(r"kept on the worker at (\S+\.mp4)", str(caught.value))[1])
    assert kept.read_bytes() == LARGE
    assert [p.name for p in kept.parent.iterdir()] == [kept.name]  # no partial copy left
    assert not path.exists()


def test_when_nothing_can_keep_the_video_the_error_says_it_is_lost(
        settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(tempfile, "tempdir", str(blocker / "temp"))
    settings = settings.replace(undelivered_dir=str(blocker / "undelivered"),
                                bucket_endpoint_url=closed_port_url())
    path = write_video(tmp_path, LARGE)
    with pytest.raises(StorageError) as caught:
        deliver(path, settings, None)
    message = str(caught.value)
    assert "EndpointConnectionError" in message
    assert "Keeping the video failed too" in message and "it is lost" in message
    assert str(blocker / "undelivered") in message and str(blocker / "temp") in message


def test_a_failing_s3config_bucket_is_named_as_the_jobs_and_its_keys_are_not_shown(
        settings: Settings, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="s2v_worker")
    endpoint, job_secret = closed_port_url(), "job-secret-key-never-shown-9876543210"
    job = parse_job({"input": {"image_url": "https://example.com/a.png",
                               "audio_url": "https://example.com/a.wav"},
                     "s3Config": {"accessId": ACCESS_KEY, "accessSecret": job_secret,
                                  "bucketName": "job-videos", "endpointUrl": endpoint}})
    with pytest.raises(StorageError) as caught:
        deliver(write_video(tmp_path, LARGE), settings, job.storage)
    message = str(caught.value)
    assert (f"uploading the video to bucket 'job-videos' at {endpoint} (from s3Config) failed: "
            "EndpointConnectionError") in message
    assert job_secret not in message + caplog.text
    assert_no_keys(message, caplog.text)


def test_endpoint_credentials_in_the_url_are_not_shown(settings: Settings, tmp_path: Path) -> None:
    endpoint = closed_port_url()
    host = urlsplit(endpoint).netloc
    password = "url-password-5551212"
    settings = settings.replace(bucket_endpoint_url=f"http://proxy-user:{password}@{host}")
    out = deliver(write_video(tmp_path, SMALL), settings, None)
    assert out["storage"] == "inline"
    assert password not in json.dumps(out) and "proxy-user" not in json.dumps(out)
    assert f"at {endpoint} failed" in out["warnings"][0]
    with pytest.raises(StorageError) as caught:
        deliver(write_video(tmp_path / "large", LARGE), settings, None)
    message = str(caught.value)
    assert password not in message and f"at {endpoint} (from settings)" in message
