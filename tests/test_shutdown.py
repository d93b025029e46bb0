"""A worker with ranks leaves no process behind however it is stopped (issue 17): SIGTERM or SIGINT
while it starts, SIGTERM while idle or during a job, and rank 0 killed outright. Each case runs
`python handler.py --rp_serve_api` at WAN_S2V_WORLD_SIZE=2 on the tiny checkpoint (two CPU
processes over gloo), records every process it starts, stops it, and checks that all are gone."""
import base64
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest
import requests

from conftest import ROOT, speech_excerpt
from test_handler import worker_env

# Generous: a loaded 2-core CI machine starts a rank (torch import, the tiny DiT) in seconds to
# minutes (at a load average of 6 to 8, one test here took 224 s in all), and a rank whose parent
# died may still be importing torch before it can notice; what is checked is that the processes
# end, not how fast.
DEADLINE_S = 600.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class WorkerProcess:
    """The handler process and every process it started, as seen while it ran."""

    def __init__(self, checkpoint, tmp_path) -> None:
        self.port = free_port()
        env = worker_env(checkpoint, WAN_S2V_WORLD_SIZE="2", WORK_DIR=str(tmp_path),
                         PYTHONFAULTHANDLER="1")
        self.log = open(tmp_path / "worker.log", "wb")
        # SIGINT as a worker gets it: a test run started in the background of a shell without job
        # control inherits SIGINT ignored, and so would the worker (Python keeps an inherited
        # ignore), which then never sees the SIGINT the tests send.
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "handler.py"), "--rp_serve_api", "--rp_api_host",
             "127.0.0.1", "--rp_api_port", str(self.port)],
            env=env, cwd=tmp_path, stdout=self.log, stderr=subprocess.STDOUT,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.handle = psutil.Process(self.process.pid)
        self.seen: dict[int, psutil.Process] = {}

    def look(self) -> list[psutil.Process]:
        try:
            for child in self.handle.children(recursive=True):
                self.seen.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            pass
        return list(self.seen.values())

    def ranks(self) -> list[psutil.Process]:
        found = []
        for process in self.look():
            try:
                command = " ".join(process.cmdline())
                if "spawn_main" in command and "resource_tracker" not in command:
                    found.append(process)
            except psutil.Error:
                pass
        return found

    def wait_for(self, condition, what: str) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while not condition():
            assert self.process.poll() is None, f"the worker exited before {what}:\n{self.tail()}"
            assert time.monotonic() < deadline, f"no {what} within {DEADLINE_S} s:\n{self.tail()}"
            time.sleep(0.05)
        self.look()

    def api_ready(self) -> bool:
        self.look()
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def assert_all_gone(self) -> None:
        deadline = time.monotonic() + DEADLINE_S
        try:
            self.process.wait(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            # Where it waits: faulthandler (PYTHONFAULTHANDLER) writes every thread's stack to
            # the log on SIGABRT.
            self.process.send_signal(signal.SIGABRT)
            time.sleep(5)
            pytest.fail(f"the worker did not end within {DEADLINE_S:.0f} s:\n{self.tail(12000)}")
        while alive := [p for p in self.seen.values() if running(p)]:
            assert time.monotonic() < deadline, (
                f"left behind: {[(p.pid, p.cmdline()) for p in alive]}\n{self.tail()}")
            time.sleep(0.1)

    def tail(self, chars: int = 3000) -> str:
        with open(self.log.name, "rb") as log:
            return log.read()[-chars:].decode(errors="replace")

    def kill_all(self) -> None:
        for process in [*self.seen.values(), self.handle]:
            try:
                process.kill()
            except psutil.Error:
                pass
        self.log.close()


def running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def worker_process(tiny_checkpoint, tmp_path):
    started = WorkerProcess(tiny_checkpoint, tmp_path)
    yield started
    started.kill_all()  # whatever a failed test left


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_start_up_stops_every_rank(worker_process, signum):
    """The moment that orphaned rank 1: its process exists, the SDK's handlers are not installed."""
    worker_process.wait_for(worker_process.ranks, "rank process")
    assert not worker_process.api_ready()
    worker_process.process.send_signal(signum)
    worker_process.assert_all_gone()


def test_rank_0_killed_outright_takes_its_ranks_with_it(worker_process):
    """SIGKILL runs no hook at all: the ranks end with their parent by themselves."""
    worker_process.wait_for(worker_process.ranks, "rank process")
    worker_process.process.kill()
    worker_process.assert_all_gone()


def test_sigterm_while_idle_stops_every_rank(worker_process):
    worker_process.wait_for(worker_process.api_ready, "API")
    assert worker_process.ranks()
    worker_process.process.terminate()
    worker_process.assert_all_gone()


def test_sigterm_during_a_job_stops_every_rank(worker_process, portrait_png, tmp_path):
    worker_process.wait_for(worker_process.api_ready, "API")
    speech = speech_excerpt(tmp_path / "speech.wav", 1.0)
    job = {"input": {"image_base64": base64.b64encode(portrait_png.read_bytes()).decode(),
                     "audio_base64": base64.b64encode(speech.read_bytes()).decode(),
                     "resolution": "480p", "sample_steps": 100, "infer_frames": 16, "max_clips": 1,
                     "fps": 16}}
    replies = []
    threading.Thread(target=lambda: replies.append(requests.post(
        f"http://127.0.0.1:{worker_process.port}/runsync", json=job, timeout=DEADLINE_S)),
        daemon=True).start()
    # The runner's line "job <id>: <size>, 1 clip(s) of 16 frames, ...", logged as sampling starts.
    # 100 steps (the most a job may ask for) keep the job running long after that line, also when
    # a loaded machine is slow to notice it.
    worker_process.wait_for(lambda: "clip(s) of" in worker_process.tail(), "job start")
    assert not replies
    worker_process.process.terminate()
    worker_process.assert_all_gone()
