"""Stand-in for imageio-ffmpeg on the GPU machine only (its wheel carries a 68 MB ffmpeg binary):
the ffmpeg named by IMAGEIO_FFMPEG_EXE (a carried static build, see bench/run_on_device.sh) or the
system's, when the machine has one. bench/run_on_device.sh copies this file to
/tmp/site/imageio_ffmpeg/__init__.py there when `import imageio_ffmpeg` fails; it is never
installed by the worker and nothing imports it under this file's name."""
import os
import shutil


def get_ffmpeg_exe() -> str:
    exe = os.environ.get("IMAGEIO_FFMPEG_EXE") or shutil.which("ffmpeg")
    if not exe:
        raise RuntimeError("no ffmpeg on this machine")
    return exe
