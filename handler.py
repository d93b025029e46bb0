"""RunPod serverless entry point for Wan2.2-S2V-14B: build the worker once, then hand it each job.

    python handler.py                          # runs test_input.json (runpod SDK's local mode)
    python handler.py --test_input '{"input": {...}}'
    python handler.py --rp_serve_api           # local HTTP API: /run, /runsync, /stream, /status

With WAN_S2V_STREAM=true the handler is the worker's streaming one (an item per clip, then the
result), except in the SDK's local test mode, which never runs a generator handler: there the
items are collected and printed as one list, as /runsync returns them (docs/job.md, "Streaming
endpoints").
"""
from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any, AsyncIterator

STARTED = time.monotonic()  # before the imports: the start-up's log line counts them

import runpod  # noqa: E402
from runpod.serverless.modules.rp_logger import RunPodLogger  # noqa: E402

# These three import the standard library only; the worker's runner (torch, the official model
# code: 20 to 30 s of a cold start) is imported in main(), once the read-ahead is reading.
from s2v_worker.logs import configure_logging  # noqa: E402
from s2v_worker.read_ahead import ReadAhead  # noqa: E402
from s2v_worker.settings import Settings  # noqa: E402

if TYPE_CHECKING:
    from s2v_worker.runner import Worker


def sdk_runs_one_local_test(argv: list[str], on_runpod: bool) -> bool:
    """Whether runpod.serverless.start will run one job in its local test mode (rp_local), which
    calls the handler once and never iterates a generator (runpod 1.12: a generator handler's
    body would not even run): with --test_input, or, without --rp_serve_api, off RunPod (it then
    reads test_input.json). The SDK's own parser reads the arguments, so they mean what they will
    mean to it."""
    args, _ = runpod.serverless.parser.parse_known_args(argv)
    return bool(args.test_input) or not (args.rp_serve_api or on_runpod)


def handler_config(worker: Worker, stream: bool, local_test: bool) -> dict[str, Any]:
    """What runpod.serverless.start gets: the handler, and its options.

    Streaming, the handler must itself be an async generator function (the SDK tells generator
    handlers by that alone), with `return_aggregate_stream` so that /run, /runsync and /status
    return the list of items. A yielded {"error"} fails the job, but the SDK keeps only its
    message: a `refresh_worker` it asks for is set on this config instead, which the SDK reads
    after the job (stopPod, and the worker stops taking jobs) as it does for a returned one."""
    if not stream:
        return {"handler": worker.handle}
    if local_test:
        async def collect(job: dict) -> Any:
            items = [item async for item in worker.handle_stream(job)]
            return items[-1] if "error" in items[-1] else items

        return {"handler": collect}
    config: dict[str, Any] = {"return_aggregate_stream": True}

    async def stream_handler(job: dict) -> AsyncIterator[dict]:
        async for item in worker.handle_stream(job):
            if item.get("refresh_worker"):
                config["refresh_worker"] = True
            yield item

    config["handler"] = stream_handler
    return config


def main() -> None:
    settings = Settings.from_env()
    configure_logging(settings.logging.log_level)
    read_ahead = (ReadAhead.of_checkpoint(settings.model, settings.folders)
                  if settings.model.read_ahead else None)
    from s2v_worker.runner import Worker, exit_through_hooks_on_sigterm

    exit_through_hooks_on_sigterm()
    RunPodLogger().set_level(str(settings.logging.runpod_log_level))
    on_runpod = settings.logging.runpod_webhook_post_output is not None
    # Progress updates go to RunPod's job API, which only exists on RunPod's workers.
    send_progress = runpod.serverless.progress_update if on_runpod else None
    worker = Worker.start(settings, send_progress=send_progress,
                          imports_s=time.monotonic() - STARTED, read_ahead=read_ahead)
    runpod.serverless.start(handler_config(worker, settings.storage.stream,
                                           sdk_runs_one_local_test(sys.argv[1:], on_runpod)))


if __name__ == "__main__":
    main()
