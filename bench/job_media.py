"""The benchmarks' job media: a 16:9 portrait and speech of any length (the speech fixture of the
tests, repeated), written where a run wants them."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def speech(seconds: float, folder: Path) -> Path:
    """`seconds` of the 7.3 s speech fixture, repeated when longer."""
    import numpy as np
    import soundfile

    data, rate = soundfile.read(str(ROOT / "tests" / "fixtures" / "speech_7s3.flac"), dtype="float32")
    data = np.concatenate([data] * (1 + int(seconds * rate) // len(data)))
    path = folder / f"speech_{seconds}s.wav"
    soundfile.write(str(path), data[: int(seconds * rate)], rate, subtype="FLOAT")
    return path


def image_16x9(folder: Path) -> Path:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (1280, 720), (70, 110, 160))
    ImageDraw.Draw(image).ellipse([540, 160, 740, 440], fill=(232, 190, 160))
    path = folder / "portrait_16x9.png"
    image.save(path)
    return path
