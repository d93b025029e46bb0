"""LoRAs on the tiny checkpoint, on the CPU: the merged model equals the same weights merged offline,
the base weights come back bit-identical, a repeated set is not merged again, bad LoRAs and bad
fields are refused with clear messages, and the worker runs them from the volume and from a URL."""
import base64
import functools
import http.server
import json
import shutil
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import speech_excerpt
from s2v_worker.checkpoint import read_checkpoint
from s2v_worker.job import JobInputError, parse_job
from s2v_worker.lora import LoraError, LoraManager, ResolvedLora, file_identity, resolve_loras
from s2v_worker.pipeline import S2VPipeline
from s2v_worker.runner import Worker
from s2v_worker.settings import Settings

LAYERS = ("blocks.0.self_attn.q", "blocks.1.ffn.0", "blocks.0.cross_attn.k")


def _linear(model, name):
    return model.get_submodule(name)


def make_lora(model, fmt: str, prefix: str = "", seed: int = 0, rank: int = 2, alpha: float = 4.0,
              layers=LAYERS):
    """A random LoRA for `layers` of `model` in one naming format; returns (tensors, deltas) where
    deltas[layer] = scale * up @ down in float32 (strength 1)."""
    gen = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    for layer in layers:
        linear = _linear(model, layer)
        down = torch.randn(rank, linear.in_features, generator=gen) * 0.1
        up = torch.randn(linear.out_features, rank, generator=gen) * 0.1
        key = prefix + layer
        if fmt == "down_up":
            tensors[f"{key}.lora_down.weight"] = down
            tensors[f"{key}.lora_up.weight"] = up
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
            scale = alpha / rank
        else:
            tensors[f"{key}.lora_A.weight"] = down
            tensors[f"{key}.lora_B.weight"] = up
            scale = 1.0
        deltas[layer] = (up @ down) * scale
    return tensors, deltas


def write_lora(path, tensors):
    save_file(tensors, str(path))
    return path


def resolved(path, strength=1.0, field="loras[0]"):
    return ResolvedLora(field, path, file_identity(path), strength)


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


def assert_base(model, base):
    state = model.state_dict()
    assert state.keys() == base.keys()
    changed = [name for name in base if not torch.equal(state[name], base[name])]
    assert not changed, f"not restored: {changed[:5]}"


@pytest.fixture
def manager(tiny_pipeline):
    """A LoraManager on the shared pipeline's DiT, restored to the base weights afterwards."""
    manager = LoraManager(tiny_pipeline.noise_model)
    yield manager
    manager.restore()


def gen_settings():
    return parse_job({"input": {"image_url": "https://x/i.png", "audio_url": "https://x/a.wav",
                                "resolution": "480p", "sample_steps": 2, "infer_frames": 16,
                                "guidance_scale": 1.0, "max_clips": 1}}).generation


@pytest.fixture(scope="module")
def speech_1s(tmp_path_factory):
    return speech_excerpt(tmp_path_factory.mktemp("audio") / "speech_1s.wav", 1.0, "-c:a", "pcm_f32le")


def merged_offline(checkpoint, out_dir, deltas, strength):
    """A copy of the checkpoint whose DiT shards hold W + strength * delta, saved in float32 (no
    rounding), in the same index/shard layout."""
    shutil.copytree(checkpoint, out_dir)
    index = json.loads((out_dir / "diffusion_pytorch_model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        state = {k: v.float() for k, v in load_file(str(out_dir / shard)).items()}
        for layer, delta in deltas.items():
            if f"{layer}.weight" in state:
                state[f"{layer}.weight"] = state[f"{layer}.weight"] + delta * strength
        save_file(state, str(out_dir / shard), metadata={"format": "pt"})
    return out_dir


# --- (a) equivalence with an offline merge -------------------------------------------------------

def test_merged_lora_equals_offline_merge(tiny_pipeline, tiny_checkpoint, manager, tmp_path,
                                          portrait_png, speech_1s):
    strength = 0.75
    tensors, deltas = make_lora(tiny_pipeline.noise_model, "down_up", "diffusion_model.")
    lora = resolved(write_lora(tmp_path / "lora.safetensors", tensors), strength)
    offline = S2VPipeline.load(read_checkpoint(merged_offline(
        tiny_checkpoint, tmp_path / "merged", deltas, strength)), torch.device("cpu"))

    gen = gen_settings()
    plan = tiny_pipeline.plan(portrait_png, 1.0, gen)
    assert manager.apply([lora])
    for layer in LAYERS:  # the merged weights are the offline ones
        assert torch.equal(_linear(tiny_pipeline.noise_model, layer).weight,
                           _linear(offline.noise_model, layer).weight)
    ours = tiny_pipeline.generate(portrait_png, speech_1s, plan, gen, seed=3).video
    theirs = offline.generate(portrait_png, speech_1s, plan, gen, seed=3).video
    assert torch.allclose(ours, theirs, atol=1e-5)


# --- (b) unmerge, (c) no re-merge ----------------------------------------------------------------

def test_unmerge_restores_bit_identical_base_weights(tiny_pipeline, manager, tmp_path):
    model = tiny_pipeline.noise_model
    base = snapshot(model)
    first = resolved(write_lora(tmp_path / "a.safetensors", make_lora(model, "down_up")[0]), 1.5)
    second = resolved(write_lora(tmp_path / "b.safetensors",
                                 make_lora(model, "a_b", "diffusion_model.", seed=1)[0]), -2.0)
    manager.apply([first])
    assert not torch.equal(model.blocks[0].self_attn.q.weight, base["blocks.0.self_attn.q.weight"])
    manager.apply([])
    assert_base(model, base)
    manager.apply([second])
    manager.apply([first, second])  # a change of set starts from the base again
    manager.apply([])
    assert_base(model, base)


def test_same_set_is_not_merged_again(tiny_pipeline, manager, tmp_path):
    model = tiny_pipeline.noise_model
    lora = resolved(write_lora(tmp_path / "a.safetensors", make_lora(model, "a_b")[0]), 0.5)
    assert manager.apply([lora]) and manager.merges == 1
    version = model.blocks[0].self_attn.q.weight._version
    assert not manager.apply([resolved(lora.path, 0.5)])
    assert manager.merges == 1 and model.blocks[0].self_attn.q.weight._version == version
    assert manager.apply([resolved(lora.path, 0.25)])  # another strength is another set
    assert manager.merges == 2


def test_two_loras_on_one_layer_add_up(tiny_pipeline, manager, tmp_path):
    model = tiny_pipeline.noise_model
    base = model.blocks[0].self_attn.q.weight.detach().clone()
    a_tensors, a = make_lora(model, "down_up", seed=4)
    b_tensors, b = make_lora(model, "a_b", seed=5)
    manager.apply([resolved(write_lora(tmp_path / "a.safetensors", a_tensors), 1.0),
                   resolved(write_lora(tmp_path / "b.safetensors", b_tensors), 2.0, "loras[1]")])
    expected = base + a["blocks.0.self_attn.q"] + 2.0 * b["blocks.0.self_attn.q"]
    assert torch.allclose(model.blocks[0].self_attn.q.weight, expected, atol=1e-6)


# --- (d) errors ----------------------------------------------------------------------------------

def test_a_lora_that_does_not_fit_is_refused_and_changes_nothing(tiny_pipeline, manager, tmp_path):
    model = tiny_pipeline.noise_model
    base = snapshot(model)
    good = resolved(write_lora(tmp_path / "good.safetensors", make_lora(model, "a_b")[0]))
    manager.apply([good])
    merged = snapshot(model)
    q = model.blocks[0].self_attn.q
    cases = {
        "no_layer.safetensors": ({"blocks.99.self_attn.q.lora_A.weight": torch.zeros(2, q.in_features),
                                  "blocks.99.self_attn.q.lora_B.weight": torch.zeros(q.out_features, 2)},
                                 "does not fit this model: it has no layer 'blocks.99.self_attn.q'"),
        "shape.safetensors": ({"blocks.0.self_attn.q.lora_A.weight": torch.zeros(2, q.in_features + 1),
                               "blocks.0.self_attn.q.lora_B.weight": torch.zeros(q.out_features, 2)},
                              "does not fit this model: layer 'blocks.0.self_attn.q' is"),
        "not_linear.safetensors": ({"blocks.0.lora_A.weight": torch.zeros(2, 2),
                                    "blocks.0.lora_B.weight": torch.zeros(2, 2)},
                                   "is not a Linear layer"),
        "half.safetensors": ({"blocks.0.self_attn.q.lora_A.weight": torch.zeros(2, q.in_features)},
                             "lacks its up matrix"),
        "odd_key.safetensors": ({"something.else": torch.zeros(1)}, "unrecognised key"),
    }
    for name, (tensors, message) in cases.items():
        bad = resolved(write_lora(tmp_path / name, tensors), field="loras[1]")
        with pytest.raises(LoraError, match=r"^'loras\[1\]' .*" + message.replace("(", r"\(")
                           .replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
            manager.apply([good, bad])
        assert_base(model, merged)  # the merged set is untouched
    (tmp_path / "text.safetensors").write_text("not a safetensors file")
    with pytest.raises(LoraError, match=r"'loras\[0\]' is not a readable safetensors file"):
        manager.apply([resolved(tmp_path / "text.safetensors")])
    manager.apply([])
    assert_base(model, base)


def job_input(**fields):
    return {"input": {"image_url": "https://x/i.png", "audio_url": "https://x/a.wav", **fields}}


@pytest.mark.parametrize("loras,message", [
    ([{"path": "../x.safetensors"}], r"'loras\[0\]\.path' must be relative to the network volume"),
    ([{"path": "a/../../x.safetensors"}], r"'loras\[0\]\.path' must be relative"),
    ([{"path": "/etc/x.safetensors"}], r"'loras\[0\]\.path' must be relative"),
    ([{"path": "x.bin"}], r"'loras\[0\]\.path' must name a \.safetensors file"),
    ([{"path": "a.safetensors"}] * 5, r"'loras' may hold at most 4"),
    ([{"path": "a.safetensors", "strength": 4.5}], r"'loras\[0\]\.strength' must be at least -4"),
    ([{"path": "a.safetensors", "strength": "1"}], r"'loras\[0\]\.strength' must be a number"),
    ([{"path": "a.safetensors"}, {"path": "a.safetensors", "url": "https://x/a"}],
     r"'loras\[1\]' needs exactly one of 'url' and 'path'"),
    ([{}], r"'loras\[0\]' needs exactly one"),
    ([{"path": "a.safetensors", "scale": 1}], r"'loras\[0\]' has unknown fields: 'scale'"),
    ([{"url": "ftp://x/a.safetensors"}], r"'loras\[0\]\.url' must be an http or https URL"),
    ({"path": "a.safetensors"}, r"'loras' must be a list"),
    (["a.safetensors"], r"'loras\[0\]' must be an object"),
])
def test_bad_lora_fields_are_refused(loras, message):
    with pytest.raises(JobInputError, match=message):
        parse_job(job_input(loras=loras))


def test_good_lora_fields_parse():
    request = parse_job(job_input(loras=[{"path": "loras/a.safetensors"},
                                         {"url": "https://x/b.safetensors", "strength": -0.5}]))
    assert [(l.field, l.path, l.url, l.strength) for l in request.loras] == [
        ("loras[0]", "loras/a.safetensors", None, 1.0),
        ("loras[1]", None, "https://x/b.safetensors", -0.5)]
    assert parse_job(job_input()).loras == ()


def test_volume_paths_must_stay_inside_the_volume(tmp_path):
    volume, outside = tmp_path / "volume", tmp_path / "outside.safetensors"
    volume.mkdir()
    save_file({"x": torch.zeros(1)}, str(outside))
    (volume / "link.safetensors").symlink_to(outside)
    settings = Settings.from_env({}).replace(network_volume_dir=str(volume))
    for path, message in (("link.safetensors", "leads outside the network volume"),
                          ("missing.safetensors", "is not a file on the network volume")):
        request = parse_job(job_input(loras=[{"path": path}]))
        with pytest.raises(LoraError, match=r"'loras\[0\]\.path' " + message):
            resolve_loras(request.loras, settings)
    request = parse_job(job_input(loras=[{"path": "a.safetensors"}]))
    with pytest.raises(LoraError, match="none is mounted"):
        resolve_loras(request.loras, settings.replace(network_volume_dir=str(tmp_path / "no")))


# --- (e) through the worker ----------------------------------------------------------------------

@pytest.fixture
def lora_server(tmp_path):
    """A loopback HTTP server for tmp_path/served; yields its base URL."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_worker_merges_job_loras_and_restores_for_the_next_job(tiny_pipeline, tmp_path,
                                                              portrait_png, speech_1s, lora_server,
                                                              monkeypatch):
    served, base_url = lora_server
    forgotten = []  # fast mode's FP8 copies must be dropped whenever the weights may have changed
    forget = tiny_pipeline.dit.forget_float8
    monkeypatch.setattr(tiny_pipeline.dit, "forget_float8", lambda: (forgotten.append(1), forget()))
    model = tiny_pipeline.noise_model
    base = snapshot(model)
    volume = tmp_path / "volume"
    (volume / "loras").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    write_lora(volume / "loras" / "distill.safetensors", make_lora(model, "down_up", "diffusion_model.")[0])
    write_lora(served / "style.safetensors", make_lora(model, "a_b", seed=9)[0])
    settings = Settings.from_env({}).replace(
        network_volume_dir=str(volume), work_dir=str(tmp_path / "work"),
        allowed_private_networks="127.0.0.0/8", lora_cache_dir=str(tmp_path / "cache"))
    worker = Worker(settings, tiny_pipeline)

    def job(**fields):
        return {"id": "lora", "input": {
            "image_base64": base64.b64encode(portrait_png.read_bytes()).decode(),
            "audio_base64": base64.b64encode(speech_1s.read_bytes()).decode(),
            "resolution": "480p", "sample_steps": 2, "infer_frames": 16, "fps": 16, "seed": 1,
            "guidance_scale": 1.0, "max_clips": 1, **fields}}

    try:
        loras = [{"path": "loras/distill.safetensors", "strength": 0.8},
                 {"url": f"{base_url}/style.safetensors"}]
        result = worker.run(job(loras=loras))
        assert "video_base64" in result, result
        assert [l["strength"] for l in result["settings"]["loras"]] == [0.8, 1.0]
        assert result["settings"]["loras"][0]["sha256"] == file_identity(
            volume / "loras" / "distill.safetensors")
        assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
        assert not torch.equal(model.blocks[0].self_attn.q.weight, base["blocks.0.self_attn.q.weight"])
        assert len(forgotten) == 1
        again = worker.run(job(loras=loras))  # same set: nothing merged, the copies stay
        assert "video_base64" in again and len(forgotten) == 1

        bad = worker.run(job(loras=[{"path": "loras/missing.safetensors"}]))
        assert bad == {"error": "'loras[0].path' is not a file on the network volume"}

        plain = worker.run(job())
        assert "video_base64" in plain and plain["settings"]["loras"] == []
        assert_base(model, base)
        assert len(forgotten) == 2  # the refused LoRA failed before any weight changed
    finally:
        if worker._loras is not None:
            worker._loras.restore()
    assert_base(model, base)
