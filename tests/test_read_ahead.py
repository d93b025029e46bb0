"""The cold start's read-ahead (read_ahead.py): the checkpoint's files read into the page cache
while the worker imports, within the host's free memory, stopped once the worker is loaded, and
never in the way of a start-up that finds no checkpoint."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import ROOT
from s2v_worker import read_ahead
from s2v_worker.checkpoint import large_files, read_checkpoint
from s2v_worker.read_ahead import ReadAhead
from s2v_worker.settings import Settings


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    sizes = [5 * 1024 + 3, 64, 2 * 1024]
    paths = []
    for i, size in enumerate(sizes):
        path = tmp_path / f"part-{i}.bin"
        path.write_bytes(os.urandom(size))
        paths.append(path)
    return paths


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(read_ahead, "CHUNK_BYTES", 1024)


def recording_preadv(monkeypatch) -> list[tuple[str, int, int]]:
    """Every read the read-ahead makes: (file name, offset, bytes)."""
    reads, names, lock = [], {}, threading.Lock()
    real_open, real_preadv = os.open, os.preadv

    def opened(path, flags, *args):
        fd = real_open(path, flags, *args)
        names[fd] = Path(path).name
        return fd

    def preadv(fd, buffers, offset):
        read = real_preadv(fd, buffers, offset)
        with lock:
            reads.append((names[fd], offset, read))
        return read

    monkeypatch.setattr(read_ahead.os, "open", opened)
    monkeypatch.setattr(read_ahead.os, "preadv", preadv)
    return reads


def test_every_byte_of_every_file_is_read_once(files, small_chunks, monkeypatch):
    reads = recording_preadv(monkeypatch)
    ahead = ReadAhead(lambda: files, budget=10**9, readers=3).start()
    ahead.starter.join()
    for thread in ahead.threads:
        thread.join()
    done = ahead.stop()
    total = sum(p.stat().st_size for p in files)
    assert ahead.bytes_read == total and done["read_ahead_s"] >= 0
    expected = {(p.name, offset, min(1024, p.stat().st_size - offset))
                for p in files for offset in range(0, p.stat().st_size, 1024)}
    assert sorted(reads) == sorted(expected)  # each piece once, nothing else


def test_it_reads_no_more_than_its_budget_in_the_files_order(files, small_chunks, monkeypatch):
    reads = recording_preadv(monkeypatch)
    ahead = ReadAhead(lambda: files, budget=4 * 1024 + 500, readers=2).start()
    ahead.starter.join()
    for thread in ahead.threads:
        thread.join()
    done = ahead.stop()
    # Whole pieces only, the first file's first four: the budget's rest does not hold a fifth.
    assert sorted(reads) == [("part-0.bin", offset, 1024) for offset in range(0, 4096, 1024)]
    assert done == {"read_ahead_gb": 0.0, "read_ahead_s": done["read_ahead_s"]}


def test_the_budget_is_the_hosts_free_memory_less_a_reserve(files, small_chunks, monkeypatch):
    reads = recording_preadv(monkeypatch)
    monkeypatch.setattr(read_ahead, "_free_host_memory",
                        lambda: read_ahead.HOST_RESERVE_BYTES + 2048)
    ahead = ReadAhead(lambda: files).start()
    ahead.starter.join()
    for thread in ahead.threads:
        thread.join()
    ahead.stop()
    assert sorted(reads) == [("part-0.bin", 0, 1024), ("part-0.bin", 1024, 1024)]
    monkeypatch.setattr(read_ahead, "_free_host_memory", lambda: read_ahead.HOST_RESERVE_BYTES)
    reads.clear()
    assert ReadAhead(lambda: files).start().stop() == {"read_ahead_gb": 0.0}
    assert reads == []


def test_stop_ends_the_reading_at_once(files, small_chunks, monkeypatch):
    """A read-ahead still reading when the worker is loaded stops after its readers' current
    pieces: here each piece waits until the test lets it go."""
    release, started = threading.Event(), threading.Event()
    real_preadv = os.preadv

    def held(fd, buffers, offset):
        started.set()
        release.wait(60)
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(read_ahead.os, "preadv", held)
    ahead = ReadAhead(lambda: files, budget=10**9, readers=2).start()
    assert started.wait(60)
    ahead.stopped.set()  # what stop() does first: the readers' pieces in flight end after it
    release.set()
    done = ahead.stop()
    assert ahead.bytes_read <= 2 * 1024 and "read_ahead_s" not in done  # not all of it


def test_a_start_up_without_a_checkpoint_reads_nothing_and_raises_nothing(tmp_path, caplog):
    """The start-up itself reports the missing checkpoint; the read-ahead only notes why it read
    nothing."""
    settings = Settings.from_env({"WAN_S2V_CKPT_DIR": str(tmp_path / "nowhere"),
                                  "NETWORK_VOLUME_DIR": str(tmp_path / "no-volume")})
    with caplog.at_level("DEBUG", logger="s2v_worker.read_ahead"):
        ahead = ReadAhead.of_checkpoint(settings.model, settings.folders)
        assert ahead.stop() == {"read_ahead_gb": 0.0}
    assert ahead.chunks == [] and ahead.threads == []
    [record] = [r for r in caplog.records if r.name == "s2v_worker.read_ahead"]
    assert record.getMessage().startswith(f"no read-ahead: WAN_S2V_CKPT_DIR={tmp_path / 'nowhere'} "
                                          "is neither a complete")


def test_a_containers_memory_limit_bounds_the_budget(tmp_path, monkeypatch):
    """The page cache counts against a container's memory limit (cgroup v2), which RunPod's
    host's MemAvailable does not show."""
    (tmp_path / "memory.max").write_text("68719476736\n")  # 64 GiB
    (tmp_path / "memory.current").write_text(str(24 * 2**30))
    assert read_ahead._cgroup_room(str(tmp_path)) == 40 * 2**30
    (tmp_path / "memory.max").write_text("max\n")
    assert read_ahead._cgroup_room(str(tmp_path)) is None
    assert read_ahead._cgroup_room(str(tmp_path / "absent")) is None
    monkeypatch.setattr(read_ahead, "_meminfo_available", lambda: 100 * 2**30)
    monkeypatch.setattr(read_ahead, "_cgroup_room", lambda: 40 * 2**30)
    assert read_ahead._free_host_memory() == 40 * 2**30
    monkeypatch.setattr(read_ahead, "_cgroup_room", lambda: None)
    assert read_ahead._free_host_memory() == 100 * 2**30


def test_the_official_layout_is_read_dit_first(tiny_checkpoint):
    names = [p.relative_to(tiny_checkpoint).as_posix()
             for p in large_files(read_checkpoint(tiny_checkpoint))]
    assert names == [*(f"diffusion_pytorch_model-0000{i}-of-00004.safetensors" for i in range(1, 5)),
                     "models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth",
                     "wav2vec2-large-xlsr-53-english/model.safetensors"]


def test_the_read_ahead_starts_before_torch_is_imported(tiny_checkpoint):
    """handler.main() starts it from its settings before it imports the worker's runner: when it
    starts, torch (20 s of a cold start, which the read-ahead is there to overlap) is not imported
    yet, and finding an official checkpoint does not import it either."""
    probe = """
import sys
sys.argv = ["handler.py"]
import handler
from s2v_worker import read_ahead
from s2v_worker.read_ahead import ReadAhead

read_ahead.HOST_RESERVE_BYTES = 0  # this machine's memory is less than the worker's reserve

class Started(Exception):
    pass

def of_checkpoint(model, folders):
    ahead = real(model, folders)
    ahead.starter.join()
    print("torch imported:", "torch" in sys.modules, "files found:", len(ahead.chunks) > 0)
    ahead.stop()
    raise Started  # main() goes no further: the worker is not built

real = ReadAhead.of_checkpoint
handler.ReadAhead.of_checkpoint = of_checkpoint
try:
    handler.main()
except Started:
    pass
"""
    env = {**os.environ, "WAN_S2V_CKPT_DIR": str(tiny_checkpoint)}
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert "torch imported: False files found: True" in out.stdout, out.stderr[-2000:]
