"""Media intake: base64 and URL inputs, decoded for real (Pillow, ffmpeg, decord), with clear errors."""
import base64
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import SPEECH_7S3, closed_port_url, with_settings
from s2v_worker import decoders, media
from s2v_worker.job import AudioSlice, MediaSource
from s2v_worker.media import MediaError
from s2v_worker.settings import Settings

load_image, load_audio = with_settings(media.load_image), with_settings(media.load_audio)
load_pose_video = with_settings(media.load_pose_video)

SETTINGS = Settings.from_env({})
# The fixture server is on loopback, which media URLs may not reach unless allowed.
LOCAL = SETTINGS.replace(allowed_private_networks="127.0.0.0/8")


def b64(field: str, data: bytes, data_uri: str | None = None) -> MediaSource:
    text = base64.b64encode(data).decode()
    return MediaSource(field, base64=f"data:{data_uri};base64,{text}" if data_uri else text)


def convert_audio(src: Path, dest: Path, *codec_args: str) -> Path:
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(src), *codec_args, str(dest)], check=True)
    return dest


# --- images ---------------------------------------------------------------------------------------

def test_image_base64_raw_and_data_uri(portrait_png, tmp_path):
    for source in (b64("image_base64", portrait_png.read_bytes()),
                   b64("image_base64", portrait_png.read_bytes(), "image/png")):
        image = load_image(source, tmp_path, SETTINGS)
        assert (image.width, image.height) == (192, 256) and image.path.suffix == ".png"


def test_image_from_url(file_server, portrait_png, tmp_path):
    base, folder = file_server
    (folder / "face.png").write_bytes(portrait_png.read_bytes())
    image = load_image(MediaSource("image_url", url=f"{base}/face.png"), tmp_path, LOCAL)
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


def test_url_errors(file_server, tmp_path, portrait_png):
    base, folder = file_server
    with pytest.raises(MediaError, match="'image_url' could not be downloaded: HTTP 404"):
        load_image(MediaSource("image_url", url=f"{base}/missing.png"), tmp_path, LOCAL)
    (folder / "big.png").write_bytes(portrait_png.read_bytes())
    with pytest.raises(MediaError, match="'image_url' is larger than the 1000 byte limit"):
        load_image(MediaSource("image_url", url=f"{base}/big.png"), tmp_path,
                   LOCAL.replace(max_image_bytes=1000))
    # a refused connection, reported by field
    with pytest.raises(MediaError, match="'image_url' could not be downloaded: could not connect"):
        load_image(MediaSource("image_url", url=f"{closed_port_url()}/x.png"), tmp_path, LOCAL)


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
    # decoding stops a second past the limit, so the message gives a lower bound
    with pytest.raises(MediaError, match=r"more than 6 s long; the maximum is 5.0 s \(MAX_AUDIO_SECONDS\)"):
        load_audio(b64("audio_base64", SPEECH_7S3.read_bytes()), tmp_path,
                   SETTINGS.replace(max_audio_seconds=5.0))
    short = convert_audio(SPEECH_7S3, tmp_path / "short.wav", "-t", "0.05")
    with pytest.raises(MediaError, match="the minimum is 0.1 s"):
        load_audio(b64("audio_base64", short.read_bytes()), tmp_path, SETTINGS)
    with pytest.raises(MediaError, match=r"is 7.3 s long; the maximum is 7.0 s"):
        load_audio(b64("audio_base64", SPEECH_7S3.read_bytes()), tmp_path,
                   SETTINGS.replace(max_audio_seconds=7.0))


def test_mislabelled_media_is_named(tmp_path, portrait_png):
    mp3 = convert_audio(SPEECH_7S3, tmp_path / "s.mp3", "-c:a", "libmp3lame")
    with pytest.raises(MediaError, match="'image_base64' is not a readable image: it looks like audio"):
        load_image(b64("image_base64", mp3.read_bytes()), tmp_path, SETTINGS)
    with pytest.raises(MediaError, match="'audio_base64' is not a readable audio file: it looks like an image"):
        load_audio(b64("audio_base64", portrait_png.read_bytes()), tmp_path, SETTINGS)
    page = b"<!DOCTYPE html><html><body>Please sign in</body></html>"
    with pytest.raises(MediaError, match="'audio_base64' is not a readable audio file: it looks like an HTML page"):
        load_audio(b64("audio_base64", page), tmp_path, SETTINGS)
    with pytest.raises(MediaError, match="'pose_video_base64' is not an MP4, MOV, MKV, WebM or AVI video: it looks like audio"):
        load_pose_video(b64("pose_video_base64", mp3.read_bytes()), tmp_path, SETTINGS)


def test_image_pixel_limit_comes_from_settings(portrait_png, tmp_path):
    with pytest.raises(MediaError, match=r"'image_base64' has 192x256 pixels; the limit is 40000 \(MAX_IMAGE_PIXELS\)"):
        load_image(b64("image_base64", portrait_png.read_bytes()), tmp_path,
                   SETTINGS.replace(max_image_pixels=40_000))


def test_audio_playlist_formats_are_refused(tmp_path):
    """An ffconcat script would make ffmpeg read other files named inside it: not an audio format."""
    (tmp_path / "other.flac").write_bytes(SPEECH_7S3.read_bytes())
    script = b"ffconcat version 1.0\nfile other.flac\n"
    with pytest.raises(MediaError, match="'audio_base64' is not a readable audio file"):
        load_audio(b64("audio_base64", script), tmp_path, SETTINGS)


def official_model_samples(source: Path, folder: Path):
    """What the model read before the streamed decoder: ffmpeg to a float32 WAV at the source's own
    rate and channels, then the official AudioEncoder's librosa.load(path, sr=16000)."""
    import imageio_ffmpeg
    import librosa

    wav = folder / "float32_source_rate.wav"  # with the worker's ffmpeg (decoders differ by version)
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-i", str(source), "-map", "0:a:0",
                    "-c:a", "pcm_f32le", str(wav)], check=True)
    return librosa.load(str(wav), sr=16000)[0]


@pytest.mark.parametrize("suffix, codec_args", [
    (".flac", ()),  # the fixture as is: 16 kHz mono
    (".mp3", ("-ar", "44100", "-ac", "2", "-c:a", "libmp3lame")),
    (".m4a", ("-ar", "48000", "-ac", "2", "-c:a", "aac")),
    (".wav", ("-ar", "22050", "-c:a", "pcm_s16le")),
    (".flac", ("-ar", "192000", "-ac", "8", "-af", "aeval=val(0)*(1+ch/8):c=same")),  # 8 unequal channels
])
def test_model_audio_is_exactly_what_librosa_load_returns(tmp_path, suffix, codec_args):
    """Downmix and resampling happen here block by block (bounded memory), with librosa's own
    to_mono and soxr at soxr_hq as a stream: the samples are bit-identical to librosa.load's."""
    import librosa

    source = SPEECH_7S3 if not codec_args else convert_audio(
        SPEECH_7S3, tmp_path / f"speech{suffix}", "-t", "3", *codec_args)
    audio = load_audio(b64("audio_base64", source.read_bytes()), tmp_path, SETTINGS)
    model, rate = librosa.load(str(audio.model_path), sr=16000)  # what the official encoder reads
    assert rate == 16000 and model.dtype == np.float32
    assert np.array_equal(model, official_model_samples(source, tmp_path))


@pytest.mark.parametrize("suffix, codec_args", [
    (".flac", ()),  # 16 kHz mono
    (".mp3", ("-ar", "44100", "-ac", "2", "-c:a", "libmp3lame")),
])
def test_a_slice_is_the_models_samples_of_its_span(tmp_path, suffix, codec_args):
    """The model hears exactly librosa.load's samples of [start, start + duration), cut by sample
    index at 16 kHz; the original is kept whole for the MP4 (video.py cuts its audio there)."""
    import soundfile

    source = SPEECH_7S3 if not codec_args else convert_audio(
        SPEECH_7S3, tmp_path / f"speech{suffix}", "-t", "5", *codec_args)
    whole = official_model_samples(source, tmp_path)
    for audio_slice, first, stop in ((AudioSlice(1.25, 2.0), 20_000, 52_000),
                                     (AudioSlice(3.0), 48_000, len(whole))):
        audio = media.load_audio(b64("audio_base64", source.read_bytes()), tmp_path,
                                 SETTINGS.media, SETTINGS.network, audio_slice)
        model, rate = soundfile.read(str(audio.model_path), dtype="float32")
        assert rate == 16000 and np.array_equal(model, whole[first:stop])
        assert audio.start_s == audio_slice.start_s
        assert audio.duration_s == pytest.approx((stop - first) / 16000, abs=1e-4)
        assert audio.original_path.read_bytes() == source.read_bytes()


@pytest.mark.parametrize("audio_slice, message", [
    (AudioSlice(7.3), r"'audio_start_s' is 7.3 s, at or past the end of 'audio_base64', which is "
                      r"7.300 s long"),
    (AudioSlice(9.0, 1.0), r"'audio_start_s' is 9 s, at or past the end of 'audio_base64', which is "
                           r"7.300 s long"),
    (AudioSlice(5.0, 2.5), r"'audio_start_s' \+ 'audio_duration_s' is 7.5 s, past the end of "
                           r"'audio_base64', which is 7.300 s long"),
    (AudioSlice(7.25), r"the slice of 'audio_base64' from 'audio_start_s' \(7.25 s\) is 0.050 s "
                       r"long; the minimum is 0.1 s \(MIN_AUDIO_SECONDS\)"),
    (AudioSlice(1.0, 0.0), r"the slice of 'audio_base64' from 'audio_start_s' \(1 s\) is 0.000 s "
                           r"long; the minimum is 0.1 s \(MIN_AUDIO_SECONDS\)"),
])
def test_a_slice_outside_the_audio_is_a_clear_error(tmp_path, audio_slice, message):
    with pytest.raises(MediaError, match=f"^{message}$"):
        media.load_audio(b64("audio_base64", SPEECH_7S3.read_bytes()), tmp_path, SETTINGS.media,
                         SETTINGS.network, audio_slice)


def test_a_slice_ending_a_rounding_error_past_the_end_ends_at_it(tmp_path):
    """An echoed audio_duration_s sent back (rounded to the microsecond) is not an overrun."""
    audio = media.load_audio(b64("audio_base64", SPEECH_7S3.read_bytes()), tmp_path,
                             SETTINGS.media, SETTINGS.network, AudioSlice(2.0, 5.3004))
    assert audio.duration_s == pytest.approx(5.3, abs=1e-9)


def test_non_finite_samples_are_refused(tmp_path):
    import soundfile

    for bad in (np.nan, np.inf, -np.inf):
        samples = np.zeros((16000, 2), dtype=np.float32)
        samples[12345, 1] = bad
        path = tmp_path / "float.wav"
        soundfile.write(str(path), samples, 16000, subtype="FLOAT")
        with pytest.raises(MediaError, match=r"^'audio_base64' has samples that are not finite "
                                             r"numbers \(NaN or infinity\)$"):
            load_audio(b64("audio_base64", path.read_bytes()), tmp_path, SETTINGS)


def test_audio_channel_and_rate_limits(tmp_path):
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i",
                    "aevalsrc=sin(600*t)|0|0|0|0|0|0|0|0:s=8000:d=0.5", str(tmp_path / "nine.wav")], check=True)
    with pytest.raises(MediaError, match=r"^'audio_base64' has 9 channels; the limit is 8 \(MAX_AUDIO_CHANNELS\)$"):
        load_audio(b64("audio_base64", (tmp_path / "nine.wav").read_bytes()), tmp_path, SETTINGS)
    speech_48k = convert_audio(SPEECH_7S3, tmp_path / "s48.wav", "-t", "1", "-ar", "48000")
    with pytest.raises(MediaError, match=r"^'audio_base64' is sampled at 48000 Hz; the limit is 44100 Hz "
                                         r"\(MAX_AUDIO_SAMPLE_RATE\)$"):
        load_audio(b64("audio_base64", speech_48k.read_bytes()), tmp_path,
                   SETTINGS.replace(max_audio_sample_rate=44100))
    speech_2k = convert_audio(SPEECH_7S3, tmp_path / "s2k.wav", "-t", "1", "-ar", "2000")
    with pytest.raises(MediaError, match=r"^'audio_base64' is sampled at 2000 Hz; speech needs at least 4000 Hz$"):
        load_audio(b64("audio_base64", speech_2k.read_bytes()), tmp_path, SETTINGS)


# Runs in a fresh interpreter: the peak resident memory of the decode alone (VmHWM, reset after a
# warm-up decode that does the imports), and the largest the job folder grows while it runs.
_BOUNDED_DECODE = """
import base64, json, sys, threading, time
from pathlib import Path
from s2v_worker.job import MediaSource
from s2v_worker.media import load_audio
from s2v_worker.settings import Settings

def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))

settings = Settings.from_env({})
warm, big, work = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
load_audio(MediaSource("audio_base64", base64=base64.b64encode(warm.read_bytes()).decode()), work,
           settings.media, settings.network)
source = MediaSource("audio_base64", base64=base64.b64encode(big.read_bytes()).decode())
for f in work.iterdir():
    f.unlink()
largest, done = [0], threading.Event()
def watch():
    while not done.is_set():
        largest[0] = max(largest[0], sum(f.stat().st_size for f in work.iterdir() if f.exists()))
        time.sleep(0.01)
watcher = threading.Thread(target=watch)
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
watcher.start()
started = time.monotonic()
audio = load_audio(source, work, settings.media, settings.network)
elapsed = time.monotonic() - started
done.set(); watcher.join()
print(json.dumps({"peak_growth": status("VmHWM") - before, "largest_folder": largest[0],
                  "files": {f.name: f.stat().st_size for f in work.iterdir()},
                  "duration": audio.duration_s, "channels": audio.channels, "rate": audio.sample_rate,
                  "seconds": elapsed}))
"""


def test_8_channel_192khz_silence_decodes_in_bounded_memory_and_disk(tmp_path):
    """The issue's case: 128 kB of FLAC that decoded to a 1.8 GB temp WAV and about 2 GB more
    worker memory. Now: at most 200 MB more memory, and no file beyond the model's own input."""
    flac = tmp_path / "silence.flac"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "anullsrc=r=192000:cl=7.1",
                    "-t", "299", "-c:a", "flac", str(flac)], check=True)
    warm = convert_audio(SPEECH_7S3, tmp_path / "warm.wav", "-t", "0.5", "-ar", "48000", "-ac", "2")
    work = tmp_path / "work"
    work.mkdir()
    run = subprocess.run([sys.executable, "-c", _BOUNDED_DECODE, str(warm), str(flac),
                          str(work)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    print("bounded decode:", result)  # the measured numbers, for the record
    assert (result["channels"], result["rate"], result["duration"]) == (8, 192000, pytest.approx(299.0))
    model_input = 299 * 16000 * 4  # mono float32 at 16 kHz
    assert result["files"]["audio.wav"] == pytest.approx(model_input, abs=100)  # plus the WAV header
    assert set(result["files"]) == {"audio.input", "audio.wav"}
    assert result["largest_folder"] <= flac.stat().st_size + result["files"]["audio.wav"]
    assert result["peak_growth"] < 200 * 1024 * 1024


def test_audio_decode_time_is_limited(tmp_path, monkeypatch):
    monkeypatch.setattr(decoders, "DECODE_TIMEOUT_S", 0.001)
    with pytest.raises(MediaError, match="'audio_base64' took longer than 0.001 s to decode"):
        load_audio(b64("audio_base64", SPEECH_7S3.read_bytes()), tmp_path, SETTINGS)


# --- pose video -----------------------------------------------------------------------------------

def make_video(dest: Path, size: str = "64x64", seconds: float = 1, *args: str) -> Path:
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", f"testsrc=size={size}:rate=16",
                    "-t", str(seconds), "-pix_fmt", "yuv420p", *args, str(dest)], check=True)
    return dest


def test_pose_video(tmp_path):
    video = make_video(tmp_path / "pose_src.mp4")
    path = load_pose_video(b64("pose_video_base64", video.read_bytes()), tmp_path, SETTINGS)
    assert path.is_file()
    with pytest.raises(MediaError, match="'pose_video_base64' is not an MP4, MOV, MKV, WebM or AVI video"):
        load_pose_video(b64("pose_video_base64", b"not a video at all" * 10), tmp_path, SETTINGS)
    with pytest.raises(MediaError, match="'pose_video_base64' is not a readable video"):
        load_pose_video(b64("pose_video_base64", video.read_bytes()[:2000]), tmp_path, SETTINGS)


def test_pose_video_limits(tmp_path):
    video = make_video(tmp_path / "pose_src.mp4", "96x64", 1)
    with pytest.raises(MediaError, match=r"has 16 frames; the limit is 10 \(MAX_POSE_VIDEO_FRAMES\)"):
        load_pose_video(b64("pose_video_base64", video.read_bytes()), tmp_path,
                        SETTINGS.replace(max_pose_video_frames=10))
    with pytest.raises(MediaError, match=r"is 96x64; the longest side may be 80 pixels \(MAX_POSE_VIDEO_SIDE\)"):
        load_pose_video(b64("pose_video_base64", video.read_bytes()), tmp_path,
                        SETTINGS.replace(max_pose_video_side=80))
    webm = make_video(tmp_path / "pose_src.webm", "64x64", 0.5, "-c:v", "libvpx")
    assert load_pose_video(b64("pose_video_base64", webm.read_bytes()), tmp_path, SETTINGS).is_file()


def test_pose_video_playlist_is_refused_before_decord_sees_it(tmp_path):
    """decord's libavformat reads an HLS playlist whatever the file is called, then opens the files
    and URLs it lists (here a local segment; it could as well be a URL inside the network)."""
    segment = make_video(tmp_path / "seg.ts", "64x64", 1, "-f", "mpegts")
    playlist = (f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:1,\nfile://{segment}\n"
                "#EXT-X-ENDLIST\n").encode()
    with pytest.raises(MediaError, match="'pose_video_base64' is not an MP4, MOV, MKV, WebM or AVI video"):
        load_pose_video(b64("pose_video_base64", playlist), tmp_path, SETTINGS)
