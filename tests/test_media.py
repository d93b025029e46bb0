"""Media intake: base64 and URL inputs, decoded for real (Pillow, ffmpeg, decord), with clear errors."""
import base64
import http.server
import subprocess
import threading
from pathlib import Path

import pytest

from conftest import SPEECH_7S3
from s2v_worker.job import MediaSource
from s2v_worker.media import MediaError, load_audio, load_image, load_pose_video
from s2v_worker.settings import Settings

SETTINGS = Settings.from_env({})


def b64(field: str, data: bytes, data_uri: str | None = None) -> MediaSource:
    text = base64.b64encode(data).decode()
    return MediaSource(field, base64=f"data:{data_uri};base64,{text}" if data_uri else text)


@pytest.fixture(scope="module")
def media_server(tmp_path_factory):
    """A real HTTP server on loopback serving a folder; yields (base_url, folder)."""
    folder = tmp_path_factory.mktemp("served")
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(folder), **k)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", folder
    server.shutdown()


def convert_audio(src: Path, dest: Path, *codec_args: str) -> Path:
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(src), *codec_args, str(dest)], check=True)
    return dest


# --- images ---------------------------------------------------------------------------------------

def test_image_base64_raw_and_data_uri(portrait_png, tmp_path):
    for source in (b64("image_base64", portrait_png.read_bytes()),
                   b64("image_base64", portrait_png.read_bytes(), "image/png")):
        image = load_image(source, tmp_path, SETTINGS)
        assert (image.width, image.height) == (192, 256) and image.path.suffix == ".png"


def test_image_from_url(media_server, portrait_png, tmp_path):
    base, folder = media_server
    (folder / "face.png").write_bytes(portrait_png.read_bytes())
    image = load_image(MediaSource("image_url", url=f"{base}/face.png"), tmp_path, SETTINGS)
    assert (image.width, image.height) == (192, 256)


@pytest.mark.parametrize("mutate, fragment", [
    (lambda data: data[: len(data) // 2], "'image_base64' is not a readable image"),
    (lambda data: b"GIF89a" + b"\0" * 50, "'image_base64' is not a readable image"),
    (lambda data: b"this is text, not an image", "'image_base64' is not a readable image"),
])
def test_bad_images_are_named(portrait_png, tmp_path, mutate, fragment):
    with pytest.raises(MediaError, match=fragment):
        load_image(b64("image_base64", mutate(portrait_png.read_bytes())), tmp_path, SETTINGS)


def test_image_limits(portrait_png, tmp_path):
    with pytest.raises(MediaError, match="larger than the 100 byte limit"):
        load_image(b64("image_base64", portrait_png.read_bytes()), tmp_path,
                   SETTINGS.replace(max_image_bytes=100))
    from PIL import Image
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (8, 8)).save(tiny)
    with pytest.raises(MediaError, match="both sides must be at least 16 pixels"):
        load_image(b64("image_base64", tiny.read_bytes()), tmp_path, SETTINGS)


def test_invalid_base64_and_bad_data_uri(tmp_path):
    with pytest.raises(MediaError, match="'image_base64' is not valid base64"):
        load_image(MediaSource("image_base64", base64="!!!not base64!!!"), tmp_path, SETTINGS)
    with pytest.raises(MediaError, match="data URI without ';base64,'"):
        load_image(MediaSource("image_base64", base64="data:image/png,abc"), tmp_path, SETTINGS)


def test_url_errors(media_server, tmp_path, portrait_png):
    base, folder = media_server
    with pytest.raises(MediaError, match="'image_url' could not be downloaded: HTTP 404"):
        load_image(MediaSource("image_url", url=f"{base}/missing.png"), tmp_path, SETTINGS)
    (folder / "big.png").write_bytes(portrait_png.read_bytes())
    with pytest.raises(MediaError, match="'image_url' is larger than the 1000 byte limit"):
        load_image(MediaSource("image_url", url=f"{base}/big.png"), tmp_path,
                   SETTINGS.replace(max_image_bytes=1000))
    # nothing listens on port 9 of loopback: a refused connection, reported by field
    with pytest.raises(MediaError, match="'image_url' could not be downloaded: ConnectionError"):
        load_image(MediaSource("image_url", url="http://127.0.0.1:9/x.png"), tmp_path, SETTINGS)


# --- audio ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix, codec_args", [
    (".flac", ()), (".wav", ()), (".mp3", ("-c:a", "libmp3lame")), (".ogg", ("-c:a", "libvorbis")),
    (".m4a", ("-c:a", "aac")),
])
def test_common_audio_formats_decode_with_their_duration(tmp_path, suffix, codec_args):
    source = SPEECH_7S3 if suffix == ".flac" else convert_audio(SPEECH_7S3, tmp_path / f"s{suffix}", *codec_args)
    audio = load_audio(b64("audio_base64", source.read_bytes()), tmp_path, SETTINGS)
    assert audio.duration_s == pytest.approx(7.3, abs=0.06)  # lossy codecs pad a few ms
    assert audio.model_path.suffix == ".wav" and audio.original_path.is_file()


def test_bad_audio(tmp_path, portrait_png):
    with pytest.raises(MediaError, match="'audio_base64' is not a readable audio file"):
        load_audio(b64("audio_base64", portrait_png.read_bytes()), tmp_path, SETTINGS)
    with pytest.raises(MediaError, match="'audio_base64' is not a readable audio file"):
        load_audio(b64("audio_base64", SPEECH_7S3.read_bytes()[:200]), tmp_path, SETTINGS)
    with pytest.raises(MediaError, match="7.3 s long; the maximum is 5.0 s"):
        load_audio(b64("audio_base64", SPEECH_7S3.read_bytes()), tmp_path,
                   SETTINGS.replace(max_audio_seconds=5.0))
    short = convert_audio(SPEECH_7S3, tmp_path / "short.wav", "-t", "0.05")
    with pytest.raises(MediaError, match="the minimum is 0.1 s"):
        load_audio(b64("audio_base64", short.read_bytes()), tmp_path, SETTINGS)


# --- pose video -----------------------------------------------------------------------------------

def test_pose_video(tmp_path):
    video = tmp_path / "pose_src.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=64x64:rate=16",
                    "-t", "1", "-pix_fmt", "yuv420p", str(video)], check=True)
    path = load_pose_video(b64("pose_video_base64", video.read_bytes()), tmp_path, SETTINGS)
    assert path.is_file()
    with pytest.raises(MediaError, match="'pose_video_base64' is not a readable video"):
        load_pose_video(b64("pose_video_base64", b"not a video at all" * 10), tmp_path, SETTINGS)
