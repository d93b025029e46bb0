"""A corpus of bad jobs, each run through one in-process worker on the tiny checkpoint: every one
gets a clear {"error": ...} naming what is wrong, with no traceback text and no refresh_worker,
and the same worker then completes a good job. No bad URL here is ever connected to: every address
below is refused by the address policy before any connection (ALLOWED_PRIVATE_NETWORKS is empty)."""
import base64
import io

import pytest

from conftest import SPEECH_7S3, speech_excerpt
from s2v_worker.runner import Worker
from s2v_worker.settings import Settings


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
S3 = {"accessId": "AK", "accessSecret": "SK", "bucketName": "b", "endpointUrl": "https://s3.example.com"}

# (name, job builder(media) -> job, fragment expected in the error)
CORPUS = [
    ("not an object", lambda m: [], "the job must be a JSON object"),
    ("no input", lambda m: {"id": "x"}, "'input' must be a JSON object"),
    ("input is text", lambda m: {"input": "make a video"}, "'input' must be a JSON object"),
    ("input is a number", lambda m: {"input": 42}, "'input' must be a JSON object"),
    ("empty input", lambda m: {"input": {}}, "needs one of 'image_url' or 'image_base64'"),
    ("no audio", lambda m: {"input": {"image_base64": m["png"]}}, "needs one of 'audio_url' or 'audio_base64'"),
    ("no image", lambda m: {"input": {"audio_base64": m["speech_1s"]}}, "needs one of 'image_url'"),
    ("two images", lambda m: {"input": {"image_base64": m["png"], "image_url": "https://a.example/i.png",
                                        "audio_base64": m["speech_1s"]}}, "give only one of 'image_url'"),
    ("two audios", lambda m: {"input": {"image_base64": m["png"], "audio_base64": m["speech_1s"],
                                        "audio_url": "https://a.example/a.wav"}}, "give only one of 'audio_url'"),
    ("two pose videos", "pose_video_url=https://a.example/p.mp4,pose_video_base64=AAAA", "give only one of 'pose_video_url'"),
    ("ftp image", "image_url=ftp://a.example/i.png", "'image_url' must be an http or https URL"),
    ("file audio", "audio_url=file:///etc/passwd", "'audio_url' must be an http or https URL"),
    ("javascript url", "image_url=javascript:alert(1)", "'image_url' must be an http or https URL"),
    ("url without host", "image_url=https://", "'image_url' must be an http or https URL"),
    ("unknown field", {"steps": 30}, "unknown input fields: steps"),
    ("prototype field", {"__proto__": {}}, "unknown input fields: __proto__"),
    ("resolution 1080p", {"resolution": "1080p"}, "'resolution' must be one of"),
    ("resolution number", {"resolution": 480}, "'resolution' must be one of"),
    ("zero steps", {"sample_steps": 0}, "'sample_steps' must be between 1 and 100"),
    ("too many steps", {"sample_steps": 1000}, "'sample_steps' must be between 1 and 100"),
    ("steps as text", {"sample_steps": "30"}, "'sample_steps' must be an integer"),
    ("fractional steps", {"sample_steps": 2.5}, "'sample_steps' must be an integer"),
    ("nan guidance", {"guidance_scale": float("nan")}, "'guidance_scale' must be a finite number, got nan"),
    ("negative guidance", {"guidance_scale": -3}, "'guidance_scale' must be at least 0.0"),
    ("zero shift", {"shift": 0}, "'shift' must be at least 0.001"),
    ("unknown solver", {"solver": "euler"}, "'solver' must be one of"),
    ("negative seed", {"seed": -5}, "'seed' must be between 0 and"),
    ("float seed", {"seed": 1e30}, "'seed' must be an integer"),
    ("frames not multiple of 4", {"infer_frames": 81}, "'infer_frames' must be a multiple of 4"),
    ("too many frames", {"infer_frames": 1000}, "'infer_frames' must be between 8 and 200"),
    ("zero clips", {"max_clips": 0}, "'max_clips' must be between 1 and 1000"),
    ("30 fps", {"fps": 30}, "'fps' must be one of 24, 16"),
    ("first frame as text", {"init_first_frame": "yes"}, "'init_first_frame' must be true or false"),
    ("prompt not text", {"prompt": 123}, "'prompt' must be a string"),
    ("prompt too long", {"prompt": "word " * 1200}, "'prompt' must be at most 5000 characters"),
    ("negative prompt object", {"negative_prompt": {"a": 1}}, "'negative_prompt' must be a string"),
    ("s3Config text", lambda m: {"input": resolve(m, GOOD), "s3Config": "s3://bucket"}, "'s3Config' must be an object"),
    ("s3Config without bucket", lambda m: {"input": resolve(m, GOOD), "s3Config": {
        k: v for k, v in S3.items() if k != "bucketName"}}, "'s3Config.bucketName' must be a non-empty string"),
    ("s3Config ftp endpoint", lambda m: {"input": resolve(m, GOOD), "s3Config": {**S3, "endpointUrl": "ftp://x"}},
     "'s3Config.endpointUrl' must be an http or https URL"),
    ("image not base64", {"image_base64": "%%% not base64 %%%"}, "'image_base64' is not valid base64"),
    ("image data URI without base64", {"image_base64": "data:image/png,abc"}, "data URI without ';base64,'"),
    ("truncated image", {"image_base64": "truncated_png"}, "'image_base64' is not a readable image"),
    ("audio given as image", {"image_base64": "speech_1s"}, "'image_base64' is not a readable image"),
    ("image too small", {"image_base64": "tiny_png"}, "both sides must be at least 16 pixels"),
    ("decompression bomb", {"image_base64": "bomb"}, "pixels; the limit is"),
    ("image given as audio", {"audio_base64": "png"}, "'audio_base64' is not a readable audio file"),
    ("truncated audio", {"audio_base64": "truncated_flac"}, "'audio_base64' is not a readable audio file"),
    ("empty audio", {"audio_base64": ""}, "'audio_base64' is empty"),
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
    ("lone surrogate in the prompt", {"prompt": "a \ud800 b"}, "'input.prompt' is not valid text"),
    ("lone surrogate in the negative prompt", {"negative_prompt": "\udfff"},
     "'input.negative_prompt' is not valid text"),
    ("lone surrogate as a key", {"x\ud800": 1}, "a key in 'input' is not valid text"),
    ("lone surrogate in the job id", lambda m: {"id": "job-\ud800", "input": resolve(m, GOOD)},
     "'id' is not valid text"),
    ("lone surrogate in s3Config", lambda m: {"input": resolve(m, GOOD), "s3Config": {**S3, "bucketName": "b\ud800"}},
     "'s3Config.bucketName' is not valid text"),
    ("lone surrogate in a URL", "image_url=https://a.example/\ud800.png", "'input.image_url' is not valid text"),
    ("lone surrogate in a LoRA", {"loras": [{"url": "https://a.example/\udc00.safetensors"}]},
     "'input.loras[0].url' is not valid text"),
    ("nan shift", {"shift": float("nan")}, "'shift' must be a finite number, got nan"),
    ("infinite guidance", {"guidance_scale": float("inf")}, "'guidance_scale' must be a finite number, got inf"),
    ("infinite LoRA strength", {"loras": [{"path": "l.safetensors", "strength": float("-inf")}]},
     "'loras[0].strength' must be a finite number, got -inf"),
    ("tiny shift", {"shift": 1e-6}, "'shift' must be at least 0.001 and at most 100.0"),
    ("shift past unipc's ceiling", {"shift": 36}, "'shift' must be at most 35.48 with the unipc solver at 30 steps"),
    ("unipc ceiling at 100 steps", {"shift": 12, "sample_steps": 100},
     "'shift' must be at most 11.1 with the unipc solver at 100 steps"),
    ("shift past 100 with dpm++", {"shift": 150, "solver": "dpm++"}, "'shift' must be at least 0.001 and at most 100.0"),
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
    ("step cache without fast mode", {"step_cache": True}, "'step_cache' is part of fast mode"),
]


def resolve(media: dict, fields: dict) -> dict:
    return {k: media.get(v, v) if isinstance(v, str) else v for k, v in fields.items()}


def build(spec, media: dict) -> object:
    if callable(spec):
        return spec(media)
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


def test_the_corpus_is_large_enough():
    assert len(CORPUS) >= 80 and len({name for name, _, _ in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("name, spec, fragment", CORPUS, ids=[c[0] for c in CORPUS])
def test_bad_job_gets_a_clear_error(worker, media, name, spec, fragment):
    result = worker.run(build(spec, media))
    assert set(result) == {"error"}, result
    assert fragment in result["error"], result["error"]
    assert "Traceback" not in result["error"] and 'File "' not in result["error"]


def test_after_the_corpus_the_same_worker_completes_a_good_job(worker, media):
    for name, spec, _ in CORPUS:
        worker.run(build(spec, media))
    result = worker.run({"id": "good", "input": {**resolve(media, GOOD), "resolution": "480p",
                                                 "sample_steps": 1, "infer_frames": 16, "fps": 16}})
    assert "video_base64" in result and "error" not in result, result
