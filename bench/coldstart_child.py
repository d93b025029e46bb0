"""One cold start, run as its own process by bench/harness.py: process start to ready for a job,
then, if asked, jobs on the worker it started.

    python -m bench.coldstart_child official|worker CHECKPOINT_DIR PARENT_START_TIME COMPILE_CACHE
        [--env NAME=VALUE ...] [--jobs first_job|stream ...] [--media-dir DIR]

Prints one JSON line: ready_s counts from the parent's clock reading just before it started this
process, so interpreter start and imports are included. The worker starts as handler.py starts it
(Worker.start, with the settings from the environment plus --env). After it is ready:
- first_job: the same 1-clip 480p job twice (4 guided steps); first_job_ratio = first / second,
  and the first job's timings (what it paid that the start-up did not);
- one_job: that job once (a capped worker's: it serves, and how fast);
- stream: a 1-clip and a 3-clip 480p job of 4 steps without guidance (a 4-step LoRA's settings),
  the second with each clip's item sent as it is ready (Worker.run's send_item, as a streaming
  endpoint runs it): seconds to the first item and between items.
"""
import argparse
import json
import time
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("path", choices=("official", "worker"))
parser.add_argument("folder", type=Path)
parser.add_argument("parent_start", type=float)
parser.add_argument("cache")
parser.add_argument("--env", action="append", default=[])
parser.add_argument("--jobs", nargs="*", default=[])
parser.add_argument("--media-dir", type=Path)
args = parser.parse_args()

settings = read_ahead = None
if args.path == "worker":  # as handler.py: the read-ahead starts before the heavy imports
    from s2v_worker.read_ahead import ReadAhead
    from s2v_worker.settings import Settings

    # Videos go to a folder standing for the network volume (they are too large to inline).
    environ = {"WAN_S2V_CKPT_DIR": str(args.folder), "TORCH_COMPILE_CACHE_DIR": args.cache,
               "NETWORK_VOLUME_DIR": str(args.media_dir or args.folder.parent),
               **dict(item.split("=", 1) for item in args.env)}
    settings = Settings.from_env(environ)
    if settings.model.read_ahead:
        read_ahead = ReadAhead.of_checkpoint(settings.model, settings.folders)

import torch  # noqa: E402  (after the clock reading above: imports count)

from s2v_worker.official import import_official, install_attention  # noqa: E402

imported = time.time()
worker = None
if args.path == "official":
    official = import_official()
    install_attention("official-sdpa")
    # The official class as its CLI builds it (offload off at generate time): T5 loaded on the CPU,
    # DiT straight to the GPU, VAE on the GPU, wav2vec2 on the CPU.
    model = official.speech2video.WanS2V(config=official.config, checkpoint_dir=str(args.folder),
                                         device_id=0)
else:  # as handler.py starts it: load, then the warm-up compilation (WAN_S2V_WARMUP=480p)
    from s2v_worker.logs import configure_logging
    from s2v_worker.runner import Worker

    configure_logging(settings.logging.log_level)  # as handler.py: the start-up's log line
    worker = Worker.start(settings, imports_s=time.time() - args.parent_start,
                          read_ahead=read_ahead)
GPU = torch.cuda.is_available()  # (without one: a dry run of this script on the tiny checkpoint)
if GPU:
    torch.cuda.synchronize()
ready = time.time()
out = {"ready_s": round(ready - args.parent_start, 1), "imports_s": round(imported - args.parent_start, 1),
       "load_s": round(ready - imported, 1),
       "gpu_gb_after_load": round(torch.cuda.memory_allocated() / 2**30, 1) if GPU else None}
if worker is not None:
    out["weights"] = worker.pipeline.denoiser.weights
print(json.dumps(out), flush=True)


def job(steps: int, guidance: float, seconds: float, job_id: str) -> dict:
    import base64

    media = args.media_dir
    return {"id": job_id, "input": {
        "image_base64": base64.b64encode((media / "portrait_16x9.png").read_bytes()).decode(),
        "audio_base64": base64.b64encode((media / f"speech_{seconds}s.wav").read_bytes()).decode(),
        "prompt": f"a person talks ({job_id})", "resolution": "480p", "sample_steps": steps,
        "guidance_scale": guidance, "seed": 42}}


def run(request: dict, send_item=None) -> dict:
    started = time.perf_counter()
    result = worker.run(request, send_item=send_item)
    if "error" in result:
        raise RuntimeError(f"job {request['id']} failed: {result['error']}")
    return {"job_s": round(time.perf_counter() - started, 2), "timings": result["timings"],
            "num_clips": result["num_clips"]}


if worker is not None and "first_job" in args.jobs:
    first = run(job(4, 4.5, 4.5, "first"))
    second = run(job(4, 4.5, 4.5, "second"))
    out["first_job"] = {"first": first, "warm": second,
                        "first_job_ratio": round(first["job_s"] / second["job_s"], 3)}
    print(json.dumps(out), flush=True)

if worker is not None and "one_job" in args.jobs:
    out["one_job"] = run(job(4, 4.5, 4.5, "one"))
    out["one_job"]["peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if GPU else None
    print(json.dumps(out), flush=True)

if worker is not None and "stream" in args.jobs:
    one_clip = run(job(4, 1.0, 4.5, "one-clip"))
    started = time.perf_counter()
    items: list[float] = []
    three = run(job(4, 1.0, 14.0, "three-clips"),
                send_item=lambda item: items.append(time.perf_counter() - started))
    gaps = [b - a for a, b in zip(items, items[1:])]
    out["stream"] = {"one_clip_job_s": one_clip["job_s"], "three_clip_job_s": three["job_s"],
                     "num_clips": three["num_clips"], "items_s": [round(t, 2) for t in items],
                     "first_item_s": round(items[0], 2) if items else None,
                     "between_items_s": round(sum(gaps) / len(gaps), 2) if gaps else None,
                     "first_item_ratio": round(items[0] / one_clip["job_s"], 3) if items else None,
                     "settings": "480p, 4 steps, guidance_scale 1.0 (a 4-step LoRA's), seed 42"}
    print(json.dumps(out), flush=True)
