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
    return {"png": b64(png), "speech_1s": b64(speech_1s.read_bytes()), "speech_7s3": b64(SPEECH_7S3.read_bytes()),
            "blip": b64(blip.read_bytes()), "bomb": b64(bomb.getvalue()), "tiny_png": b64(tiny.getvalue()),
            "truncated_png": b64(png[: len(png) // 3]), "truncated_flac": b64(SPEECH_7S3.read_bytes()[:300])}


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
    assert len(CORPUS) >= 40 and len({name for name, _, _ in CORPUS}) == len(CORPUS)


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
