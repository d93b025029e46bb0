"""The GPU wheelhouse (bench/wheelhouse.py, built by bench/make_wheelhouse.sh) against the project's
pins, without network: every pinned package reaches the GPU machine as a wheel at its pinned
version, from the image, through a stand-in, or is declared unneeded there; what the worker, the
benchmarks and the GPU tests import is there; the carried wheels' own dependencies are too."""
from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import zipfile

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement

from bench import wheelhouse
from bench.wheelhouse import EXTRA, IMAGE_PROVIDES, NOT_ON_DEVICE, STAND_INS, normalize
from conftest import ROOT

# The GPU machine (../shared/device-notes.md): Linux x86-64, Python 3.12.3.
DEVICE_ENVIRONMENT = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
                      "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
                      "implementation_name": "cpython", "platform_python_implementation": "CPython",
                      "extra": ""}
# Code that runs on the GPU machine: the worker, the benchmarks, the GPU tests (not handler.py, the
# serverless entry point, nor builder/, which makes the weights elsewhere).
DEVICE_CODE = sorted([*(ROOT / "src" / "s2v_worker").glob("*.py"), *(ROOT / "bench").glob("*.py"),
                      *(ROOT / "tests" / "gpu").glob("*.py")])
LOCAL_PACKAGES = {"s2v_worker", "bench", "builder", "conftest", "tests", "handler"}

PINS = wheelhouse.pins()
WHEELS = wheelhouse.wheels()


def image_packages() -> dict[str, str]:
    """bench/device_image_packages.txt: what the image has, name -> version."""
    listed = {}
    for line in (ROOT / "bench" / "device_image_packages.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            listed[normalize(name)] = version
    return listed


def where(name: str) -> list[str]:
    """How a distribution reaches the GPU machine: the declarations that name it."""
    return [kind for kind, names in (("wheel", WHEELS), ("image", IMAGE_PROVIDES), ("stand-in", STAND_INS),
                                     ("not needed", NOT_ON_DEVICE)) if name in names]


def test_every_pin_is_carried_at_its_version_provided_stood_in_for_or_not_needed():
    problems = []
    for name, (version, marker) in PINS.items():
        kinds = where(name)
        if len(kinds) != 1:
            problems.append(f"{name}=={version}: {' and '.join(kinds) or 'nowhere'}")
        elif kinds == ["wheel"] and WHEELS[name] != version:
            problems.append(f"{name}: carried at {WHEELS[name]}, pinned at {version}")
        if marker and kinds == ["wheel"] and not Marker(marker).evaluate(DEVICE_ENVIRONMENT):
            problems.append(f"{name}: carried, but its marker {marker!r} does not hold on the GPU machine")
    assert problems == [], "requirements*.txt against bench/wheelhouse.py:\n" + "\n".join(problems)


def test_the_job_models_dependency_is_carried():
    """Issue 18: the wheelhouse lacked pydantic, and a GPU run failed at `import pydantic`."""
    for name in ("pydantic", "pydantic-core", "annotated-types", "typing-inspection"):
        assert name in WHEELS, f"{name} is not in the wheelhouse"
    assert WHEELS["pydantic"] == PINS["pydantic"][0]


def test_extra_wheels_are_not_pinned_provided_or_declared_elsewhere():
    for name, version in EXTRA.items():
        assert name == normalize(name) and re.fullmatch(r"[0-9][0-9a-z.+!]*", version), (name, version)
        assert name not in PINS, f"{name} is pinned in requirements: its wheel must come from the pin"
        assert name not in IMAGE_PROVIDES and name not in STAND_INS and name not in NOT_ON_DEVICE, name


def test_declared_names_are_normalized_and_declarations_are_disjoint():
    for names in (IMAGE_PROVIDES, STAND_INS, NOT_ON_DEVICE, EXTRA):
        assert all(name == normalize(name) for name in names), sorted(names)
    assert not set(NOT_ON_DEVICE) & (set(IMAGE_PROVIDES) | set(STAND_INS) | set(WHEELS))
    assert not set(IMAGE_PROVIDES) & set(WHEELS) and not set(STAND_INS) & set(WHEELS)


def test_image_provides_only_what_the_image_was_read_to_have():
    image = image_packages()
    assert "torch" in image and "numpy" in image, "bench/device_image_packages.txt is not a pip freeze"
    assert sorted(set(IMAGE_PROVIDES) - set(image)) == []


def test_every_stand_in_has_its_file_and_every_file_is_declared():
    files = {path.name for path in (ROOT / "bench" / "stand_ins").iterdir() if path.name != "__pycache__"}
    assert files == {f"{module}_stand_in.py" for module in STAND_INS.values()}
    for name, module in STAND_INS.items():
        text = (ROOT / "bench" / "stand_ins" / f"{module}_stand_in.py").read_text()
        docstring = ast.get_docstring(ast.parse(text)) or ""
        assert docstring.startswith(f"Stand-in for {name} on the GPU machine only"), module
        assert "bench/run_on_device.sh" in docstring and f"`import {module}` fails" in docstring, module


def _imports(path) -> set[str]:
    """Top-level names of the absolute imports anywhere in a module (also those inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _device_imports() -> dict[str, set[str]]:
    """distribution -> the modules (file names) of DEVICE_CODE that import it."""
    distributions = importlib.metadata.packages_distributions()
    found: dict[str, set[str]] = {}
    unknown = []
    for path in DEVICE_CODE:
        for name in _imports(path) - LOCAL_PACKAGES - set(sys.stdlib_module_names):
            if name not in distributions:
                unknown.append(f"{path.relative_to(ROOT)}: {name}")
                continue
            for distribution in distributions[name]:
                found.setdefault(normalize(distribution), set()).add(str(path.relative_to(ROOT)))
    assert unknown == [], f"imports of no installed distribution: {unknown}"
    return found


def test_what_the_device_code_imports_is_on_the_device():
    """What the worker (job.py's pydantic, storage.py's boto3, ...), the benchmarks and the GPU tests
    import is carried, in the image or stood in for; "not needed" is no answer for them."""
    missing = [f"{name} (imported by {', '.join(sorted(users))})"
               for name, users in sorted(_device_imports().items())
               if not set(where(name)) & {"wheel", "image", "stand-in"}]
    assert missing == [], "imported on the GPU machine but not there:\n" + "\n".join(missing)


def test_runpod_is_imported_by_handler_py_only():
    assert "runpod" in _imports(ROOT / "handler.py")
    assert "runpod" not in _device_imports()


def test_the_carried_wheels_dependencies_are_on_the_device():
    """Each carried wheel's declared runtime dependencies (from the metadata installed here, with the
    GPU machine's markers) are carried, in the image, stood in for, or declared unneeded."""
    problems = []
    for name, version in sorted(WHEELS.items()):
        marker = PINS.get(name, ("", ""))[1]
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            if marker and not Marker(marker).evaluate():  # e.g. fa3-fwd on a machine that is not x86-64
                continue
            problems.append(f"{name}: not installed here, its dependencies cannot be read")
            continue
        for text in distribution.requires or []:
            requirement = Requirement(text)
            if requirement.marker and not requirement.marker.evaluate(DEVICE_ENVIRONMENT):
                continue
            if not where(normalize(requirement.name)):
                problems.append(f"{name} needs {requirement.name}")
    assert problems == [], "\n".join(problems)


def test_make_wheelhouse_takes_its_list_from_wheelhouse_py():
    script = (ROOT / "bench" / "make_wheelhouse.sh").read_text()
    code = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("#"))
    assert "python3 bench/wheelhouse.py)" in code and '"${wheels[@]}"' in code
    assert "--prune .wheels" in code and "--slim .wheels" in code
    assert re.search(r"[A-Za-z0-9]==[0-9]", code) is None, "make_wheelhouse.sh pins a version itself"


def test_run_on_device_installs_the_stand_ins_under_their_module_names_only_there():
    script = (ROOT / "bench" / "run_on_device.sh").read_text()
    assert "bench/stand_ins/*_stand_in.py" in script
    assert 'python3 -c "import $module"' in script and '/tmp/site/$module/__init__.py' in script
    assert "device_shims" not in script


def test_no_file_or_folder_of_the_repository_is_named_like_a_package():
    """Tools that map imports to packages (and readers) took bench/device_shims/numba/ for numba."""
    distributions = importlib.metadata.packages_distributions()
    covered = set(PINS) | set(WHEELS) | set(IMAGE_PROVIDES) | set(STAND_INS)
    package_names = {module for module, owners in distributions.items()
                     if any(normalize(owner) in covered for owner in owners)} | set(STAND_INS.values())
    package_names -= {"s2v_worker", "tests", "bench", "builder"}
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    clashes = []
    for line in tracked.stdout.splitlines():
        parts = line.split("/")
        names = parts[:-1] + [parts[-1].removesuffix(".py")] if parts[-1].endswith(".py") else parts[:-1]
        clashes += [line for name in names if name in package_names]
    assert clashes == []


def test_prune_deletes_the_wheels_of_other_versions_and_packages(tmp_path):
    for name in ("pydantic-2.14.4-py3-none-any.whl", "platformdirs-4.14.8-py3-none-any.whl",
                 "platformdirs-4.14.9-py3-none-any.whl", "msgpack-1.2.4-cp312-cp312-manylinux_2_17_x86_64.whl",
                 "pydantic_core-2.50.5-cp312-cp312-manylinux_2_17_x86_64.whl"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "notes.txt").write_text("kept")
    deleted = wheelhouse.prune(tmp_path, {"pydantic": "2.14.4", "platformdirs": "4.14.9", "pydantic-core": "2.50.5"})
    assert [path.name for path in deleted] == ["msgpack-1.2.4-cp312-cp312-manylinux_2_17_x86_64.whl",
                                               "platformdirs-4.14.8-py3-none-any.whl"]
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "notes.txt", "platformdirs-4.14.9-py3-none-any.whl", "pydantic-2.14.4-py3-none-any.whl",
        "pydantic_core-2.50.5-cp312-cp312-manylinux_2_17_x86_64.whl"]


def test_slim_botocore_keeps_s3_sts_and_the_shared_data_only(tmp_path):
    wheel = tmp_path / "botocore-1.44.8-py3-none-any.whl"
    names = ["botocore/__init__.py", "botocore/data/endpoints.json", "botocore/data/_retry.json",
             "botocore/data/s3/2006-03-01/service-2.json.gz", "botocore/data/sts/2011-06-15/service-2.json.gz",
             "botocore/data/ec2/2016-11-15/service-2.json.gz", "botocore/data/s3control/2018-08-20/service-2.json.gz"]
    record = "".join(f"{name},sha256=x,1\n" for name in names) + "botocore-1.44.8.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name in names:
            archive.writestr(name, b"{}")
        archive.writestr("botocore-1.44.8.dist-info/RECORD", record)
    assert wheelhouse.slim_botocore(wheel) is True
    kept = names[:5]
    with zipfile.ZipFile(wheel) as archive:
        assert archive.namelist() == [*kept, "botocore-1.44.8.dist-info/RECORD"]
        recorded = [line.split(",")[0] for line in archive.read("botocore-1.44.8.dist-info/RECORD").decode().splitlines()]
    assert recorded == [*kept, "botocore-1.44.8.dist-info/RECORD"]
    assert wheelhouse.slim_botocore(wheel) is False  # already slim: left as it is


def test_pins_read_markers_and_refuse_an_unpinned_requirement(tmp_path):
    (tmp_path / "requirements-wan.txt").write_text("# comment\nwan22==2.2.11\n")
    (tmp_path / "requirements.txt").write_text('Foo_Bar==1.0; platform_machine == "x86_64"  # why\n')
    assert wheelhouse.pins(tmp_path) == {"foo-bar": ("1.0", 'platform_machine == "x86_64"'),
                                         "wan22": ("2.2.11", "")}
    for line in ("foo>=1.0", "foo"):
        (tmp_path / "requirements.txt").write_text(f"bar==2.0\n{line}\n")
        with pytest.raises(ValueError, match="not pinned"):
            wheelhouse.pins(tmp_path)
