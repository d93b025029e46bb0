"""Where the finished MP4 goes: a bucket, the job's answer itself, or the network volume.

The order is the product contract. A bucket (the job's s3Config, else the BUCKET_* settings) gets
every video and the client a presigned link. Without one, a small video comes back inline as base64,
a large one is copied to the network volume, and when there is no volume the job fails with a
message saying how to configure storage; the worker never answers with a path only it can read.

When the bucket upload fails (after botocore's bounded retries), the same fallbacks apply, and the
output carries a "warnings" entry saying that the upload failed and why. No finished video is ever
dropped silently: when nothing can take it, the MP4 is moved to the undelivered folder
(UNDELIVERED_DIR) under a random name, and the job's error names that file.

A streaming job's clips (`ClipDelivery`) go the same way, inline only within a stream item's size.
A clip that nothing can take is an item without video that says why, never an error and never
kept: the whole video, delivered last, has its frames.
"""
from __future__ import annotations

import base64
import errno
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from .bucket import BucketUploadError, bucket_target, upload_to_bucket
from .errors import StorageError
from .job import StorageOverride
from .settings import FolderSettings, NetworkSettings, StorageSettings, writable_dir

logger = logging.getLogger(__name__)

VOLUME_SUBDIR = "wan-s2v-outputs"
UNDELIVERED_SUBDIR = "wan-s2v-undelivered"
# A stream item's own limit: RunPod takes at most 1 MB per streamed item, and base64 adds a third,
# so a clip comes back inline only up to this size (and MAX_INLINE_VIDEO_BYTES).
MAX_INLINE_CLIP_BYTES = 700_000


def deliver_video(path: Path, override: StorageOverride | None, storage: StorageSettings,
                  network: NetworkSettings, folders: FolderSettings) -> dict[str, Any]:
    """Put the finished video where the client can fetch it; return the output's storage fields.

    The fields are video_url, video_base64 or video_path, with storage (and object_key for a
    bucket); after a failed upload also "warnings", a list of messages for the client. When no
    storage can take the video, it is moved (so `path` is gone) to the undelivered folder and
    StorageError names the file.
    """
    target = bucket_target(storage, override)
    if target is None:
        return _deliver_without_bucket(path, storage, folders)
    try:
        return upload_to_bucket(path, target, storage, network.allowed_private_networks)
    except BucketUploadError as failure:
        return _deliver_after_upload_failure(path, storage, folders, failure)


class ClipDelivery:
    """A streaming job's clips, each delivered as the whole video is: to the bucket; else inline
    up to MAX_INLINE_CLIP_BYTES (or MAX_INLINE_VIDEO_BYTES, if smaller); else to the network
    volume; else not at all, which the item's "warnings" say. Once an upload has failed, later
    clips skip the bucket: a dead bucket would hold each clip up for its retries (the whole
    video still tries it)."""

    def __init__(self, override: StorageOverride | None, storage: StorageSettings,
                 network: NetworkSettings, folders: FolderSettings) -> None:
        self.target = bucket_target(storage, override)
        self.storage, self.network, self.folders = storage, network, folders
        self.inline_limit = min(storage.max_inline_video_bytes, MAX_INLINE_CLIP_BYTES)
        self.upload_failed = False

    def deliver(self, path: Path, name: str) -> dict[str, Any]:
        """The item's storage fields, as deliver_video's, or none and "warnings" saying why
        (`name` is the clip's, for them). Never raises; `path` is left where it is."""
        warnings = []
        if self.target is not None:
            if not self.upload_failed:
                try:
                    return upload_to_bucket(path, self.target, self.storage,
                                            self.network.allowed_private_networks)
                except BucketUploadError as failure:
                    logger.warning("%s: %s", name, failure)
                    self.upload_failed = True
                    warnings.append(f"{name}: {failure.reason}")
            else:
                warnings.append(f"{name}: not uploaded, as the upload of an earlier clip failed")
        size = path.stat().st_size
        if size <= self.inline_limit:
            return {**_inline(path, size), **({"warnings": warnings} if warnings else {})}
        if writable_dir(self.folders.network_volume_dir):
            try:
                return {**copy_to_volume(path, self.folders.network_volume_dir),
                        **({"warnings": warnings} if warnings else {})}
            except StorageError as exc:
                problem = f"{exc}"
        else:
            problem = (f"it is {size} bytes, more than a clip returns inline "
                       f"({self.inline_limit} bytes), and there is no network volume at "
                       f"{self.folders.network_volume_dir}"
                       f"{'' if self.target is not None else ' and no bucket'}")
        logger.warning("%s was not delivered: %s", name, problem)
        return {"warnings": [*warnings, f"{name} was not delivered ({problem}); its frames are "
                                        "in the whole video, which comes last"]}


# --- without a bucket, or after the upload failed ------------------------------------------------

def _deliver_without_bucket(path: Path, storage: StorageSettings,
                            folders: FolderSettings) -> dict[str, Any]:
    size = path.stat().st_size
    if size <= storage.max_inline_video_bytes:
        return _inline(path, size)
    volume = folders.network_volume_dir
    if writable_dir(volume):
        try:
            return copy_to_volume(path, volume)
        except StorageError as exc:
            nowhere = f"{exc}"
    else:
        nowhere = "there is nowhere else to put it"
    problem = (
        f"the video is {size} bytes, too large to return inline (MAX_INLINE_VIDEO_BYTES is "
        f"{storage.max_inline_video_bytes} bytes), and {nowhere}. Configure "
        "a bucket with BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID, BUCKET_SECRET_ACCESS_KEY and "
        "BUCKET_NAME, or send the job's s3Config, or attach a network volume at "
        f"{folders.network_volume_dir} (NETWORK_VOLUME_DIR).")
    raise StorageError(_keep_and_describe(path, folders, problem))


def _deliver_after_upload_failure(path: Path, storage: StorageSettings, folders: FolderSettings,
                                  failure: BucketUploadError) -> dict[str, Any]:
    """The upload failed: deliver the video as if there were no bucket, and say so."""
    size = path.stat().st_size
    if size <= storage.max_inline_video_bytes:
        logger.warning("%s; returning the video inline instead", failure)
        return {**_inline(path, size),
                "warnings": [f"{failure.reason}; the video is returned inline instead"]}
    volume = folders.network_volume_dir
    if writable_dir(volume):
        try:
            delivered = copy_to_volume(path, volume)
        except StorageError as exc:
            nowhere = f"{exc}"
        else:
            logger.warning("%s; the video is on the network volume instead", failure)
            return {**delivered, "warnings": [
                f"{failure.reason}; the video is on the network volume instead (video_path)"]}
    else:
        nowhere = f"no network volume is mounted at {folders.network_volume_dir}"
    problem = (f"{failure}. The video is {size} bytes, too large to return inline "
               f"(MAX_INLINE_VIDEO_BYTES is {storage.max_inline_video_bytes} bytes), and "
               f"{nowhere}.")
    raise StorageError(_keep_and_describe(path, folders, problem)) from failure


def _inline(path: Path, size: int) -> dict[str, Any]:
    logger.info("returning the video inline (%d bytes)", size)
    return {"video_base64": base64.b64encode(path.read_bytes()).decode("ascii"),
            "storage": "inline"}


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
        _remove_quietly(partial)
        raise StorageError(f"copying the video to the network volume at {folder} failed: "
                           f"{exc.strerror or exc}") from exc
    logger.info("copied the video (%d bytes) to the network volume as %s",
                destination.stat().st_size, destination)
    return {"video_path": str(destination), "storage": "network_volume"}


# --- the undelivered folder --------------------------------------------------------------------

def undelivered_dir(folders: FolderSettings) -> Path:
    """UNDELIVERED_DIR; else wan-s2v-undelivered on the volume if mounted, else in temp."""
    return folders.lasting(folders.undelivered_dir, UNDELIVERED_SUBDIR)


def _keep_and_describe(path: Path, folders: FolderSettings, problem: str) -> str:
    """Keep the video in the undelivered folder; `problem` plus where it is (or that it is lost)."""
    candidates = [undelivered_dir(folders)]
    last_resort = Path(tempfile.gettempdir()).absolute() / UNDELIVERED_SUBDIR
    if last_resort not in candidates:
        candidates.append(last_resort)
    failures = []
    for folder in candidates:
        try:
            kept = keep_undelivered(path, folder)
        except OSError as exc:
            failures.append(f"{folder}: {exc.strerror or exc}")
            logger.error("keeping the undelivered video in %s failed: %s", folder, exc)
            continue
        logger.error("the video could not be delivered and was kept at %s: %s", kept, problem)
        return (f"{problem} The video was kept on the worker at {kept} "
                "(UNDELIVERED_DIR) so that it is not lost.")
    logger.error("the video could not be delivered or kept, and is lost: %s", problem)
    return f"{problem} Keeping the video failed too ({'; '.join(failures)}), so it is lost."


def keep_undelivered(path: Path, folder: Path) -> Path:
    """Move the video into `folder` under a random name; return its new path."""
    # 0o700: under the shared temp folder, other users can neither list nor read kept videos.
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    name = uuid.uuid4().hex
    destination = folder / f"{name}.mp4"
    try:
        os.rename(path, destination)  # same file system: instant, atomic, needs no more space
        return destination
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    partial = folder / f".{name}.mp4.partial"
    try:
        shutil.copyfile(path, partial)
        os.replace(partial, destination)
    except OSError:
        _remove_quietly(partial)
        raise
    _remove_quietly(path)  # the job's folder is deleted anyway; this only frees the space sooner
    return destination


def _remove_quietly(path: Path) -> None:
    # Not unlink(missing_ok=True) alone: where the folder is a file, that raises NotADirectoryError.
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass
