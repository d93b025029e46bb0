"""The worker end to end, as users run it: `python handler.py --test_input ...` and the runpod SDK's
local HTTP API (`--rp_serve_api`, POST /runsync), on the tiny checkpoint, with a real S3 server
(moto) on loopback, real ffmpeg, and the MP4 checked with ffprobe."""
import ast
import base64
import http.server
import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from conftest import ROOT, LoopbackHTTPServer, S3_ACCESS_KEY, S3_SECRET_KEY, SPEECH_7S3, s3_admin, speech_excerpt

SERVER_BUCKET, JOB_BUCKET = "runsync-videos", "cli-job-videos"


def ffprobe(path: Path) -> dict:
    out = subprocess.run(["ffprobe", "-v", "error", "-show_streams", "-show_format", "-of", "json",
                          str(path)], check=True, capture_output=True, text=True).stdout
    info = json.loads(out)
    streams = {s["codec_type"]: s for s in info["streams"]}
    return {"video": streams.get("video"), "audio": streams.get("audio"),
            "duration": float(info["format"]["duration"])}


def assert_plays_as_long_as_the_audio(path: Path, fps: int, seconds: float = 7.3) -> None:
    info = ffprobe(path)
    assert info["video"]["codec_name"] == "h264" and info["video"]["pix_fmt"] == "yuv420p"
    assert info["video"]["avg_frame_rate"] == f"{fps}/1"
    assert info["audio"]["codec_name"] == "aac"
    assert info["duration"] == pytest.approx(seconds, abs=0.1)


def worker_env(checkpoint: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BUCKET_", "RUNPOD_"))}
    env.update({"WAN_S2V_CKPT_DIR": str(checkpoint), "NETWORK_VOLUME_DIR": "/nonexistent-volume", **extra})
    return env


@pytest.fixture(scope="module")
def speech_mp3(tmp_path_factory) -> Path:
    """2 s of the speech as a 32 kb/s MP3 (one clip; the two-clip 7.3 s job runs in the other
    end-to-end tests): small enough for one command-line argument (128 KiB)."""
    return speech_excerpt(tmp_path_factory.mktemp("mp3") / "speech.mp3", 2.0, "-c:a", "libmp3lame",
                          "-b:a", "32k")


def speech_job(audio_path: Path = SPEECH_7S3, **fields) -> dict:
    audio = base64.b64encode(audio_path.read_bytes()).decode()
    return {"input": {"image_base64": None, "audio_base64": audio, "resolution": "480p",
                      "sample_steps": 2, "seed": 11, **fields}}


def with_image(job: dict, image: Path) -> dict:
    job["input"]["image_base64"] = base64.b64encode(image.read_bytes()).decode()
    return job


# --- `python handler.py --test_input` ----------------------------------------------------------------

def run_cli(job: dict, env: dict, tmp_path: Path, as_file: bool = False,
            timeout_s: float = 600) -> tuple[int, dict | None, str]:
    """`python handler.py --test_input JOB`, or with as_file, JOB as test_input.json in the cwd."""
    args = [sys.executable, str(ROOT / "handler.py")]
    if as_file:
        (tmp_path / "test_input.json").write_text(json.dumps(job))
    else:
        args += ["--test_input", json.dumps(job)]
    result = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=timeout_s)
    log = result.stdout + result.stderr
    marker = "Job result: "
    line = next((l for l in log.splitlines() if marker in l), None)
    payload = ast.literal_eval(line.split(marker, 1)[1]) if line else None
    return result.returncode, payload, log


def test_test_input_json_video_on_the_volume_with_its_audio(tiny_checkpoint, portrait_png, tmp_path):
    # The SDK's local mode logs the result on one line and cuts long lines, so the video is kept as
    # a file (the network-volume fallback) rather than inline base64 here; test_storage covers inline.
    volume = tmp_path / "volume"
    volume.mkdir()
    env = worker_env(tiny_checkpoint, NETWORK_VOLUME_DIR=str(volume), MAX_INLINE_VIDEO_BYTES="1")
    code, payload, log = run_cli(with_image(speech_job(), portrait_png), env, tmp_path, as_file=True)
    assert code == 0, log[-3000:]
    output = payload["output"]
    assert output["storage"] == "network_volume" and output["seed"] == 11 and output["num_clips"] == 2
    video = Path(output["video_path"])
    assert video.parent == volume / "wan-s2v-outputs"
    assert_plays_as_long_as_the_audio(video, fps=24)
    assert (output["fps"], output["duration_s"]) == (24, pytest.approx(7.3, abs=0.1))
    assert set(output["timings"]) >= {"download_s", "text_encoding_s", "audio_encoding_s",
                                      "sampling_s", "decoding_s", "encoding_s", "upload_s", "total_s"}
    assert job_input_not_logged(log)


def job_input_not_logged(log: str, audio: Path = SPEECH_7S3) -> bool:
    return base64.b64encode(audio.read_bytes()).decode()[1000:1100] not in log


def test_cli_job_s3config_uploads_to_the_jobs_bucket(tiny_checkpoint, portrait_png, tmp_path, s3_server,
                                                     speech_mp3):
    s3_admin(s3_server).create_bucket(Bucket=JOB_BUCKET)
    job = with_image(speech_job(speech_mp3, fps=16), portrait_png)
    job["s3Config"] = {"accessId": S3_ACCESS_KEY, "accessSecret": S3_SECRET_KEY,
                       "bucketName": JOB_BUCKET, "endpointUrl": s3_server}
    env = worker_env(tiny_checkpoint, RUNPOD_LOG_LEVEL="info", ALLOWED_PRIVATE_NETWORKS="127.0.0.0/8")
    code, payload, log = run_cli(job, env, tmp_path)
    assert code == 0, log[-3000:]
    output = payload["output"]
    assert output["storage"] == "s3"
    video = tmp_path / "from_s3.mp4"
    video.write_bytes(requests.get(output["video_url"], timeout=30).content)
    assert_plays_as_long_as_the_audio(video, fps=16, seconds=2.0)
    assert S3_SECRET_KEY not in log and job_input_not_logged(log, speech_mp3)


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_cli_bad_job_is_a_clear_error(tiny_checkpoint, tmp_path, world_size):
    # With a second rank the process must still end after the job (it once waited on the rank).
    job = {"input": {"image_url": "https://example.com/a.png", "audio_base64": "AAAA", "steps": 3}}
    # run_cli's generous default time-out (600 s): under load the two-rank case took 94 s of the
    # 120 s it once had here. A process that does not end after the job still fails at 600 s.
    code, _, log = run_cli(job, worker_env(tiny_checkpoint, WAN_S2V_WORLD_SIZE=world_size),
                           tmp_path)
    assert code == 1
    assert "unknown input fields: steps" in log and "Traceback" not in log


# --- the local HTTP API: /runsync --------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def api_server(checkpoint: Path, s3_endpoint: str, log: Path, **extra_env: str):
    """handler.py --rp_serve_api with a bucket configured; yields (base URL, log path, pid)."""
    port = free_port()
    env = worker_env(checkpoint, BUCKET_ENDPOINT_URL=s3_endpoint, BUCKET_ACCESS_KEY_ID=S3_ACCESS_KEY,
                     BUCKET_SECRET_ACCESS_KEY=S3_SECRET_KEY, BUCKET_NAME=SERVER_BUCKET,
                     ALLOWED_PRIVATE_NETWORKS="127.0.0.0/8",  # the S3 server is on loopback
                     MALLOC_ARENA_MAX="2",  # as the Dockerfile sets it (test_packaging.py)
                     **extra_env)
    with open(log, "w") as sink:
        server = subprocess.Popen([sys.executable, str(ROOT / "handler.py"), "--rp_serve_api",
                                   "--rp_api_host", "127.0.0.1", "--rp_api_port", str(port)],
                                  env=env, stdout=sink, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    # Generous: a loaded CI machine may take long to start the server or to answer its first
    # request; a slow answer is waited for again, not taken for a failure.
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        assert server.poll() is None, log.read_text()[-3000:]
        try:
            requests.get(f"{base}/docs", timeout=10)
            break
        except (requests.ConnectionError, requests.Timeout):
            time.sleep(0.5)
    else:
        pytest.fail("the API server did not start:\n" + log.read_text()[-3000:])
    try:
        yield base, log, server.pid
    finally:
        server.terminate()
        server.wait(timeout=300)


@pytest.fixture(scope="module")
def api(tiny_checkpoint, s3_server, tmp_path_factory):
    s3_admin(s3_server).create_bucket(Bucket=SERVER_BUCKET)
    with api_server(tiny_checkpoint, s3_server, tmp_path_factory.mktemp("api") / "server.log") as server:
        yield server


def runsync(base: str, job: dict) -> dict:
    response = requests.post(f"{base}/runsync", json=job, timeout=600)
    assert response.status_code == 200
    return response.json()


def test_runsync_7s3_speech_returns_a_url_serving_a_7s3_24fps_mp4(api, portrait_png, tmp_path):
    base, log, _ = api
    reply = runsync(base, with_image(speech_job(prompt="a person talks"), portrait_png))
    assert reply["status"] == "COMPLETED", reply
    output = reply["output"]
    assert output["storage"] == "s3" and output["object_key"].startswith("wan-s2v/")
    video = tmp_path / "runsync.mp4"
    video.write_bytes(requests.get(output["video_url"], timeout=30).content)
    assert_plays_as_long_as_the_audio(video, fps=24)
    assert (output["width"], output["height"], output["num_frames"]) == (64, 64, 176)
    assert output["settings"]["seed"] == 11 and output["settings"]["prompt"] == "a person talks"
    assert S3_SECRET_KEY not in log.read_text()


def test_bad_jobs_fail_clearly_and_the_worker_keeps_serving(api, portrait_png):
    base, log, _ = api
    bad = [
        ({"input": {"audio_base64": "AAAA"}}, "needs one of 'image_url' or 'image_base64'"),
        (with_image(speech_job(resolution="4k"), portrait_png), "'resolution' must be one of"),
        ({"input": {**speech_job()["input"], "image_base64": base64.b64encode(b"not an image").decode()}},
         "'image_base64' is not a readable image"),
        (with_image({"input": {"audio_base64": base64.b64encode(b"\x00" * 999).decode()}}, portrait_png),
         "'audio_base64' is not a readable audio file"),
    ]
    for job, fragment in bad:
        reply = runsync(base, job)
        assert reply["status"] == "FAILED" and fragment in reply["error"], reply
        assert "Traceback" not in reply["error"]
    good = runsync(base, with_image(speech_job(max_clips=1, sample_steps=1), portrait_png))
    assert good["status"] == "COMPLETED", good
    assert good["output"]["duration_s"] == pytest.approx(77 / 16, abs=0.07)  # one clip, cut short


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_twenty_jobs_at_once_all_complete_unmixed_and_memory_stays_flat(api, portrait_png, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    base, _, server_pid = api
    speech_1s = tmp_path / "speech_1s.wav"
    speech_excerpt(speech_1s, 1.0)

    def submit(index: int) -> tuple[int, dict]:
        # One 20-frame clip (the second of speech is 16 frames, plus the 3 the first clip drops):
        # a quarter of the default clip's decode, which was most of a job's time here.
        job = with_image(speech_job(speech_1s, seed=1000 + index, prompt=f"job number {index}",
                                    sample_steps=1, fps=16, infer_frames=20), portrait_png)
        return index, runsync(base, job)

    def run_batch(indices: range) -> None:
        with ThreadPoolExecutor(max_workers=len(indices)) as pool:
            replies = list(pool.map(submit, indices))
        for index, reply in replies:
            assert reply["status"] == "COMPLETED", reply
            settings = reply["output"]["settings"]
            assert (settings["seed"], settings["prompt"]) == (1000 + index, f"job number {index}")
        assert len({reply["output"]["object_key"] for _, reply in replies}) == len(indices)

    run_batch(range(20))  # twenty at once: all complete, none lost or mixed
    run_batch(range(20, 30))  # and ten at once, the shape of the batches measured below
    # Memory: the first batch grows the process once (executor threads, their malloc arenas,
    # allocator caches); after that it must stay flat. RSS moves by tens of MB from batch to batch
    # and sometimes jumps for a batch and comes back (90 20-frame jobs, one torch thread: 1621 MB
    # after the twenty, then 1643, 1701, 1646, 1696, 1600, 1772, 1678 MB after each ten; on
    # 97273cf this test once failed on [1701, 1778, 1740, 1841] MB). A leak raises every later
    # sample, a jump only one: the lower of the samples 20 and 30 jobs after the first batch of
    # ten must be under 64 MB above the sample right after it: about 3 MB a job, were it all a
    # leak. (Without MALLOC_ARENA_MAX=2 resident memory rose by 50-90 MB over the first 50 jobs and
    # then stayed flat over 120 more: [1771, 1785, 1859, 1867] MB; with it, [1581, 1582, 1591, 1592].)
    memory = [rss_mb(server_pid)]
    for start in (30, 40, 50):
        run_batch(range(start, start + 10))
        memory.append(rss_mb(server_pid))
    growth = min(memory[-2:]) - memory[0]
    assert growth < 64, f"worker memory grew by {growth:.0f} MB over 20 jobs and more: {memory}"


def decoded_frames(video: Path) -> bytes:
    return subprocess.run(["ffmpeg", "-v", "error", "-i", str(video), "-f", "rawvideo",
                           "-pix_fmt", "rgb24", "-"], check=True, capture_output=True).stdout


def test_a_job_on_two_ranks_matches_one_gpu_frame_for_frame(api, tiny_checkpoint, s3_server,
                                                             portrait_png, tmp_path):
    """WAN_S2V_WORLD_SIZE=2 (two CPU processes over gloo here, two GPUs on RunPod): the same job
    gives the same video as the one-process worker, through the local API."""
    job = with_image(speech_job(prompt="two ranks", max_clips=1, sample_steps=3), portrait_png)
    videos = {}
    with api_server(tiny_checkpoint, s3_server, tmp_path / "two.log",
                    WAN_S2V_WORLD_SIZE="2") as (base, log, _):
        reply = runsync(base, job)
        assert reply["status"] == "COMPLETED", reply
        assert reply["output"]["parallel"] == {"world_size": 2, "cfg_parallel": True,
                                               "sequence_parallel": 1}
        videos[2] = reply["output"]["video_url"]
        assert "all 2 ranks ready" in log.read_text()
    reply = runsync(api[0], job)
    assert reply["output"]["parallel"]["world_size"] == 1
    videos[1] = reply["output"]["video_url"]
    frames = {}
    for world_size, url in videos.items():
        path = tmp_path / f"world{world_size}.mp4"
        path.write_bytes(requests.get(url, timeout=30).content)
        frames[world_size] = decoded_frames(path)
    output = reply["output"]
    assert len(frames[1]) == output["num_frames"] * output["width"] * output["height"] * 3 > 0
    assert frames[2] == frames[1]


# --- text with no UTF-8 form, and the client side with the runpod SDK ----------------------------------

def test_text_with_no_utf8_form_gets_a_clear_error_not_an_http_500(api, portrait_png):
    """A lone surrogate ("\\ud800" in the JSON) used to run the job and then break the answer's
    UTF-8 encoding (HTTP 500, video lost). It is refused up front, and the answer is sent."""
    base, _, _ = api
    job = with_image(speech_job(sample_steps=1, max_clips=1), portrait_png)
    for field, value, fragment in (("prompt", "a \ud800 b", "'prompt' is not valid text"),
                                   ("x\udfff", 1, "a key in the job's 'input' is not valid text")):
        reply = requests.post(f"{base}/runsync", json={"input": {**job["input"], field: value}}, timeout=600)
        assert reply.status_code == 200, reply.text
        assert reply.json()["status"] == "FAILED" and fragment in reply.json()["error"]


def documented_run_job():
    """docs/job.md's `run_job`, taken from the page itself so that the documented code is the
    tested code."""
    page = (ROOT / "docs" / "job.md").read_text()
    block = next(b for b in page.split("```python")[1:] if "def run_job(" in b).split("```")[0]
    namespace: dict = {}
    exec(block.split("runpod.api_key")[0], namespace)  # the imports and definitions only
    return namespace["run_job"]


class SdkLayout(http.server.BaseHTTPRequestHandler):
    """RunPod's URL layout in front of the SDK's local API, which cannot serve it as is: the SDK
    calls /{endpoint}/run, /{endpoint}/runsync and GET /{endpoint}/status/{id}, the local API has
    /run, /runsync and POST /status/{id}. Only paths and that method are translated."""

    api_base = ""
    seen: list[tuple[str, str]] = []

    def _forward(self, method: str) -> None:
        SdkLayout.seen.append((method, self.path))
        endpoint, _, rest = self.path.lstrip("/").partition("/")
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
        answer = requests.post(f"{self.api_base}/{rest}", data=body, timeout=600,
                               headers={"Content-Type": "application/json"})
        self.send_response(answer.status_code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer.content)))
        self.end_headers()
        self.wfile.write(answer.content)

    def do_POST(self) -> None:
        self._forward("POST")

    def do_GET(self) -> None:
        self._forward("GET")

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def sdk_endpoint(api, monkeypatch):
    """runpod.Endpoint, unchanged, pointed (endpoint_url_base) at the local API through SdkLayout."""
    import runpod

    SdkLayout.api_base, SdkLayout.seen = api[0], []
    with LoopbackHTTPServer(SdkLayout) as proxy:
        monkeypatch.setattr(runpod, "endpoint_url_base", proxy.url)
        monkeypatch.setattr(runpod, "api_key", "local-test-key")
        yield runpod.Endpoint("local-endpoint")


def test_the_documented_sdk_pattern_surfaces_the_workers_error(sdk_endpoint, portrait_png):
    bad = {**with_image(speech_job(), portrait_png)["input"], "resolution": "4k"}
    # The SDK's run_sync gives None for a failed job (result["video_url"] is then a TypeError and
    # the worker's message is lost): the documented run_job polls the status instead.
    assert sdk_endpoint.run_sync(bad, timeout=600) is None
    run_job = documented_run_job()
    with pytest.raises(RuntimeError, match=r"^job test-[0-9a-f-]+ FAILED: 'resolution' must be one of "):
        run_job(sdk_endpoint, bad, timeout_s=600, poll_s=0.5)
    assert ("GET", "/local-endpoint/status/") in {(m, p.rsplit("/", 1)[0] + "/") for m, p in SdkLayout.seen}
    good = {**with_image(speech_job(sample_steps=1, max_clips=1), portrait_png)["input"]}
    output = run_job(sdk_endpoint, good, timeout_s=600, poll_s=0.5)
    assert output["storage"] == "s3" and output["video_url"].startswith("http")


# --- a slice of the audio, on a default worker ---------------------------------------------------

def test_runsync_of_a_sliced_job_returns_an_mp4_as_long_as_the_slice(api, portrait_png, tmp_path):
    base, _, _ = api
    reply = runsync(base, with_image(speech_job(audio_start_s=2.0, audio_duration_s=3.0,
                                                sample_steps=1), portrait_png))
    assert reply["status"] == "COMPLETED", reply
    output = reply["output"]
    assert isinstance(output, dict) and output["num_clips"] == 1  # 48 + 3 frames: one clip of 80
    assert (output["settings"]["audio_start_s"], output["settings"]["audio_duration_s"]) == (2.0, 3.0)
    video = tmp_path / "sliced.mp4"
    video.write_bytes(requests.get(output["video_url"], timeout=30).content)
    assert_plays_as_long_as_the_audio(video, fps=24, seconds=3.0)
    assert float(ffprobe(video)["audio"]["duration"]) == pytest.approx(3.0, abs=0.03)


# --- a streaming endpoint (WAN_S2V_STREAM=true) ----------------------------------------------------

@pytest.fixture(scope="module")
def stream_api(tiny_checkpoint, s3_server, tmp_path_factory):
    """A streaming worker whose encoders are lossless (VIDEO_CRF=0), so that a decoded frame is
    exactly the frame its encoder took."""
    s3_admin(s3_server).create_bucket(Bucket=SERVER_BUCKET)
    with api_server(tiny_checkpoint, s3_server, tmp_path_factory.mktemp("stream") / "server.log",
                    WAN_S2V_STREAM="true", VIDEO_CRF="0") as server:
        yield server


def frame_times(video: Path) -> list[float]:
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
                          "frame=pts_time", "-of", "csv=p=0", str(video)], check=True,
                         capture_output=True, text=True).stdout
    return [float(line.strip(",")) for line in out.split()]


def yuv_frames(video: Path) -> bytes:
    return subprocess.run(["ffmpeg", "-v", "error", "-i", str(video), "-f", "rawvideo",
                           "-pix_fmt", "yuv420p", "-"], check=True, capture_output=True).stdout


def test_stream_gives_each_clip_then_the_video_and_the_clips_are_its_frames(stream_api,
                                                                            portrait_png, tmp_path):
    """A 3-clip job (2.5 s of speech, 16 frames a clip, 24 fps) through /run and /stream/{id}: 3
    clip items, then the result. Each MP4 plays (ffprobe); the clips' frames in turn are the
    video's, at its timestamps. The worker encodes losslessly here, so decoded frames are the
    frames its encoders took and are compared exactly (with lossy settings two encodes of the
    same frames differ by the encoders' state: tests/test_video.py compares those within the
    encoding error)."""
    base, log, _ = stream_api
    speech = speech_excerpt(tmp_path / "speech_2s5.wav", 2.5)
    job = with_image(speech_job(speech, infer_frames=16, sample_steps=1), portrait_png)
    started = requests.post(f"{base}/run", json=job, timeout=60).json()
    assert started["status"] == "IN_PROGRESS"
    reply = requests.post(f"{base}/stream/{started['id']}", timeout=600).json()
    assert reply["status"] == "COMPLETED", reply
    *clips, final = [chunk["output"] for chunk in reply["stream"]]
    assert [(c["clip"], c["clips"]) for c in clips] == [(1, 3), (2, 3), (3, 3)]
    assert final["num_clips"] == 3 and final["storage"] == "s3" and "clip" not in final
    assert_plays_as_long_as_the_audio(download(final["video_url"], tmp_path / "video.mp4"),
                                      fps=24, seconds=2.5)
    paths = []
    for clip in clips:
        assert clip["storage"] == "s3" and clip["fps"] == 24
        path = download(clip["video_url"], tmp_path / f"clip{clip['clip']}.mp4")
        info = ffprobe(path)
        assert info["video"]["codec_name"] == "h264" and info["audio"]["codec_name"] == "aac"
        assert int(info["video"]["nb_frames"]) == clip["num_frames"]
        assert info["duration"] == pytest.approx(clip["duration_s"], abs=0.05)
        paths.append(path)
    video = tmp_path / "video.mp4"
    assert b"".join(yuv_frames(p) for p in paths) == yuv_frames(video)
    clip_times = [t + c["start_s"] for c, p in zip(clips, paths) for t in frame_times(p)]
    assert clip_times == pytest.approx(frame_times(video), abs=1e-6)
    assert final["timings"]["items_s"] == [c["timings"]["item_s"] for c in clips]


def download(url: str, path: Path) -> Path:
    path.write_bytes(requests.get(url, timeout=30).content)
    return path


def test_runsync_on_a_streaming_worker_returns_the_items_with_the_result_last(stream_api,
                                                                              portrait_png):
    base, _, _ = stream_api
    reply = runsync(base, with_image(speech_job(max_clips=1, sample_steps=1), portrait_png))
    assert reply["status"] == "COMPLETED", reply
    clip, final = reply["output"]
    assert (clip["clip"], clip["clips"], clip["storage"]) == (1, 1, "s3")
    assert final["num_clips"] == 1 and final["storage"] == "s3"
    # A failed job: the SDK's local API returns a yielded error as the last item of a COMPLETED
    # job, where RunPod fails the job with its message (docs/job.md, "Streaming endpoints").
    reply = runsync(base, with_image(speech_job(resolution="4k"), portrait_png))
    assert reply["output"] == [{"error": "'resolution' must be one of '480p', '720p', got '4k'"}]


def documented_stream_job():
    """docs/job.md's `stream_job`, taken from the page itself (as documented_run_job)."""
    page = (ROOT / "docs" / "job.md").read_text()
    block = next(b for b in page.split("```python")[1:] if "def stream_job(" in b).split("```")[0]
    namespace: dict = {}
    exec(block.split("runpod.api_key")[0], namespace)
    return namespace["stream_job"]


@pytest.fixture
def stream_sdk_endpoint(stream_api, monkeypatch):
    import runpod

    SdkLayout.api_base, SdkLayout.seen = stream_api[0], []
    with LoopbackHTTPServer(SdkLayout) as proxy:
        monkeypatch.setattr(runpod, "endpoint_url_base", proxy.url)
        monkeypatch.setattr(runpod, "api_key", "local-test-key")
        yield runpod.Endpoint("local-endpoint")


def test_the_documented_stream_pattern_yields_the_items_and_surfaces_the_error(
        stream_sdk_endpoint, portrait_png):
    stream_job = documented_stream_job()
    good = with_image(speech_job(max_clips=1, sample_steps=1), portrait_png)["input"]
    items = list(stream_job(stream_sdk_endpoint, good, timeout_s=600, poll_s=0.5))
    assert [item.get("clip") for item in items] == [1, None] and items[-1]["num_clips"] == 1
    assert ("GET", "/local-endpoint/stream/") in {(m, p.rsplit("/", 1)[0] + "/") for m, p in SdkLayout.seen}
    bad = {**good, "resolution": "4k"}
    with pytest.raises(RuntimeError, match=r"^job test-[0-9a-f-]+ failed: 'resolution' must be one of "):
        list(stream_job(stream_sdk_endpoint, bad, timeout_s=600, poll_s=0.5))


def test_test_input_on_a_streaming_worker_prints_the_items_as_one_list(tiny_checkpoint, portrait_png,
                                                                        tmp_path):
    """The SDK's test mode (here test_input.json; --test_input alike) never runs a generator
    handler (runpod 1.12): on a streaming worker it runs the job and prints its items as /runsync
    returns them."""
    volume = tmp_path / "volume"
    volume.mkdir()
    env = worker_env(tiny_checkpoint, WAN_S2V_STREAM="true", NETWORK_VOLUME_DIR=str(volume),
                     MAX_INLINE_VIDEO_BYTES="1")
    job = with_image(speech_job(infer_frames=48, sample_steps=1), portrait_png)
    code, payload, log = run_cli(job, env, tmp_path, as_file=True)
    assert code == 0, log[-3000:]
    *clips, final = payload["output"]
    assert [c["clip"] for c in clips] == [1, 2, 3] and final["num_clips"] == 3
    for item in payload["output"]:
        assert item["storage"] == "network_volume"
        assert Path(item["video_path"]).parent == volume / "wan-s2v-outputs"
    assert_plays_as_long_as_the_audio(Path(final["video_path"]), fps=24)
