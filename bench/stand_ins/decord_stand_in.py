"""Stand-in for decord on the GPU machine only, used when the image lacks decord (its 14 MB wheel
would crowd out what a run must carry). `wan.speech2video` imports VideoReader at import time;
the benchmarks never read a pose video. bench/run_on_device.sh copies this file to
/tmp/site/decord/__init__.py there when `import decord` fails; it is never installed by the worker
and nothing imports it under this file's name."""


class VideoReader:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("decord is not installed on this machine (benchmark stand-in)")
