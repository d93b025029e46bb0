"""Delivery of the finished video, against a real S3 HTTP server (moto) on loopback. What happens
when the upload fails (each fault, each fallback) is tests/test_storage_faults.py."""
from __future__ import annotations

import base64
import re
import socket
import threading
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from boto3.s3.transfer import TransferConfig

from conftest import S3_ACCESS_KEY as ACCESS_KEY, S3_SECRET_KEY as SECRET_KEY, deliver, s3_admin
from s2v_worker import bucket as bucket_module, storage as storage_module
from s2v_worker.job import StorageOverride, parse_job
from s2v_worker.settings import Settings
from s2v_worker.storage import StorageError

JOB_SECRET = "job-secret-key-never-shown-9876543210"
SETTINGS_BUCKET = "worker-videos"
JOB_BUCKET = "job-videos"
JOB_ID = "job-7f3e2a91-b5c4"
KEY_PATTERN = re.compile(r"^wan-s2v/\d{4}/\d{2}/\d{2}/[0-9a-f]{32}\.mp4$")


@pytest.fixture(scope="module")
def s3_endpoint(s3_server: str) -> str:
    for name in (SETTINGS_BUCKET, JOB_BUCKET):
        s3_admin(s3_server).create_bucket(Bucket=name)
    return s3_server


@pytest.fixture
def admin(s3_endpoint: str):
    return s3_admin(s3_endpoint)


@pytest.fixture
def base_settings(tmp_path: Path) -> Settings:
    """No bucket, no network volume, one attempt: each test adds what it needs. The S3 server is
    on loopback, which the address policy admits only when told to (as a private MinIO would be).
    The timeout is what moto must answer within on a loaded CI machine, so not a tight one; no
    test here waits for it (refused endpoints fail before or at the connection)."""
    return Settings.from_env({}).replace(network_volume_dir=str(tmp_path / "no-volume"),
                                         undelivered_dir=str(tmp_path / "undelivered"),
                                         bucket_timeout_s=30.0, bucket_max_attempts=1,
                                         allowed_private_networks="127.0.0.0/8")


@pytest.fixture
def bucket_settings(base_settings: Settings, s3_endpoint: str) -> Settings:
    return base_settings.replace(bucket_endpoint_url=s3_endpoint, bucket_access_key_id=ACCESS_KEY,
                                 bucket_secret_access_key=SECRET_KEY, bucket_name=SETTINGS_BUCKET,
                                 bucket_url_expiry_s=3600)


@pytest.fixture
def video(tmp_path: Path) -> Path:
    path = tmp_path / "video.mp4"
    path.write_bytes(bytes(range(256)) * 1200)  # 300 KiB
    return path


def job_override(endpoint: str, bucket: str = JOB_BUCKET) -> StorageOverride:
    job = parse_job({"id": JOB_ID,
                     "input": {"image_url": "https://example.com/a.png",
                               "audio_url": "https://example.com/a.wav"},
                     "s3Config": {"accessId": ACCESS_KEY, "accessSecret": JOB_SECRET,
                                  "bucketName": bucket, "endpointUrl": endpoint}})
    assert job.storage is not None
    return job.storage


# --- bucket ------------------------------------------------------------------------------------

def test_settings_bucket_gets_the_video_and_a_working_presigned_link(
        bucket_settings: Settings, video: Path, admin) -> None:
    out = deliver(video, bucket_settings, None)
    assert out["storage"] == "s3"
    key = out["object_key"]
    assert KEY_PATTERN.match(key)
    assert key.startswith(f"wan-s2v/{datetime.now(timezone.utc):%Y/%m/%d}/")
    assert JOB_ID not in key
    query = parse_qs(urlsplit(out["video_url"]).query)
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert query["X-Amz-Expires"] == ["3600"]
    response = requests.get(out["video_url"], timeout=10)
    assert response.status_code == 200
    assert response.content == video.read_bytes()
    assert admin.head_object(Bucket=SETTINGS_BUCKET, Key=key)["ContentType"] == "video/mp4"


def test_every_upload_gets_its_own_key(bucket_settings: Settings, video: Path) -> None:
    keys = {deliver(video, bucket_settings, None)["object_key"] for _ in range(3)}
    assert len(keys) == 3


def test_s3config_override_goes_to_the_jobs_bucket(bucket_settings: Settings, video: Path,
                                                   s3_endpoint: str, admin) -> None:
    out = deliver(video, bucket_settings, job_override(s3_endpoint))
    assert out["storage"] == "s3"
    assert JOB_ID not in out["object_key"]
    assert admin.get_object(Bucket=JOB_BUCKET, Key=out["object_key"])["Body"].read() == \
        video.read_bytes()
    listed = admin.list_objects_v2(Bucket=SETTINGS_BUCKET, Prefix=out["object_key"])
    assert listed["KeyCount"] == 0
    assert requests.get(out["video_url"], timeout=10).content == video.read_bytes()


def test_s3config_override_works_without_bucket_settings(base_settings: Settings, video: Path,
                                                          s3_endpoint: str, admin) -> None:
    out = deliver(video, base_settings, job_override(s3_endpoint))
    assert out["storage"] == "s3"
    assert admin.head_object(Bucket=JOB_BUCKET, Key=out["object_key"])["ContentType"] == "video/mp4"


def test_large_video_goes_up_in_parts(bucket_settings: Settings, tmp_path: Path, admin,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bucket_module, "TRANSFER_CONFIG",
                        TransferConfig(multipart_threshold=5 * 1024 * 1024,
                                       multipart_chunksize=5 * 1024 * 1024))
    path = tmp_path / "large.mp4"
    path.write_bytes(bytes(range(256)) * (11 * 4096))  # 11 MiB: three parts
    out = deliver(path, bucket_settings, None)
    head = admin.head_object(Bucket=SETTINGS_BUCKET, Key=out["object_key"])
    assert head["ContentType"] == "video/mp4"
    assert head["ContentLength"] == path.stat().st_size
    assert requests.get(out["video_url"], timeout=10).content == path.read_bytes()


def kept_file(message: str, settings: Settings) -> Path:
    """The undelivered copy an error message names; it must be in the undelivered folder."""
    match = re.search(r"kept on the worker at (\S+\.mp4)", message)
    assert match, message
    kept = Path(match.group(1))
    assert kept.parent == settings.folders.undelivered_dir
    assert re.fullmatch(r"[0-9a-f]{32}\.mp4", kept.name)
    return kept


# --- without a bucket --------------------------------------------------------------------------

def test_small_video_comes_back_inline(base_settings: Settings, video: Path) -> None:
    out = deliver(video, base_settings, None)
    assert out["storage"] == "inline"
    assert base64.b64decode(out["video_base64"]) == video.read_bytes()


def test_video_exactly_at_the_cap_is_inline(base_settings: Settings, video: Path) -> None:
    settings = base_settings.replace(max_inline_video_bytes=video.stat().st_size)
    assert deliver(video, settings, None)["storage"] == "inline"


def test_large_video_goes_to_the_network_volume(base_settings: Settings, video: Path,
                                                tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    settings = base_settings.replace(max_inline_video_bytes=1000, network_volume_dir=str(volume))
    out = deliver(video, settings, None)
    assert out["storage"] == "network_volume"
    saved = Path(out["video_path"])
    assert saved.parent == volume / "wan-s2v-outputs"
    assert re.fullmatch(r"[0-9a-f]{32}\.mp4", saved.name)
    assert saved.read_bytes() == video.read_bytes()
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]  # no partial copy left


def test_large_video_without_bucket_or_volume_says_how_to_configure(base_settings: Settings,
                                                                    video: Path) -> None:
    settings = base_settings.replace(max_inline_video_bytes=1000)
    content = video.read_bytes()
    with pytest.raises(StorageError) as caught:
        deliver(video, settings, None)
    message = str(caught.value)
    assert str(len(content)) in message and "1000" in message
    for name in ("BUCKET_ENDPOINT_URL", "BUCKET_ACCESS_KEY_ID", "BUCKET_SECRET_ACCESS_KEY",
                 "BUCKET_NAME", "s3Config", "NETWORK_VOLUME_DIR", "UNDELIVERED_DIR"):
        assert name in message
    kept = kept_file(message, settings)
    assert kept.read_bytes() == content
    assert not video.exists()  # moved, not copied: the job's folder is deleted anyway


def test_volume_that_refuses_the_copy_keeps_the_video_on_the_volume(base_settings: Settings,
                                                                   video: Path,
                                                                   tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "wan-s2v-outputs").write_text("a file where the folder should be")
    settings = base_settings.replace(max_inline_video_bytes=1000, network_volume_dir=str(volume),
                                     undelivered_dir=None)
    content = video.read_bytes()
    with pytest.raises(StorageError) as caught:
        deliver(video, settings, None)
    message = str(caught.value)
    assert "copying the video to the network volume" in message
    kept = kept_file(message, settings.replace(undelivered_dir=str(volume / "wan-s2v-undelivered")))
    assert kept.read_bytes() == content


def test_incomplete_bucket_settings_are_not_a_bucket(base_settings: Settings, video: Path) -> None:
    settings = base_settings.replace(bucket_name=SETTINGS_BUCKET, bucket_access_key_id=ACCESS_KEY)
    assert deliver(video, settings, None)["storage"] == "inline"


# --- client configuration ------------------------------------------------------------------------

@pytest.mark.parametrize("endpoint, style", [
    (None, "virtual"),
    ("https://s3.eu-west-1.amazonaws.com", "virtual"),
    ("https://abc123.r2.cloudflarestorage.com", "path"),
    ("https://s3.us-west-004.backblazeb2.com", "path"),
    ("http://minio.internal:9000", "path"),
    ("http://127.0.0.1:9000", "path"),
])
def test_auto_addressing_style(base_settings: Settings, endpoint: str | None, style: str) -> None:
    assert bucket_module._addressing_style(base_settings.storage, endpoint) == style
    forced = base_settings.replace(bucket_addressing_style="virtual")
    assert bucket_module._addressing_style(forced.storage, endpoint) == "virtual"


@pytest.mark.parametrize("endpoint, region", [
    ("https://s3.eu-west-1.amazonaws.com", "eu-west-1"),
    ("https://s3.dualstack.ap-southeast-2.amazonaws.com", "ap-southeast-2"),
    ("https://s3.us-west-004.backblazeb2.com", "us-west-004"),
    ("https://nyc3.digitaloceanspaces.com", "nyc3"),
    ("https://abc123.r2.cloudflarestorage.com", None),
    ("http://127.0.0.1:9000", None),
])
def test_region_of_an_s3config_endpoint(endpoint: str, region: str | None) -> None:
    assert bucket_module._region_from_endpoint(endpoint) == region


def test_bucket_target_repr_hides_keys(bucket_settings: Settings) -> None:
    target = bucket_module.bucket_target(bucket_settings.storage, None)
    assert target is not None and SECRET_KEY not in repr(target) and ACCESS_KEY not in repr(target)


# --- the address policy ------------------------------------------------------------------------

class Listener:
    """A loopback TCP port that records every connection made to it (and answers none)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted = 0
        self.running = True
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while self.running:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        """Stop, and count what the thread had not accepted yet. A connect() to loopback returns
        once the kernel has completed the handshake and queued the connection on this socket, so
        every connection the code under test made is counted here however slow the machine (no
        sleep that a loaded machine could outlast)."""
        if not self.running:
            return
        self.running = False
        self.thread.join()
        self.sock.setblocking(False)
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                break
            self.accepted += 1
            conn.close()
        self.sock.close()


@pytest.fixture
def listener():
    server = Listener()
    yield server
    server.close()


POLICY_WARNING = ("upload to bucket {bucket} at {endpoint} refused: the endpoint is a private or "
                  "local address; the video is returned inline instead")


@pytest.mark.parametrize("through_override", [False, True])
def test_a_loopback_endpoint_is_refused_before_any_connection_and_the_video_comes_inline(
        base_settings: Settings, video: Path, listener: Listener, through_override: bool) -> None:
    settings = base_settings.replace(allowed_private_networks="")  # the default policy
    if through_override:
        override, bucket = job_override(listener.url), JOB_BUCKET
    else:
        override, bucket = None, SETTINGS_BUCKET
        settings = settings.replace(bucket_endpoint_url=listener.url, bucket_name=SETTINGS_BUCKET,
                                    bucket_access_key_id=ACCESS_KEY, bucket_secret_access_key=SECRET_KEY)
    out = deliver(video, settings, override)
    listener.close()
    assert listener.accepted == 0  # not even a TCP handshake
    assert out["storage"] == "inline" and base64.b64decode(out["video_base64"]) == video.read_bytes()
    assert out["warnings"] == [POLICY_WARNING.format(bucket=bucket, endpoint=listener.url)]


def test_a_refused_endpoint_with_a_large_video_goes_to_the_volume(base_settings: Settings, video: Path,
                                                                  listener: Listener, tmp_path: Path):
    volume = tmp_path / "volume"
    volume.mkdir()
    settings = base_settings.replace(allowed_private_networks="", max_inline_video_bytes=1000,
                                     network_volume_dir=str(volume))
    out = deliver(video, settings, job_override(listener.url))
    listener.close()
    assert listener.accepted == 0
    assert out["storage"] == "network_volume" and Path(out["video_path"]).read_bytes() == video.read_bytes()
    assert "refused: the endpoint is a private or local address" in out["warnings"][0]


def test_a_name_that_turns_private_after_the_check_is_refused_at_the_connection(
        base_settings: Settings, video: Path, listener: Listener, monkeypatch) -> None:
    """DNS rebinding: public when checked, loopback when botocore connects. Each connection resolves
    the name itself and connects only to the addresses it checked."""
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect
    port = int(listener.url.rsplit(":", 1)[1])
    lookups = []

    def rebinding_dns(host, port_, *args, **kwargs):
        if host != "bucket.rebind.test":
            return real_getaddrinfo(host, port_, *args, **kwargs)
        lookups.append(host)
        address = "93.184.216.34" if len(lookups) == 1 else "127.0.0.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port_))]

    def loopback_only(sock, address):  # nothing in this test may leave the machine
        assert address[0] == "127.0.0.1", f"connection attempted to {address}"
        return real_connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding_dns)
    monkeypatch.setattr(socket.socket, "connect", loopback_only)
    settings = base_settings.replace(allowed_private_networks="", bucket_max_attempts=2)
    out = deliver(video, settings, job_override(f"http://bucket.rebind.test:{port}"))
    listener.close()
    assert listener.accepted == 0 and len(lookups) >= 2
    assert out["storage"] == "inline"
    assert out["warnings"] == [f"upload to bucket {JOB_BUCKET} at http://bucket.rebind.test:{port} failed "
                               "(EndpointAddressRefused); the video is returned inline instead"]


def test_the_allow_list_admits_a_private_endpoint(base_settings: Settings, video: Path, s3_endpoint: str,
                                                  admin) -> None:
    """What a private MinIO needs: ALLOWED_PRIVATE_NETWORKS covering its address (here loopback)."""
    assert [str(n) for n in base_settings.network.allowed_private_networks] == ["127.0.0.0/8"]
    out = deliver(video, base_settings, job_override(s3_endpoint))
    assert out["storage"] == "s3" and "warnings" not in out
    assert admin.get_object(Bucket=JOB_BUCKET, Key=out["object_key"])["Body"].read() == video.read_bytes()


# --- a streaming job's clips -------------------------------------------------------------------

def clip_delivery(settings: Settings, override=None):
    from s2v_worker.storage import ClipDelivery

    return ClipDelivery(override, settings.storage, settings.network, settings.folders)


def test_a_clip_goes_to_the_bucket_as_the_video_does(bucket_settings: Settings, video: Path,
                                                     admin) -> None:
    out = clip_delivery(bucket_settings).deliver(video, "clip 1 of 2")
    assert out["storage"] == "s3" and KEY_PATTERN.match(out["object_key"])
    assert "warnings" not in out and video.exists()  # the caller removes it
    assert requests.get(out["video_url"], timeout=10).content == video.read_bytes()


def test_a_clip_is_inline_only_within_a_stream_items_size(base_settings: Settings, video: Path,
                                                          tmp_path: Path) -> None:
    from s2v_worker.storage import MAX_INLINE_CLIP_BYTES

    out = clip_delivery(base_settings).deliver(video, "clip 1 of 2")  # 300 KiB
    assert out["storage"] == "inline" and base64.b64decode(out["video_base64"]) == video.read_bytes()
    large = tmp_path / "large.mp4"
    large.write_bytes(b"\0" * (MAX_INLINE_CLIP_BYTES + 1))  # under MAX_INLINE_VIDEO_BYTES (7 MiB)
    out = clip_delivery(base_settings).deliver(large, "clip 2 of 2")
    assert set(out) == {"warnings"} and large.exists()
    assert out["warnings"] == [
        f"clip 2 of 2 was not delivered (it is {MAX_INLINE_CLIP_BYTES + 1} bytes, more than a clip "
        f"returns inline ({MAX_INLINE_CLIP_BYTES} bytes), and there is no network volume at "
        f"{tmp_path / 'no-volume'} and no bucket); its frames are in the whole video, which comes "
        "last"]
    assert not (tmp_path / "undelivered").exists()  # a clip is never kept
    volume = tmp_path / "volume"
    volume.mkdir()
    out = clip_delivery(base_settings.replace(network_volume_dir=str(volume))).deliver(large, "c")
    assert out["storage"] == "network_volume" and Path(out["video_path"]).parent == volume / "wan-s2v-outputs"


def test_after_a_failed_upload_later_clips_skip_the_bucket(base_settings: Settings, video: Path,
                                                           monkeypatch) -> None:
    from conftest import closed_port_url

    settings = base_settings.replace(bucket_endpoint_url=closed_port_url(), bucket_access_key_id=ACCESS_KEY,
                                     bucket_secret_access_key=SECRET_KEY, bucket_name=SETTINGS_BUCKET)
    delivery = clip_delivery(settings)
    first = delivery.deliver(video, "clip 1 of 2")
    assert first["storage"] == "inline"
    [warning] = first["warnings"]
    assert warning.startswith(f"clip 1 of 2: upload to bucket {SETTINGS_BUCKET} at http://127.0.0.1:")
    attempts = []
    real_upload = storage_module.upload_to_bucket
    monkeypatch.setattr(storage_module, "upload_to_bucket",
                        lambda *args: attempts.append(args) or real_upload(*args))
    second = delivery.deliver(video, "clip 2 of 2")
    assert attempts == []  # the dead bucket is not tried again (each try waits out its retries)
    assert second["storage"] == "inline" and second["warnings"] == [
        "clip 2 of 2: not uploaded, as the upload of an earlier clip failed"]
