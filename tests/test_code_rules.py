"""Rules the package keeps everywhere, checked on its source: external programs get argument
lists (never a shell), nothing prints outside a __main__ block (a module that logs has one
logger), only settings.py reads the environment, and files a job writes have fixed names (nothing
in a path comes from the job)."""
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


def prints_outside_main(path):
    """print() calls that are not under `if __name__ == "__main__":` (settings.py and job.py print
    the README's tables there)."""
    tree = ast.parse(path.read_text())
    in_main = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
               and ast.unparse(block.test) == "__name__ == '__main__'" for node in ast.walk(block)}
    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call)
            and ast.unparse(node.func) == "print" and id(node) not in in_main]


def test_no_print_and_one_logger_per_module():
    for path in SOURCES:
        assert prints_outside_main(path) == [], path.name
        text = path.read_text()
        logs = re.search(r"^\s+logger\.[a-z]+\(", text, re.M) is not None
        loggers = re.findall(r"^logger = logging.getLogger\(__name__\)$", text, re.M)
        assert len(loggers) == logs, f"{path.name}: a module that logs has one logger, one that does not none"


def test_job_files_have_fixed_names():
    media = (ROOT / "src" / "s2v_worker" / "media.py").read_text()
    for name in re.findall(r'work_dir / "([^"]+)"', media):
        assert re.fullmatch(r"[a-z_]+\.[a-z0-9]+", name), name
