"""Where the finished MP4 goes: a bucket, the job's answer itself, or the network volume.

The order is the product contract. A bucket (the job's s3Config, else the BUCKET_* settings) gets
every video and the client a presigned link. Without one, a small video comes back inline as base64,
a large one is copied to the network volume, and when there is no volume the job fails with a
message saying how to configure storage; the worker never answers with a path only it can read.
"""
from __future__ import annotations

import base64
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from .job import StorageOverride
from .settings import Settings

logger = logging.getLogger(__name__)

VOLUME_SUBDIR = "wan-s2v-outputs"
MAX_PRESIGN_EXPIRY_S = 7 * 24 * 3600  # SigV4 presigned URLs stop working after 7 days
CONTENT_TYPE = "video/mp4"
MiB = 1024 * 1024
AWS_HOST_SUFFIXES = (".amazonaws.com", ".amazonaws.com.cn")

# One PUT up to 64 MiB (most videos); larger files go up in parallel 16 MiB parts, each retried
# on its own rather than restarting the whole file.
TRANSFER_CONFIG = TransferConfig(multipart_threshold=64 * MiB, multipart_chunksize=16 * MiB,
                                 max_concurrency=4)

# Region spelled in common endpoint host names: s3.<region>.amazonaws.com (also dualstack),
# s3.<region>.backblazeb2.com, s3.<region>.wasabisys.com, <region>.digitaloceanspaces.com.
_REGION_IN_HOST = (re.compile(r"(?:^|\.)s3[.-](?:dualstack\.)?([a-z]{2}(?:-[a-z]+)+-\d+)\."),
                   re.compile(r"^([a-z]+\d+)\.digitaloceanspaces\.com$"))


class StorageError(RuntimeError):
    """The video could not be delivered. The message is safe to return to the client."""


@dataclass(frozen=True)
class BucketTarget:
    """One bucket and the credentials to write to it, from the settings or the job's s3Config."""

    bucket_name: str
    endpoint_url: str | None  # None: AWS S3, endpoint chosen by region
    access_key_id: str = field(repr=False)
    secret_access_key: str = field(repr=False)
    region: str
    source: str  # "s3Config" or "settings", for messages


def deliver_video(path: Path, settings: Settings,
                  override: StorageOverride | None) -> dict[str, Any]:
    """Put the finished video where the client can fetch it; return the output's storage fields."""
    target = bucket_target(settings, override)
    if target is not None:
        # Fallback-after-failure goes here: catch StorageError and call _deliver_without_bucket.
        return upload_to_bucket(path, target, settings)
    return _deliver_without_bucket(path, settings)


def bucket_target(settings: Settings, override: StorageOverride | None) -> BucketTarget | None:
    if override is not None:
        return BucketTarget(
            bucket_name=override.bucket_name, endpoint_url=override.endpoint_url,
            access_key_id=override.access_id, secret_access_key=override.access_secret,
            # s3Config carries no region; RunPod's own uploader reads it from the endpoint too.
            region=_region_from_endpoint(override.endpoint_url) or settings.bucket_region,
            source="s3Config")
    if settings.bucket_configured:
        return BucketTarget(
            bucket_name=settings.bucket_name, endpoint_url=settings.bucket_endpoint_url,
            access_key_id=settings.bucket_access_key_id,
            secret_access_key=settings.bucket_secret_access_key,
            region=settings.bucket_region, source="settings")
    return None


# --- bucket ------------------------------------------------------------------------------------

def make_s3_client(target: BucketTarget, settings: Settings) -> BaseClient:
    """The one place a boto3 client is made: explicit keys, so ~/.aws and AWS_* keys never count."""
    config = Config(
        signature_version="s3v4",
        region_name=target.region,
        connect_timeout=settings.bucket_timeout_s,
        read_timeout=settings.bucket_timeout_s,
        retries={"mode": "standard", "max_attempts": settings.bucket_max_attempts},
        s3={"addressing_style": _addressing_style(settings, target.endpoint_url)},
        # botocore >= 1.36 adds CRC checksums to every upload by default, which several
        # S3-compatible services reject; send them only where an operation requires one.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    session = boto3.session.Session(aws_access_key_id=target.access_key_id,
                                    aws_secret_access_key=target.secret_access_key,
                                    region_name=target.region)
    return session.client("s3", endpoint_url=target.endpoint_url, config=config)


def _addressing_style(settings: Settings, endpoint_url: str | None) -> str:
    """'auto' means virtual-hosted for AWS and path style for everything else.

    No one style works everywhere. AWS has deprecated path style and announced its removal, so
    it gets virtual-hosted names. MinIO, Ceph and loopback servers usually have no per-bucket DNS
    names, so only path style reaches them, and R2, B2, Wasabi and Spaces accept it too. The few
    services that refuse path style (Alibaba OSS) need BUCKET_ADDRESSING_STYLE=virtual.
    """
    if settings.bucket_addressing_style != "auto":
        return settings.bucket_addressing_style
    if not endpoint_url:
        return "virtual"
    host = urlsplit(endpoint_url).hostname or ""
    return "virtual" if host.endswith(AWS_HOST_SUFFIXES) else "path"


def _region_from_endpoint(endpoint_url: str) -> str | None:
    host = urlsplit(endpoint_url).hostname or ""
    for pattern in _REGION_IN_HOST:
        match = pattern.search(host)
        if match:
            return match.group(1)
    return None


def _object_key(prefix: str) -> str:
    # Nothing from the job goes into the key: a random name cannot be guessed or collide.
    return f"{prefix}{datetime.now(timezone.utc):%Y/%m/%d}/{uuid.uuid4().hex}.mp4"


def _presign_expiry_s(settings: Settings) -> int:
    if settings.bucket_url_expiry_s > MAX_PRESIGN_EXPIRY_S:
        logger.warning("BUCKET_URL_EXPIRY_S=%d is past S3's 7-day limit; links last 7 days",
                       settings.bucket_url_expiry_s)
        return MAX_PRESIGN_EXPIRY_S
    return settings.bucket_url_expiry_s


def upload_to_bucket(path: Path, target: BucketTarget, settings: Settings) -> dict[str, Any]:
    key = _object_key(settings.bucket_key_prefix)
    size = path.stat().st_size
    started = time.monotonic()
    try:
        client = make_s3_client(target, settings)
        client.upload_file(str(path), target.bucket_name, key,
                           ExtraArgs={"ContentType": CONTENT_TYPE}, Config=TRANSFER_CONFIG)
        url = client.generate_presigned_url(
            "get_object", Params={"Bucket": target.bucket_name, "Key": key},
            ExpiresIn=_presign_expiry_s(settings))
    except (BotoCoreError, ClientError, S3UploadFailedError) as exc:
        raise StorageError(_upload_failure_message(exc, target)) from exc
    # The presigned URL is a bearer credential: it is returned, never logged.
    logger.info("uploaded %d bytes to bucket %r (%s, %s) as %s in %.2f s", size,
                target.bucket_name, target.source, target.endpoint_url or "AWS", key,
                time.monotonic() - started)
    return {"video_url": url, "storage": "s3", "object_key": key}


def _upload_failure_message(exc: BaseException, target: BucketTarget) -> str:
    code, detail = _s3_error(exc)
    message = (f"uploading the video to bucket '{target.bucket_name}' at "
               f"{target.endpoint_url or 'AWS S3'} (from {target.source}) failed: {code}"
               + (f" ({detail})" if detail else ""))
    return _redact(message, target)


def _s3_error(exc: BaseException) -> tuple[str, str]:
    """(error code, message) of the S3 error behind `exc`, which boto3 may have wrapped."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ClientError):
            error = seen.response.get("Error", {})
            return str(error.get("Code") or "unknown error"), str(error.get("Message") or "")
        seen = seen.__cause__ or seen.__context__
    return type(exc).__name__, str(exc)


def _redact(text: str, target: BucketTarget) -> str:
    # S3 errors do not echo secrets, but a message that reaches the client must never carry one.
    for secret in (target.secret_access_key, target.access_key_id):
        if secret:
            text = text.replace(secret, "***")
    return text


# --- without a bucket --------------------------------------------------------------------------

def _deliver_without_bucket(path: Path, settings: Settings) -> dict[str, Any]:
    size = path.stat().st_size
    if size <= settings.max_inline_video_bytes:
        logger.info("returning the video inline (%d bytes)", size)
        return {"video_base64": base64.b64encode(path.read_bytes()).decode("ascii"),
                "storage": "inline"}
    volume = Path(settings.network_volume_dir)
    if _is_writable_dir(volume):
        return copy_to_volume(path, volume)
    raise StorageError(
        f"the video is {size} bytes, too large to return inline (MAX_INLINE_VIDEO_BYTES is "
        f"{settings.max_inline_video_bytes} bytes), and there is nowhere else to put it. Configure "
        "a bucket with BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID, BUCKET_SECRET_ACCESS_KEY and "
        "BUCKET_NAME, or send the job's s3Config, or attach a network volume at "
        f"{settings.network_volume_dir} (NETWORK_VOLUME_DIR).")


def _is_writable_dir(folder: Path) -> bool:
    return folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)


def copy_to_volume(path: Path, volume: Path) -> dict[str, Any]:
    folder = volume / VOLUME_SUBDIR
    name = uuid.uuid4().hex
    destination = folder / f"{name}.mp4"
    partial = folder / f".{name}.mp4.partial"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # Copy under a hidden name, then rename: a reader never sees half a video.
        shutil.copyfile(path, partial)
        os.replace(partial, destination)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise StorageError(f"copying the video to the network volume at {folder} failed: "
                           f"{exc.strerror or exc}") from exc
    logger.info("copied the video (%d bytes) to the network volume as %s",
                destination.stat().st_size, destination)
    return {"video_path": str(destination), "storage": "network_volume"}
