"""Logging for the worker's processes (handler.py's, and each spawned rank's).

LOG_LEVEL is the level of the worker's own loggers (`s2v_worker.*`). Every other library logs at
WARNING and above whatever LOG_LEVEL says (LOG_LEVEL=error quiets them to errors too): their debug
output is for their developers (with the root logger at debug, as LOG_LEVEL=debug once set it,
numba's compiler internals buried the worker's own lines).
"""
from __future__ import annotations

import logging
import sys

WORKER_LOGGER = "s2v_worker"
THIRD_PARTY_LEVEL = logging.WARNING


def configure_logging(level: str, process: str = "") -> None:
    """Log to stderr: the worker's loggers at `level` (debug, info, warning or error), the rest
    at `level` or WARNING, whichever is higher. `process` prefixes each line's logger name (a
    rank's "rank1 ")."""
    worker_level = logging.getLevelName(level.upper())
    logging.basicConfig(level=max(worker_level, THIRD_PARTY_LEVEL), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s {process}%(name)s: %(message)s",
                        force=True)
    logging.getLogger(WORKER_LOGGER).setLevel(worker_level)
