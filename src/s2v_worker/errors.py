"""What a job can end with, told apart by what the worker should do about it.

Every stage raises a subclass of `JobError` (job.JobInputError, MediaError, lora.LoraError,
StorageError, parallel.RankFailure, JobStopped) with a message that is safe to return to
the client: it names the job field and the rule, never a path, a key or a traceback. The runner
catches `JobError` once and answers RunPod with `{"error": message}`, adding
`"refresh_worker": true` when the error's `refresh_worker` says the GPU may be in doubt, which makes
RunPod replace the worker after the job. What the job's input causes never asks for that.
(video.VideoEncodingError is not a JobError: its message holds ffmpeg's log, so the runner logs it
and answers with a message of its own.)
"""
from __future__ import annotations


class JobError(Exception):
    """A job's end that the client is told about, with the message as it is."""

    refresh_worker = False

    def result(self) -> dict:
        """RunPod's answer for this job."""
        return {"error": str(self), **({"refresh_worker": True} if self.refresh_worker else {})}


class MediaError(JobError, ValueError):
    """An input (media, or a LoRA file's download) could not be fetched or decoded. The message
    is safe to return to the client."""


class StorageError(JobError, RuntimeError):
    """The video could not be delivered. The message is safe to return to the client."""


class JobStopped(JobError):
    """The job was cancelled or ran past its time limit; every stage checks between its steps."""
