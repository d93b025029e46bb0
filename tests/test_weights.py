"""The DiT's weights as the worker keeps them (issue 19), on the tiny checkpoint on the CPU: loaded
tensor by tensor (bit-identical to diffusers' from_pretrained), in FP8 (quantized as they arrive,
the large Linear layers only), served by FP8 GEMMs or upcast to the GEMM's dtype, taking LoRAs
(and giving the exact FP8 values back), streamed from host memory block by block, and the T5
streamed too; a whole job on FP8 weights. The GPU measures the same on the full-size model
(bench/harness.py, section memory)."""
import re

import pytest
import torch

from conftest import generate_video, load_tiny_pipeline, plan_job, speech_excerpt
from s2v_worker import weights
from s2v_worker.checkpoint import read_checkpoint
from s2v_worker.denoiser import Denoiser
from s2v_worker.dit import DiTEngine
from s2v_worker.float8 import Float8Linear, Float8UpcastWeight, Float8Weight
from s2v_worker.job import parse_job
from s2v_worker.loading import load_pipeline, stream_t5
from s2v_worker.official import import_official
from s2v_worker.settings import ModelSettings

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return read_checkpoint(tiny_checkpoint)


def rel_l2(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_the_dit_loads_tensor_by_tensor_as_from_pretrained_does(checkpoint):
    official = import_official().model_s2v.WanModel_S2V.from_pretrained(
        str(checkpoint.path), torch_dtype=torch.float32, device_map="cpu")
    ours = weights.load_dit(checkpoint, CPU, torch.float32)
    expected, got = official.state_dict(), ours.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]) and expected[name].dtype == got[name].dtype, name
    assert torch.equal(official.freqs, ours.freqs)


def test_in_fp8_the_large_linears_are_quantized_as_they_arrive(checkpoint):
    reference = weights.load_dit(checkpoint, CPU, torch.float32)
    model = weights.load_dit(checkpoint, CPU, torch.float32, weights.Float8Recipe(gemm="upcast"))
    fp8 = {name for name, m in model.named_modules() if isinstance(m, Float8Linear)}
    linears = {name for name, m in reference.named_modules() if isinstance(m, torch.nn.Linear)}
    # The blocks' self-attention, cross-attention query and output, feed-forward; the text's key
    # and value, the audio injectors, the embeddings and the head stay as they were.
    assert fp8 == {n for n in linears
                   if re.fullmatch(r"blocks\.\d+\.(self_attn\.[qkvo]|cross_attn\.[qo]|ffn\.\d+)", n)}
    assert fp8 and {"blocks.0.cross_attn.k", "audio_injector.injector.0.q"} <= linears - fp8
    for name in sorted(fp8)[:5]:
        layer, dense = model.get_submodule(name), reference.get_submodule(name)
        assert layer.weight.dtype == torch.float8_e4m3fn and layer.scale.shape == (1, layer.out_features)
        assert torch.equal(layer.bias, dense.bias)
        # e4m3 keeps 3 mantissa bits: each value within 1/16 of itself (plus the scale's rounding)
        error = (layer.stored.dequantize(torch.float32) - dense.weight).abs()
        assert (error <= dense.weight.abs() / 16 + layer.scale.t() * 2**-9).all(), name
    assert weights.dit_memory_bytes(model) < weights.dit_memory_bytes(reference)


def test_a_float8_linear_multiplies_as_its_dequantized_weight(checkpoint):
    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 96)
    stored = Float8Weight.quantize(dense.weight.detach(), rowwise=True)
    x = torch.randn(5, 7, 64)
    expected = x @ stored.dequantize(torch.float32).t() + dense.bias.detach()
    upcast = Float8Linear(stored, dense.bias.detach(), "upcast")
    assert isinstance(upcast.stored, Float8UpcastWeight)
    torch.testing.assert_close(upcast(x), expected, rtol=1e-5, atol=1e-5)
    gemm = Float8Linear(stored, dense.bias.detach(), "fp8")  # activations quantized per token too
    assert rel_l2(gemm(x), expected) < 0.05


@pytest.mark.parametrize("gemm", ["upcast", "fp8"])
def test_one_forward_on_fp8_weights_stays_close_to_the_exact_one(checkpoint, gemm):
    from test_dit import clip_inputs

    dense = weights.load_dit(checkpoint, CPU, torch.float32)
    fp8 = weights.load_dit(checkpoint, CPU, torch.float32, weights.Float8Recipe(gemm=gemm))
    x = [torch.randn(16, 20, 8, 12, generator=torch.Generator().manual_seed(3))]
    t = torch.tensor([700.0])
    outputs = []
    for model in (dense, fp8):
        engine = DiTEngine(model)
        outputs.append(engine.forward(x, t, engine.prepare(**clip_inputs(1, False)))[0])
    error = rel_l2(outputs[1], outputs[0])
    assert 0 < error < 0.1, error  # the full-size bound (6e-2) is measured on the GPU


def test_streamed_blocks_compute_what_resident_ones_do(checkpoint):
    from test_dit import clip_inputs

    model = weights.load_dit(checkpoint, CPU, torch.float32, weights.Float8Recipe(gemm="upcast"))
    resident, streamed = DiTEngine(model), DiTEngine(
        weights.load_dit(checkpoint, CPU, torch.float32, weights.Float8Recipe(gemm="upcast")))
    per_block = streamed.stream_blocks([1, 2], CPU)
    assert per_block > 0
    x = [torch.randn(16, 20, 8, 12, generator=torch.Generator().manual_seed(4))]
    t = torch.tensor([300.0])
    inputs = clip_inputs(2, False)
    expected = resident.forward(x, t, resident.prepare(**inputs))[0]
    got = streamed.forward(x, t, streamed.prepare(**inputs))[0]
    assert torch.equal(got, expected)
    # Between uses the streamed blocks' weights are their host copies again.
    assert all(p.data_ptr() == h.data_ptr() for p, h in zip(
        [*streamed.model.blocks[1].parameters()], streamed.stream.host[0]))


def test_a_lora_on_fp8_weights_merges_into_the_dequantized_weight_and_restores_exactly(
        tiny_pipeline, checkpoint, tmp_path):
    from safetensors.torch import save_file

    from s2v_worker.lora import ResolvedLora, file_identity
    from s2v_worker.lora_merge import LoraManager

    model = weights.load_dit(checkpoint, CPU, torch.float32, weights.Float8Recipe(gemm="upcast"))
    layer = model.blocks[0].self_attn.q
    base = (layer.weight.data.clone(), layer.scale.clone())
    before = layer.stored.dequantize(torch.float32)
    g = torch.Generator().manual_seed(1)
    down, up = torch.randn(2, layer.in_features, generator=g), torch.randn(layer.out_features, 2,
                                                                           generator=g)
    path = tmp_path / "lora.safetensors"
    save_file({"blocks.0.self_attn.q.lora_down.weight": down * 0.1,
               "blocks.0.self_attn.q.lora_up.weight": up * 0.1}, str(path))
    manager = LoraManager(model)
    assert manager.apply([ResolvedLora("loras[0]", path, file_identity(path), 1.0)])
    expected = Float8Weight.quantize(before + (up * 0.1) @ (down * 0.1), rowwise=True)
    assert torch.equal(layer.weight.view(torch.uint8), expected.weight.view(torch.uint8))
    assert torch.equal(layer.scale, expected.scale)
    manager.apply([])
    assert torch.equal(layer.weight.view(torch.uint8), base[0].view(torch.uint8))
    assert torch.equal(layer.scale, base[1])


def test_t5_streamed_block_by_block_encodes_as_resident_t5(tiny_pipeline, checkpoint):
    resident = load_pipeline(checkpoint, CPU, ModelSettings())
    streamed = load_pipeline(checkpoint, CPU, ModelSettings())
    stream_t5(streamed.text_encoder.model, CPU)
    prompt = "a person talks, slowly"
    expected = resident.text_encoder([prompt], CPU)[0]
    assert torch.equal(streamed.text_encoder([prompt], CPU)[0], expected)


def test_the_text_embeddings_are_cached_per_prompt(tiny_pipeline, monkeypatch):
    calls = []
    encoder = tiny_pipeline.text_encoder
    monkeypatch.setattr(tiny_pipeline, "text_encoder",
                        lambda texts, device: (calls.append(texts), encoder(texts, device))[1])
    tiny_pipeline._text_cache.clear()
    first = tiny_pipeline.encode_text("hello there", None)
    again = tiny_pipeline.encode_text("hello there", "")  # the default negative prompt again
    assert len(calls) == 2 and all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    tiny_pipeline.encode_text("something else", None)
    assert len(calls) == 3


def test_a_whole_job_on_fp8_weights_says_so_and_stays_near_the_bf16_one(tiny_checkpoint,
                                                                      portrait_png, tmp_path):
    import base64

    from s2v_worker.runner import Worker
    from s2v_worker.settings import Settings

    speech = speech_excerpt(tmp_path / "speech.wav", 1.0)
    settings = Settings.from_env({"WAN_S2V_CKPT_DIR": str(tiny_checkpoint),
                                  "WAN_S2V_WEIGHTS": "fp8", "WORK_DIR": str(tmp_path)})
    worker = Worker.start(settings)
    assert isinstance(worker.pipeline.denoiser.model.blocks[0].ffn[0], Float8Linear)
    job = {"id": "fp8", "input": {
        "image_base64": base64.b64encode(portrait_png.read_bytes()).decode(),
        "audio_base64": base64.b64encode(speech.read_bytes()).decode(), "resolution": "480p",
        "sample_steps": 2, "infer_frames": 16, "fps": 16, "seed": 3, "max_clips": 1}}
    result = worker.run(job)
    assert "video_base64" in result and result["weights"] == "fp8", result

    bf16 = load_tiny_pipeline(tiny_checkpoint)
    fp8 = worker.pipeline
    gen = parse_job(job).generation
    plan = plan_job(bf16, portrait_png, 1.0, gen)
    error = rel_l2(generate_video(fp8, portrait_png, speech, plan, gen, 3),
                   generate_video(bf16, portrait_png, speech, plan, gen, 3))
    assert 0 < error < 0.2, error


def test_a_denoiser_on_fp8_weights_reports_them(checkpoint):
    denoiser = Denoiser.load(checkpoint, CPU, ModelSettings(weights="fp8"))
    assert denoiser.weights == "fp8"
    assert isinstance(denoiser.model.blocks[0].self_attn.q, Float8Linear)
    assert not isinstance(denoiser.model.audio_injector.injector[0].q, Float8Linear)
    assert Denoiser.load(checkpoint, CPU, ModelSettings()).weights == "bf16"


@pytest.mark.parametrize("part", ["t5", "vae", "wav2vec2"])
def test_a_model_loaded_while_the_dit_is_built_empty_keeps_its_values(checkpoint, part):
    """load_pipeline loads T5, the VAE and wav2vec2 in threads while the DiT is built empty
    (accelerate's init_empty_weights, which patches torch.nn.Module for every thread): each waits
    for weights.MODEL_CONSTRUCTION, so none of their parameters lands on the meta device."""
    import threading

    from accelerate import init_empty_weights

    from s2v_worker.loading import load_t5, load_vae, load_warm_audio_encoder

    loaders = {
        "t5": lambda: load_t5(checkpoint, torch.device("cpu"), ModelSettings(), streamed=False).model,
        "vae": lambda: load_vae(checkpoint.vae_file, torch.device("cpu")).model,
        "wav2vec2": lambda: load_warm_audio_encoder(checkpoint.wav2vec_dir, torch.device("cpu"),
                                                    ModelSettings(), warm=False).model}
    building, loaded = threading.Event(), {}

    def build_empty():  # as weights.build_dit holds it, for longer
        with weights.MODEL_CONSTRUCTION, init_empty_weights():
            building.set()
            torch.nn.Linear(4, 4)
            threading.Event().wait(1.0)  # the other thread tries to load meanwhile

    builder = threading.Thread(target=build_empty)
    builder.start()
    building.wait()
    loader = threading.Thread(target=lambda: loaded.update(model=loaders[part]()))
    loader.start()
    builder.join()
    loader.join()
    tensors = [*loaded["model"].parameters(), *loaded["model"].buffers()]
    assert tensors and not any(t.is_meta for t in tensors)
