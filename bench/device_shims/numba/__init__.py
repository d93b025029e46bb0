"""Stand-in for numba on the GPU machine only, used when the image lacks numba (its llvmlite wheel
is too large to carry). librosa imports numba's decorators at import time; the S2V path calls only
librosa.load (soundfile + soxr), which runs no jitted code. Never installed by the worker."""


def _passthrough(*args, **kwargs):
    if len(args) == 1 and callable(args[0]) and not kwargs:
        return args[0]
    return lambda function: function


jit = njit = vectorize = guvectorize = stencil = generated_jit = _passthrough
prange = range
