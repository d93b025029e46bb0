"""Job validation: every rule of the schema, as a pure function (no model, no network)."""
import json

import pytest

from s2v_worker.job import (DEFAULT_NEGATIVE_PROMPT, GENERATION_FIELDS, JobInputError, parse_job,
                            unipc_max_shift)
from conftest import ROOT

GOOD_INPUT = {"image_url": "https://example.com/face.png", "audio_base64": "UklGRg=="}


def job(**fields):
    return {"id": "job-1", "input": {**GOOD_INPUT, **fields}}


def error_of(payload) -> str:
    with pytest.raises(JobInputError) as info:
        parse_job(payload)
    return str(info.value)


def test_defaults_follow_the_issue_and_the_official_config():
    request = parse_job(job())
    g = request.generation
    assert (g.prompt, g.negative_prompt, g.resolution, g.sample_steps, g.guidance_scale, g.shift,
            g.solver, g.seed, g.infer_frames, g.max_clips, g.fps, g.init_first_frame) == (
        "", None, "720p", 30, 4.5, 3.0, "unipc", None, 80, None, 24, False)
    assert request.image.url == GOOD_INPUT["image_url"] and request.image.base64 is None
    assert request.audio.base64 == GOOD_INPUT["audio_base64"]
    assert request.pose_video is None and request.storage is None
    assert request.job_id == "job-1"


def test_every_generation_field_is_accepted_at_a_valid_value():
    request = parse_job(job(prompt="hi", negative_prompt="blur", resolution="480p", sample_steps=4,
                            guidance_scale=1, shift=5.0, solver="dpm++", seed=0, infer_frames=48,
                            max_clips=2, fps=16, init_first_frame=True,
                            pose_video_base64="AAAA"))
    g = request.generation
    assert (g.resolution, g.sample_steps, g.guidance_scale, g.solver, g.seed, g.infer_frames,
            g.max_clips, g.fps, g.init_first_frame) == ("480p", 4, 1.0, "dpm++", 0, 48, 2, 16, True)
    assert request.pose_video.field == "pose_video_base64"


@pytest.mark.parametrize("fields, fragment", [
    ({"resolution": "1080p"}, "'resolution' must be one of"),
    ({"sample_steps": 0}, "'sample_steps' must be between 1 and 100"),
    ({"sample_steps": 101}, "'sample_steps' must be between 1 and 100"),
    ({"sample_steps": 3.5}, "'sample_steps' must be an integer"),
    ({"sample_steps": True}, "'sample_steps' must be an integer"),
    ({"sample_steps": "30"}, "'sample_steps' must be an integer"),
    ({"guidance_scale": -1}, "'guidance_scale' must be at least 0.0"),
    ({"guidance_scale": "high"}, "'guidance_scale' must be a number"),
    ({"shift": 0}, "'shift' must be at least 0.001 and at most 100.0, got 0"),
    ({"shift": 0.0005, "solver": "dpm++"}, "'shift' must be at least 0.001"),
    ({"shift": 100.5}, "'shift' must be at least 0.001 and at most 100.0, got 100.5"),
    ({"guidance_scale": float("nan")}, "'guidance_scale' must be a finite number, got nan"),
    ({"shift": float("inf")}, "'shift' must be a finite number, got inf"),
    ({"guidance_scale": float("-inf")}, "'guidance_scale' must be a finite number, got -inf"),
    ({"loras": [{"path": "l.safetensors", "strength": float("nan")}]},
     "'loras[0].strength' must be a finite number, got nan"),
    ({"solver": "euler"}, "'solver' must be one of"),
    ({"seed": -1}, "'seed' must be between 0 and"),
    ({"seed": 2**70}, "'seed' must be between 0 and"),
    ({"infer_frames": 81}, "'infer_frames' must be a multiple of 4"),
    ({"infer_frames": 4}, "'infer_frames' must be between 8 and 200"),
    ({"max_clips": 0}, "'max_clips' must be between 1 and 1000"),
    ({"fps": 30}, "'fps' must be one of 24, 16"),
    ({"fps": True}, "'fps' must be one of"),
    ({"init_first_frame": "yes"}, "'init_first_frame' must be true or false"),
    ({"prompt": 5}, "'prompt' must be a string"),
    ({"prompt": "x" * 5001}, "'prompt' must be at most 5000 characters"),
    ({"negative_prompt": ["a"]}, "'negative_prompt' must be a string"),
    ({"steps": 30}, "unknown input fields: steps"),
    ({"pose_video_url": "ftp://x/y.mp4"}, "'pose_video_url' must be an http or https URL"),
    ({"pose_video_url": "https://a/p.mp4", "pose_video_base64": "AAAA"},
     "give only one of 'pose_video_url' and 'pose_video_base64'"),
])
def test_each_rule_names_its_field(fields, fragment):
    assert fragment in error_of(job(**fields))


@pytest.mark.parametrize("payload, fragment", [
    ({"id": "x", "input": {"audio_base64": "AAAA"}}, "needs one of 'image_url' or 'image_base64'"),
    ({"id": "x", "input": {"image_base64": "AAAA"}}, "needs one of 'audio_url' or 'audio_base64'"),
    ({"id": "x", "input": {**GOOD_INPUT, "image_base64": "AAAA"}},
     "give only one of 'image_url' and 'image_base64'"),
    ({"id": "x", "input": {**GOOD_INPUT, "audio_url": "https://a/b.wav"}},
     "give only one of 'audio_url' and 'audio_base64'"),
    ({"id": "x", "input": {"image_url": "file:///etc/passwd", "audio_base64": "AAAA"}},
     "'image_url' must be an http or https URL"),
    ({"id": "x", "input": {"image_url": "https://", "audio_base64": "AAAA"}},
     "'image_url' must be an http or https URL"),
    ({"id": "x", "input": {"image_url": "https://a/b.png", "audio_base64": "   "}},
     "'audio_base64' is empty"),
    ({"id": "x", "input": None}, "'input' must be a JSON object"),
    ({"id": "x", "input": [1, 2]}, "'input' must be a JSON object"),
    ({"id": "x"}, "'input' must be a JSON object"),
    ([], "the job must be a JSON object"),
])
def test_media_rules(payload, fragment):
    assert fragment in error_of(payload)


def test_s3_config_overrides_storage_and_is_validated():
    override = parse_job({**job(), "s3Config": {"accessId": "AK", "accessSecret": "SK",
                                                 "bucketName": "b", "endpointUrl": "https://s3.x"}}).storage
    assert (override.access_id, override.access_secret, override.bucket_name, override.endpoint_url) == (
        "AK", "SK", "b", "https://s3.x")
    assert "SK" not in repr(override)
    assert "'s3Config.bucketName' must be a non-empty string" in error_of(
        {**job(), "s3Config": {"accessId": "AK", "accessSecret": "SK", "endpointUrl": "https://s3.x"}})
    assert "'s3Config' has unknown fields: region" in error_of(
        {**job(), "s3Config": {"accessId": "A", "accessSecret": "S", "bucketName": "b",
                               "endpointUrl": "https://s3.x", "region": "eu"}})
    assert "'s3Config' must be an object" in error_of({**job(), "s3Config": "s3://bucket"})


def test_speed_is_exact_unless_asked_and_fast_mode_caches_steps_unless_told_not_to():
    assert (parse_job(job()).generation.speed, parse_job(job()).generation.step_cache) == ("exact", False)
    fast = parse_job(job(speed="fast")).generation
    assert (fast.speed, fast.step_cache) == ("fast", True)
    assert parse_job(job(speed="fast", step_cache=False)).generation.step_cache is False
    assert parse_job(job(speed="exact", step_cache=False)).generation.step_cache is False
    assert "'step_cache' is part of fast mode" in error_of(job(step_cache=True))
    assert "'speed' must be one of" in error_of(job(speed="turbo"))
    assert "'step_cache' must be true or false" in error_of(job(speed="fast", step_cache="yes"))


def test_null_means_default():
    request = parse_job(job(seed=None, resolution=None, negative_prompt=None))
    assert request.generation.seed is None and request.generation.resolution == "720p"


def test_every_generation_field_has_a_default_that_passes_its_own_rule():
    for name, (rule, default) in GENERATION_FIELDS.items():
        if default is not None:
            assert rule(name, default) == default


def test_default_negative_prompt_is_the_official_one():
    from s2v_worker.pipeline import OFFICIAL_CONFIG

    assert DEFAULT_NEGATIVE_PROMPT == OFFICIAL_CONFIG.sample_neg_prompt


def test_test_input_json_is_a_valid_job():
    payload = json.loads((ROOT / "test_input.json").read_text())
    request = parse_job(payload)
    assert request.image.base64.startswith("data:image/") and request.audio.base64.startswith("data:audio/")


# --- shift, per solver ------------------------------------------------------------------------------

def test_unipc_shift_ceiling_falls_with_the_step_count():
    # Values from bisecting the official scheduler (tests/test_pipeline.py runs it at these limits).
    assert [unipc_max_shift(steps) for steps in (1, 2, 10, 12, 30, 40, 100)] == [
        float("inf"), 1000.99, 112.11, 91.9, 35.48, 26.64, 11.1]


def test_shift_is_checked_against_the_solver_and_the_step_count():
    assert parse_job(job(shift=35.48)).generation.shift == 35.48  # unipc, 30 steps: the limit itself
    message = error_of(job(shift=36))
    assert message == ("'shift' must be at most 35.48 with the unipc solver at 30 steps (above it the "
                       "solver's first two timesteps coincide and it fails), got 36.0; lower the shift, "
                       "use fewer steps, or \"solver\": \"dpm++\"")
    assert "at most 11.1 with the unipc solver at 100 steps" in error_of(job(shift=12, sample_steps=100))
    assert parse_job(job(shift=100, sample_steps=10)).generation.shift == 100.0  # below the ceiling
    assert parse_job(job(shift=100, solver="dpm++", sample_steps=100)).generation.shift == 100.0
    assert parse_job(job(shift=0.001, sample_steps=100)).generation.shift == 0.001


# --- text the result could not carry ----------------------------------------------------------------

LONE = "\ud800"  # what JSON's "\ud800" decodes to: no UTF-8 form


@pytest.mark.parametrize("payload, message", [
    (job(prompt=f"a {LONE} b"), "'input.prompt' is not valid text"),
    (job(negative_prompt=LONE), "'input.negative_prompt' is not valid text"),
    (job(**{f"x{LONE}": 1}), "a key in 'input' is not valid text"),
    (job(loras=[{"url": f"https://a.example/{LONE}.safetensors"}]), "'input.loras[0].url' is not valid text"),
    (job(loras=[{f"k{LONE}": 1}]), "a key in 'input.loras[0]' is not valid text"),
    ({**job(), "id": f"job-{LONE}"}, "'id' is not valid text"),
    ({**job(), "s3Config": {"accessId": "AK", "accessSecret": "SK", "bucketName": LONE,
                            "endpointUrl": "https://s3.example.com"}}, "'s3Config.bucketName' is not valid text"),
    (job(prompt="\udfff"), "'input.prompt' is not valid text"),  # a low surrogate alone too
])
def test_lone_surrogates_are_refused_up_front_with_a_message_that_encodes(payload, message):
    error = error_of(payload)
    assert error.startswith(message) and "UTF-16 surrogate" in error
    json.dumps({"error": error}, ensure_ascii=False).encode("utf-8")  # as RunPod sends it


def test_text_outside_the_basic_plane_and_deep_nesting_are_fine():
    emoji = "\U0001f600 \u4f60\u597d"  # a surrogate pair in UTF-16, one character here: valid
    assert parse_job(job(prompt=emoji)).generation.prompt == emoji
    deep = []
    for _ in range(10_000):  # walked without recursion
        deep = [deep]
    assert "unknown input fields: extra" in error_of(job(extra=deep))
