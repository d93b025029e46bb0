"""The wheels a GPU benchmark run carries (`.wheels/`, built by make_wheelhouse.sh, installed by
run_on_device.sh), derived from the project's own pins so that the two cannot drift apart.

Every package pinned in requirements.txt and requirements-wan.txt is, on the GPU machine, exactly
one of: carried as a wheel at its pinned version; provided by the machine's image
(IMAGE_PROVIDES); replaced by a stand-in (STAND_INS, bench/stand_ins/); or not needed there
(NOT_ON_DEVICE, each with its reason). The carried wheels are the pins left over plus EXTRA: the
runtime dependencies of those pins that the image lacks and requirements.txt does not pin.
tests/test_bench_wheelhouse.py checks all of it, without network.

    python3 bench/wheelhouse.py            # the carried wheels, one `name==version` a line
    python3 bench/wheelhouse.py --prune D  # delete wheels in D that are not in that list
    python3 bench/wheelhouse.py --slim D   # botocore's wheel in D without the unused service models

Standard library only: make_wheelhouse.sh runs it with whatever python3 the host has.
"""
from __future__ import annotations

import re
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENT_FILES = ("requirements.txt", "requirements-wan.txt")
STAND_IN_DIR = ROOT / "bench" / "stand_ins"

# What the GPU machine's image has and a run uses from it, by distribution name. The device notes
# (../shared/device-notes.md, "What the image has") list torch, triton, transformers, accelerate,
# peft, einops, safetensors, huggingface_hub, opencv-python-headless, numpy and pytest, and say
# never to carry torch/torchvision/torchaudio; the rest was read on the machine itself
# (bench/device_image_packages.txt, which must list every name here). The image's versions differ
# from some pins (torch 2.11.0, torchvision 0.26.0, transformers 5.17.0, huggingface_hub 1.33.0,
# tokenizers 0.23.2, pillow 12.3.0, ...): the benchmarks run on what the image has.
IMAGE_PROVIDES: dict[str, str] = {
    # pinned in requirements.txt
    "torch": "the image's CUDA build (device notes: never carry it)",
    "torchvision": "built against the image's torch (device notes: never carry it)",
    "transformers": "device notes",
    "tokenizers": "transformers' own dependency, at the version the image's transformers wants",
    "accelerate": "device notes",
    "peft": "device notes",
    "safetensors": "device notes",
    "huggingface-hub": "device notes",
    "numpy": "device notes (numpy 2.x)",
    "opencv-python-headless": "device notes",
    "einops": "device notes",
    "pillow": "torchvision's dependency",
    "sentencepiece": "transformers' umt5 tokenizer when it is built from spiece.model",
    "protobuf": "transformers' SentencePiece reader (a ComfyUI umt5 file's tokenizer)",
    "regex": "transformers' dependency",
    "tqdm": "transformers' dependency",
    "requests": "diffusers, pooch",
    # runtime dependencies of the carried wheels (not pinned in requirements.txt)
    "triton": "torch's compiler back-end (device notes)",
    "pytest": "the GPU tests (device notes)",
    "scipy": "librosa (resampling filters), wan's fm_solvers_unipc",
    "scikit-learn": "librosa's declared dependency",
    "joblib": "librosa's cache",
    "numba": "librosa's decorators (bench/stand_ins/numba_stand_in.py when an image lacks it)",
    "lazy-loader": "librosa's lazy submodules",
    "msgpack": "librosa's declared dependency",
    "typing-extensions": "librosa, soundfile, pydantic",
    "packaging": "diffusers, pooch, lazy_loader, fa3-fwd",
    "filelock": "diffusers",
    "python-dateutil": "botocore",
    "six": "python-dateutil",
    "urllib3": "botocore; the worker's media.py and storage.py",
    "certifi": "the worker's media.py (the CA bundle requests uses)",
}

# Packages a run cannot carry (their wheels would crowd out the rest of its 64 MiB: llvmlite 60 MB
# for numba, imageio-ffmpeg's ffmpeg 68 MB, decord 14 MB): distribution name -> import name.
# bench/stand_ins/<import name>_stand_in.py stands in for each; run_on_device.sh installs it under
# the import name in /tmp/site on the GPU machine only, and only when the image lacks the package.
STAND_INS: dict[str, str] = {
    "numba": "numba",
    "imageio-ffmpeg": "imageio_ffmpeg",
    "decord": "decord",
}

# Pinned, but not used where the benchmarks and GPU tests run.
NOT_ON_DEVICE: dict[str, str] = {
    "runpod": "the serverless SDK, imported by handler.py only: the benchmarks and GPU tests start "
              "the worker through s2v_worker.runner",
    "omegaconf": "official wan.modules.animate's SAM utilities: the worker never imports wan's "
                 "__init__ or animate (official.py)",
    # declared dependencies of carried wheels
    "flash-attn": "wan22 declares it; the worker replaces it at run time (attention.py, official.py)",
    "dashscope": "wan22's prompt extension, not on the S2V path",
    "opencv-python": "wan22 declares it; the image's opencv-python-headless provides cv2",
    "ninja": "fa3-fwd's build tool, not used at run time",
    "importlib-metadata": "diffusers imports it on Python < 3.8 only",
}

# Runtime dependencies of the carried wheels that the image lacks and requirements.txt does not pin,
# at the versions the project's environment installs with the pins (pip freeze there).
EXTRA: dict[str, str] = {
    # pydantic (job.py's models)
    "pydantic-core": "2.50.5",
    "annotated-types": "0.8.0",
    "typing-inspection": "0.4.5",
    # librosa
    "audioread": "3.1.0",
    "decorator": "5.3.1",
    "pooch": "1.9.0",
    "platformdirs": "4.14.9",
    # soundfile
    "cffi": "2.1.1",
    "pycparser": "3.12",
    # ftfy
    "wcwidth": "0.9.4",
    # boto3 (storage.py)
    "botocore": "1.44.8",
    "s3transfer": "0.19.3",
    "jmespath": "1.1.0",
}

# botocore's wheel is 17 MB, nearly all of it the models of some 400 AWS services; the worker uses
# s3 (storage.py) and, for credentials, sts. Carried without the others it is 1 MB.
BOTOCORE_SERVICES_KEPT = ("s3", "sts")

_PIN = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[A-Za-z0-9,._-]+\])?==([A-Za-z0-9.+!_-]+)")


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them: `Huggingface_Hub` -> `huggingface-hub`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(root: Path = ROOT) -> dict[str, tuple[str, str]]:
    """name -> (version, environment marker or "") of every requirement in REQUIREMENT_FILES."""
    found: dict[str, tuple[str, str]] = {}
    for file_name in REQUIREMENT_FILES:
        for raw in (root / file_name).read_text().splitlines():
            line = raw.split(" #", 1)[0].strip()
            if not line or line.startswith("#"):
                continue
            requirement, _, marker = line.partition(";")
            match = _PIN.fullmatch(requirement.strip())
            if not match:
                raise ValueError(f"{file_name}: not pinned with ==: {line!r}")
            found[normalize(match.group(1))] = (match.group(2), marker.strip())
    return found


def wheels(root: Path = ROOT) -> dict[str, str]:
    """The carried wheels, name -> version: the pins that are not in the image, stood in for or
    unneeded (the GPU machine is Linux x86-64, so an x86_64 marker holds there), then EXTRA."""
    skipped = set(IMAGE_PROVIDES) | set(STAND_INS) | set(NOT_ON_DEVICE)
    carried = {name: version for name, (version, _) in pins(root).items() if name not in skipped}
    return {**carried, **EXTRA}


def prune(directory: Path, keep: dict[str, str]) -> list[Path]:
    """Deletes the wheels in `directory` that are not `keep`'s name and version (a wheel left from an
    older list would be installed next to its successor); returns what it deleted."""
    deleted = []
    for path in sorted(directory.glob("*.whl")):
        name, version = path.name.split("-")[:2]
        if keep.get(normalize(name)) != version:
            path.unlink()
            deleted.append(path)
    return deleted


def _unused_botocore_model(name: str) -> bool:
    parts = name.split("/")
    return len(parts) > 3 and parts[:2] == ["botocore", "data"] and parts[2] not in BOTOCORE_SERVICES_KEPT


def slim_botocore(path: Path) -> bool:
    """Rewrites a botocore wheel without the service models other than BOTOCORE_SERVICES_KEPT, and
    its RECORD without their lines; False when there was nothing to leave out (already slim)."""
    with zipfile.ZipFile(path) as source:
        entries = source.infolist()
        if not any(_unused_botocore_model(entry.filename) for entry in entries):
            return False
        slim = path.with_name(path.name + ".part")
        with zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as target:
            for entry in entries:
                if _unused_botocore_model(entry.filename):
                    continue
                data = source.read(entry)
                if entry.filename.endswith(".dist-info/RECORD"):
                    lines = data.decode().splitlines(keepends=True)
                    data = "".join(line for line in lines
                                   if not _unused_botocore_model(line.split(",", 1)[0])).encode()
                target.writestr(entry, data)
    slim.replace(path)
    return True


def main(argv: list[str]) -> int:
    listed = wheels()
    if argv[:1] == ["--prune"] and len(argv) == 2:
        for path in prune(Path(argv[1]), listed):
            print(f"removed {path.name} (not in the list)", file=sys.stderr)
        return 0
    if argv[:1] == ["--slim"] and len(argv) == 2:
        for path in sorted(Path(argv[1]).glob("botocore-*.whl")):
            if slim_botocore(path):
                print(f"{path.name}: kept the {', '.join(BOTOCORE_SERVICES_KEPT)} models only", file=sys.stderr)
        return 0
    if argv:
        print(__doc__, file=sys.stderr)
        return 2
    for name, version in sorted(listed.items()):
        print(f"{name}=={version}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
