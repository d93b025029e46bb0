"""Wan2.2-S2V-14B components at full size with random weights, built on the GPU in seconds.

No real weights can reach our machines, so speed and faithfulness at full size are measured with
random weights of the real shapes (wan/configs/wan_s2v_14B.py, umt5-xxl, Wan2.1 VAE, wav2vec2-large).
Used by bench/harness.py and tests/gpu/. `write_checkpoint` also writes them to disk in the exact
layout of the Hugging Face repository, for cold-start measurements through the real loaders.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Iterator

import torch

from builder import make_tiny_checkpoint as tiny  # same file layout, smaller sizes
from s2v_worker.checkpoint import (T5_CHECKPOINT, T5_TOKENIZER_DIR, VAE_CHECKPOINT, WAV2VEC_DIR,
                                   Checkpoint)
from s2v_worker.denoiser import Denoiser
from s2v_worker.official import import_official
from s2v_worker.pipeline import S2VPipeline
from s2v_worker.vae import VideoVAE

_official = import_official()
OFFICIAL_CONFIG = _official.config

ROOT = Path(__file__).resolve().parent.parent

CFG = OFFICIAL_CONFIG.transformer
DIT_CONFIG = {**tiny.DIT_CONFIG, "audio_dim": CFG.audio_dim,
              "audio_inject_layers": list(CFG.audio_inject_layers), "dim": CFG.dim,
              "ffn_dim": CFG.ffn_dim, "num_heads": CFG.num_heads, "num_layers": CFG.num_layers}
T5_CONFIG = dict(vocab=256384, dim=4096, dim_attn=4096, dim_ffn=10240, num_heads=64, num_layers=24,
                 num_buckets=32, shared_pos=False, dropout=0.1)  # wan.modules.t5.umt5_xxl
VAE_CONFIG = {**tiny.VAE_ARCH, "dim": 96}  # wan.modules.vae2_1._video_vae
WAV2VEC_CONFIG = {**tiny.WAV2VEC_CONFIG, "hidden_size": 1024, "num_attention_heads": 16,
                  "intermediate_size": 4096, "conv_dim": (512,) * 7, "num_conv_pos_embeddings": 128,
                  "num_conv_pos_embedding_groups": 16}  # wav2vec2-large-xlsr-53
STD = tiny.WEIGHT_STD

# 16:9 image sizes the official sizing gives at each resolution (448x832: 32,760 tokens per forward).
SIZES_16X9 = {"480p": (448, 832), "720p": (640, 1088)}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random, in place, on its own device: norm scales ~1, the rest ~0 (std 0.02).
    The official zero_init leaves layers at exactly 0, which would hide wiring mistakes."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            values = torch.randn(param.shape, generator=generator, device=param.device,
                                 dtype=torch.float32) * STD
            if tiny._is_norm_scale(module, name):
                values += 1.0
            param.copy_(values)
    audio_mix = getattr(getattr(model, "casual_audio_encoder", None), "weights", None)
    if audio_mix is not None:  # divided by the sum of their SiLU: keep them positive, as upstream
        audio_mix.copy_(0.01 + torch.rand(audio_mix.shape, generator=generator,
                                          device=audio_mix.device) * STD)
    return model


def build_dit(device: torch.device, num_layers: int | None = None, seed: int = 0) -> torch.nn.Module:
    config = dict(DIT_CONFIG)
    if num_layers is not None:
        config["num_layers"] = num_layers
        config["audio_inject_layers"] = [i for i in config["audio_inject_layers"] if i < num_layers]
    with torch.device(device), default_dtype(torch.bfloat16):
        model = _official.model_s2v.WanModel_S2V(**config)
    return randomize_(model.eval().requires_grad_(False), seed)


def bench_rank_main(spec, conn) -> None:
    """Entry of a benchmark's other ranks (s2v_worker.ranks): the worker's rank, whose DiT is
    build_dit()'s random full-size weights (same seed, so the same weights as rank 0's) instead of
    a checkpoint read from disk."""
    from s2v_worker import weights
    from s2v_worker.ranks import rank_main

    weights.load_dit = lambda checkpoint, device, dtype: build_dit(device)
    rank_main(spec, conn)


def build_t5(device: torch.device, seed: int = 1) -> torch.nn.Module:
    with torch.device(device), default_dtype(torch.bfloat16):
        model = _official.t5.T5Encoder(**T5_CONFIG)
    return randomize_(model.eval().requires_grad_(False), seed)


def build_vae_state(device: torch.device, seed: int = 2) -> dict[str, torch.Tensor]:
    with torch.device(device):
        model = _official.vae.WanVAE_(**VAE_CONFIG)
    return {k: v.cpu() for k, v in randomize_(model, seed).state_dict().items()}


def build_wav2vec2(seed: int = 3):
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    config = Wav2Vec2Config(vocab_size=len(tiny.WAV2VEC_VOCAB), **WAV2VEC_CONFIG)
    return randomize_(Wav2Vec2ForCTC(config).eval(), seed), config


def write_small_files(folder: Path) -> None:
    """Tokenizer and audio-processor files: the tiny checkpoint's, which have the real formats."""
    tiny.write_tokenizer(folder / T5_TOKENIZER_DIR)
    tiny.write_wav2vec2(folder / WAV2VEC_DIR, seed=0)  # its weights are replaced by the caller


def build_pipeline(device: torch.device, workdir: Path, attention: str = "auto",
                   compile_dit: bool = True) -> S2VPipeline:
    """The worker's pipeline around full-size random components, without touching the disk for
    the big ones (the VAE goes through a file: the official class only loads from one)."""
    workdir.mkdir(parents=True, exist_ok=True)
    write_small_files(workdir)
    timings = {}
    start = time.perf_counter()
    text_encoder = _official.t5.T5EncoderModel.__new__(_official.t5.T5EncoderModel)
    text_encoder.__dict__.update(
        text_len=OFFICIAL_CONFIG.text_len, dtype=OFFICIAL_CONFIG.t5_dtype, device=device,
        checkpoint_path=None, tokenizer_path=str(workdir / T5_TOKENIZER_DIR), model=build_t5(device),
        tokenizer=_official.t5.HuggingfaceTokenizer(name=str(workdir / T5_TOKENIZER_DIR),
                                                    seq_len=OFFICIAL_CONFIG.text_len,
                                                    clean="whitespace"))
    torch.save(build_vae_state(device), workdir / VAE_CHECKPOINT)
    vae = VideoVAE(vae_pth=str(workdir / VAE_CHECKPOINT), device=device)
    audio_encoder = _official.audio_encoder.AudioEncoder(model_id=str(workdir / WAV2VEC_DIR))
    audio_encoder.model = build_wav2vec2()[0]  # on the CPU, as upstream (the worker's: see below)
    denoiser = build_denoiser(device, attention, compile_dit)
    timings["build_s"] = time.perf_counter() - start
    pipeline = S2VPipeline(Checkpoint(path=workdir), device, text_encoder=text_encoder, vae=vae,
                           audio_encoder=audio_encoder, denoiser=denoiser)
    pipeline.build_timings = timings
    return pipeline


def build_denoiser(device: torch.device, attention: str = "auto", compile_dit: bool = True,
                   num_layers: int | None = None) -> Denoiser:
    """The worker's Denoiser around build_dit()'s random full-size DiT, with the attention kernels
    a worker would install (WAN_S2V_ATTENTION=`attention`)."""
    from s2v_worker.denoiser import install_attentions
    from s2v_worker.settings import Attention

    install_attentions(Attention(attention), device)
    return Denoiser(build_dit(device, num_layers), device, compile=compile_dit)


def official_view(pipeline: S2VPipeline):
    """The official `wan.WanS2V` over the same components (shared weights), built without its
    __init__ (which would load a checkpoint), with every attribute its generate() reads."""
    official = _official.speech2video.WanS2V.__new__(_official.speech2video.WanS2V)
    vae = _official.vae.Wan2_1_VAE.__new__(_official.vae.Wan2_1_VAE)
    vae.__dict__.update(pipeline.vae.__dict__)  # the official class itself, same model and scale
    official.__dict__.update(
        device=pipeline.device, config=OFFICIAL_CONFIG, rank=0, t5_cpu=False, init_on_cpu=False,
        num_train_timesteps=OFFICIAL_CONFIG.num_train_timesteps,
        param_dtype=OFFICIAL_CONFIG.param_dtype, text_encoder=pipeline.text_encoder, vae=vae,
        noise_model=pipeline.denoiser.model, audio_encoder=pipeline.audio_encoder, sp_size=1,
        sample_neg_prompt=OFFICIAL_CONFIG.sample_neg_prompt,
        motion_frames=OFFICIAL_CONFIG.transformer.motion_frames,
        drop_first_motion=OFFICIAL_CONFIG.drop_first_motion, fps=OFFICIAL_CONFIG.sample_fps,
        audio_sample_m=0)
    return official


def dit_inputs(height: int, width: int, device: torch.device, seed: int = 0) -> dict:
    """One clip's DiT inputs at a resolution, as WanS2V.generate builds them (80 frames per clip,
    73 motion frames = 19 motion latents, 512-token text padded inside the model)."""
    lat_h, lat_w = height // 8, width // 8
    g = torch.Generator(device=device).manual_seed(seed)
    return dict(
        x=[torch.randn(16, 20, lat_h, lat_w, device=device, dtype=torch.bfloat16, generator=g)],
        t=torch.tensor([900.0], device=device),
        context=[torch.randn(120, 4096, device=device, dtype=torch.bfloat16, generator=g)],
        seq_len=20 * lat_h * lat_w // 4,
        ref_latents=torch.randn(1, 16, 1, lat_h, lat_w, device=device, generator=g),
        motion_latents=torch.randn(1, 16, 19, lat_h, lat_w, device=device, generator=g),
        cond_states=torch.zeros(1, 16, 20, lat_h, lat_w, device=device, dtype=torch.bfloat16),
        audio_input=torch.randn(1, 25, 1024, 80, device=device, dtype=torch.bfloat16, generator=g),
        motion_frames=[73, 19], drop_motion_frames=False)


# The Wan DiT's own layers, which a Wan distill LoRA changes; the S2V-only ones (audio, pose, frame
# packing) are not in such a LoRA.
WAN_CORE_LAYERS = ("blocks.", "text_embedding.", "time_embedding.", "time_projection.", "head.",
                   "patch_embedding.")


@torch.no_grad()
def lightx2v_lora(model: torch.nn.Module, rank: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random LoRA for `model`'s Wan layers in the layout of LightX2V's Wan distill LoRAs (their
    extractor, tools/extract/lora_extractor.py, and the key lists of their published files):
    `diffusion_model.X.lora_down.weight` [rank, in], `.lora_up.weight` [out, rank] and `.alpha`
    (= rank, scale 1) for every Linear but the small head projection; `X.diff` for the other
    weights (norms, head.head, the patch embedding's Conv3d), `X.diff_b` for every bias and
    `X.diff_m` for each block's and the head's modulation. bf16 on the CPU, ready for save_file;
    drawn on the model's device. The values are small: the merged model stays near the base."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, std):
        return (torch.randn(shape, generator=generator, device=device) * std).to(torch.bfloat16).cpu()

    state = {}
    for name, param in model.named_parameters():
        if not name.startswith(WAN_CORE_LAYERS):
            continue
        layer, _, kind = name.rpartition(".")
        key = f"diffusion_model.{layer}"
        module = model.get_submodule(layer)
        if kind == "modulation":
            state[f"{key}.diff_m"] = randn(*param.shape, std=1e-4)
        elif kind == "bias":
            state[f"{key}.diff_b"] = randn(*param.shape, std=1e-4)
        elif isinstance(module, torch.nn.Linear) and layer != "head.head":
            state[f"{key}.lora_down.weight"] = randn(rank, module.in_features,
                                                     std=module.in_features ** -0.5)
            state[f"{key}.lora_up.weight"] = randn(module.out_features, rank, std=1e-3)
            state[f"{key}.alpha"] = torch.tensor(float(rank), dtype=torch.bfloat16)
        else:
            state[f"{key}.diff"] = randn(*param.shape, std=1e-4)
    return state


def write_checkpoint(folder: Path, device: torch.device) -> dict[str, float]:
    """The full-size random checkpoint in the real repository's layout (about 44 GB)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    sizes = {}
    write_small_files(folder)
    model, config = build_wav2vec2()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / WAV2VEC_DIR / "model.safetensors"), metadata={"format": "pt"})
    config.to_json_file(str(folder / WAV2VEC_DIR / "config.json"))
    torch.save(build_vae_state(device), folder / VAE_CHECKPOINT)

    t5 = build_t5(device)
    torch.save({k: v.cpu() for k, v in t5.state_dict().items()}, folder / T5_CHECKPOINT)
    del t5

    dit = build_dit(device)
    dit_config = json.loads(dit.to_json_string())
    state = {k: v.cpu().contiguous() for k, v in dit.state_dict().items()}
    del dit
    torch.cuda.empty_cache()
    tiny.write_dit(folder, dit_config, state)
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(0o644)
            sizes[str(path.relative_to(folder))] = path.stat().st_size / 2**30
    return sizes


def convert_to_comfy_fp8(official: Path, out: Path) -> dict[str, float]:
    """The full-size checkpoint in `official` rewritten as ComfyUI's fp8_scaled set in `out`
    (builder/make_tiny_comfy.py's converters: the DiT's and T5's Linear weights in FP8 with
    per-tensor scales, the VAE in bf16, wav2vec2 in fp16). Each official file is deleted once it
    is read, so that the disk holds one checkpoint at a time (the GPU machine's 64 GB holds the
    official 43 GB or the FP8 23 GB, not both). GiB of each file written."""
    import shutil

    from safetensors.torch import save_file

    from builder import make_tiny_comfy as comfy_files
    from s2v_worker.checkpoint import dit_files

    names = comfy_files.file_names("fp8_scaled", "comfy")
    converters = {
        "vae": (lambda: comfy_files.convert_vae(official, "fp8_scaled"), [official / VAE_CHECKPOINT]),
        "wav2vec2": (lambda: comfy_files.convert_wav2vec2(official, "fp8_scaled", "comfy"),
                     [official / WAV2VEC_DIR]),
        "t5": (lambda: comfy_files.convert_t5(official, "fp8_scaled"), [official / T5_CHECKPOINT]),
        "dit": (lambda: comfy_files.convert_dit(official, "fp8_scaled", "comfy"),
                dit_files(official)),
    }
    sizes = {}
    for role, (convert, sources) in converters.items():
        state = convert()
        for source in sources:  # read: its space is needed for the FP8 file
            shutil.rmtree(source) if source.is_dir() else source.unlink()
        path = out / names[role]
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        del state
        sizes[names[role]] = path.stat().st_size / 2**30
    return sizes
