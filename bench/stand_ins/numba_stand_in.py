"""Stand-in for numba on the GPU machine only, used when the image lacks numba (its llvmlite wheel
is too large to carry; the image read on 2026-12-04 has numba 0.68.0, so there it is not used).
librosa imports numba's decorators at import time; the S2V path calls only librosa.load
(soundfile + soxr), which runs no jitted code. bench/run_on_device.sh copies this file to
/tmp/site/numba/__init__.py there when `import numba` fails; it is never installed by the worker
and nothing imports it under this file's name."""


def _passthrough(*args, **kwargs):
    if len(args) == 1 and callable(args[0]) and not kwargs:
        return args[0]
    return lambda function: function


jit = njit = vectorize = guvectorize = stencil = generated_jit = _passthrough
prange = range
