"""Checks that the worker's pipeline computes what the official Wan2.2 code computes, on a GPU.

Each check returns a dict of measured numbers with "passed" and its bound; tests/gpu asserts them
and bench/harness.py records them. The official side is always the official code itself: the real
`wan.WanS2V` (its __init__ and generate) for the whole job on the tiny checkpoint, and the official
modules with the official fallback attention (SDPA, what a FlashAttention-free deployment of the
official code runs) for the full-size DiT.
"""
from __future__ import annotations

from pathlib import Path

import torch

from bench import fullsize
from s2v_worker import attention
from s2v_worker.checkpoint import T5_CHECKPOINT, VAE_CHECKPOINT, read_checkpoint
from s2v_worker.denoiser import Denoiser
from s2v_worker.dit import DiTEngine
from s2v_worker.job import parse_job
from s2v_worker.loading import load_pipeline
from s2v_worker.official import import_official, install_attention, official_architecture
from s2v_worker.planning import plan_clips, video_size
from s2v_worker.sampling import ClipRequest, Role
from s2v_worker.settings import ModelSettings
from s2v_worker.weights import infer_t5_architecture, infer_vae_width, peek_state_dict

_official = import_official()
OFFICIAL_CONFIG = _official.config

WHOLE_JOB_MAX_ABS = 1e-3  # on [-1, 1] pixels
FORWARD_REL_L2 = 1e-2
THREE_STEPS_REL_L2 = 2e-2


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def official_wans2v(checkpoint_dir: Path):
    """The official class, loaded by its own __init__. It builds umt5-xxl and the 96-wide VAE by
    name; for the tiny checkpoint those builders get the checkpoint's sizes (as the worker's loader
    does), everything else is upstream's code path."""
    t5_arch = infer_t5_architecture(peek_state_dict(checkpoint_dir / T5_CHECKPOINT))
    vae_dim = infer_vae_width(peek_state_dict(checkpoint_dir / VAE_CHECKPOINT))
    with official_architecture(_official.t5, "umt5_xxl", **t5_arch), \
            official_architecture(_official.vae, "_video_vae", dim=vae_dim):
        return _official.speech2video.WanS2V(config=OFFICIAL_CONFIG, checkpoint_dir=str(checkpoint_dir),
                                             device_id=0)


def official_tiny_video(checkpoint_dir: Path, image: Path, audio_wav: Path, seed: int = 42,
                        steps: int = 4, clips: int = 2, prompt: str = "a person talks") -> torch.Tensor:
    """The official WanS2V.generate on the tiny checkpoint (CUDA)."""
    checkpoint = read_checkpoint(checkpoint_dir)
    official = official_wans2v(checkpoint_dir)
    install_attention("official-sdpa")
    video = official.generate(
        input_prompt=prompt, ref_image_path=str(image), audio_path=str(audio_wav), enable_tts=False,
        tts_prompt_audio=None, tts_prompt_text=None, tts_text=None, num_repeat=clips,
        pose_video=None, max_area=checkpoint.max_area["480p"], infer_frames=80, shift=3.0,
        sample_solver="unipc", sampling_steps=steps, guide_scale=4.5, n_prompt="", seed=seed,
        offload_model=False, init_first_frame=False)
    del official
    torch.cuda.empty_cache()
    return video.float().cpu()


def worker_tiny_video(checkpoint_dir: Path, image: Path, audio_wav: Path, seed: int = 42,
                      steps: int = 4, clips: int = 2, prompt: str = "a person talks",
                      compile_dit: bool = True, audio_encoder_on_gpu: bool = True) -> torch.Tensor:
    """The worker's pipeline on the same job (defaults: as served, compiled DiT and wav2vec2 on
    the GPU; both off: WAN_S2V_COMPILE=false WAN_S2V_AUDIO_ENCODER_DEVICE=cpu)."""
    model = ModelSettings(attention="sdpa", compile=compile_dit,
                          audio_encoder_device="gpu" if audio_encoder_on_gpu else "cpu")
    pipeline = load_pipeline(read_checkpoint(checkpoint_dir), torch.device("cuda"), model)
    settings = parse_job({"input": {"image_url": "https://x/i", "audio_url": "https://x/a",
                                    "prompt": prompt, "resolution": "480p", "sample_steps": steps,
                                    "guidance_scale": 4.5, "shift": 3.0, "max_clips": clips,
                                    "seed": seed}}).generation
    import soundfile
    seconds = soundfile.info(str(audio_wav)).duration
    from PIL import Image

    with Image.open(image) as opened:
        size = video_size(*opened.size, pipeline.checkpoint.max_area["480p"], "480p")
    plan = plan_clips(size, seconds, settings)
    frames = []
    pipeline.generate(image, audio_wav, plan, settings, seed, on_frames=frames.append)
    return torch.cat(frames, dim=1).float()


def compare_videos(got: torch.Tensor, expected: torch.Tensor) -> dict:
    shapes_match = tuple(got.shape) == tuple(expected.shape)
    diff = (got - expected).abs().max().item() if shapes_match else float("inf")
    return {"passed": shapes_match and diff <= WHOLE_JOB_MAX_ABS, "max_abs_diff": diff,
            "bound": WHOLE_JOB_MAX_ABS, "shape": list(got.shape), "official_shape": list(expected.shape)}


def tiny_whole_job(checkpoint_dir: Path, image: Path, audio_wav: Path, seed: int = 42,
                   steps: int = 4, clips: int = 2) -> dict:
    """Whole job, official WanS2V.generate vs the worker's pipeline: same inputs, seed, settings.

    The bound holds for the worker's computation itself: the pipeline with the DiT engine run
    eagerly and wav2vec2 on the CPU (the settings that make it bit-identical). As served (compiled
    DiT, wav2vec2 on the GPU) the same job moves by about 1e-2: any change of rounding, even
    wav2vec2's float32 on the GPU alone (1e-6 relative), flips bfloat16 roundings that this
    4-step, 2-clip job carries into the pixels; `served_max_abs_diff` records it, and the
    full-size checks below bound the served path."""
    expected = official_tiny_video(checkpoint_dir, image, audio_wav, seed, steps, clips)
    got = worker_tiny_video(checkpoint_dir, image, audio_wav, seed, steps, clips,
                            compile_dit=False, audio_encoder_on_gpu=False)
    served = worker_tiny_video(checkpoint_dir, image, audio_wav, seed, steps, clips)
    return {**compare_videos(got, expected), "served_max_abs_diff": compare_videos(
        served, expected)["max_abs_diff"], "clips": clips, "steps": steps, "guidance_scale": 4.5}


def _forward(dit, inputs: dict, attention: str) -> torch.Tensor:
    install_attention(attention)
    with torch.no_grad(), torch.amp.autocast("cuda", dtype=torch.bfloat16):
        return dit(**inputs)[0]


def worker_forward(engine: DiTEngine, inputs: dict) -> torch.Tensor:
    """The worker's DiT call as served: clip state prepared once, then one step, with the
    attention kernel WAN_S2V_ATTENTION=auto picks on this GPU (FlashAttention-3 on Hopper)."""
    inputs = dict(inputs)
    x, t = inputs.pop("x"), inputs.pop("t")
    install_attention("sdpa")
    attention.use_kernel(attention.choose_kernel("auto", torch.device("cuda")))
    with torch.no_grad(), torch.amp.autocast("cuda", dtype=torch.bfloat16):
        return engine.forward(x, t, engine.prepare(**inputs))[0]


def fullsize_forward(dit, resolution: str = "480p") -> dict:
    """One DiT forward at full size: official modules + official attention vs the worker's
    engine as it serves (compiled, dynamic shapes)."""
    height, width = fullsize.SIZES_16X9[resolution]
    inputs = fullsize.dit_inputs(height, width, torch.device("cuda"))
    expected = _forward(dit, inputs, "official-sdpa")
    got = worker_forward(DiTEngine(dit, compile=True), inputs)
    error = rel_l2(got, expected)
    return {"passed": error <= FORWARD_REL_L2, "rel_l2": error, "bound": FORWARD_REL_L2,
            "resolution": resolution, "size": [height, width], "kernel": attention.ATTENTION.name}


def _scheduler(steps: int, shift: float = 3.0):
    scheduler = _official.fm_solvers_unipc.FlowUniPCMultistepScheduler(
        num_train_timesteps=1000, shift=1, use_dynamic_shifting=False)
    scheduler.set_timesteps(steps, device="cuda", shift=shift)
    return scheduler


def fullsize_three_steps(dit, resolution: str = "480p", guidance: float = 4.5) -> dict:
    """The first 3 guided steps of a 30-step UniPC schedule: the official loop (as written in
    WanS2V.generate, official attention) vs the worker's sampler (ClipSampler.sample)."""
    height, width = fullsize.SIZES_16X9[resolution]
    device = torch.device("cuda")
    inputs = fullsize.dit_inputs(height, width, device)
    noise = inputs.pop("x")[0]
    inputs.pop("t")
    arg_c = dict(inputs)
    arg_null = {**inputs, "context": [torch.zeros_like(inputs["context"][0])],
                "audio_input": 0.0 * inputs["audio_input"]}

    install_attention("official-sdpa")
    scheduler = _scheduler(30)
    timesteps = scheduler.timesteps[:3]
    generator = torch.Generator(device=device).manual_seed(0)
    latents = [noise.clone()]
    with torch.amp.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
        for t in timesteps:  # WanS2V.generate's loop, line for line
            timestep = torch.stack([t]).to(device)
            cond = dit(latents[0:1], t=timestep, **arg_c)
            uncond = dit(latents[0:1], t=timestep, **arg_null)
            pred = [u + guidance * (c - u) for c, u in zip(cond, uncond)]
            latents[0] = scheduler.step(pred[0].unsqueeze(0), t, latents[0].unsqueeze(0),
                                        return_dict=False, generator=generator)[0].squeeze(0)
    expected = latents[0]

    from s2v_worker.denoiser import install_attentions

    install_attentions("auto", device)
    denoiser = Denoiser(dit, device, compile=True)
    request = ClipRequest(latents=noise.clone(),
                          generator_state=torch.Generator(device=device).manual_seed(0).get_state(),
                          solver="unipc", steps=30, shift=3.0, guidance_scale=guidance, cond=arg_c,
                          uncond=arg_null)
    got = denoiser.sampler.sample(request, Role(), stop_after=3)
    error = rel_l2(got, expected)
    return {"passed": error <= THREE_STEPS_REL_L2, "rel_l2": error, "bound": THREE_STEPS_REL_L2,
            "resolution": resolution, "steps": 3, "guidance_scale": guidance}
