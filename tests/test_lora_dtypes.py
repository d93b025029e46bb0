"""LoRA files as they come (issue 17): every float dtype the ecosystem saves LoRAs in merges exactly
as its float32 values say, other dtypes are refused naming the dtype, values whose merge would not
be finite are refused however they are spread over the factors, the scale and the dtypes, and a
file that fails never stays in the URL cache. On the tiny checkpoint, on the CPU."""
import pytest
import torch

from test_lora import (assert_base, cache_files, lora_job, lora_worker, manager,  # noqa: F401 (fixtures)
                       resolved, snapshot, speech_1s, write_lora)
from s2v_worker.lora import LoraError, check_lora_file

KEY = "blocks.0.self_attn.q"
FLOAT_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, torch.float16, torch.bfloat16,
                torch.float32, torch.float64)


def q_shape(model):
    q = model.blocks[0].self_attn.q
    return q.out_features, q.in_features


def pair(model, dtype, alpha=None, alpha_dtype=None, seed=0):
    """A rank-2 LoRA for KEY in `dtype` (alpha in `alpha_dtype`, default `dtype`), and the change it
    makes at strength 1, computed here in float32 from the stored values."""
    out_dim, in_dim = q_shape(model)
    gen = torch.Generator().manual_seed(seed)
    down = (torch.randn(2, in_dim, generator=gen) * 0.5).to(dtype)
    up = (torch.randn(out_dim, 2, generator=gen) * 0.5).to(dtype)
    tensors = {f"{KEY}.lora_down.weight": down, f"{KEY}.lora_up.weight": up}
    scale = 1.0
    if alpha is not None:
        alpha_tensor = torch.tensor(alpha).to(alpha_dtype or dtype)
        tensors[f"{KEY}.alpha"] = alpha_tensor
        scale = float(alpha_tensor.float()) / 2
    return tensors, (up.float() @ down.float()) * scale


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_every_float_dtype_merges_its_exact_float32_values(tiny_pipeline, manager, tmp_path, dtype):
    model = tiny_pipeline.denoiser.model
    base = snapshot(model)
    tensors, change = pair(model, dtype, alpha=3.0)
    assert manager.apply([resolved(write_lora(tmp_path / "lora.safetensors", tensors), 0.5)])
    weight = model.get_parameter(f"{KEY}.weight")
    assert torch.equal(weight, (base[f"{KEY}.weight"].float() + change * 0.5).to(weight.dtype))
    manager.apply([])
    assert_base(model, base)


@pytest.mark.parametrize("part", ["alpha", "diff"])
def test_an_fp8_alpha_or_diff_alone_loads(tiny_pipeline, manager, tmp_path, part):
    model = tiny_pipeline.denoiser.model
    base = snapshot(model)
    if part == "alpha":
        tensors, change = pair(model, torch.float32, alpha=4.0, alpha_dtype=torch.float8_e4m3fn)
        param = f"{KEY}.weight"
    else:
        diff = torch.full_like(model.blocks[0].norm3.weight, 0.25).to(torch.float8_e4m3fn)
        tensors, change, param = {"blocks.0.norm3.diff": diff}, diff.float(), "blocks.0.norm3.weight"
    assert manager.apply([resolved(write_lora(tmp_path / "lora.safetensors", tensors))])
    assert torch.equal(model.get_parameter(param), base[param] + change)


def test_an_integer_alpha_loads_as_loaders_read_it(tiny_pipeline, manager, tmp_path):
    model = tiny_pipeline.denoiser.model
    base = snapshot(model)
    tensors, change = pair(model, torch.float16, alpha=4, alpha_dtype=torch.int64)
    assert manager.apply([resolved(write_lora(tmp_path / "lora.safetensors", tensors))])
    assert torch.equal(model.get_parameter(f"{KEY}.weight"), base[f"{KEY}.weight"] + change)


@pytest.mark.parametrize("dtype, name, part", [
    (torch.float8_e8m0fnu, "F8_E8M0", "up"),
    (torch.complex64, "C64", "up"),
    (torch.int32, "I32", "down"),
    (torch.int8, "I8", "up"),
    (torch.bool, "BOOL", "alpha"),
    (torch.complex64, "C64", "alpha"),
])
def test_other_dtypes_are_refused_naming_the_dtype(tiny_pipeline, manager, tmp_path, dtype, name, part):
    model = tiny_pipeline.denoiser.model
    base = snapshot(model)
    tensors, _ = pair(model, torch.float32, alpha=1.0)
    key = f"{KEY}.alpha" if part == "alpha" else f"{KEY}.lora_{part}.weight"
    tensors[key] = tensors[key].to(dtype)
    path = write_lora(tmp_path / "lora.safetensors", tensors)
    message = (f"'loras[0]' stores '{key}' as {name}, which a LoRA merge cannot use; LoRA tensors "
               "load in float8 (F8_E4M3, F8_E5M2), F16, BF16, F32 or F64")
    with pytest.raises(LoraError) as refused:
        check_lora_file(path, "loras[0]")  # from the header: what a download is checked with
    assert str(refused.value) == message
    with pytest.raises(LoraError) as refused:
        manager.apply([resolved(path)])
    assert str(refused.value) == message
    assert_base(model, base)


def overflowing_loras(model):
    """name -> tensors whose float32 merge is not finite, though each value alone may be: the
    cases of the issue, each once passed the guard and merged NaN or infinity."""
    out_dim, in_dim = q_shape(model)
    down, up = f"{KEY}.lora_down.weight", f"{KEY}.lora_up.weight"
    return {
        # float64 factors whose product is 1, but not in float32, where the merge computes
        "float64_1e200_1e-200": {down: torch.full((2, in_dim), 1e-200, dtype=torch.float64),
                                 up: torch.full((out_dim, 2), 1e200, dtype=torch.float64)},
        # an alpha past float32's range on a zero up: inf * 0
        "float64_alpha_1e300": {down: torch.ones(2, in_dim, dtype=torch.float64),
                                up: torch.zeros(out_dim, 2, dtype=torch.float64),
                                f"{KEY}.alpha": torch.tensor(1e300, dtype=torch.float64)},
        # the product overflows float32 before the tiny alpha could bring it back
        "float32_1e20_alpha_1e-30": {down: torch.full((2, in_dim), 1e20),
                                     up: torch.full((out_dim, 2), 1e20),
                                     f"{KEY}.alpha": torch.tensor(1e-30)},
    }


@pytest.mark.parametrize("name", ["float64_1e200_1e-200", "float64_alpha_1e300",
                                  "float32_1e20_alpha_1e-30"])
def test_values_whose_merge_is_not_finite_are_refused_and_change_nothing(
        tiny_pipeline, lora_worker, portrait_png, speech_1s, name):
    model = tiny_pipeline.denoiser.model
    base = snapshot(model)
    write_lora(lora_worker.volume / "loras" / "bad.safetensors", overflowing_loras(model)[name])
    result = lora_worker.run(lora_job(portrait_png, speech_1s,
                                      loras=[{"path": "loras/bad.safetensors"}]))
    assert set(result) == {"error"}, result  # a client error: no refresh_worker, no video
    assert result["error"].startswith("'loras[0]' has ") and f"'{KEY}'" in result["error"]
    assert_base(model, base)
    assert "video_base64" in lora_worker.run(lora_job(portrait_png, speech_1s))  # still serves


def test_an_fp8_lora_by_url_merges_and_stays_cached(tiny_pipeline, lora_worker, portrait_png,
                                                     speech_1s):
    """The issue's first case: an F8_E4M3 LoRA given by URL restarted the worker on every job."""
    write_lora(lora_worker.served / "fp8.safetensors", pair(tiny_pipeline.denoiser.model,
                                                             torch.float8_e4m3fn, alpha=2.0)[0])
    job = lora_job(portrait_png, speech_1s, loras=[{"url": f"{lora_worker.base_url}/fp8.safetensors"}])
    result = lora_worker.run(job)
    assert "video_base64" in result and "refresh_worker" not in result, result
    assert len(cache_files(lora_worker)) == 1


@pytest.mark.parametrize("content", ["complex64", "overflow"])
def test_the_url_cache_never_keeps_a_file_that_failed(tiny_pipeline, lora_worker, portrait_png,
                                                      speech_1s, content):
    model = tiny_pipeline.denoiser.model
    if content == "complex64":  # refused from the header: never enters the cache
        tensors, _ = pair(model, torch.float32)
        tensors[f"{KEY}.lora_up.weight"] = tensors[f"{KEY}.lora_up.weight"].to(torch.complex64)
    else:  # reads as a LoRA, enters the cache, fails at the merge: leaves the cache
        tensors = overflowing_loras(model)["float32_1e20_alpha_1e-30"]
    write_lora(lora_worker.served / "bad.safetensors", tensors)
    job = lora_job(portrait_png, speech_1s, loras=[{"url": f"{lora_worker.base_url}/bad.safetensors"}])
    result = lora_worker.run(job)
    assert set(result) == {"error"}, result
    assert cache_files(lora_worker) == []


def test_an_unexpected_parse_failure_is_no_worker_restart_and_leaves_the_cache(
        tiny_pipeline, lora_worker, portrait_png, speech_1s, monkeypatch):
    """A bug in parsing (here: one injected) happens before any weight changes: an internal error
    without refresh_worker, and the file leaves the cache like any file that failed to load."""
    from s2v_worker import lora_merge

    write_lora(lora_worker.served / "lora.safetensors", pair(tiny_pipeline.denoiser.model, torch.float16)[0])

    def broken(*args, **kwargs):
        raise NotImplementedError("a parsing bug")

    monkeypatch.setattr(lora_merge, "parse_lora", broken)
    result = lora_worker.run(lora_job(portrait_png, speech_1s,
                                      loras=[{"url": f"{lora_worker.base_url}/lora.safetensors"}]))
    assert result == {"error": "internal error (NotImplementedError); the worker's logs have the "
                               "details for job lora"}
    assert cache_files(lora_worker) == []


@pytest.mark.parametrize("make", ["name_too_long", "symlink_loop"])
def test_unreadable_volume_paths_are_client_errors(tiny_pipeline, lora_worker, portrait_png,
                                                   speech_1s, make):
    if make == "name_too_long":  # 300 characters: within the field's 1024, past the file system's 255
        path, reason = "loras/" + "a" * 300 + ".safetensors", "file name too long"
    else:
        (lora_worker.volume / "loras" / "one.safetensors").symlink_to("two.safetensors")
        (lora_worker.volume / "loras" / "two.safetensors").symlink_to("one.safetensors")
        path, reason = "loras/one.safetensors", "a symlink loop"
    result = lora_worker.run(lora_job(portrait_png, speech_1s, loras=[{"path": path}]))
    assert result == {"error": f"'loras[0].path' cannot be read on the network volume ({reason})"}
