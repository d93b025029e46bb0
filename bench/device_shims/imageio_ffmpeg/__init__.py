"""Stand-in for imageio-ffmpeg on the GPU machine only (its wheel carries a 68 MB ffmpeg binary):
the system ffmpeg, when the machine has one. Never installed by the worker."""
import os
import shutil


def get_ffmpeg_exe() -> str:
    exe = os.environ.get("IMAGEIO_FFMPEG_EXE") or shutil.which("ffmpeg")
    if not exe:
        raise RuntimeError("no ffmpeg on this machine")
    return exe
