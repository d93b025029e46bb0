"""Rules the package keeps everywhere, checked on its source: external programs get argument
lists (never a shell), nothing prints (one logger per module), only settings.py reads the
environment, and files a job writes have fixed names (nothing in a path comes from the job)."""
import ast
import re

from conftest import ROOT

SOURCES = sorted((ROOT / "src" / "s2v_worker").glob("*.py")) + [ROOT / "handler.py"]


def calls(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            yield node


def test_no_shell_and_no_os_system():
    for path in SOURCES:
        for node in calls(path):
            assert not any(k.arg == "shell" for k in node.keywords), f"{path.name}: shell=True"
            name = ast.unparse(node.func)
            assert name not in ("os.system", "os.popen", "subprocess.getoutput"), f"{path.name}: {name}"


def test_no_print_and_one_logger_per_module():
    for path in SOURCES:
        names = {ast.unparse(node.func) for node in calls(path)}
        assert "print" not in names or path.name == "settings.py", path.name  # settings: its __main__
        text = path.read_text()
        # modules that log nothing need no logger
        if path.name not in ("__init__.py", "handler.py", "settings.py", "job.py", "errors.py",
                             "logs.py"):
            assert len(re.findall(r"^logger = logging.getLogger\(__name__\)$", text, re.M)) == 1, path.name


def test_job_files_have_fixed_names():
    media = (ROOT / "src" / "s2v_worker" / "media.py").read_text()
    for name in re.findall(r'work_dir / "([^"]+)"', media):
        assert re.fullmatch(r"[a-z_]+\.[a-z0-9]+", name), name
