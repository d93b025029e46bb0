"""The bucket: uploading the finished MP4 to S3-compatible storage and signing a link to it.

The bucket is the job's s3Config, else the BUCKET_* settings. Its endpoint obeys the address policy
of media URLs (net.py), checked before the upload and at every connection botocore opens. A failed
upload raises `BucketUploadError`, whose message and reason carry no secret; storage.py then
delivers the video another way.
"""
from __future__ import annotations

import functools
import logging
import re
import socket
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.awsrequest import (AWSHTTPConnection, AWSHTTPConnectionPool, AWSHTTPSConnection,
                                 AWSHTTPSConnectionPool)
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from urllib3.exceptions import NewConnectionError
from urllib3.util import connection as urllib3_connection

from .errors import StorageError
from .job import StorageOverride
from .net import refused_address
from .settings import IPNetwork, StorageSettings

logger = logging.getLogger(__name__)

MAX_PRESIGN_EXPIRY_S = 7 * 24 * 3600  # SigV4 presigned URLs stop working after 7 days
CONTENT_TYPE = "video/mp4"
MiB = 1024 * 1024
AWS_HOST_SUFFIXES = (".amazonaws.com", ".amazonaws.com.cn")

# One PUT up to 64 MiB (most videos); larger files go up in parallel 16 MiB parts, each retried
# on its own rather than restarting the whole file.
TRANSFER_CONFIG = TransferConfig(multipart_threshold=64 * MiB, multipart_chunksize=16 * MiB,
                                 max_concurrency=4)

# How long a failing upload can take. botocore's "standard" retry mode tries every bucket request
# BUCKET_MAX_ATTEMPTS times in all. It retries connection errors, timeouts and 500/502/503/504
# answers, and not 403 (wrong keys) or 404 (missing bucket), which fail at the first answer. One
# attempt ends at its first timeout: BUCKET_TIMEOUT_S to connect, then (for a file body, sent with
# "Expect: 100-continue") up to 1 s waiting for "100 Continue", then BUCKET_TIMEOUT_S without a
# byte of the answer. Between attempts botocore waits rand(0,1) * min(scale * 2**i, 20 s), scale
# 1 s for throttling codes (SlowDown) and 50 ms otherwise, raised by an x-amz-retry-after header
# by at most 5 s. So one failing request takes at most
#     attempts * (2 * timeout + 1 s) + sum over i < attempts - 1 of (min(2**i, 20) + 5) s,
# which `failing_request_bound_s` computes: 3 * 61 + (1 + 5) + (2 + 5) = 196 s with the defaults
# (30 s, 3 attempts); in practice a dead endpoint or a silent server costs about 3 * 30 s. A video
# at or below the multipart threshold is one PutObject; a larger one that fails spends this on
# CreateMultipartUpload or on the failing part (parts go up 4 at a time), then again on the abort.
# Not bounded by these timeouts: DNS look-ups, and a server that keeps trickling bytes (each read
# is bounded, not their sum).
EXPECT_CONTINUE_WAIT_S = 1.0  # botocore's own wait for "100 Continue" before it sends the body
RETRY_AFTER_EXTRA_MAX_S = 5.0  # most an x-amz-retry-after header adds to one backoff
MAX_BACKOFF_S = 20.0
THROTTLING_BACKOFF_SCALE_S = 1.0  # the larger of botocore's two backoff scales


def failing_request_bound_s(storage: StorageSettings) -> float:
    """Longest one bucket request can take to fail, all attempts and backoffs included."""
    attempts = storage.bucket_max_attempts
    per_attempt = 2 * storage.bucket_timeout_s + EXPECT_CONTINUE_WAIT_S
    backoff = sum(min(THROTTLING_BACKOFF_SCALE_S * 2 ** i, MAX_BACKOFF_S) + RETRY_AFTER_EXTRA_MAX_S
                  for i in range(attempts - 1))
    return attempts * per_attempt + backoff


# Region spelled in common endpoint host names: s3.<region>.amazonaws.com (also dualstack),
# s3.<region>.backblazeb2.com, s3.<region>.wasabisys.com, <region>.digitaloceanspaces.com.
_REGION_IN_HOST = (re.compile(r"(?:^|\.)s3[.-](?:dualstack\.)?([a-z]{2}(?:-[a-z]+)+-\d+)\."),
                   re.compile(r"^([a-z]+\d+)\.digitaloceanspaces\.com$"))


class EndpointAddressRefused(NewConnectionError):
    """The bucket's host resolved to an address the address policy refuses: nothing was sent."""


ENDPOINT_REFUSED_CODE = "EndpointAddressRefused"


class BucketUploadError(StorageError):
    """The upload to the bucket failed; `code` is the S3 error code or the exception's class."""

    def __init__(self, message: str, *, code: str, reason: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason  # "upload to bucket <name> at <endpoint> failed (<code>)", no secret


@dataclass(frozen=True)
class BucketTarget:
    """One bucket and the credentials to write to it, from the settings or the job's s3Config."""

    bucket_name: str
    endpoint_url: str | None  # None: AWS S3, endpoint chosen by region
    access_key_id: str = field(repr=False)
    secret_access_key: str = field(repr=False)
    region: str
    source: str  # "s3Config" or "settings", for messages


def bucket_target(storage: StorageSettings,
                  override: StorageOverride | None) -> BucketTarget | None:
    if override is not None:
        return BucketTarget(
            bucket_name=override.bucket_name, endpoint_url=override.endpoint_url,
            access_key_id=override.access_id, secret_access_key=override.access_secret,
            # s3Config carries no region; RunPod's own uploader reads it from the endpoint too.
            region=_region_from_endpoint(override.endpoint_url) or storage.bucket_region,
            source="s3Config")
    if storage.bucket_configured:
        return BucketTarget(
            bucket_name=storage.bucket_name, endpoint_url=storage.bucket_endpoint_url,
            access_key_id=storage.bucket_access_key_id,
            secret_access_key=storage.bucket_secret_access_key,
            region=storage.bucket_region, source="settings")
    return None


# --- the address policy --------------------------------------------------------------------------
#
# The bucket endpoint comes from the job (s3Config) or the settings, so it obeys the policy media URLs
# obey (net.py): every address its host resolves to must be public, or inside
# ALLOWED_PRIVATE_NETWORKS (which admits a private MinIO). It is checked twice: once before the
# upload, for a clear message, and at every connection botocore opens, on the very addresses that
# connection then uses, so a DNS answer that changes in between (rebinding) cannot slip through.

class _PolicyConnection:
    """Mixed into botocore's connections: resolve the host once, refuse it when an answer is
    outside the policy, and connect to those checked addresses (urllib3 would look the name up
    again). `host` is unchanged, so the Host header, TLS SNI and the certificate check are too."""

    allowed_networks: tuple[IPNetwork, ...] = ()

    def _new_conn(self) -> socket.socket:
        host = self._dns_host  # the URL's host name, as urllib3 resolves it
        try:
            infos = socket.getaddrinfo(host, self.port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise NewConnectionError(self, f"could not resolve the bucket host: {exc}") from exc
        refused = refused_address(infos, self.allowed_networks)
        if refused is not None:
            logger.warning("bucket host %s resolved to %s, which the address policy refuses", host,
                           refused)
            raise EndpointAddressRefused(self, "the bucket host resolves to a private or local "
                                               "address (not allowed; see ALLOWED_PRIVATE_NETWORKS)")
        last_error: OSError | None = None
        for address in dict.fromkeys(str(info[4][0]) for info in infos):
            try:
                return urllib3_connection.create_connection(
                    (address, self.port), self.timeout, source_address=self.source_address,
                    socket_options=self.socket_options)
            except OSError as exc:
                last_error = exc
        raise NewConnectionError(self, f"could not connect: {last_error}")


@functools.lru_cache(maxsize=8)
def _policy_pool_classes(allowed: tuple[IPNetwork, ...]) -> dict[str, type]:
    connections = {scheme: type(f"Policy{base.__name__}", (_PolicyConnection, base),
                                {"allowed_networks": allowed})
                   for scheme, base in (("http", AWSHTTPConnection), ("https", AWSHTTPSConnection))}
    return {scheme: type(f"Policy{pool.__name__}", (pool,), {"ConnectionCls": connections[scheme]})
            for scheme, pool in (("http", AWSHTTPConnectionPool), ("https", AWSHTTPSConnectionPool))}


def check_endpoint_address(target: "BucketTarget", allowed: tuple[IPNetwork, ...]) -> None:
    """Refuse the upload up front when the endpoint's host resolves outside the address policy.

    A host that does not resolve is left to the upload, which reports it as before. AWS's own
    endpoints (no endpoint URL) are checked at connection time only.
    """
    if not target.endpoint_url:
        return
    parts = urlsplit(target.endpoint_url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        infos = socket.getaddrinfo(parts.hostname or "", port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError):
        return
    refused = refused_address(infos, allowed)
    if refused is None:
        return
    endpoint = _endpoint_for_messages(target.endpoint_url)
    logger.warning("bucket endpoint %s (%s) resolved to %s, which the address policy refuses",
                   endpoint, target.source, refused)
    raise BucketUploadError(
        f"the bucket endpoint {endpoint} (from {target.source}) resolves to a private or local "
        "address, which the address policy refuses (ALLOWED_PRIVATE_NETWORKS can admit a private "
        "network); nothing was sent to it",
        code=ENDPOINT_REFUSED_CODE,
        reason=f"upload to bucket {target.bucket_name} at {endpoint} refused: the endpoint is a "
               "private or local address")


def make_s3_client(target: BucketTarget, storage: StorageSettings,
                   allowed: tuple[IPNetwork, ...]) -> BaseClient:
    """The one place a boto3 client is made: explicit keys, so ~/.aws and AWS_* keys never count;
    every connection under the address policy (`_PolicyConnection`), and no environment proxy,
    through which that check would mean nothing."""
    config = Config(
        proxies={},
        signature_version="s3v4",
        region_name=target.region,
        connect_timeout=storage.bucket_timeout_s,
        read_timeout=storage.bucket_timeout_s,
        # total_max_attempts counts the first try, as BUCKET_MAX_ATTEMPTS does; botocore's
        # "max_attempts" key would count retries only (one attempt more than asked for).
        retries={"mode": "standard", "total_max_attempts": storage.bucket_max_attempts},
        s3={"addressing_style": _addressing_style(storage, target.endpoint_url)},
        # botocore >= 1.36 adds CRC checksums to every upload by default, which several
        # S3-compatible services reject; send them only where an operation requires one.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    session = boto3.session.Session(aws_access_key_id=target.access_key_id,
                                    aws_secret_access_key=target.secret_access_key,
                                    region_name=target.region)
    client = session.client("s3", endpoint_url=target.endpoint_url, config=config)
    # botocore offers no public hook for its connection class: its URLLib3Session makes a pool per
    # host, lazily, from its PoolManager's pool classes, which are replaced here before any request
    # (tests/test_storage.py proves that no connection reaches a refused address).
    client._endpoint.http_session._manager.pool_classes_by_scheme = _policy_pool_classes(allowed)
    return client


def _addressing_style(storage: StorageSettings, endpoint_url: str | None) -> str:
    """'auto' means virtual-hosted for AWS and path style for everything else.

    No one style works everywhere. AWS has deprecated path style and announced its removal, so
    it gets virtual-hosted names. MinIO, Ceph and loopback servers usually have no per-bucket DNS
    names, so only path style reaches them, and R2, B2, Wasabi and Spaces accept it too. The few
    services that refuse path style (Alibaba OSS) need BUCKET_ADDRESSING_STYLE=virtual.
    """
    if storage.bucket_addressing_style != "auto":
        return str(storage.bucket_addressing_style)
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


def _presign_expiry_s(storage: StorageSettings) -> int:
    if storage.bucket_url_expiry_s > MAX_PRESIGN_EXPIRY_S:
        logger.warning("BUCKET_URL_EXPIRY_S=%d is past S3's 7-day limit; links last 7 days",
                       storage.bucket_url_expiry_s)
        return MAX_PRESIGN_EXPIRY_S
    return storage.bucket_url_expiry_s


def upload_to_bucket(path: Path, target: BucketTarget, storage: StorageSettings,
                     allowed: tuple[IPNetwork, ...]) -> dict[str, Any]:
    check_endpoint_address(target, allowed)
    key = _object_key(storage.bucket_key_prefix)
    size = path.stat().st_size
    started = time.monotonic()
    try:
        client = make_s3_client(target, storage, allowed)
        client.upload_file(str(path), target.bucket_name, key,
                           ExtraArgs={"ContentType": CONTENT_TYPE}, Config=TRANSFER_CONFIG)
        url = client.generate_presigned_url(
            "get_object", Params={"Bucket": target.bucket_name, "Key": key},
            ExpiresIn=_presign_expiry_s(storage))
    except (BotoCoreError, ClientError, S3UploadFailedError) as exc:
        raise _upload_error(exc, target) from exc
    except Exception as exc:  # e.g. a malformed s3Config endpoint: no reason to lose the video
        logger.exception("unexpected error uploading to bucket %r", target.bucket_name)
        raise _upload_error(exc, target) from exc
    # The presigned URL is a bearer credential: it is returned, never logged.
    logger.info("uploaded %d bytes to bucket %r (%s, %s) as %s in %.2f s", size,
                target.bucket_name, target.source, _endpoint_for_messages(target.endpoint_url), key,
                time.monotonic() - started)
    return {"video_url": url, "storage": "s3", "object_key": key}


def _upload_error(exc: BaseException, target: BucketTarget) -> BucketUploadError:
    code, detail = _s3_error(exc)
    endpoint = _endpoint_for_messages(target.endpoint_url)
    message = (f"uploading the video to bucket '{target.bucket_name}' at {endpoint} "
               f"(from {target.source}) failed: {code}" + (f" ({detail})" if detail else ""))
    reason = f"upload to bucket {target.bucket_name} at {endpoint} failed ({code})"
    return BucketUploadError(_redact(message, target), code=_redact(code, target),
                             reason=_redact(reason, target))


def _endpoint_for_messages(endpoint_url: str | None) -> str:
    """The endpoint as messages show it: without user:password@ or a query, should it have one."""
    if not endpoint_url:
        return "AWS S3"
    parts = urlsplit(endpoint_url)
    if "@" not in parts.netloc and not parts.query and not parts.fragment:
        return endpoint_url
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def _s3_error(exc: BaseException) -> tuple[str, str]:
    """(error code, message) of the S3 error behind `exc`, which boto3 may have wrapped."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, EndpointAddressRefused):  # the host's answer changed after the check
            return ENDPOINT_REFUSED_CODE, "the bucket host resolves to a private or local address"
        if isinstance(seen, ClientError):
            error = seen.response.get("Error", {})
            return str(error.get("Code") or "unknown error"), str(error.get("Message") or "")
        seen = seen.__cause__ or seen.__context__
    return type(exc).__name__, str(exc)


def _redact(text: str, target: BucketTarget) -> str:
    # S3 errors do not echo secrets, but a message that reaches the client must never carry one.
    # botocore's connection errors do echo the endpoint URL, user:password@ included.
    userinfo = urlsplit(target.endpoint_url or "").netloc.rpartition("@")[0]
    if userinfo:
        text = text.replace(userinfo + "@", "")
    for secret in (target.secret_access_key, target.access_key_id):
        if secret:
            text = text.replace(secret, "***")
    return text
