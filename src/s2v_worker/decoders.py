"""Decoders in child processes, read within a deadline: ffmpeg for the audio (media.py), decord
for pose videos (media.py's probe, pose.py's frames). A hostile file can make a decoder crawl or
crash; in a child it can do neither to the worker, and a decoder that overruns DECODE_TIMEOUT_S
is a client error naming the job field.
"""
from __future__ import annotations

import os
import selectors
import subprocess
import time

from .errors import MediaError

# ffmpeg and the decord probe run in child processes with this limit: a hostile file can make a
# decoder crawl (or crash), and neither may hold or take down the job.
DECODE_TIMEOUT_S = 120.0
_PIPE_READ_BYTES = 1 << 20
_STDERR_KEPT_BYTES = 1 << 14


def error_summary(stderr: bytes) -> str:
    lines = [line for line in stderr.decode("utf-8", "replace").splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no error text"



def run_decoder(field: str, command: list[str], what: str) -> subprocess.CompletedProcess:
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
        return f"exit status {returncode}: {error_summary(bytes(self.stderr))}"
