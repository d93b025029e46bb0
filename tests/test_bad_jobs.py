"""A corpus of bad jobs, each run through one in-process worker on the tiny checkpoint: every one
gets a clear {"error": ...} naming what is wrong, with no traceback text and no refresh_worker,
and the same worker then completes a good job. The corpus holds what needs the worker (media to
fetch and decode, their limits, the machine); the schema's rules are test_job.py's, whose jobs run
here too. No bad URL here is ever connected to: every address below is refused by the address
policy before any connection (ALLOWED_PRIVATE_NETWORKS is empty)."""
import base64
import io

import pytest

from conftest import SPEECH_7S3, speech_excerpt
from s2v_worker.job import JobInputError, parse_job
from s2v_worker.runner import Worker
from s2v_worker.settings import Settings
from test_job import RULES


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def media(portrait_png, tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("corpus")
    speech_1s = folder / "speech_1s.wav"
    speech_excerpt(speech_1s, 1.0)
    blip = folder / "blip.wav"
    speech_excerpt(blip, 0.05)
    bomb = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(bomb, "PNG")  # 100 Mpx in a few kB
    tiny = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiny, "PNG")
    png = portrait_png.read_bytes()
    made = {name: b64(data) for name, data in made_media(folder).items()}
    return {"png": b64(png), "speech_1s": b64(speech_1s.read_bytes()), "speech_7s3": b64(SPEECH_7S3.read_bytes()),
            "blip": b64(blip.read_bytes()), "bomb": b64(bomb.getvalue()), "tiny_png": b64(tiny.getvalue()),
            "truncated_png": b64(png[: len(png) // 3]), "truncated_flac": b64(SPEECH_7S3.read_bytes()[:300]),
            **made}


def made_media(folder) -> dict[str, bytes]:
    """Media the second hardening round refuses: non-finite samples, odd channel counts and rates,
    surround audio past the length limit, images the model's sizing cannot take."""
    import subprocess

    import numpy as np
    import soundfile
    from PIL import Image

    def ffmpeg_lavfi(source: str, name: str, *args: str) -> bytes:
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", source, *args,
                        str(folder / name)], check=True)
        return (folder / name).read_bytes()

    made = {}
    for name, bad in (("nan_wav", np.nan), ("inf_wav", np.inf)):
        samples = np.zeros((8000, 2), dtype=np.float32)
        samples[4000, 0] = bad
        soundfile.write(str(folder / f"{name}.wav"), samples, 16000, subtype="FLOAT")
        made[name] = (folder / f"{name}.wav").read_bytes()
    made["nine_channels"] = ffmpeg_lavfi("aevalsrc=sin(600*t)|0|0|0|0|0|0|0|0:s=8000:d=0.5", "nine.wav")
    made["rate_2k"] = ffmpeg_lavfi("sine=frequency=300:sample_rate=2000", "rate_2k.wav", "-t", "0.5")
    made["rate_384k"] = ffmpeg_lavfi("sine=frequency=300:sample_rate=384000", "rate_384k.wav", "-t", "0.3")
    made["surround_6s"] = ffmpeg_lavfi("anullsrc=r=192000:cl=7.1", "surround.flac", "-t", "6", "-c:a", "flac")
    for name, size in (("wide_png", (20000, 16)), ("tall_png", (16, 20000))):
        strip = io.BytesIO()
        Image.new("RGB", size, (120, 90, 60)).save(strip, "PNG")
        made[name] = strip.getvalue()
    return made


GOOD = {"image_base64": "png", "audio_base64": "speech_1s"}

# Jobs that need the worker to be refused: media that must be fetched or decoded, their limits,
# what the machine cannot do. (name, job builder(media) -> job, fragment expected in the error)
# The schema's own rules are test_job.py's RULES, each message asserted there once; below they run
# through the same worker, which must pass each message on as parse_job gives it.
CORPUS = [
    ("image not base64", {"image_base64": "%%% not base64 %%%"}, "'image_base64' is not valid base64"),
    ("image data URI without base64", {"image_base64": "data:image/png,abc"}, "data URI without ';base64,'"),
    ("truncated image", {"image_base64": "truncated_png"}, "'image_base64' is not a readable image"),
    ("audio given as image", {"image_base64": "speech_1s"}, "'image_base64' is not a readable image"),
    ("image too small", {"image_base64": "tiny_png"}, "both sides must be at least 16 pixels"),
    ("decompression bomb", {"image_base64": "bomb"}, "pixels; the limit is"),
    ("image given as audio", {"audio_base64": "png"}, "'audio_base64' is not a readable audio file"),
    ("truncated audio", {"audio_base64": "truncated_flac"}, "'audio_base64' is not a readable audio file"),
    ("audio too short", {"audio_base64": "blip"}, "the minimum is 0.1 s"),
    ("audio too long", {"audio_base64": "speech_7s3"}, "the maximum is 5.0 s (MAX_AUDIO_SECONDS)"),
    ("pose video garbage", {"pose_video_base64": b64(b"not a video " * 40)}, "'pose_video_base64' is not"),
    ("metadata address", "image_url=http://169.254.169.254/latest/meta-data/", "\'image_url\' points to a private or local address"),
    ("loopback audio", "audio_url=http://127.0.0.1:9/speech.wav",
     "'audio_url' points to a private or local address"),
    ("ipv6 loopback", "image_url=http://[::1]/face.png", "\'image_url\' points to a private or local address"),
    ("private network", "image_url=http://10.0.0.1/face.png", "\'image_url\' points to a private or local address"),
    ("localhost name", "image_url=http://localhost/face.png", "\'image_url\' points to a private or local address"),
    # --- round 2: what the input causes is a client error, never refresh_worker ---
    ("image far too wide", {"image_base64": "wide_png"}, "'image_base64' is 20000x16, too wide for 720p"),
    ("image far too tall", {"image_base64": "tall_png", "resolution": "480p"},
     "'image_base64' is 16x20000, too tall for 480p"),
    ("audio with a NaN sample", {"audio_base64": "nan_wav"},
     "'audio_base64' has samples that are not finite numbers (NaN or infinity)"),
    ("audio with an infinite sample", {"audio_base64": "inf_wav"},
     "'audio_base64' has samples that are not finite numbers (NaN or infinity)"),
    ("audio with 9 channels", {"audio_base64": "nine_channels"},
     "'audio_base64' has 9 channels; the limit is 8 (MAX_AUDIO_CHANNELS)"),
    ("audio at 2 kHz", {"audio_base64": "rate_2k"}, "'audio_base64' is sampled at 2000 Hz; speech needs at least 4000 Hz"),
    ("audio at 384 kHz", {"audio_base64": "rate_384k"},
     "'audio_base64' is sampled at 384000 Hz; the limit is 192000 Hz (MAX_AUDIO_SAMPLE_RATE)"),
    ("8-channel 192 kHz audio past the length limit", {"audio_base64": "surround_6s"},
     "'audio_base64' is more than 6 s long; the maximum is 5.0 s (MAX_AUDIO_SECONDS)"),
    ("fast mode on the CPU", {"speed": "fast"}, '"speed": "fast" needs a GPU with FP8 tensor cores'),
    ("fastest mode on the CPU", {"speed": "fastest"},
     '"speed": "fastest" needs a GPU with FP8 tensor cores'),
]


def resolve(media: dict, fields: dict) -> dict:
    return {k: media.get(v, v) if isinstance(v, str) else v for k, v in fields.items()}


def build(spec, media: dict) -> dict:
    if isinstance(spec, str):  # "field=value,field=value": URLs replace the good media fields
        fields = dict(item.split("=", 1) for item in spec.split(","))
        base = {k: v for k, v in GOOD.items() if not any(f.startswith(k.split("_")[0]) for f in fields)}
        return {"id": "bad", "input": {**resolve(media, base), **fields}}
    return {"id": "bad", "input": {**resolve(media, GOOD), **resolve(media, spec)}}


@pytest.fixture(scope="module")
def worker(tiny_pipeline, tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    settings = Settings.from_env({}).replace(work_dir=str(work), max_audio_seconds=5.0,
                                             network_volume_dir=str(work / "no-volume"))
    return Worker(settings, tiny_pipeline)


def test_corpus_names_are_unique():
    assert len({name for name, _, _ in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("name, spec, fragment", CORPUS, ids=[c[0] for c in CORPUS])
def test_bad_job_gets_a_clear_error(worker, media, name, spec, fragment):
    result = worker.run(build(spec, media))
    assert set(result) == {"error"}, result
    assert fragment in result["error"], result["error"]
    assert "Traceback" not in result["error"] and 'File "' not in result["error"]


@pytest.mark.parametrize("job", [job for job, _ in RULES])
def test_a_job_breaking_a_schema_rule_gets_parse_jobs_message(worker, job):
    with pytest.raises(JobInputError) as refused:
        parse_job(job)
    assert worker.run(job) == {"error": str(refused.value)}


def test_after_the_corpus_the_same_worker_completes_a_good_job(worker, media):
    for name, spec, _ in CORPUS:
        worker.run(build(spec, media))
    for job, _ in RULES:
        worker.run(job)
    result = worker.run({"id": "good", "input": {**resolve(media, GOOD), "resolution": "480p",
                                                 "sample_steps": 1, "infer_frames": 16, "fps": 16}})
    assert "video_base64" in result and "error" not in result, result
