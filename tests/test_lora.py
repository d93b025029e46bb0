"""LoRAs on the tiny checkpoint, on the CPU: every key layout merges to the weights an offline merge
gives, the base weights come back bit-identical, a repeated set is not merged again, keys for
layers this model lacks are skipped and reported, bad LoRAs and bad fields are refused with clear
messages, the URL cache keeps only files that load, and the worker runs LoRAs from the volume and
from a URL."""
import base64
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import generate_video, load_tiny_pipeline, plan_job, speech_excerpt
from s2v_worker.job import JobInputError, parse_job
from s2v_worker.lora import LoraError, ResolvedLora, file_identity, parse_lora, resolve_loras
from s2v_worker.lora_merge import LoraManager
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


# name -> (key prefix, down suffix, up suffix, kohya spelling, alpha or None)
LAYOUTS = {
    "diffusion_model. lora_down/lora_up + alpha": ("diffusion_model.", ".lora_down.weight",
                                                   ".lora_up.weight", False, 8.0),
    "model.diffusion_model. lora_A/lora_B": ("model.diffusion_model.", ".lora_A.weight",
                                             ".lora_B.weight", False, None),
    "model. PEFT lora_A/lora_B.default + alpha": ("model.", ".lora_A.default.weight",
                                                  ".lora_B.default.weight", False, 2.0),
    "transformer. lora_A/lora_B without .weight": ("transformer.", ".lora_A", ".lora_B", False, None),
    "bare _lora.down/_lora.up": ("", "_lora.down.weight", "_lora.up.weight", False, None),
    "bare lora.down/lora.up + alpha": ("", ".lora.down.weight", ".lora.up.weight", False, 1.0),
    "bare lora_linear_layer.down/up": ("", ".lora_linear_layer.down.weight",
                                       ".lora_linear_layer.up.weight", False, None),
    "kohya lora_unet_ + alpha": ("lora_unet_", ".lora_down.weight", ".lora_up.weight", True, 4.0),
    "kohya lora_unet__": ("lora_unet__", ".lora_down.weight", ".lora_up.weight", True, None),
}
# Linear layers (one with underscores in its own name), and the patch embedding, a Conv3d.
LOW_RANK_LAYERS = ("blocks.0.self_attn.q", "blocks.1.ffn.0", "blocks.0.cross_attn.k",
                   "audio_injector.injector.0.q", "patch_embedding")
# (layer, suffix, tensor): a norm's weight, a bias, a block's and the head's modulation.
FULL_DELTAS = (("blocks.0.norm3", ".diff", "weight"), ("blocks.0.self_attn.q", ".diff_b", "bias"),
               ("blocks.1", ".diff_m", "modulation"), ("head", ".diff_m", "modulation"))


def make_layout_lora(model, layout: str, seed: int = 0, rank: int = 3):
    """A random LoRA in one of LAYOUTS for LOW_RANK_LAYERS and FULL_DELTAS of `model`; returns
    (tensors, expected) where expected[param] is the float32 change at strength 1, computed here
    independently of lora.py. Kohya files give the convolution conv-shaped factors (LoCon),
    the others flat ones."""
    prefix, down_suffix, up_suffix, kohya, alpha = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(seed)

    def key(layer, suffix):
        return prefix + (layer.replace(".", "_") if kohya else layer) + suffix

    tensors, expected = {}, {}
    for layer in LOW_RANK_LAYERS:
        weight = model.get_submodule(layer).weight
        out_dim, kernel = weight.shape[0], tuple(weight.shape[1:])
        conv_shaped = kohya and weight.dim() > 2
        down = torch.randn(rank, *kernel, generator=gen) * 0.1
        down = down if conv_shaped else down.reshape(rank, -1)
        up = torch.randn(out_dim, rank, *((1,) * (weight.dim() - 2) if conv_shaped else ()),
                         generator=gen) * 0.1
        tensors[key(layer, down_suffix)], tensors[key(layer, up_suffix)] = down, up
        if alpha is not None:
            tensors[key(layer, ".alpha")] = torch.tensor(alpha)
        scale = alpha / rank if alpha is not None else 1.0
        expected[f"{layer}.weight"] = (up.reshape(out_dim, rank) @ down.reshape(rank, -1)
                                       ).reshape(weight.shape) * scale
    for layer, suffix, name in FULL_DELTAS:
        diff = torch.randn(getattr(model.get_submodule(layer), name).shape, generator=gen) * 0.1
        tensors[key(layer, suffix)] = diff
        expected[f"{layer}.{name}"] = diff
    return tensors, expected


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
    manager = LoraManager(tiny_pipeline.denoiser.model)
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
    """A copy of the checkpoint whose DiT shards hold W + strength * delta for each tensor named in
    `deltas`, saved in float32 (no rounding), in the same index/shard layout."""
    shutil.copytree(checkpoint, out_dir)
    index = json.loads((out_dir / "diffusion_pytorch_model.safetensors.index.json").read_text())
    changed = set()
    for shard in sorted(set(index["weight_map"].values())):
        state = {k: v.float() for k, v in load_file(str(out_dir / shard)).items()}
        for param, delta in deltas.items():
            if param in state:
                state[param] = state[param] + delta * strength
                changed.add(param)
        save_file(state, str(out_dir / shard), metadata={"format": "pt"})
    assert changed == set(deltas), "a delta names no tensor of the checkpoint"
    return out_dir


# --- (a) equivalence with an offline merge -------------------------------------------------------

def test_merged_lora_equals_offline_merge(tiny_pipeline, tiny_checkpoint, manager, tmp_path,
                                          portrait_png, speech_1s):
    """Low rank on Linears and on the Conv3d patch embedding, a norm's .diff, a bias's .diff_b and
    the modulations' .diff_m: the same weights, and the same video, as the checkpoint merged
    offline."""
    strength = 0.75
    tensors, deltas = make_layout_lora(tiny_pipeline.denoiser.model,
                                       "diffusion_model. lora_down/lora_up + alpha")
    lora = resolved(write_lora(tmp_path / "lora.safetensors", tensors), strength)
    offline = load_tiny_pipeline(merged_offline(tiny_checkpoint, tmp_path / "merged", deltas,
                                                strength))

    gen = gen_settings()
    plan = plan_job(tiny_pipeline, portrait_png, 1.0, gen)
    assert manager.apply([lora])
    for param in deltas:  # the merged weights are the offline ones
        assert torch.equal(tiny_pipeline.denoiser.model.get_parameter(param),
                           offline.denoiser.model.get_parameter(param)), param
    ours = generate_video(tiny_pipeline, portrait_png, speech_1s, plan, gen, 3)
    theirs = generate_video(offline, portrait_png, speech_1s, plan, gen, 3)
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_merges_as_computed_offline_and_restores_exactly(tiny_pipeline, manager,
                                                                      tmp_path, layout):
    model = tiny_pipeline.denoiser.model
    base = snapshot(model)
    strength = -1.25
    tensors, deltas = make_layout_lora(model, layout, seed=7)
    assert manager.apply([resolved(write_lora(tmp_path / "lora.safetensors", tensors), strength)])
    assert manager.warnings == ()
    state = model.state_dict()
    for name, value in base.items():
        expected = value + deltas[name] * strength if name in deltas else value
        assert torch.equal(state[name], expected), name
    manager.apply([])
    assert_base(model, base)


def test_a_kohya_name_that_two_layers_share_is_refused(tmp_path):
    model = torch.nn.Module()
    model.a = torch.nn.Module()
    model.a.b_c = torch.nn.Linear(4, 4)
    model.a_b = torch.nn.Module()
    model.a_b.c = torch.nn.Linear(4, 4)

    def lora(name):
        return resolved(write_lora(tmp_path / f"{name}.safetensors", {
            f"{name}.lora_down.weight": torch.ones(1, 4), f"{name}.lora_up.weight": torch.ones(4, 1)}))

    with pytest.raises(LoraError, match=r"^'loras\[0\]' does not fit this model: the kohya name "
                                        r"'a_b_c' could mean any of 'a\.b_c', 'a_b\.c'$"):
        parse_lora(lora("lora_unet_a_b_c"), model)
    assert [d.param for d in parse_lora(lora("a.b_c"), model).deltas] == ["a.b_c.weight"]


# --- (b) unmerge, (c) no re-merge ----------------------------------------------------------------

def test_unmerge_restores_bit_identical_base_weights(tiny_pipeline, manager, tmp_path):
    model = tiny_pipeline.denoiser.model
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
    model = tiny_pipeline.denoiser.model
    lora = resolved(write_lora(tmp_path / "a.safetensors", make_lora(model, "a_b")[0]), 0.5)
    assert manager.apply([lora]) and manager.merges == 1
    version = model.blocks[0].self_attn.q.weight._version
    assert not manager.apply([resolved(lora.path, 0.5)])
    assert manager.merges == 1 and model.blocks[0].self_attn.q.weight._version == version
    assert manager.apply([resolved(lora.path, 0.25)])  # another strength is another set
    assert manager.merges == 2


def test_two_loras_on_one_layer_add_up(tiny_pipeline, manager, tmp_path):
    model = tiny_pipeline.denoiser.model
    base = model.blocks[0].self_attn.q.weight.detach().clone()
    a_tensors, a = make_lora(model, "down_up", seed=4)
    b_tensors, b = make_lora(model, "a_b", seed=5)
    manager.apply([resolved(write_lora(tmp_path / "a.safetensors", a_tensors), 1.0),
                   resolved(write_lora(tmp_path / "b.safetensors", b_tensors), 2.0, "loras[1]")])
    expected = base + a["blocks.0.self_attn.q"] + 2.0 * b["blocks.0.self_attn.q"]
    assert torch.allclose(model.blocks[0].self_attn.q.weight, expected, atol=1e-6)


# --- (d) skipped keys, errors --------------------------------------------------------------------

def i2v_branch(model):
    """What an I2V LoRA adds for its image branch, which S2V does not have (11 keys), plus a
    .diff for a norm that has no weight in this model."""
    width = model.blocks[0].cross_attn.k.in_features
    tensors = {}
    for layer in ("blocks.0.cross_attn.k_img", "blocks.0.cross_attn.v_img", "img_emb.proj.1"):
        tensors[f"diffusion_model.{layer}.lora_down.weight"] = torch.randn(2, width)
        tensors[f"diffusion_model.{layer}.lora_up.weight"] = torch.randn(width, 2)
        tensors[f"diffusion_model.{layer}.diff_b"] = torch.randn(width)
    tensors["diffusion_model.blocks.0.cross_attn.norm_k_img.diff"] = torch.randn(width)
    tensors["diffusion_model.blocks.0.norm1.diff"] = torch.randn(width)
    return tensors


I2V_WARNING = ("loras[0]: skipped 11 key(s) for layers this model does not have "
               "('blocks.0.cross_attn.k_img', 'blocks.0.cross_attn.norm_k_img', "
               "'blocks.0.cross_attn.v_img', ...)")


def test_keys_for_layers_the_model_lacks_are_skipped_and_reported(tiny_pipeline, manager, tmp_path):
    model = tiny_pipeline.denoiser.model
    base = snapshot(model)
    tensors, deltas = make_lora(model, "down_up", "diffusion_model.")
    lora = resolved(write_lora(tmp_path / "i2v.safetensors", {**tensors, **i2v_branch(model)}))
    parsed = parse_lora(lora, model)
    assert parsed.skipped_layers == ("blocks.0.cross_attn.k_img", "blocks.0.cross_attn.norm_k_img",
                                     "blocks.0.cross_attn.v_img", "img_emb.proj.1",
                                     "blocks.0.norm1.weight")
    assert manager.apply([lora]) and manager.warnings == (I2V_WARNING,)
    for layer, delta in deltas.items():  # what does apply is merged
        assert torch.equal(model.get_parameter(f"{layer}.weight"), base[f"{layer}.weight"] + delta)
    manager.apply([])
    assert manager.warnings == ()
    assert_base(model, base)
    only_i2v = resolved(write_lora(tmp_path / "only.safetensors", i2v_branch(model)))
    with pytest.raises(LoraError, match=re.escape(
            "'loras[0]' does not fit this model: none of its 11 keys is for a layer this model "
            "has (e.g. 'blocks.0.cross_attn.k_img', 'blocks.0.cross_attn.norm_k_img', "
            "'blocks.0.cross_attn.v_img')")):
        manager.apply([only_i2v])


def bad_loras(model):
    """name -> (tensors, the error's text after "'loras[1]' "), each refused before any change."""
    q = model.blocks[0].self_attn.q
    out_dim, in_dim = q.out_features, q.in_features
    key = "blocks.0.self_attn.q"

    def pair(down, up, **more):
        return {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, **more}

    nan_up = torch.randn(out_dim, 2)
    nan_up[1, 1] = float("nan")
    inf_down = torch.randn(2, in_dim)
    inf_down[0, 3] = float("inf")
    misfit = "does not fit this model: "
    return {
        "nan_up": (pair(torch.randn(2, in_dim), nan_up),
                   f"has non-finite values (NaN or infinity) in layer '{key}' (up)"),
        "inf_down": (pair(inf_down, torch.randn(out_dim, 2)),
                     f"has non-finite values (NaN or infinity) in layer '{key}' (down)"),
        "nan_alpha": (pair(torch.randn(2, in_dim), torch.randn(out_dim, 2),
                           **{f"{key}.alpha": torch.tensor(float("nan"))}),
                      f"has non-finite values (NaN or infinity) in layer '{key}' (alpha)"),
        "inf_diff": ({"blocks.0.norm3.diff": torch.full_like(model.blocks[0].norm3.weight, -float("inf"))},
                     "has non-finite values (NaN or infinity) in layer 'blocks.0.norm3' (weight delta)"),
        "nan_diff_m": ({"blocks.1.diff_m": torch.full_like(model.blocks[1].modulation, float("nan"))},
                       "has non-finite values (NaN or infinity) in layer 'blocks.1' (modulation delta)"),
        "rank_0": (pair(torch.zeros(0, in_dim), torch.zeros(out_dim, 0)), f"has rank 0 in layer '{key}'"),
        "too_large": (pair(torch.full((2, in_dim), 1e20), torch.full((out_dim, 2), 1e20)),
                      f"has values too large to merge in layer '{key}': the change could overflow "
                      "float32"),
        "shape": (pair(torch.zeros(2, in_dim + 1), torch.zeros(out_dim, 2)),
                  f"{misfit}layer '{key}' has a weight of shape ({out_dim}, {in_dim}), the LoRA "
                  f"gives up ({out_dim}, 2) and down (2, {in_dim + 1})"),
        "diff_shape": ({"blocks.1.diff_m": torch.zeros(model.blocks[1].modulation.shape[1:])},
                       f"{misfit}layer 'blocks.1' has a modulation of shape "
                       f"{tuple(model.blocks[1].modulation.shape)}, the LoRA's delta is "
                       f"{tuple(model.blocks[1].modulation.shape[1:])}"),
        "no_layer": ({"blocks.99.self_attn.q.lora_A.weight": torch.zeros(2, in_dim),
                      "blocks.99.self_attn.q.lora_B.weight": torch.zeros(out_dim, 2)},
                     f"{misfit}none of its 2 keys is for a layer this model has "
                     "(e.g. 'blocks.99.self_attn.q')"),
        "not_linear": ({"blocks.0.lora_A.weight": torch.zeros(2, 2), "blocks.0.lora_B.weight": torch.zeros(2, 2)},
                       f"{misfit}'blocks.0' is not a Linear or convolution layer"),
        "half": ({f"{key}.lora_A.weight": torch.zeros(2, in_dim)}, f"{misfit}layer '{key}' lacks its up matrix"),
        "mixed": ({**pair(torch.zeros(2, in_dim), torch.zeros(out_dim, 2)),
                   f"{key}.lora_A.weight": torch.zeros(2, in_dim), f"{key}.lora_B.weight": torch.zeros(out_dim, 2)},
                  f"{misfit}layer '{key}' mixes the layouts lora_A/lora_B and lora_down/lora_up"),
        "twice": ({f"{key}.lora_A.weight": torch.zeros(2, in_dim),
                   f"diffusion_model.{key}.lora_A.weight": torch.zeros(2, in_dim),
                   f"{key}.lora_B.weight": torch.zeros(out_dim, 2)},
                  f"{misfit}its keys '{key}.lora_A.weight' and 'diffusion_model.{key}.lora_A.weight' "
                  f"are the same tensor of layer '{key}'"),
        "alpha_alone": ({f"{key}.alpha": torch.tensor(1.0), f"{key}.diff_b": torch.zeros(out_dim)},
                        f"{misfit}layer '{key}' has an alpha but no low-rank pair"),
        "odd_key": ({"something.else": torch.zeros(1)},
                    "has a key of no LoRA layout this worker reads: 'something.else'"),
    }


def test_a_lora_that_does_not_fit_is_refused_and_changes_nothing(tiny_pipeline, manager, tmp_path):
    model = tiny_pipeline.denoiser.model
    base = snapshot(model)
    good = resolved(write_lora(tmp_path / "good.safetensors", make_lora(model, "a_b")[0]))
    manager.apply([good])
    merged = snapshot(model)
    for name, (tensors, message) in bad_loras(model).items():
        bad = resolved(write_lora(tmp_path / f"{name}.safetensors", tensors), field="loras[1]")
        with pytest.raises(LoraError, match="^" + re.escape(f"'loras[1]' {message}") + "$"):
            manager.apply([good, bad])
        assert_base(model, merged)  # the merged set is untouched
    (tmp_path / "text.safetensors").write_text("not a safetensors file")
    with pytest.raises(LoraError, match=r"'loras\[0\]' is not a readable safetensors file"):
        manager.apply([resolved(tmp_path / "text.safetensors")])
    manager.apply([])
    assert_base(model, base)


def test_a_grouped_convolution_is_refused(tmp_path):
    model = torch.nn.Module()
    model.conv = torch.nn.Conv2d(4, 4, 3, groups=2)
    lora = resolved(write_lora(tmp_path / "conv.safetensors", {
        "conv.lora_down.weight": torch.ones(1, 2, 3, 3), "conv.lora_up.weight": torch.ones(4, 1, 1, 1)}))
    with pytest.raises(LoraError, match="'conv' is a grouped convolution, which a low-rank LoRA "
                                        "cannot change"):
        parse_lora(lora, model)


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
            resolve_loras(request.loras, settings.media, settings.network, settings.folders)
    request = parse_job(job_input(loras=[{"path": "a.safetensors"}]))
    with pytest.raises(LoraError, match="none is mounted"):
        missing = settings.replace(network_volume_dir=str(tmp_path / "no"))
        resolve_loras(request.loras, missing.media, missing.network, missing.folders)


# --- (e) through the worker ----------------------------------------------------------------------

@pytest.fixture
def lora_worker(tiny_pipeline, tmp_path, file_server):
    """A worker with a network volume (tmp_path/volume, LoRAs under loras/), a LoRA cache
    (tmp_path/cache) and the loopback server allowed; its LoRA set is restored afterwards."""
    base_url, served = file_server
    volume = tmp_path / "volume"
    (volume / "loras").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    settings = Settings.from_env({}).replace(
        network_volume_dir=str(volume), work_dir=str(tmp_path / "work"),
        allowed_private_networks="127.0.0.0/8", lora_cache_dir=str(tmp_path / "cache"))
    worker = Worker(settings, tiny_pipeline)
    worker.volume, worker.served, worker.base_url = volume, served, base_url
    worker.cache = tmp_path / "cache"
    yield worker
    worker.pipeline.denoiser.loras.restore()


def lora_job(portrait_png, speech_1s, **fields):
    return {"id": "lora", "input": {
        "image_base64": base64.b64encode(portrait_png.read_bytes()).decode(),
        "audio_base64": base64.b64encode(speech_1s.read_bytes()).decode(),
        "resolution": "480p", "sample_steps": 2, "infer_frames": 16, "fps": 16, "seed": 1,
        "guidance_scale": 1.0, "max_clips": 1, **fields}}


def cache_files(worker):
    return sorted(p.name for p in worker.cache.iterdir()) if worker.cache.is_dir() else []


def test_worker_merges_job_loras_and_restores_for_the_next_job(tiny_pipeline, lora_worker,
                                                              portrait_png, speech_1s, monkeypatch):
    worker, volume = lora_worker, lora_worker.volume
    forgotten = []  # fast mode's FP8 copies must be dropped whenever the weights may have changed
    forget = tiny_pipeline.denoiser.engine.forget_float8
    monkeypatch.setattr(tiny_pipeline.denoiser.engine, "forget_float8", lambda: (forgotten.append(1), forget()))
    model = tiny_pipeline.denoiser.model
    base = snapshot(model)
    write_lora(volume / "loras" / "distill.safetensors", make_lora(model, "down_up", "diffusion_model.")[0])
    write_lora(worker.served / "style.safetensors", make_lora(model, "a_b", seed=9)[0])

    def job(**fields):
        return lora_job(portrait_png, speech_1s, **fields)

    loras = [{"path": "loras/distill.safetensors", "strength": 0.8},
             {"url": f"{worker.base_url}/style.safetensors"}]
    result = worker.run(job(loras=loras))
    assert "video_base64" in result and "warnings" not in result, result
    assert [l["strength"] for l in result["settings"]["loras"]] == [0.8, 1.0]
    assert result["settings"]["loras"][0]["sha256"] == file_identity(
        volume / "loras" / "distill.safetensors")
    assert len(cache_files(worker)) == 1
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


def test_skipped_keys_reach_the_job_result(tiny_pipeline, lora_worker, portrait_png, speech_1s,
                                           monkeypatch):
    model = tiny_pipeline.denoiser.model
    tensors = {**make_lora(model, "down_up", "diffusion_model.")[0], **i2v_branch(model)}
    write_lora(lora_worker.volume / "loras" / "i2v.safetensors", tensors)
    job = lora_job(portrait_png, speech_1s, loras=[{"path": "loras/i2v.safetensors"}])
    for _ in range(2):  # merged, then already merged: the same warning both times
        result = lora_worker.run(job)
        assert "video_base64" in result, result
        assert result["warnings"] == [I2V_WARNING]
    assert "warnings" not in lora_worker.run(lora_job(portrait_png, speech_1s))

    import s2v_worker.runner as runner  # a storage fallback's warning comes after the LoRA's

    deliver = runner.deliver_video
    monkeypatch.setattr(runner, "deliver_video", lambda *a: {
        **deliver(*a), "warnings": ["the upload failed; the video is returned inline instead"]})
    assert lora_worker.run(job)["warnings"] == [
        I2V_WARNING, "the upload failed; the video is returned inline instead"]


@pytest.mark.parametrize("name", ["nan_up", "inf_diff", "nan_alpha", "rank_0", "shape", "no_layer"])
def test_a_bad_lora_is_a_clear_client_error(tiny_pipeline, lora_worker, portrait_png, speech_1s,
                                            name):
    model = tiny_pipeline.denoiser.model
    base = snapshot(model)
    tensors, message = bad_loras(model)[name]
    write_lora(lora_worker.volume / "loras" / "bad.safetensors", tensors)
    result = lora_worker.run(lora_job(portrait_png, speech_1s,
                                      loras=[{"path": "loras/bad.safetensors"}]))
    assert result == {"error": f"'loras[0]' {message}"}  # no refresh_worker, no traceback
    assert_base(model, base)


def test_the_url_cache_keeps_only_files_that_load(tiny_pipeline, lora_worker, portrait_png,
                                                  speech_1s):
    """Whatever the URL served before, the same URL works as soon as it serves a LoRA."""
    from safetensors.torch import save

    model = tiny_pipeline.denoiser.model
    served = lora_worker.served / "lora.safetensors"
    job = lora_job(portrait_png, speech_1s, loras=[{"url": f"{lora_worker.base_url}/lora.safetensors"}])
    bad = bad_loras(model)
    not_loras = [  # (what the URL serves, the error)
        (b"<html>502 Bad Gateway</html>", "'loras[0]' is not a readable safetensors file"),
        (save({"blocks.0.self_attn.q.weight": model.blocks[0].self_attn.q.weight.detach()}),
         "'loras[0]' has a key of no LoRA layout this worker reads: 'blocks.0.self_attn.q.weight'"),
        # These read as LoRAs, so they enter the cache, and leave it when they fail to merge.
        (save(bad["nan_up"][0]), f"'loras[0]' {bad['nan_up'][1]}"),
        (save(bad["shape"][0]), f"'loras[0]' {bad['shape'][1]}"),
    ]
    # What does not read as a LoRA is refused on download, before the job's next LoRA is looked at.
    missing_second = lora_job(portrait_png, speech_1s, loras=[
        {"url": f"{lora_worker.base_url}/lora.safetensors"}, {"path": "loras/missing.safetensors"}])
    for content, error in not_loras[:2]:
        served.write_bytes(content)
        assert lora_worker.run(missing_second) == {"error": error}
        assert cache_files(lora_worker) == []
    for content, error in not_loras:
        served.write_bytes(content)
        assert lora_worker.run(job) == {"error": error}
        assert cache_files(lora_worker) == []
    write_lora(served, make_lora(model, "a_b")[0])
    result = lora_worker.run(job)
    assert "video_base64" in result, result
    assert len(cache_files(lora_worker)) == 1 and cache_files(lora_worker)[0].endswith(".safetensors")
    served.unlink()  # now served from the cache
    assert "video_base64" in lora_worker.run(job)


# --- (f) the benchmark's LoRA (bench/harness.py, section job with --job-lora-rank) --------------

@pytest.fixture(scope="module")
def harness():
    from bench import harness

    return harness


def test_the_benchmark_lora_has_lightx2v_layout_and_applies_whole(tiny_pipeline, manager, tmp_path,
                                                                 harness):
    """Written, parsed as a job, resolved and merged the worker's way on the tiny DiT: every key
    applies, every Wan-core tensor changes as the file says (read here independently), and
    nothing else."""
    model = tiny_pipeline.denoiser.model
    base = snapshot(model)
    lora_path, info = harness._write_job_lora(model, 4, tmp_path)
    state = load_file(str(tmp_path / lora_path))
    assert (info["rank"], info["keys"]) == (4, len(state))
    q = model.blocks[0].self_attn.q
    assert state["diffusion_model.blocks.0.self_attn.q.lora_down.weight"].shape == (4, q.in_features)
    assert state["diffusion_model.blocks.0.self_attn.q.lora_up.weight"].shape == (q.out_features, 4)
    assert {"diffusion_model.blocks.0.self_attn.q.alpha", "diffusion_model.blocks.0.self_attn.q.diff_b",
            "diffusion_model.blocks.0.norm3.diff", "diffusion_model.blocks.0.diff_m",
            "diffusion_model.head.head.diff", "diffusion_model.head.diff_m",
            "diffusion_model.patch_embedding.diff"} <= set(state)

    request = harness._job_request(4, 1.0, 42, lora_path)
    assert (request.generation.sample_steps, request.generation.guidance_scale) == (4, 1.0)
    settings = Settings.from_env({}).replace(network_volume_dir=str(tmp_path))
    loras = resolve_loras(request.loras, settings.media, settings.network, settings.folders)
    assert manager.apply(loras) and manager.warnings == ()

    expected = {}
    for key, value in state.items():
        name = key.removeprefix("diffusion_model.")
        if name.endswith(".lora_down.weight"):
            layer = name.removesuffix(".lora_down.weight")
            up = state[f"diffusion_model.{layer}.lora_up.weight"].float()
            scale = float(state[f"diffusion_model.{layer}.alpha"]) / value.shape[0]
            expected[f"{layer}.weight"] = (up @ value.float()) * scale
        for suffix, tensor in ((".diff_m", "modulation"), (".diff_b", "bias"), (".diff", "weight")):
            if name.endswith(suffix):
                expected[f"{name.removesuffix(suffix)}.{tensor}"] = value.float()
    core = {name for name, _ in model.named_parameters() if name.startswith(harness.fullsize.WAN_CORE_LAYERS)}
    assert set(expected) == core
    state_now = model.state_dict()
    for name, value in base.items():
        assert torch.equal(state_now[name], value + expected[name] if name in expected else value), name


def test_no_kohya_name_of_the_full_size_dit_is_ambiguous(harness):
    """Every layer of the real S2V DiT keeps a unique name with dots as underscores, so every
    kohya LoRA key maps back to one layer."""
    from s2v_worker.official import import_official

    _official = import_official()

    with torch.device("meta"):
        model = _official.model_s2v.WanModel_S2V(**harness.fullsize.DIT_CONFIG)
    names = [name for name, _ in model.named_modules() if name]
    assert len(names) > 1000 and len({n.replace(".", "_") for n in names}) == len(names)
