"""The DiT's attention kernels and how one is chosen (attention.py), on the CPU: FlashAttention-3
is only ever chosen where it can run, and a missing or broken fa3-fwd falls back with one log
line; the FP8 kernel's exact-arithmetic rewrites (K centred, V scaled per channel) leave the
attention unchanged."""
import logging
import sys

import pytest
import torch

from s2v_worker import attention
from s2v_worker.attention import (KERNELS, ATTENTION, choose_kernel, fa3_unavailable,
                                  forward_state, sdpa_token_major)

CPU = torch.device("cpu")


def test_auto_takes_sdpa_on_the_cpu_and_says_why(caplog):
    with caplog.at_level(logging.INFO, logger="s2v_worker.attention"):
        assert choose_kernel("auto", CPU) == "sdpa"
    assert [r.getMessage() for r in caplog.records] == [
        "attention: FlashAttention-3 not used (not a CUDA device); PyTorch SDPA instead"]


def test_a_fa3_that_does_not_import_falls_back_on_a_hopper_gpu(monkeypatch, caplog):
    """As on an H100 whose fa3-fwd build does not match the installed torch."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100")
    monkeypatch.setitem(sys.modules, "fa3_fwd_interface", None)  # import raises ImportError
    cuda = torch.device("cuda", 0)
    assert fa3_unavailable(cuda).startswith("fa3-fwd does not import (ModuleNotFoundError")
    with caplog.at_level(logging.INFO, logger="s2v_worker.attention"):
        assert choose_kernel("auto", cuda) == "sdpa"
    assert len(caplog.records) == 1 and "fa3-fwd does not import" in caplog.records[0].getMessage()
    with pytest.raises(RuntimeError, match="WAN_S2V_ATTENTION=fa3 but FlashAttention-3 cannot run "
                                           "here: fa3-fwd does not import"):
        choose_kernel("fa3", cuda)


def test_fa3_is_only_chosen_on_hopper(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    reason = fa3_unavailable(torch.device("cuda", 0))
    assert reason == "NVIDIA A100 is compute capability 8.0, FlashAttention-3 needs Hopper (9.0)"
    assert choose_kernel("sdpa", torch.device("cuda", 0)) == "sdpa"


def test_fp8_attention_needs_fa3():
    assert ATTENTION.name == "sdpa"
    with pytest.raises(RuntimeError, match="FP8 attention needs FlashAttention-3"):
        with forward_state(None, 0, float8=True):
            pass


def test_the_fp8_rewrites_leave_the_attention_unchanged(monkeypatch):
    """fa3_float8 centres K and scales V per channel around the quantization; with the e4m3
    rounding taken out (scaled floats handed to a kernel that undoes the scales), what is left is
    plain attention, up to the bfloat16 result."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 64, 2, 32, generator=g) * 3 + 1 for _ in range(3))

    def dequantizing_fa3(q8, k8, v8, q_descale, k_descale, v_descale):
        return sdpa_token_major(*[t * s[:, None, :, None] for t, s in
                                  ((q8, q_descale), (k8, k_descale), (v8, v_descale))])

    monkeypatch.setattr(attention, "_fa3_function", lambda: dequantizing_fa3)
    monkeypatch.setattr(attention, "_float8_inputs_compiled", attention._float8_inputs)
    monkeypatch.setattr(attention, "_quantize", lambda x, scale: x.float() / scale[:, None, :, None])
    got = attention.fa3_float8(q, k, v)
    expected = sdpa_token_major(q, k, v)
    assert got.dtype == torch.bfloat16 and got.shape == q.shape
    assert ((got.float() - expected).norm() / expected.norm()).item() < 1e-2


def test_kernels_agree_on_the_cpu():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 16, 2, 8, generator=g) for _ in range(3))
    out = KERNELS["sdpa"](q, k, v)
    reference = torch.softmax(q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2) / 8 ** 0.5,
                              -1) @ v.transpose(1, 2)
    torch.testing.assert_close(out, reference.transpose(1, 2))
