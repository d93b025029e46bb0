"""GPU faithfulness: the worker's pipeline against the official Wan2.2 code (run on the device:
bench/run_on_device.sh). Skipped where there is no CUDA. Bounds and checks live in
bench/faithfulness.py; with FAITHFULNESS_RESULTS set, the measured numbers are written there too."""
import json
import os

import pytest
import torch

from conftest import SPEECH_7S3

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

RESULTS = {}


def record(name: str, result: dict) -> dict:
    RESULTS[name] = result
    path = os.environ.get("FAITHFULNESS_RESULTS")
    if path:
        with open(path, "w") as sink:
            json.dump(RESULTS, sink, indent=1)
    return result


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory):
    import soundfile

    data, rate = soundfile.read(str(SPEECH_7S3), dtype="float32")
    path = tmp_path_factory.mktemp("audio") / "speech_7s3.wav"
    soundfile.write(str(path), data, rate, subtype="FLOAT")
    return path


def test_tiny_whole_job_matches_official_generate(tiny_checkpoint, portrait_png, speech_wav):
    from bench import faithfulness

    result = record("tiny_whole_job", faithfulness.tiny_whole_job(tiny_checkpoint, portrait_png,
                                                                  speech_wav))
    assert result["passed"], result


@pytest.fixture(scope="module")
def fullsize_dit():
    from bench import fullsize

    dit = fullsize.build_dit(torch.device("cuda"))
    yield dit
    del dit
    torch.cuda.empty_cache()


@pytest.mark.parametrize("resolution", ["480p", "720p"])
def test_fullsize_forward_matches_official_modules(fullsize_dit, resolution):
    from bench import faithfulness

    result = record(f"fullsize_forward_{resolution}",
                    faithfulness.fullsize_forward(fullsize_dit, resolution))
    assert result["passed"], result


def test_fullsize_three_guided_steps_match_official_loop(fullsize_dit):
    from bench import faithfulness

    result = record("fullsize_three_steps_480p", faithfulness.fullsize_three_steps(fullsize_dit, "480p"))
    assert result["passed"], result
