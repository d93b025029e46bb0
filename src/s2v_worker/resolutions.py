"""The video resolutions a job can ask for, defined once: each is the official largest pixel area
(wan/configs MAX_AREA_CONFIGS '832*480' and '1024*704'); the image's aspect ratio decides the
sides (planning.video_size)."""
from __future__ import annotations

from typing import Literal

Resolution = Literal["480p", "720p"]
RESOLUTIONS: dict[str, int] = {"480p": 832 * 480, "720p": 1024 * 704}
