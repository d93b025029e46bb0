"""How the worker fits the GPU it has: the memory tier, chosen at start-up from the memory the worker
may use (WAN_S2V_GPU_MEMORY_GB, by default the card's), and the up-front refusal of a job whose
activations would not fit what is left.

Resident bytes come from the checkpoint (each component's tensors, in the form it will take on the
GPU); a job's activations from its DiT token count (`activation_bytes`). The tiers, tried in order,
the first that fits the largest resolution (720p) winning, else the first that fits 480p:

1. the DiT in bfloat16, everything resident (the official numbers; 80 GB cards and up);
2. the DiT's large Linear weights in FP8 (WAN_S2V_WEIGHTS=fp8: half the DiT's bytes);
3. and T5 streamed from pinned host memory block by block for each new prompt (T5's 10.6 GiB
   leave the GPU; text embeddings are cached per prompt, so a repeated prompt costs nothing);
4. and as many DiT blocks as needed streamed from pinned host memory while they run (24 GB cards).

WAN_S2V_WEIGHTS=bf16 or fp8 restricts the tiers to that format. The plan is logged in one line.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .checkpoint import Checkpoint
from .planning import WARM_UP_IMAGE_SIZE, dit_tokens, video_size
from .resolutions import RESOLUTIONS
from .weights import ComponentShapes, Float8Recipe, component_shapes, dit_bytes, module_bytes

GiB = 2**30
# A job's peak of activations (and the VAE decode) over the resident weights, per DiT token of
# its clips: measured on an H200, 1-clip jobs in exact mode, torch.compile'd blocks (allocated
# bytes): 7.8 GiB at 480p (32,760 tokens), 14.6 GiB at 720p (61,200 tokens), docs/performance.md.
ACTIVATION_BYTES_PER_TOKEN = int(0.26 * 2**20)
ACTIVATION_FIXED_BYTES = int(1.0 * GiB)
# Left free of every plan: the caching allocator's fragmentation and CUDA's own workspaces.
MARGIN_FRACTION = 0.06
FRAMES_PER_CLIP = 80  # the default clip, which the tiers are sized for


def activation_bytes(tokens: int) -> int:
    """GPU memory a job needs beyond the resident weights, for DiT calls of `tokens` tokens."""
    return ACTIVATION_FIXED_BYTES + ACTIVATION_BYTES_PER_TOKEN * tokens


@dataclass(frozen=True)
class ModelBytes:
    """What each component takes on the GPU."""

    dit_bf16: int  # the whole DiT in bfloat16
    dit_float8: int  # its large Linear weights in FP8 (with scales), the rest in bfloat16
    dit_blocks: int  # the DiT's blocks alone (in the FP8 form): what streaming can move off
    num_blocks: int
    t5: int
    t5_streamed: int  # what stays of T5 when streamed: two blocks' buffers
    others: int  # VAE, wav2vec2


@dataclass(frozen=True)
class MemoryPlan:
    """Where the weights live on this worker, and what is left for a job's activations."""

    limit_bytes: int  # what the worker may use on the GPU
    weights: str  # "bf16" or "fp8"
    t5_streamed: bool
    streamed_blocks: int  # the DiT's last blocks kept on the host, streamed in while they run
    resident_bytes: int
    resolutions: tuple[str, ...]  # what fits (the largest first)
    steps: list[str] = field(default_factory=list)  # why, for the log line

    @property
    def job_budget_bytes(self) -> int:
        """GPU memory left for one job's activations."""
        return int(self.limit_bytes * (1 - MARGIN_FRACTION)) - self.resident_bytes

    def spare_bytes(self, device) -> int:
        """GPU memory beyond what the allocator holds now and what the largest job this worker
        serves needs: what a LoRA merge may keep its base copies in."""
        import torch

        largest = max((activation_bytes(tokens_at(r, dict(RESOLUTIONS))) for r in self.resolutions),
                      default=0)
        return (int(self.limit_bytes * (1 - MARGIN_FRACTION)) - torch.cuda.memory_reserved(device)
                - largest)

    def refusal(self, tokens: int, resolution: str) -> str | None:
        """Why a job of `tokens`-token DiT calls cannot run here (None: it fits)."""
        needed = activation_bytes(tokens)
        if needed <= self.job_budget_bytes:
            return None
        return (f"this job needs about {needed / GiB:.1f} GiB of GPU memory for its {resolution} "
                f"clips ({tokens} DiT tokens), more than the {max(0, self.job_budget_bytes) / GiB:.1f} "
                f"GiB this worker has left beside its weights ({self.limit_bytes / GiB:.0f} GiB "
                "usable, WAN_S2V_GPU_MEMORY_GB); use 480p, fewer frames per clip (infer_frames), "
                "or a GPU with more memory")

    def describe(self) -> str:
        streamed = (f", {self.streamed_blocks} DiT blocks streamed from host memory"
                    if self.streamed_blocks else "")
        return (f"memory plan for {self.limit_bytes / GiB:.1f} GiB: DiT weights {self.weights}, "
                f"T5 {'streamed' if self.t5_streamed else 'resident'}{streamed}; "
                f"{self.resident_bytes / GiB:.1f} GiB resident, "
                f"{self.job_budget_bytes / GiB:.1f} GiB for a job; serves "
                f"{', '.join(self.resolutions) or 'nothing'}"
                + (f" ({'; '.join(self.steps)})" if self.steps else ""))


def tokens_at(resolution: str, max_area: dict[str, int]) -> int:
    """The DiT tokens of a default clip of a 16:9 image at `resolution` (what the tiers size)."""
    height, width = video_size(*WARM_UP_IMAGE_SIZE, max_area[resolution], resolution)
    return dit_tokens(height, width, FRAMES_PER_CLIP)


def plan_memory(limit_bytes: int, sizes: ModelBytes, weights_setting: str,
                max_area: dict[str, int] | None = None) -> MemoryPlan:
    """The first tier (module docstring) that fits 720p, else the first that fits 480p; a
    SettingsError-worthy ValueError when nothing fits even 480p."""
    max_area = max_area or dict(RESOLUTIONS)
    budget = int(limit_bytes * (1 - MARGIN_FRACTION))
    formats = {"auto": ("bf16", "fp8"), "bf16": ("bf16",), "fp8": ("fp8",)}[weights_setting]
    tiers = []
    for fmt in formats:
        dit = sizes.dit_bf16 if fmt == "bf16" else sizes.dit_float8
        tiers.append((fmt, False, 0, dit + sizes.t5 + sizes.others))
        tiers.append((fmt, True, 0, dit + sizes.t5_streamed + sizes.others))
    steps = []
    for resolution in sorted(max_area, key=lambda r: -max_area[r]):  # 720p first
        need = activation_bytes(tokens_at(resolution, max_area))
        for fmt, t5_streamed, streamed, resident in tiers:
            if resident + need <= budget:
                fits = tuple(r for r in sorted(max_area, key=lambda r: -max_area[r])
                             if resident + activation_bytes(tokens_at(r, max_area)) <= budget)
                return MemoryPlan(limit_bytes, fmt, t5_streamed, streamed, resident, fits, steps)
        steps.append(f"{resolution} does not fit with every block resident")
    # Stream DiT blocks (FP8: the smallest) until 480p fits.
    fmt = "fp8" if "fp8" in formats else "bf16"
    per_block = sizes.dit_blocks / sizes.num_blocks
    if fmt == "bf16":
        per_block *= sizes.dit_bf16 / sizes.dit_float8
    dit = sizes.dit_bf16 if fmt == "bf16" else sizes.dit_float8
    smallest = min(max_area, key=lambda r: max_area[r])
    need = activation_bytes(tokens_at(smallest, max_area))
    # Every block resident, plus the two buffer sets that streamed blocks pass through.
    resident_without_streaming = dit + sizes.t5_streamed + sizes.others + 2 * per_block
    streamed = max(1, math.ceil((resident_without_streaming + need - budget) / per_block))
    resident = int(resident_without_streaming - streamed * per_block)
    if resident + need > budget or streamed >= sizes.num_blocks:
        raise ValueError(
            f"the model cannot run in {limit_bytes / GiB:.1f} GiB of GPU memory: even with its "
            f"weights in {fmt} and streamed from host memory, a {smallest} job needs about "
            f"{(resident + need) / GiB:.1f} GiB (WAN_S2V_GPU_MEMORY_GB, WAN_S2V_WEIGHTS)")
    steps.append(f"{streamed} of {sizes.num_blocks} blocks streamed")
    return MemoryPlan(limit_bytes, fmt, True, streamed, resident, (smallest,), steps)


def model_bytes(checkpoint: Checkpoint) -> ModelBytes:
    """Each component's bytes on the GPU, read from the checkpoint's headers (no tensor loaded)."""
    return count_model_bytes(component_shapes(checkpoint))


def count_model_bytes(shapes: ComponentShapes) -> ModelBytes:
    """Each component's bytes on the GPU in the forms the worker keeps them: the DiT in bfloat16
    or FP8, T5 in bfloat16, the VAE and wav2vec2 in float32."""
    dit_bf16, _ = dit_bytes(shapes.dit, None)
    dit_float8, dit_blocks = dit_bytes(shapes.dit, Float8Recipe())
    num_blocks = len({name.split(".")[1] for name in shapes.dit if name.startswith("blocks.")})
    t5_modules, t5_layers = module_bytes(shapes.t5, 2)
    t5 = sum(t5_modules.values())
    # Streamed, T5 keeps its small parts and two blocks' buffers on the GPU; its embedding table
    # stays in host memory (offload.embedding_on_host).
    t5_blocks = t5_modules.get("blocks", 0)
    t5_streamed = t5 - t5_blocks - t5_modules.get("token_embedding", 0) + \
        2 * t5_blocks // max(1, t5_layers)
    return ModelBytes(dit_bf16=dit_bf16, dit_float8=dit_float8, dit_blocks=dit_blocks,
                      num_blocks=num_blocks, t5=t5, t5_streamed=t5_streamed,
                      others=4 * (shapes.vae_values + shapes.wav2vec_values))
