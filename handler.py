"""RunPod serverless entry point for Wan2.2-S2V-14B: build the worker once, then hand it each job.

    python handler.py                          # runs test_input.json (runpod SDK's local mode)
    python handler.py --test_input '{"input": {...}}'
    python handler.py --rp_serve_api           # local HTTP API: /run, /runsync, /status
"""
import time

STARTED = time.monotonic()  # before the imports: the start-up's log line counts them

import runpod  # noqa: E402
from runpod.serverless.modules.rp_logger import RunPodLogger  # noqa: E402

from s2v_worker.logs import configure_logging  # noqa: E402
from s2v_worker.runner import Worker, exit_through_hooks_on_sigterm  # noqa: E402
from s2v_worker.settings import Settings  # noqa: E402


def main() -> None:
    exit_through_hooks_on_sigterm()
    settings = Settings.from_env()
    configure_logging(settings.logging.log_level)
    RunPodLogger().set_level(str(settings.logging.runpod_log_level))
    # Progress updates go to RunPod's job API, which only exists on RunPod's workers.
    send_progress = (runpod.serverless.progress_update
                     if settings.logging.runpod_webhook_post_output else None)
    worker = Worker.start(settings, send_progress=send_progress,
                          imports_s=time.monotonic() - STARTED)
    runpod.serverless.start({"handler": worker.handle})


if __name__ == "__main__":
    main()
