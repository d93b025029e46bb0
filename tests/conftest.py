"""Shared fixtures: a tiny checkpoint built once per session, test media, the loopback S3 server,
loopback HTTP servers. The worker is the installed s2v_worker package (builder/dev.sh installs it
editable)."""
from __future__ import annotations

import functools
import http.server
import os
import socket
import ssl
import threading
from pathlib import Path
from typing import Iterator, NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent

FIXTURES = ROOT / "tests" / "fixtures"
SPEECH_7S3 = FIXTURES / "speech_7s3.flac"


def speech_excerpt(dest: Path, seconds: float, *codec_args: str) -> Path:
    """The first `seconds` of the 7.3 s speech fixture, written by ffmpeg to `dest` (format by suffix)."""
    import subprocess

    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(SPEECH_7S3), "-t", str(seconds),
                    *codec_args, str(dest)], check=True)
    return dest


S3_ACCESS_KEY = "AKIATESTWORKER000001"
S3_SECRET_KEY = "worker-secret-key-never-shown-0123456789"


def s3_admin(endpoint: str):
    """A boto3 client for test set-up against the loopback S3 server."""
    import boto3
    from botocore.config import Config

    return boto3.session.Session(aws_access_key_id=S3_ACCESS_KEY, aws_secret_access_key=S3_SECRET_KEY,
                                 region_name="us-east-1").client(
        "s3", endpoint_url=endpoint, config=Config(s3={"addressing_style": "path"}))


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 HTTP server (moto) on loopback for the whole session; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


# --- loopback HTTP --------------------------------------------------------------------------------

class LoopbackHTTPServer(http.server.ThreadingHTTPServer):
    """A real HTTP server on a free loopback port, answering with `handler` from daemon threads
    (a handler still busy, e.g. dripping bytes, never holds up the teardown); HTTPS with `tls`.
    Use it as a context manager, or call close()."""

    daemon_threads = True

    def __init__(self, handler, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True)
        self.thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()

    def __exit__(self, *exc) -> None:
        self.close()


class QuietFileHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep test output clean
        pass


class FileServer(NamedTuple):
    url: str  # base URL: f"{url}/name" serves folder / name
    folder: Path


@pytest.fixture
def file_server(tmp_path) -> Iterator[FileServer]:
    """A loopback HTTP server for the files a test writes into tmp_path/served."""
    folder = tmp_path / "served"
    folder.mkdir()
    with LoopbackHTTPServer(functools.partial(QuietFileHandler, directory=str(folder))) as server:
        yield FileServer(server.url, folder)


def with_settings(loader):
    """A media loader called as the runner calls it, from a whole `Settings` (its media limits and
    network policy): `load_image = with_settings(media.load_image)`."""
    def load(source, work_dir, settings):
        return loader(source, work_dir, settings.media, settings.network)

    return load


def deliver(path: Path, settings, override=None) -> dict:
    """storage.deliver_video as the runner calls it, from a whole `Settings`."""
    from s2v_worker.storage import deliver_video

    return deliver_video(path, override, settings.storage, settings.network, settings.folders)


def closed_port_url() -> str:
    """An http:// URL on loopback where nothing listens: a port the system just handed out and
    took back (connections are refused at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# --- the tiny checkpoint and media -----------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from builder.make_tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "Wan2.2-S2V-14B")


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_checkpoint):
    """The worker's pipeline on the tiny checkpoint, on the CPU, loaded once per session."""
    return load_tiny_pipeline(tiny_checkpoint)


def load_tiny_pipeline(folder: Path):
    """A pipeline as the worker loads one, from a checkpoint folder, on the CPU."""
    import torch

    from s2v_worker.checkpoint import read_checkpoint
    from s2v_worker.loading import load_pipeline
    from s2v_worker.settings import ModelSettings

    return load_pipeline(read_checkpoint(folder), torch.device("cpu"), ModelSettings())


def plan_job(pipeline, image_path: Path, audio_seconds: float, generation):
    """The job's ClipPlan as the runner makes it: the video's size from the image's header."""
    from PIL import Image

    from s2v_worker.planning import plan_clips, video_size

    with Image.open(image_path) as image:
        width, height = image.size
    size = video_size(width, height, pipeline.checkpoint.max_area[generation.resolution],
                      generation.resolution)
    return plan_clips(size, audio_seconds, generation)


def generate_video(pipeline, image_path: Path, audio_path: Path, plan, generation, seed: int,
                   **options):
    """`pipeline.generate`'s frames collected into one tensor [3, frames, H, W] (the worker
    streams them to the MP4 encoder instead)."""
    import torch

    pieces = []
    pipeline.generate(image_path, audio_path, plan, generation, seed, on_frames=pieces.append,
                      **options)
    return torch.cat(pieces, dim=1)


@pytest.fixture(scope="session")
def portrait_png(tmp_path_factory) -> Path:
    """A 3:4 portrait drawn with Pillow (the model's output is noise anyway on the tiny checkpoint)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (192, 256), (70, 110, 160))
    draw = ImageDraw.Draw(image)
    draw.ellipse([50, 50, 142, 170], fill=(232, 190, 160))
    draw.ellipse([72, 92, 88, 104], fill=(255, 255, 255))
    draw.ellipse([104, 92, 120, 104], fill=(255, 255, 255))
    draw.arc([78, 120, 114, 146], 20, 160, fill=(150, 60, 60), width=3)
    path = tmp_path_factory.mktemp("media") / "portrait.png"
    image.save(path)
    return path


def pytest_configure(config):
    # On a CPU-only machine, one torch (OpenMP) thread per process: this one, the worker processes
    # tests start (handler.py, ranks) and their children (the variable is inherited). The CPU suite
    # runs on 2 shared cores, and OpenMP threads spin while they wait for each other: next to any
    # other busy process (a rank, an API server, a second suite) a 2-thread process ran the tiny
    # jobs 4-5 times slower (a tiny 3-clip generate: 4.4 s alone with 2 threads, 18-23 s with 2
    # threads beside one more such process, 3.9-4.8 s with one thread each). The GPU tests
    # (tests/gpu) keep torch's default: the official pipeline runs wav2vec2 on the host's cores.
    import torch

    if "OMP_NUM_THREADS" not in os.environ and not torch.cuda.is_available():
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    # The official Wan2.2 modules use the deprecated torch.cuda.amp API (warned at every call), and
    # on a CPU-only machine torch says once more that CUDA autocast is off: noise in test output.
    config.addinivalue_line("filterwarnings", r"ignore::FutureWarning:wan(\.|$)")
    config.addinivalue_line("filterwarnings", "ignore:CUDA is not available:UserWarning")
