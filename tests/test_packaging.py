"""Packaging checks that need no Docker, GPU or network: the Dockerfile, the pinned requirements,
the RunPod Hub files (.runpod/hub.json, .runpod/tests.json) and builder/download_weights.py."""
from __future__ import annotations

import base64
import fnmatch
import importlib.util
import io
import json
import re
import shlex
import wave
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

from s2v_worker.job import parse_job  # noqa: E402
from s2v_worker.settings import SETTINGS  # noqa: E402

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
HUB_JSON = ROOT / ".runpod" / "hub.json"
TESTS_JSON = ROOT / ".runpod" / "tests.json"
DOWNLOAD_SCRIPT = ROOT / "builder" / "download_weights.py"

# Settings RunPod sets on its workers by itself. Offering them in the Hub's deploy form would let a
# form default override RunPod's value, so hub.json must leave them out.
RUNPOD_MANAGED_SETTINGS = {"RUNPOD_WEBHOOK_POST_OUTPUT"}
SETTINGS_BY_ENV = {s.env: s for s in SETTINGS}
SECRET_WORDS = ("TOKEN", "SECRET", "KEY", "PASSWORD")


# --- Dockerfile parsing -----------------------------------------------------------------------

def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):  # comment lines inside a continuation are dropped
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        pending += line
        if pending.strip():
            keyword, _, args = pending.strip().partition(" ")
            instructions.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending.strip(), "Dockerfile ends inside a line continuation"
    return instructions


INSTRUCTIONS = dockerfile_instructions(DOCKERFILE.read_text())


def _of(keyword: str) -> list[str]:
    return [args for kw, args in INSTRUCTIONS if kw == keyword]


def _split_flags(args: str) -> tuple[list[str], list[str]]:
    """Leading --flags and the remaining words of an instruction (JSON array form understood)."""
    if args.lstrip().startswith("["):
        return [], json.loads(args)
    words = shlex.split(args)
    flags = [w for w in words if w.startswith("--")]
    rest = [w for w in words if not w.startswith("--")]
    return flags, rest


def _assignments(args: str) -> list[tuple[str, str]]:
    """name/value pairs of ARG or ENV (`A=1 B=2`, `A=1`, legacy `ENV A 1`, bare `ARG A`)."""
    words = shlex.split(args)
    if words and "=" not in words[0]:
        return [(words[0], " ".join(words[1:]))]
    return [tuple(w.split("=", 1)) for w in words]  # type: ignore[misc]


def _arg_defaults() -> dict[str, str]:
    return {name: value for args in _of("ARG") for name, value in _assignments(args)}


def _stage_names() -> set[str]:
    names = set()
    for args in _of("FROM"):
        words = args.split()
        if len(words) >= 3 and words[-2].upper() == "AS":
            names.add(words[-1])
    return names


def _copy_sources() -> list[str]:
    sources = []
    for args in _of("COPY") + _of("ADD"):
        flags, words = _split_flags(args)
        if any(f.startswith("--from") for f in flags):
            continue  # copies between stages
        sources += words[:-1]
    return sources


def test_dockerfile_parser_joins_continuations_and_drops_comments():
    parsed = dockerfile_instructions(
        "# comment\nFROM a:1 AS b\nRUN one \\\n    # inner comment\n    two \\\n    three\n"
        "CMD [\"x\"]\n")
    assert parsed == [("FROM", "a:1 AS b"), ("RUN", "one  two  three"), ("CMD", '["x"]')]


def test_every_copy_source_exists_in_the_repository():
    sources = _copy_sources()
    assert sources, "the Dockerfile copies nothing"
    missing = [s for s in sources if not list(ROOT.glob(s.rstrip("/") or "."))]
    assert not missing, f"COPY/ADD sources missing from the repository: {missing}"


def test_no_copy_source_is_excluded_by_dockerignore():
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert not any(p.startswith("!") for p in patterns), "negated patterns are not handled here"
    for source in _copy_sources():
        parts = Path(source.rstrip("/")).parts
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        for pattern in patterns:
            pat = pattern.rstrip("/")
            hits = [p for p in prefixes
                    if fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, pat.removeprefix("**/"))]
            assert not hits, f"COPY source {source!r} is excluded by .dockerignore's {pattern!r}"


def test_every_requirements_file_referenced_exists_and_is_copied_in():
    copied = {Path(s).name for s in _copy_sources()}
    referenced = [m for args in _of("RUN") for m in re.findall(r"-r\s+(\S+)", args)]
    assert referenced, "no `pip install -r FILE` in the Dockerfile"
    for ref in referenced:
        name = Path(ref).name
        assert (ROOT / name).is_file(), f"the Dockerfile installs {ref}, absent from the repository"
        assert name in copied, f"{ref} is installed but never copied into the image"


def test_wan22_is_installed_without_its_dependencies():
    wan_installs = [args for args in _of("RUN")
                    if "requirements-wan.txt" in args or "wan22" in args]
    assert wan_installs, "the Dockerfile never installs requirements-wan.txt"
    for args in wan_installs:
        assert "--no-deps" in args.split(), f"wan22 must be installed with --no-deps: {args}"


def test_base_image_is_pinned_to_an_exact_tag():
    stages, arg_defaults = _stage_names(), _arg_defaults()
    external = []
    for args in _of("FROM"):
        words = [w for w in args.split() if not w.startswith("--platform")]
        image = re.sub(r"\$\{?(\w+)\}?",
                       lambda m: arg_defaults.get(m.group(1), m.group(0)), words[0])
        if image in stages:
            continue
        external.append(image)
        name, _, digest = image.partition("@")
        tag = name.rpartition(":")[2] if ":" in name.rpartition("/")[2] else ""
        assert digest or tag, f"FROM {image} has no tag"
        assert tag != "latest", f"FROM {image} uses the moving 'latest' tag"
        assert "$" not in image, f"FROM {image} is not resolvable from ARG defaults"
        assert digest or re.search(r"\d+\.\d+\.\d+", tag), f"FROM {image}: pin a full version"
    assert external, "no base image"


def test_stage_selected_by_bake_weights_exists_for_both_values():
    stages = _stage_names()
    assert {"weights-0", "weights-1"} <= stages
    assert _arg_defaults().get("BAKE_WEIGHTS") == "0", "weights must not be baked by default"


def test_no_token_or_secret_in_build_args_or_environment():
    for keyword in ("ARG", "ENV"):
        for args in _of(keyword):
            for name, _ in _assignments(args):
                assert not any(w in name.upper() for w in SECRET_WORDS), \
                    f"{keyword} {name}: secrets must come in as BuildKit secrets, never {keyword}"


def test_weights_download_takes_the_token_as_a_buildkit_secret():
    downloads = [args for args in _of("RUN") if "download_weights.py" in args]
    assert downloads, "the Dockerfile has no (opt-in) weights download"
    for args in downloads:
        assert "--mount=type=secret,id=hf_token" in args
        assert "HF_TOKEN" not in args, "the token must not be on the command line"


def test_baked_revision_matches_the_download_script():
    assert _arg_defaults().get("WAN_S2V_REVISION") == load_download_script().DEFAULT_REVISION


def test_image_can_compile_the_dit():
    """torch.compile is on by default; Triton needs a C compiler and Python's headers at run time."""
    from s2v_worker.settings import Settings

    assert Settings.from_env({}).model.compile
    apt = " ".join(args for kw, args in INSTRUCTIONS if kw == "RUN" and "apt-get install" in args)
    for package in ("gcc", "libc6-dev", "python3-dev"):
        assert re.search(rf"(^|\s){re.escape(package)}(\s|$)", apt), package


def test_the_image_carries_numbas_cache_for_any_cpu():
    """librosa's first use compiles numba functions (15.5 s of a cold start): built at image
    build time, for a generic x86-64 CPU, where the worker finds them."""
    env = " ".join(args for kw, args in INSTRUCTIONS if kw == "ENV")
    assert re.search(r"NUMBA_CACHE_DIR=/\S+", env) and "NUMBA_CPU_NAME=generic" in env
    warm = [args for kw, args in INSTRUCTIONS if kw == "RUN" and "librosa.load" in args]
    assert warm, "no RUN step fills numba's cache"
    assert "expandable_segments:True" in env
    assert "MALLOC_ARENA_MAX=2" in env  # as the API tests run the worker (test_handler.py)


def test_cmd_runs_the_handler():
    cmds = _of("CMD")
    assert cmds, "no CMD"
    _, words = _split_flags(cmds[-1])
    assert any(Path(w).name == "handler.py" for w in words), f"CMD runs no handler.py: {cmds[-1]}"
    assert _of("WORKDIR"), "no WORKDIR"


# --- requirements -----------------------------------------------------------------------------

def _requirement_lines(path: Path) -> list[str]:
    lines = []
    for raw in path.read_text().splitlines():
        line = raw.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in _requirement_lines(path):
        requirement, _, marker = line.partition(";")  # an environment marker may follow
        match = re.fullmatch(
            r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[A-Za-z0-9,._-]+\])?==([A-Za-z0-9.+!_-]+)",
            requirement.strip())
        assert match, f"{path.name}: not pinned with ==: {line!r}"
        pins[match.group(1).lower().replace("_", "-")] = match.group(3)
    return pins


def test_runtime_requirements_are_all_pinned():
    pins = _pins(ROOT / "requirements.txt")
    assert "torch" in pins and "torchvision" in pins
    assert "runpod" in pins and "huggingface-hub" in pins


def test_wan_requirements_pin_wan22_and_fa3():
    pins = _pins(ROOT / "requirements-wan.txt")
    assert "wan22" in pins and "fa3-fwd" in pins


def test_every_runtime_requirement_says_what_uses_it():
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    for index, line in enumerate(lines):
        if line.strip() and not line.startswith("#"):
            assert index and lines[index - 1].startswith("# "), f"{line}: no comment above it"


def test_the_package_is_installable_and_no_code_edits_sys_path():
    """pyproject.toml installs s2v_worker from src/ with requirements.txt's dependencies; nothing
    reaches it through sys.path edits any more."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["tool"]["setuptools"]["dynamic"]["dependencies"]["file"] == ["requirements.txt"]
    assert project["tool"]["setuptools"]["packages"]["find"]["where"] == ["src"]
    import ast

    paths = [ROOT / "handler.py", *(p for folder in ("src", "tests", "bench", "builder")
                                    for p in (ROOT / folder).rglob("*.py"))]
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                assert not ast.unparse(node.func).startswith("sys.path."), path


# --- RunPod Hub -------------------------------------------------------------------------------

def _hub() -> dict:
    return json.loads(HUB_JSON.read_text())


def _env_value(value) -> str:
    """How RunPod hands a form value to the worker: as a string."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def test_hub_json_metadata():
    hub = _hub()
    for key in ("title", "description", "type", "category", "config"):
        assert hub.get(key), f"hub.json lacks {key}"
    assert hub["type"] == "serverless"
    assert hub["category"] in ("audio", "embedding", "language", "video", "image")
    config = hub["config"]
    assert config["runsOn"] == "GPU"
    assert isinstance(config["containerDiskInGb"], int) and config["containerDiskInGb"] > 0
    assert isinstance(config["gpuCount"], int) and config["gpuCount"] >= 1
    assert isinstance(config["gpuIds"], str) and config["gpuIds"].strip()
    assert all(re.fullmatch(r"\d+\.\d+", v) for v in config.get("allowedCudaVersions", []))


def test_hub_json_offers_every_setting_and_nothing_else():
    keys = [entry["key"] for entry in _hub()["config"]["env"]]
    assert len(keys) == len(set(keys)), "duplicate env keys in hub.json"
    expected = set(SETTINGS_BY_ENV) - RUNPOD_MANAGED_SETTINGS
    assert set(keys) - expected == set(), "hub.json offers settings the worker does not have"
    assert expected - set(keys) == set(), "hub.json lacks settings of s2v_worker.settings.SETTINGS"


def test_hub_json_inputs_parse_as_the_worker_parses_them():
    for entry in _hub()["config"]["env"]:
        setting = SETTINGS_BY_ENV[entry["key"]]
        spec = entry["input"]
        assert spec.get("name") and spec.get("description"), entry["key"]
        assert spec["type"] in ("string", "number", "boolean", "huggingface"), entry["key"]
        default = spec.get("default")
        parsed = setting.parse(_env_value(default))
        assert parsed == setting.default, \
            f"{entry['key']}: hub default {default!r} != worker default {setting.default!r}"
        if spec["type"] == "boolean":
            assert setting.parse(spec["trueValue"]) is True
            assert setting.parse(spec["falseValue"]) is False
        for option in spec.get("options", []):
            setting.parse(option["value"])  # raises on a value the worker rejects
        if setting.secret:
            assert default in ("", None), f"{entry['key']} is secret: no default value"


def test_hub_json_presets_name_known_settings_with_valid_values():
    for preset in _hub()["config"].get("presets", []):
        assert preset["name"]
        for key, value in preset["defaults"].items():
            assert key in SETTINGS_BY_ENV and key not in RUNPOD_MANAGED_SETTINGS, key
            SETTINGS_BY_ENV[key].parse(_env_value(value))


def _tests_json() -> dict:
    return json.loads(TESTS_JSON.read_text())


def test_tests_json_config():
    config = _tests_json()["config"]
    assert isinstance(config["gpuTypeId"], str) and config["gpuTypeId"]
    assert isinstance(config["gpuCount"], int) and config["gpuCount"] >= 1
    for item in config.get("env", []):
        setting = SETTINGS_BY_ENV[item["key"]]
        setting.parse(item["value"])
    assert config.get("allowedCudaVersions") == _hub()["config"].get("allowedCudaVersions")


def test_tests_json_jobs_pass_the_worker_validation():
    tests = _tests_json()["tests"]
    assert tests
    for test in tests:
        assert test["name"]
        assert isinstance(test["timeout"], int) and test["timeout"] > 0  # milliseconds
        request = parse_job({"id": "t", "input": test["input"]})
        assert request.image.base64 and request.audio.base64


def test_tests_json_media_decode():
    from PIL import Image

    job = _tests_json()["tests"][0]["input"]
    with Image.open(io.BytesIO(base64.b64decode(job["image_base64"]))) as image:
        image.load()
        assert image.size[0] > 0 and image.size[1] > 0
    with wave.open(io.BytesIO(base64.b64decode(job["audio_base64"]))) as audio:
        seconds = audio.getnframes() / audio.getframerate()
    setting = SETTINGS_BY_ENV["MIN_AUDIO_SECONDS"]
    assert setting.default <= seconds <= SETTINGS_BY_ENV["MAX_AUDIO_SECONDS"].default


# --- builder/download_weights.py ---------------------------------------------------------------

def load_download_script():
    spec = importlib.util.spec_from_file_location("download_weights_under_test", DOWNLOAD_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# A plausible listing of the Hugging Face repository: what the worker needs, and what it must skip.
NEEDED_FILES = [
    "config.json",
    "diffusion_pytorch_model-00001-of-00004.safetensors",
    "diffusion_pytorch_model-00004-of-00004.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "models_t5_umt5-xxl-enc-bf16.pth",
    "Wan2.1_VAE.pth",
    "google/umt5-xxl/spiece.model",
    "google/umt5-xxl/tokenizer.json",
    "google/umt5-xxl/tokenizer_config.json",
    "wav2vec2-large-xlsr-53-english/config.json",
    "wav2vec2-large-xlsr-53-english/model.safetensors",
    "wav2vec2-large-xlsr-53-english/preprocessor_config.json",
    "wav2vec2-large-xlsr-53-english/vocab.json",
]
SKIPPED_FILES = [
    "README.md",
    "configuration.json",
    "assets/s2v_pipeline.png",
    "examples/i2v_input.JPG",
    "examples/talk.wav",
    "wav2vec2-large-xlsr-53-english/flax_model.msgpack",
]


def _selected(module, paths):
    from huggingface_hub.utils import filter_repo_objects

    return set(filter_repo_objects(paths, allow_patterns=list(module.ALLOW_PATTERNS),
                                   ignore_patterns=list(module.IGNORE_PATTERNS)))


def test_download_allow_list_covers_the_checkpoint_and_nothing_else():
    module = load_download_script()
    assert module.REPO_ID == "Wan-AI/Wan2.2-S2V-14B"
    assert _selected(module, NEEDED_FILES) == set(NEEDED_FILES)
    assert _selected(module, SKIPPED_FILES) == set()


def test_download_revision_is_pinned():
    revision = load_download_script().DEFAULT_REVISION
    assert re.fullmatch(r"[0-9a-f]{40}", revision), f"pin a commit hash, not {revision!r}"


def test_download_arguments():
    module = load_download_script()
    args = module.parse_args(["/tmp/ckpt"])
    assert args.dest == Path("/tmp/ckpt") and args.revision == module.DEFAULT_REVISION
    assert module.parse_args(["/tmp/ckpt", "--revision", "abc123"]).revision == "abc123"
    with pytest.raises(SystemExit):
        module.parse_args([])


def test_download_token_comes_from_the_secret_file_then_the_environment(tmp_path):
    module = load_download_script()
    secret = tmp_path / "hf_token"
    secret.write_text("hf_from_file\n")
    assert module.read_token(secret, {"HF_TOKEN": "hf_from_env"}) == "hf_from_file"
    assert module.read_token(tmp_path / "absent", {"HF_TOKEN": " hf_from_env "}) == "hf_from_env"
    assert module.read_token(tmp_path / "absent", {}) is None


def test_download_end_to_end_without_network(tmp_path, monkeypatch, caplog):
    """main() with snapshot_download replaced by a fake that writes the selected files of a fake
    repository: the result must satisfy the worker's own checkpoint check, and the token must never
    reach the logs."""
    import huggingface_hub

    from s2v_worker.checkpoint import missing_entries

    module = load_download_script()
    calls = []

    def fake_snapshot_download(**kwargs):
        calls.append(kwargs)
        dest = Path(kwargs["local_dir"])
        for rel in _selected(module, NEEDED_FILES + SKIPPED_FILES):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_bytes(b"x")
        index = {"weight_map": {"a": "diffusion_pytorch_model-00001-of-00004.safetensors",
                                "b": "diffusion_pytorch_model-00004-of-00004.safetensors"}}
        (dest / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
        return str(dest)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(module, "SECRET_TOKEN_FILE", tmp_path / "absent")
    monkeypatch.setenv("HF_TOKEN", "hf_very_secret_value")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    dest = tmp_path / "Wan2.2-S2V-14B"
    caplog.set_level("DEBUG")

    assert module.main([str(dest), "--revision", "0123abc"]) == 0
    assert calls[0]["repo_id"] == module.REPO_ID and calls[0]["revision"] == "0123abc"
    assert calls[0]["token"] == "hf_very_secret_value"
    assert missing_entries(dest) == []
    assert "hf_very_secret_value" not in caplog.text

    # An incomplete download is an error (exit status 1), not a silent success.
    (dest / "Wan2.1_VAE.pth").unlink()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kwargs: kwargs["local_dir"])
    assert module.main([str(dest)]) == 1
    assert "Wan2.1_VAE.pth" in caplog.text
