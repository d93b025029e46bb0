"""Property-based fuzzing: every bad input ends in the module's own clear error, never in a crash.

(a) `parse_job` gets random JSON as the whole job, as its "input", and as the value of each known
field: `JobInputError` is the only exception allowed. (b) The media loaders get mutated files (bit
flips, truncations, insertions of other valid media): they either succeed or raise `MediaError`, in
bounded time. Examples are few and small so the file runs in well under a minute.
"""
from __future__ import annotations

import base64
import contextlib
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from s2v_worker import decoders, media
from s2v_worker.job import (JobInput, JobInputError, JobRequest, MediaSource, StorageOverride,
                            parse_job)
from s2v_worker.media import MediaError
from conftest import with_settings

load_image, load_audio = with_settings(media.load_image), with_settings(media.load_audio)
load_pose_video = with_settings(media.load_pose_video)
from s2v_worker.settings import Settings

SETTINGS = Settings.from_env({})
# Pillow warns (and goes on) on the broken EXIF blocks that mutations make: expected noise here.
pytestmark = pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")
FAST = settings(max_examples=40, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])
# No per-example deadline: on a loaded CI machine a decoder child's start alone can take seconds,
# and hypothesis fails an example that runs past its deadline once and not the second time as
# flaky. What is checked is that every load ends: DECODE_TIMEOUT_S (8 s here, each decoding step)
# stops a slow decoder, and hang_guard turns a load that never ends into a failure.
MEDIA_FUZZ = settings(max_examples=30, deadline=None, database=None,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
HANG_S = 120.0  # a few decoding steps of DECODE_TIMEOUT_S each, with room for a loaded machine

# --- (a) the job schema ---------------------------------------------------------------------------

SCALARS = (st.none() | st.booleans() | st.integers()
           | st.sampled_from([10**400, -10**400, 2**63])
           | st.sampled_from([5000]).map(lambda digits: 10**digits)  # past str()'s digit limit
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=30)
           | st.sampled_from(["", " ", "720p", "480p", "unipc", "dpm++", "http://", "https://a.b/c",
                              "http://[::1", "data:,", "file:///etc/passwd", "AAAA", "\x00"]))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)
INPUT_FIELDS = sorted(JobInput.model_fields)
S3_CONFIG_FIELDS = [field.alias for field in StorageOverride.model_fields.values()]


def parse_or_input_error(job) -> JobRequest | None:
    try:
        return parse_job(job)
    except JobInputError as exc:
        message = str(exc)
        assert message and len(message) < 1000, "errors stay short whatever the input"
        return None


@FAST
@given(JSON)
def test_any_json_as_the_job(job):
    parse_or_input_error(job)


@FAST
@given(JSON, JSON)
def test_any_json_as_the_input(payload, job_id):
    parse_or_input_error({"id": job_id, "input": payload})


@FAST
@given(st.fixed_dictionaries({}, optional={name: JSON for name in INPUT_FIELDS}),
       st.sampled_from(["image_url", "image_base64"]), st.sampled_from(["audio_url", "audio_base64"]))
def test_any_value_for_each_known_field(payload, image_field, audio_field):
    # Valid media most of the time, so the generation fields behind them are reached too.
    payload.setdefault(image_field, "https://example.com/a.png" if "url" in image_field else "AAAA")
    payload.setdefault(audio_field, "https://example.com/a.wav" if "url" in audio_field else "AAAA")
    parse_or_input_error({"id": "fuzz", "input": payload})


NUMERIC_FIELDS = ["guidance_scale", "shift", "sample_steps", "seed", "fps", "infer_frames",
                  "max_clips", "audio_start_s", "audio_duration_s"]
NUMBERS = (st.integers() | st.integers(10**300, 10**400) | st.integers(-10**400, -10**300)
           | st.floats(allow_nan=True, allow_infinity=True) | st.booleans())


@FAST
@given(st.sampled_from(NUMERIC_FIELDS), NUMBERS)
def test_any_number_for_each_numeric_field(field, value):
    parse_or_input_error({"input": {"image_base64": "AAAA", "audio_base64": "AAAA", field: value}})


@FAST
@given(st.one_of(JSON, st.fixed_dictionaries({}, optional={k: JSON for k in S3_CONFIG_FIELDS})))
def test_any_s3_config(s3_config):
    job = {"input": {"image_base64": "AAAA", "audio_base64": "AAAA"}, "s3Config": s3_config}
    parse_or_input_error(job)


@pytest.mark.parametrize("field", NUMERIC_FIELDS)
@pytest.mark.parametrize("value", [10**400, -10**400, 10**5000, float("nan"), float("inf"),
                                   "1" * 5000, ["x" * 5000], {"a": "x" * 5000}],
                         ids=["huge", "-huge", "past-str-limit", "nan", "inf", "long-str",
                              "long-list", "long-dict"])
def test_extreme_numbers_and_long_values(field, value):
    """Bugs found by fuzzing: an integer too large for a float crashed the number check with
    OverflowError (JSON allows 10**400), one past Python's 4300-digit str() limit crashed the error
    message with ValueError, and other messages echoed any value whole."""
    job = {"input": {"image_base64": "AAAA", "audio_base64": "AAAA", field: value}}
    with pytest.raises(JobInputError, match=f"'{field}'") as caught:
        parse_job(job)
    assert len(str(caught.value)) < 300, "the error does not echo a huge value back"


# --- (b) media decoders on mutated files ----------------------------------------------------------

def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args], check=True)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, bytes]:
    """One small valid PNG, WAV and MP4, made once."""
    from PIL import Image, ImageDraw

    folder = tmp_path_factory.mktemp("seeds")
    image = Image.new("RGB", (32, 24), (40, 90, 160))
    ImageDraw.Draw(image).ellipse([4, 4, 20, 20], fill=(230, 190, 160))
    image.save(folder / "seed.png")
    _ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:sample_rate=8000", "-t", "0.4",
            "-c:a", "pcm_s16le", str(folder / "seed.wav"))
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=32x32:rate=8", "-t", "1", "-pix_fmt", "yuv420p",
            str(folder / "seed.mp4"))
    return {kind: (folder / f"seed.{kind}").read_bytes() for kind in ("png", "wav", "mp4")}


@st.composite
def mutations(draw, seeds: dict[str, bytes], base: str) -> bytes:
    """A seed file with a few random edits; sometimes another kind of seed file as the start."""
    start = base if draw(st.integers(0, 4)) else draw(st.sampled_from(sorted(seeds)))
    data = bytearray(seeds[start])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "flip", "truncate", "insert", "overwrite", "zero"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            blob = draw(st.one_of(st.binary(min_size=1, max_size=64),
                                  st.sampled_from(sorted(seeds)).map(seeds.__getitem__)))
            data[pos:pos] = blob
        elif op == "overwrite":
            blob = draw(st.binary(min_size=1, max_size=16))
            data[pos:pos + len(blob)] = blob
        elif op == "zero":
            data[pos:pos + draw(st.integers(1, 256))] = b"\0" * 16
    return bytes(data)


@contextlib.contextmanager
def hang_guard(seconds: float):
    """Turn a hang into a test failure (hypothesis' deadline only judges examples that finish)."""
    def fire(signum, frame):
        raise TimeoutError(f"no result after {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def load_or_media_error(loader, field: str, data: bytes) -> None:
    source = MediaSource(field, base64=base64.b64encode(data).decode())
    with tempfile.TemporaryDirectory() as work_dir, hang_guard(HANG_S):
        try:
            loader(source, Path(work_dir), SETTINGS)
        except MediaError as exc:
            assert str(exc).startswith(f"'{field}' "), "the message names the field"


@pytest.fixture(scope="module", autouse=True)
def short_decode_limit():
    # A decoder child that runs this long is stopped and reported as MediaError: that is the
    # behaviour under test, and it keeps a pathological example from eating the whole budget.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(decoders, "DECODE_TIMEOUT_S", 8.0)
        yield


def test_seeds_are_valid(seeds):
    """The unmutated seeds load, so the fuzz below starts from real media."""
    with tempfile.TemporaryDirectory() as work_dir:
        for loader, field, kind in ((load_image, "image_base64", "png"),
                                    (load_audio, "audio_base64", "wav"),
                                    (load_pose_video, "pose_video_base64", "mp4")):
            source = MediaSource(field, base64=base64.b64encode(seeds[kind]).decode())
            loader(source, Path(work_dir), SETTINGS)


@MEDIA_FUZZ
@given(data=st.data())
def test_mutated_images(seeds, data):
    load_or_media_error(load_image, "image_base64", data.draw(mutations(seeds, "png")))


@MEDIA_FUZZ
@given(data=st.data())
def test_mutated_audio(seeds, data):
    load_or_media_error(load_audio, "audio_base64", data.draw(mutations(seeds, "wav")))


@settings(MEDIA_FUZZ, max_examples=25)
@given(data=st.data())
def test_mutated_pose_videos(seeds, data):
    load_or_media_error(load_pose_video, "pose_video_base64", data.draw(mutations(seeds, "mp4")))
