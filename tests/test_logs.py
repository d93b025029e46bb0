"""Logging set-up (s2v_worker.logs, what handler.py and every rank call): LOG_LEVEL is for the
worker's loggers; third-party ones stay at warning (LOG_LEVEL=debug once flooded the log with numba's
compiler internals). Each case runs in a fresh interpreter, as the worker's process starts."""
import subprocess
import sys

import pytest

LOG_LINES = """
import logging, sys
from s2v_worker.logs import configure_logging
configure_logging(sys.argv[1], process="rank1 ")
for name in ("s2v_worker.pipeline", "numba.core.ssa", "urllib3.connectionpool", "botocore.hooks",
             "PIL.PngImagePlugin", "some_library"):
    log = logging.getLogger(name)
    for level in ("debug", "info", "warning", "error"):
        getattr(log, level)("%s %s", name, level)
"""


def logged(level: str) -> set[str]:
    """'logger level' of each line the child wrote to stderr."""
    child = subprocess.run([sys.executable, "-c", LOG_LINES, level], capture_output=True, text=True,
                           check=True, timeout=60)
    assert child.stdout == ""
    lines = child.stderr.splitlines()
    assert all(" rank1 " in line for line in lines), lines
    return {" ".join(line.split()[-2:]) for line in lines}


def lines_of(names, levels) -> set[str]:
    return {f"{name} {level}" for name in names for level in levels}


THIRD_PARTY = ("numba.core.ssa", "urllib3.connectionpool", "botocore.hooks", "PIL.PngImagePlugin",
               "some_library")


@pytest.mark.parametrize("level, ours, theirs", [
    ("debug", ("debug", "info", "warning", "error"), ("warning", "error")),
    ("info", ("info", "warning", "error"), ("warning", "error")),
    ("error", ("error",), ("error",)),
])
def test_log_level_is_for_the_workers_loggers_and_the_rest_stay_at_warning(level, ours, theirs):
    assert logged(level) == lines_of(["s2v_worker.pipeline"], ours) | lines_of(THIRD_PARTY, theirs)
