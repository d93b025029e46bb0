"""Shared fixtures: the package on sys.path, a tiny checkpoint built once per session, test media."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "builder"))

FIXTURES = ROOT / "tests" / "fixtures"
SPEECH_7S3 = FIXTURES / "speech_7s3.flac"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from make_tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "Wan2.2-S2V-14B")


@pytest.fixture(scope="session")
def portrait_png(tmp_path_factory) -> Path:
    """A 3:4 portrait drawn with Pillow (the model's output is noise anyway on the tiny checkpoint)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (192, 256), (70, 110, 160))
    draw = ImageDraw.Draw(image)
    draw.ellipse([50, 50, 142, 170], fill=(232, 190, 160))
    draw.ellipse([72, 92, 88, 104], fill=(255, 255, 255))
    draw.ellipse([104, 92, 120, 104], fill=(255, 255, 255))
    draw.arc([78, 120, 114, 146], 20, 160, fill=(150, 60, 60), width=3)
    path = tmp_path_factory.mktemp("media") / "portrait.png"
    image.save(path)
    return path
