"""Cold start: the checkpoint's large files read into the page cache while the worker imports.

A worker's first 22 s (on the GPU machine, page cache dropped) go to importing torch and the
official model code (diffusers, transformers, the compiler), while the disk, which sets the pace
of the loading that follows, has the checkpoint still to give. `ReadAhead` reads the files the
loaders will read, in the order the start-up needs them (the DiT first: its compilation follows
it), with several threads (the disk gives its full speed to about 8 readers), into the page
cache, from the moment handler.py has its settings. The loaders then find their bytes in memory.
It reads no more than the memory the process may still use (the host's free memory, or the
container's limit when lower) less a reserve for what the loaders keep in host memory, so that
what it reads is not evicted before it is used, and stops once the worker is loaded.

Measured on an H200 machine (docs/deploying.md, "Start-up"): the load after it takes 9 s instead
of 39 s, but the imports, which read their own files from the same disk, take about twice as
long beside it.

Standard library only, and the checkpoint found in the read-ahead's own thread: it starts before
the imports it overlaps. (A ComfyUI set is told apart by reading its headers with comfy.py, which
imports torch: for one, the reading starts once torch is imported.)
"""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable

from .settings import FolderSettings, ModelSettings

logger = logging.getLogger(__name__)

READERS = 8
CHUNK_BYTES = 32 * 2**20
# Host memory left to the loaders and the process: the read-ahead stops before the page cache
# would take it. The most the worker keeps in host memory is the 24 GB tier's (memory.py): T5 and
# 27 of the DiT's blocks pinned, about 21 GiB.
HOST_RESERVE_BYTES = 24 * 2**30


class ReadAhead:
    """Reads the files `find_files()` names into the page cache, with `readers` threads, until
    every one is read, `budget` bytes are (default: the host's free memory less a reserve), or
    `stop()`. `find_files` runs in a thread of its own: `start` returns at once. Any failure
    leaves the rest unread: the start-up finds the checkpoint itself and reports what is wrong."""

    def __init__(self, find_files: Callable[[], list[Path]], budget: int | None = None,
                 readers: int = READERS) -> None:
        self.find_files, self.budget, self.readers = find_files, budget, readers
        self.chunks: list[tuple[Path, int, int]] = []
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        self.next = 0
        self.bytes_read = 0
        self.total = 0  # the bytes to read, once the files are found
        self.started = time.perf_counter()
        self.seconds: float | None = None  # until every chunk was read
        self.threads: list[threading.Thread] = []
        self.starter = threading.Thread(target=self._start, name="read-ahead", daemon=True)

    @classmethod
    def of_checkpoint(cls, model: ModelSettings, folders: FolderSettings) -> "ReadAhead":
        """The worker's checkpoint, as the start-up will find it, read ahead (started)."""
        def find_files() -> list[Path]:
            from .checkpoint import find_checkpoint, large_files

            return large_files(find_checkpoint(model, folders))

        return cls(find_files).start()

    def start(self) -> "ReadAhead":
        self.starter.start()
        return self

    def _start(self) -> None:
        try:
            budget = self.budget
            if budget is None:
                budget = _free_host_memory() - HOST_RESERVE_BYTES
            self.chunks = _chunks(self.find_files(), budget)
            self.total = sum(length for _, _, length in self.chunks)
        except Exception as exc:  # noqa: BLE001  (the start-up reports it)
            logger.debug("no read-ahead: %s", exc)
            return
        self.threads = [threading.Thread(target=self._read, name=f"read-ahead-{i}", daemon=True)
                        for i in range(min(self.readers, len(self.chunks)))]
        for thread in self.threads:
            thread.start()

    def _read(self) -> None:
        buffer = memoryview(bytearray(CHUNK_BYTES))
        files: dict[Path, int] = {}
        try:
            while not self.stopped.is_set():
                with self.lock:
                    if self.next == len(self.chunks):
                        break
                    path, offset, length = self.chunks[self.next]
                    self.next += 1
                if path not in files:
                    files[path] = os.open(path, os.O_RDONLY)
                read = os.preadv(files[path], [buffer[:length]], offset)
                with self.lock:
                    self.bytes_read += read
                    if self.bytes_read == self.total and self.seconds is None:
                        self.seconds = time.perf_counter() - self.started
        except OSError as exc:  # a file gone or unreadable: its loader will say so
            logger.debug("read-ahead stopped: %s", exc)
        finally:
            for fd in files.values():
                os.close(fd)

    def stop(self) -> dict[str, float]:
        """Stop reading; what was read, for the start-up's log line: read_ahead_gb, and
        read_ahead_s when it read all it meant to."""
        self.stopped.set()
        self.starter.join()
        for thread in self.threads:
            thread.join()
        done = {"read_ahead_gb": round(self.bytes_read / 1e9, 1)}
        if self.seconds is not None:
            done["read_ahead_s"] = round(self.seconds, 1)
        return done


def _chunks(files: list[Path], budget: int) -> list[tuple[Path, int, int]]:
    """(file, offset, length) to read, in order, within `budget` bytes."""
    chunks = []
    for path in files:
        size = path.stat().st_size
        for offset in range(0, size, CHUNK_BYTES):
            length = min(CHUNK_BYTES, size - offset)
            if budget < length:
                return chunks
            budget -= length
            chunks.append((path, offset, length))
    return chunks


def _free_host_memory() -> int:
    """What the process may still fill: MemAvailable of /proc/meminfo, or less where the
    container's memory limit (cgroup v2) leaves less; 0 where neither can be read (no read-ahead)."""
    free = _meminfo_available()
    limit = _cgroup_room()
    return free if limit is None else min(free, limit)


def _meminfo_available(path: str = "/proc/meminfo") -> int:
    try:
        with open(path) as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _cgroup_room(folder: str = "/sys/fs/cgroup") -> int | None:
    """memory.max less memory.current of this process's cgroup (v2), None without a limit. The
    page cache counts against a container's limit: past it, what was read first is evicted."""
    try:
        limit = Path(folder, "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int(Path(folder, "memory.current").read_text()))
    except (OSError, ValueError):
        return None
