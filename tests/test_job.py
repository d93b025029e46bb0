"""Job validation: every rule of the schema with its whole message, as a pure function (no model, no
network); the order rules are reported in; the published JSON Schema (docs are
tests/test_reference.py's)."""
import json

import pytest
from pydantic import ValidationError

from conftest import ROOT
from s2v_worker.job import (MAX_SEED, SEED_RANGE, AudioSlice, GenerationSettings, JobInputError,
                            parse_job, unipc_max_shift)
from s2v_worker.reference import job_json_schema

GOOD_INPUT = {"image_url": "https://example.com/face.png", "audio_base64": "UklGRg=="}
S3 = {"accessId": "AK", "accessSecret": "SK", "bucketName": "b", "endpointUrl": "https://s3.example.com"}


def job(**fields):
    return {"id": "job-1", "input": {**GOOD_INPUT, **fields}}


def with_s3(**fields):
    return {**job(), "s3Config": {**S3, **fields}}


def error_of(payload) -> str:
    with pytest.raises(JobInputError) as info:
        parse_job(payload)
    return str(info.value)


def test_defaults_follow_the_official_config():
    request = parse_job(job())
    g = request.generation
    assert (g.prompt, g.negative_prompt, g.resolution, g.sample_steps, g.guidance_scale, g.shift,
            g.solver, g.seed, g.infer_frames, g.max_clips, g.fps, g.init_first_frame, g.speed,
            g.step_cache) == ("", None, "720p", 30, 4.5, 3.0, "unipc", None, 80, None, 24, False,
                              "exact", False)
    assert request.image.url == GOOD_INPUT["image_url"] and request.image.base64 is None
    assert request.audio.base64 == GOOD_INPUT["audio_base64"]
    assert request.pose_video is None and request.storage is None and request.loras == ()
    assert request.job_id == "job-1"
    assert parse_job({"input": GOOD_INPUT}).job_id == "local"


def test_every_generation_field_is_accepted_at_a_valid_value():
    request = parse_job(job(prompt="hi", negative_prompt="blur", resolution="480p", sample_steps=4,
                            guidance_scale=1, shift=5.0, solver="dpm++", seed=0, infer_frames=48,
                            max_clips=2, fps=16, init_first_frame=True,
                            pose_video_base64="AAAA"))
    g = request.generation
    assert (g.resolution, g.sample_steps, g.guidance_scale, g.solver, g.seed, g.infer_frames,
            g.max_clips, g.fps, g.init_first_frame) == ("480p", 4, 1.0, "dpm++", 0, 48, 2, 16, True)
    assert type(g.guidance_scale) is float  # an integer given for a number field
    assert request.pose_video.field == "pose_video_base64"


def test_the_audio_slice_is_read_and_defaults_to_the_whole_audio():
    assert parse_job(job()).audio_slice == AudioSlice(0.0, None) and AudioSlice().whole
    request = parse_job(job(audio_start_s=2, audio_duration_s=3.5))
    assert request.audio_slice == AudioSlice(2.0, 3.5) and not request.audio_slice.whole
    assert type(request.audio_slice.start_s) is float
    assert parse_job(job(audio_start_s=None, audio_duration_s=None)).audio_slice.whole


def test_the_settings_are_immutable_and_list_every_field():
    generation = parse_job(job(seed=7)).generation
    with pytest.raises(ValidationError, match="frozen"):
        generation.seed = 8
    assert list(generation.as_dict()) == list(GenerationSettings.model_fields)
    assert generation.as_dict()["seed"] == 7


# Every rule, once, with its whole message (test_bad_jobs.py runs these jobs through a worker).
RULES = [
    # the job and its input
    ([], "the job must be a JSON object"),
    ({"id": "x"}, "the job's 'input' must be a JSON object"),
    ({"id": "x", "input": None}, "the job's 'input' must be a JSON object"),
    ({"id": "x", "input": [1, 2]}, "the job's 'input' must be a JSON object"),
    ({"input": "make a video"}, "the job's 'input' must be a JSON object"),
    ({"input": {**GOOD_INPUT, 1: "x"}}, "the job's 'input' keys must be strings"),
    (job(steps=30), "unknown input fields: steps"),
    (job(steps=30, __proto__={}), "unknown input fields: __proto__, steps"),
    # media: one source each
    ({"id": "x", "input": {}}, "the job needs one of 'image_url' or 'image_base64'"),
    ({"id": "x", "input": {"image_base64": "AAAA"}}, "the job needs one of 'audio_url' or 'audio_base64'"),
    (job(image_base64="AAAA"), "give only one of 'image_url' and 'image_base64', not both"),
    (job(audio_url="https://a.example/a.wav"), "give only one of 'audio_url' and 'audio_base64', not both"),
    (job(pose_video_url="https://a.example/p.mp4", pose_video_base64="AAAA"),
     "give only one of 'pose_video_url' and 'pose_video_base64', not both"),
    (job(image_url="ftp://a.example/i.png"), "'image_url' must be an http or https URL"),
    (job(image_url="file:///etc/passwd"), "'image_url' must be an http or https URL"),
    (job(image_url="javascript:alert(1)"), "'image_url' must be an http or https URL"),
    (job(image_url="https://"), "'image_url' must be an http or https URL"),
    (job(pose_video_url="ftp://x/y.mp4"), "'pose_video_url' must be an http or https URL"),
    (job(image_url="http://[::1"), "'image_url' is not a valid URL"),
    (job(image_url=5), "'image_url' must be a string, got int"),
    (job(image_url="https://a.example/" + "x" * 8200), "'image_url' must be at most 8192 characters, got 8218"),
    (job(audio_base64="   "), "'audio_base64' is empty"),
    (job(audio_base64=""), "'audio_base64' is empty"),
    # text
    (job(prompt=5), "'prompt' must be a string, got int"),
    (job(prompt="x" * 5001), "'prompt' must be at most 5000 characters, got 5001"),
    (job(negative_prompt=["a"]), "'negative_prompt' must be a string, got list"),
    # choices
    (job(resolution="1080p"), "'resolution' must be one of '480p', '720p', got '1080p'"),
    (job(resolution=480), "'resolution' must be one of '480p', '720p', got 480"),
    (job(solver="euler"), "'solver' must be one of 'unipc', 'dpm++', got 'euler'"),
    (job(fps=30), "'fps' must be one of 24, 16, got 30"),
    (job(fps=True), "'fps' must be one of 24, 16, got True"),
    (job(speed="turbo"), "'speed' must be one of 'exact', 'fast', 'fastest', got 'turbo'"),
    (job(init_first_frame="yes"), "'init_first_frame' must be true or false, got 'yes'"),
    (job(speed="fast", step_cache="yes"), "'step_cache' must be true or false, got 'yes'"),
    # integers: no floats, no booleans, no text; any size
    (job(sample_steps=0), "'sample_steps' must be between 1 and 100, got 0"),
    (job(sample_steps=101), "'sample_steps' must be between 1 and 100, got 101"),
    (job(sample_steps=2.5), "'sample_steps' must be an integer, got float"),
    (job(sample_steps=True), "'sample_steps' must be an integer, got bool"),
    (job(sample_steps="30"), "'sample_steps' must be an integer, got str"),
    (job(seed=-1), "'seed' must be between 0 and 4611686018427387904, got -1"),
    (job(seed=2**70), "'seed' must be between 0 and 4611686018427387904, got 1180591620717411303424"),
    (job(seed=10**5000), "'seed' must be between 0 and 4611686018427387904, got a number with too many digits"),
    (job(seed=1e30), "'seed' must be an integer, got float"),
    (job(infer_frames=81), "'infer_frames' must be a multiple of 4, got 81"),
    (job(infer_frames=4), "'infer_frames' must be between 8 and 200, got 4"),
    (job(infer_frames=1000), "'infer_frames' must be between 8 and 200, got 1000"),
    (job(infer_frames=201), "'infer_frames' must be between 8 and 200, got 201"),  # nor a multiple
    (job(max_clips=0), "'max_clips' must be between 1 and 1000, got 0"),
    # the audio's slice (against the audio's length: test_media.py)
    (job(audio_start_s=-1), "'audio_start_s' must be at least 0.0 and at most 86400.0, got -1"),
    (job(audio_duration_s=-0.5), "'audio_duration_s' must be at least 0.0 and at most 86400.0, got -0.5"),
    (job(audio_duration_s=1e6), "'audio_duration_s' must be at least 0.0 and at most 86400.0, got 1000000.0"),
    (job(audio_start_s="1:30"), "'audio_start_s' must be a number, got str"),
    (job(audio_duration_s=float("inf")), "'audio_duration_s' must be a finite number, got inf"),
    # numbers: finite, no booleans, integers of any size
    (job(guidance_scale=-1), "'guidance_scale' must be at least 0.0 and at most 20.0, got -1"),
    (job(guidance_scale="high"), "'guidance_scale' must be a number, got str"),
    (job(guidance_scale=True), "'guidance_scale' must be a number, got bool"),
    (job(guidance_scale=float("nan")), "'guidance_scale' must be a finite number, got nan"),
    (job(guidance_scale=float("-inf")), "'guidance_scale' must be a finite number, got -inf"),
    (job(guidance_scale=10**400),  # too large for a float
     "'guidance_scale' must be at least 0.0 and at most 20.0, got 1000000000000000000000000000000000000000..."),
    (job(shift=0), "'shift' must be at least 0.001 and at most 100.0, got 0"),
    (job(shift=1e-6), "'shift' must be at least 0.001 and at most 100.0, got 1e-06"),
    (job(shift=0.0005, solver="dpm++"), "'shift' must be at least 0.001 and at most 100.0, got 0.0005"),
    (job(shift=150, solver="dpm++"), "'shift' must be at least 0.001 and at most 100.0, got 150"),
    (job(shift=float("inf")), "'shift' must be a finite number, got inf"),
    (job(loras=[{"path": "l.safetensors", "strength": float("nan")}]),
     "'loras[0].strength' must be a finite number, got nan"),
    # rules between fields
    (job(step_cache=True), "'step_cache' is part of fast mode: set \"speed\": \"fast\" or \"fastest\" with it"),
    (job(shift=36), "'shift' must be at most 35.48 with the unipc solver at 30 steps (above it the "
                    "solver's first two timesteps coincide and it fails), got 36.0; lower the shift, "
                    "use fewer steps, or \"solver\": \"dpm++\""),
    (job(shift=12, sample_steps=100), "'shift' must be at most 11.1 with the unipc solver at 100 steps "
                                      "(above it the solver's first two timesteps coincide and it "
                                      "fails), got 12.0; lower the shift, use fewer steps, or "
                                      "\"solver\": \"dpm++\""),
    # s3Config, RunPod's per-job bucket beside `input` (the LoRA rules: test_lora.py)
    ({**job(), "s3Config": "s3://bucket"}, "'s3Config' must be an object"),
    (with_s3(region="eu"), "'s3Config' has unknown fields: region"),
    (with_s3(bucketName=None), "'s3Config.bucketName' must be a non-empty string"),
    (with_s3(accessSecret="  "), "'s3Config.accessSecret' must be a non-empty string"),
    (with_s3(accessId=5), "'s3Config.accessId' must be a non-empty string"),
    (with_s3(endpointUrl="ftp://x"), "'s3Config.endpointUrl' must be an http or https URL"),
    (with_s3(endpointUrl="https://s3.example.com/" + "a" * 8192),
     "'s3Config.endpointUrl' must be at most 8192 characters, got 8215"),
    # no coercion: a float equal to a choice is not one of the integer choices
    (job(fps=24.0), "'fps' must be one of 24, 16, got 24.0"),
]


@pytest.mark.parametrize("payload, message", RULES)
def test_each_rule_has_its_own_message(payload, message):
    assert error_of(payload) == message


@pytest.mark.parametrize("where", ["input", "s3Config", "lora"])
def test_unknown_field_messages_name_a_few_and_count_the_rest(where):
    """50,000 unknown keys: a message of a line (it is returned and logged), not of their names."""
    unknown = {f"k{i:05d}": 1 for i in range(50_000)}
    payload = {"input": job()["input"] | unknown} if where == "input" else \
        with_s3(**unknown) if where == "s3Config" else job(loras=[{"path": "a.safetensors", **unknown}])
    message = error_of(payload)
    expected = {"input": "unknown input fields: k00000, k00001, k00002, k00003, k00004 and 49995 more",
                "s3Config": "'s3Config' has unknown fields: k00000, k00001, k00002, k00003, k00004 "
                            "and 49995 more",
                "lora": "'loras[0]' has unknown fields: 'k00000', 'k00001', 'k00002', 'k00003', "
                        "'k00004' and 49995 more"}[where]
    assert message == expected
    long_key = "x" * 10_000
    assert error_of(job(**{long_key: 1})) == f"unknown input fields: {'x' * 40}..."


def test_rules_are_reported_in_a_fixed_order():
    """Unknown fields first, then each field's own rules in the order the fields are declared
    (media, generation), s3Config, the LoRAs, and only for fields that pass their own rules the
    rules between them (one source per medium, step_cache, the unipc shift ceiling)."""
    faults = {"steps": 1, "image_url": "ftp://x", "sample_steps": 0, "fps": 30,
              "loras": [{"path": "x.bin"}]}
    payload = {"input": {**GOOD_INPUT, **faults}, "s3Config": {**S3, "bucketName": ""}}
    seen = []
    for fixed in ("steps", "image_url", "sample_steps", "fps", "s3Config", "loras"):
        seen.append(error_of(payload).split(" must")[0].split(":")[0])
        if fixed == "s3Config":
            payload["s3Config"] = S3
        elif fixed == "image_url":
            payload["input"]["image_url"] = GOOD_INPUT["image_url"]
        else:
            del payload["input"][fixed]
    assert seen == ["unknown input fields", "'image_url'", "'sample_steps'", "'fps'",
                    "'s3Config.bucketName'", "'loras[0].path'"]
    no_image = {"input": {"audio_base64": "AAAA", "sample_steps": 0, "step_cache": True}}
    assert error_of(no_image).startswith("'sample_steps' must be between")
    del no_image["input"]["sample_steps"]
    assert error_of(no_image) == "the job needs one of 'image_url' or 'image_base64'"


def test_s3_config_overrides_storage_without_showing_its_keys():
    override = parse_job(with_s3(bucketName=" b ")).storage
    assert (override.access_id, override.access_secret, override.bucket_name, override.endpoint_url) == (
        "AK", "SK", "b", "https://s3.example.com")
    assert "SK" not in repr(override) and "AK" not in repr(override)


def test_other_top_level_keys_are_runpods_and_ignored():
    assert parse_job({**job(), "webhook": "https://example.com/done", "policy": {}}).job_id == "job-1"


def test_speed_is_exact_unless_asked_and_fast_mode_caches_steps_unless_told_not_to():
    assert (parse_job(job()).generation.speed, parse_job(job()).generation.step_cache) == ("exact", False)
    for speed in ("fast", "fastest"):
        fast = parse_job(job(speed=speed)).generation
        assert (fast.speed, fast.step_cache) == (speed, True)
    assert parse_job(job(speed="fast", step_cache=False)).generation.step_cache is False
    assert parse_job(job(speed="exact", step_cache=False)).generation.step_cache is False


def test_null_means_default():
    request = parse_job(job(seed=None, resolution=None, negative_prompt=None, step_cache=None,
                            loras=None, pose_video_url=None))
    assert request.generation.seed is None and request.generation.resolution == "720p"
    assert request.generation.step_cache is False and request.loras == ()
    assert error_of(job(steps=None)) == "unknown input fields: steps"  # unknown even when null


def test_a_drawn_seed_is_one_a_job_may_send_back():
    assert SEED_RANGE <= 2**53  # exact as a JSON number in any client
    assert parse_job(job(seed=SEED_RANGE - 1)).generation.seed == SEED_RANGE - 1
    assert parse_job(job(seed=MAX_SEED)).generation.seed == MAX_SEED


def test_every_default_passes_its_own_rule():
    defaults = GenerationSettings()
    assert GenerationSettings.model_validate(defaults.model_dump()) == defaults


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
    assert parse_job(job(shift=100, sample_steps=10)).generation.shift == 100.0  # below the ceiling
    assert parse_job(job(shift=100, solver="dpm++", sample_steps=100)).generation.shift == 100.0
    assert parse_job(job(shift=0.001, sample_steps=100)).generation.shift == 0.001


# --- text the result could not carry ----------------------------------------------------------------

LONE = "\ud800"  # what JSON's "\ud800" decodes to: no UTF-8 form


@pytest.mark.parametrize("payload, message", [
    # Fields named as every other error names them: `input`'s without "input." in front.
    (job(prompt=f"a {LONE} b"), "'prompt' is not valid text"),
    (job(negative_prompt=LONE), "'negative_prompt' is not valid text"),
    (job(**{f"x{LONE}": 1}), "a key in the job's 'input' is not valid text"),
    (job(image_url=f"https://a.example/{LONE}.png"), "'image_url' is not valid text"),
    (job(loras=[{"url": f"https://a.example/{LONE}.safetensors"}]), "'loras[0].url' is not valid text"),
    (job(loras=[{f"k{LONE}": 1}]), "a key in 'loras[0]' is not valid text"),
    ({**job(), "id": f"job-{LONE}"}, "'id' is not valid text"),
    (with_s3(bucketName=LONE), "'s3Config.bucketName' is not valid text"),
    (job(prompt="\udfff"), "'prompt' is not valid text"),  # a low surrogate alone too
])
def test_lone_surrogates_are_refused_up_front_with_a_message_that_encodes(payload, message):
    error = error_of(payload)
    assert error == (f"{message}: it holds a lone UTF-16 surrogate (\\ud800-\\udfff), which has no "
                     "UTF-8 form")
    json.dumps({"error": error}, ensure_ascii=False).encode("utf-8")  # as RunPod sends it


def test_text_outside_the_basic_plane_and_deep_nesting_are_fine():
    emoji = "\U0001f600 \u4f60\u597d"  # a surrogate pair in UTF-16, one character here: valid
    assert parse_job(job(prompt=emoji)).generation.prompt == emoji
    deep = []
    for _ in range(10_000):  # walked without recursion
        deep = [deep]
    assert error_of(job(extra=deep)) == "unknown input fields: extra"


# --- the published schema ---------------------------------------------------------------------------

def test_every_field_of_the_schema_is_described():
    models = job_json_schema()["$defs"]
    assert set(models) == {"JobInput", "LoraEntry", "StorageOverride"}
    for name, model in models.items():
        assert model.get("description"), name
        for field, prop in model["properties"].items():
            assert prop.get("description"), f"{name}.{field}"


@pytest.mark.parametrize("payload", [
    job(), json.loads((ROOT / "test_input.json").read_text()),
    job(prompt="hi", resolution="480p", sample_steps=4, guidance_scale=1, seed=2**62, speed="fast",
        step_cache=False, pose_video_url="https://a.example/p.mp4", negative_prompt=None,
        loras=[{"path": "a.safetensors"}, {"url": "https://a.example/b.safetensors", "strength": -0.5}]),
    with_s3(),
])
def test_the_schema_accepts_the_jobs_the_worker_accepts(payload):
    import jsonschema

    parse_job(payload)
    jsonschema.validate({k: v for k, v in payload.items() if k != "id"}, job_json_schema())


# What the schema can say (types, choices, ranges, unknown fields, one source each); a URL's form,
# blank text and the rules between generation fields are in its descriptions only.
SCHEMA_REFUSES = [
    job(steps=30), {"input": {}}, job(image_base64="AAAA"),
    job(pose_video_url="https://a.example/p.mp4", pose_video_base64="AAAA"), job(image_url=5),
    job(prompt="x" * 5001), job(resolution="1080p"), job(sample_steps=0), job(sample_steps=2.5),
    job(sample_steps=True), job(infer_frames=81), job(guidance_scale=-1), job(shift=150, solver="dpm++"),
    job(seed=2**70), job(fps=30), job(fps=True), job(init_first_frame="yes"), job(speed="turbo"),
    job(loras=[{"path": "a.safetensors", "url": "https://a.example/b.safetensors"}]), job(loras=[{}]),
    job(loras=[{"path": "a.safetensors"}] * 5), job(loras=[{"path": "a.safetensors", "scale": 1}]),
    {**job(), "s3Config": "s3://bucket"}, with_s3(region="eu"), with_s3(bucketName=""),
]


@pytest.mark.parametrize("payload", SCHEMA_REFUSES)
def test_the_schema_refuses_what_the_worker_refuses(payload):
    import jsonschema

    error_of(payload)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({k: v for k, v in payload.items() if k != "id"}, job_json_schema())
