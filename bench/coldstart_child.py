"""One cold start, run as its own process by bench/harness.py: process start to ready for a job.

    python -m bench.coldstart_child official|worker CHECKPOINT_DIR PARENT_START_TIME COMPILE_CACHE

Prints one JSON line: ready_s counts from the parent's clock reading just before it started this
process, so interpreter start and imports are included.
"""
import json
import sys
import time
from pathlib import Path

path, folder, parent_start, cache = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
import torch  # noqa: E402  (after the clock reading above: imports count)

from s2v_worker.official import import_official, install_attention  # noqa: E402

imported = time.time()
if path == "official":
    official = import_official()
    install_attention("official-sdpa")
    # The official class as its CLI builds it (offload off at generate time): T5 loaded on the CPU,
    # DiT straight to the GPU, VAE on the GPU, wav2vec2 on the CPU.
    model = official.speech2video.WanS2V(config=official.config, checkpoint_dir=str(folder), device_id=0)
else:  # as handler.py starts it: load, then the warm-up compilation (WAN_S2V_WARMUP=480p)
    from s2v_worker.runner import Worker
    from s2v_worker.settings import Settings

    settings = Settings.from_env({"WAN_S2V_CKPT_DIR": str(folder), "TORCH_COMPILE_CACHE_DIR": cache})
    model = Worker.start(settings)
torch.cuda.synchronize()
ready = time.time()
print(json.dumps({"ready_s": round(ready - parent_start, 1), "imports_s": round(imported - parent_start, 1),
                  "load_s": round(ready - imported, 1),
                  "gpu_gb_after_load": round(torch.cuda.memory_allocated() / 2**30, 1)}))
