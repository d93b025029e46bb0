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
    """print() calls that are not under `if __name__ == "__main__":` (or in reference.py's `main`,
    the command that writes the generated documents)."""
    tree = ast.parse(path.read_text())
    in_main = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
               and ast.unparse(block.test) == "__name__ == '__main__'" for node in ast.walk(block)}
    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call)
            and ast.unparse(node.func) == "print" and id(node) not in in_main]


def test_no_print_and_one_logger_per_module():
    for path in SOURCES:
        if path.name != "reference.py":
            assert prints_outside_main(path) == [], path.name
        text = path.read_text()
        logs = re.search(r"^\s+logger\.[a-z]+\(", text, re.M) is not None
        loggers = re.findall(r"^logger = logging.getLogger\(__name__\)$", text, re.M)
        assert len(loggers) == logs, f"{path.name}: a module that logs has one logger, one that does not none"


def test_job_files_have_fixed_names():
    media = (ROOT / "src" / "s2v_worker" / "media.py").read_text()
    for name in re.findall(r'work_dir / "([^"]+)"', media):
        assert re.fullmatch(r"[a-z_]+\.[a-z0-9]+", name), name


def package_imports() -> dict[str, set[str]]:
    """module -> the package's modules it imports (relative imports, anywhere in the file)."""
    graph = {}
    for path in SOURCES:
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    names.add(node.module.split(".")[0])
                else:  # from . import attention, weights
                    names.update(alias.name for alias in node.names)
        graph[path.stem] = names
    return graph


def test_no_module_imports_itself_back_through_others():
    """The package is layered (docs/architecture.md): no import circle, deferred imports included."""
    graph = package_imports()

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        for name in graph.get(start, ()):
            if name == target or (name not in seen and not seen.add(name) and reaches(name, target, seen)):
                return True
        return False

    circles = sorted(name for name in graph if reaches(name, name, set()))
    assert circles == [], f"modules in an import circle: {circles}"


def test_the_architecture_page_maps_every_module():
    page = (ROOT / "docs" / "architecture.md").read_text()
    missing = [path.name for path in SOURCES if path.name != "__init__.py" and f"`{path.name}`" not in page]
    assert missing == [], f"docs/architecture.md does not map {missing}"
