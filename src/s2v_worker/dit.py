"""The S2V DiT forward as the worker runs it: the official `WanModel_S2V` math, arranged for speed.

The official `WanModel_S2V.forward` redoes, at every denoising step and for both guidance branches,
work that depends only on the clip: the audio encoder, the pose and reference-image embeddings, the
frame-pack motion tokens, a float64 RoPE table (1.3 GB at 480p), the text embedding and the text
cross-attention keys/values of all 40 blocks. Its blocks then apply RoPE in complex float64 and stop
the GPU once per block (`e[1].item()`) and per audio cross-attention (key-length check).

`DiTEngine` splits that forward in two:

* `prepare(**clip_kwargs)` -- once per clip and branch: everything above that does not depend on the
  noisy latents or the timestep, computed by the official submodules in the official order, so the
  cached tensors are the very values the official forward would compute again;
* `forward(x, t, conditioning)` -- per step: patch embedding, time embedding, the 40 blocks and the
  head. The blocks are blocks.py's `dit_block`, a line-for-line functional copy of
  `WanS2VAttentionBlock.forward` with two changes: RoPE from a cached cos/sin table in real
  arithmetic (the official code multiplies complex float64 tensors of 1.3 GB at 480p in every
  block), and the two timestep segments selected per token with `torch.where` instead of slicing
  at a host-side index.

Eagerly (`compile=False`) the engine is bit-identical to the official forward (tests/test_dit.py;
on the GPU, the tiny whole job of bench/faithfulness.py). With `compile=True` the blocks and audio
injections run through `torch.compile`, which fuses the float32 modulation, norms, RoPE and
residual updates around the cuBLAS/cuDNN kernels; fused arithmetic rounds differently, so the
result moves within bfloat16 noise (relative error about 5e-3 per forward at full size, bound
1e-2). The RoPE table is then float32: float64 costs 0.11 s per 480p forward inside the fused
kernels and changes nothing at that noise level (measured, bench/results).

The weights are the official module's own parameters, read at every call, so LoRA merges
(`lora_merge.py`) apply without any copy; they may be FP8 (float8.Float8Linear), and some blocks
may live in host memory, streamed in while they run (`stream_blocks`, offload.py). The result is compared with the official forward by
tests/test_dit.py (CPU, tiny checkpoint) and bench/faithfulness.py (GPU, full size).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .attention import SequenceParallel, forward_state
from .blocks import AudioWeights, BlockWeights, audio_injection, dit_block, linear_weight
from .float8 import FLOAT8_LAYER_SETS
from .offload import ModuleStream
from .official import import_official

logger = logging.getLogger(__name__)


# --- per-clip state ----------------------------------------------------------------------------------

@dataclass
class ClipConditioning:
    """Everything one branch (conditional or unconditional) of one clip needs besides x and t."""
    pose: torch.Tensor            # [1, C, F, H, W] pose embedding, added to the patch embedding
    noisy_mask_embedding: torch.Tensor  # [1, 1, C] trainable_cond_mask(0)
    prefix: torch.Tensor          # [1, S_ref + S_motion, C] reference and motion tokens (+ mask)
    token_dtype: torch.dtype      # dtype of the concatenated token sequence
    grid_sizes: torch.Tensor      # [1, 3] (F, H, W) of the noisy latents after patching, on the CPU
    rope: torch.Tensor            # [S, 1, D/2, 2] (cos, sin) for this process's tokens
    noisy: torch.Tensor           # [S, 1] bool, True for the tokens with the sampled timestep
    text_kv: list[tuple[torch.Tensor, torch.Tensor]]   # per block
    audio: dict[int, tuple]       # block index -> (AdaLN shift, 1 + scale, k, v, norm eps)
    num_frames: int
    shard: "TokenShard | None" = None  # this process's tokens, under sequence parallelism

    @property
    def noisy_tokens(self) -> int:
        return int(self.grid_sizes.prod())


@dataclass(frozen=True)
class TokenShard:
    """The tokens [start, start + length) of a `total`-token sequence that one rank of a
    sequence-parallel group holds; positions past `total` are padding (zeros)."""
    parallel: SequenceParallel
    total: int
    start: int
    length: int

    @classmethod
    def of(cls, parallel: SequenceParallel, total: int) -> "TokenShard":
        length = -(-total // parallel.size)
        return cls(parallel, total, parallel.rank * length, length)

    def take(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """This shard of a full-sequence tensor along `dim`, zero-padded past the end."""
        available = max(0, min(self.length, tensor.shape[dim] - self.start))
        part = tensor.narrow(dim, min(self.start, tensor.shape[dim]), available)
        if available == self.length:
            return part
        pad_shape = list(tensor.shape)
        pad_shape[dim] = self.length - available
        return torch.cat([part, part.new_zeros(pad_shape)], dim=dim)

    def gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's shard of `tensor` along `dim`, in token order, padding removed."""
        parts = [torch.empty_like(tensor) for _ in range(self.parallel.size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.parallel.group)
        return torch.cat(parts, dim=dim).narrow(dim, 0, self.total)


def rope_table(freqs: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Official complex float64 RoPE factors [..., S, heads, D/2] (equal across heads) -> the
    (cos, sin) table [S, 1, D/2, 2], without the head copies. float64: the official numbers."""
    freqs = freqs.reshape(-1, *freqs.shape[-2:])[:, :1]
    return torch.view_as_real(freqs).to(dtype).contiguous()


class DiTEngine:
    """Runs an official `WanModel_S2V` with per-clip caching and, optionally, compiled blocks."""

    def __init__(self, model: torch.nn.Module, compile: bool = False,
                 dynamic_shapes: bool = True) -> None:
        official = import_official()  # the official helpers the cached parts use
        self._rope_precompute = official.model_s2v.rope_precompute
        self._sinusoidal = official.model_s2v.sinusoidal_embedding_1d
        self.model = model
        self.rope_dtype = torch.float32 if compile else torch.float64
        # Dynamic: one compilation serves every image size (the token count varies with the
        # aspect ratio and resolution); static: one compilation per size.
        self.dynamic_shapes = compile and dynamic_shapes
        first = model.blocks[0]
        self.num_heads = first.self_attn.num_heads
        self.eps = first.norm1.eps
        self._block = dit_block
        self._audio = audio_injection
        self._float8_blocks: dict[str, list[BlockWeights]] = {}
        # Blocks whose weights live in host memory and are streamed in while they run (a card
        # too small for the whole DiT): block index -> its place in the stream.
        self.stream: ModuleStream | None = None
        self.streamed: dict[int, int] = {}
        if compile:
            # One graph for blocks 1..39 (float32 residual stream) and one for the injections; block
            # 0 (bfloat16 input) runs eagerly rather than costing a second compilation.
            dynamic = None if dynamic_shapes else False
            self._block = torch.compile(dit_block, fullgraph=True, dynamic=dynamic)
            self._audio = torch.compile(audio_injection, fullgraph=True, dynamic=dynamic)
        logger.info("DiT engine: %s", f"compiled ({'dynamic' if dynamic_shapes else 'static'} shapes)"
                    if compile else "eager")

    def stream_blocks(self, indices: list[int], device: torch.device) -> int:
        """Keep the blocks `indices` in pinned host memory from now on, streamed to `device` while
        they run (offload.ModuleStream); the bytes each takes."""
        blocks = [self.model.blocks[i] for i in indices]
        self.stream = ModuleStream(blocks, device)
        self.streamed = {index: place for place, index in enumerate(indices)}
        return self.stream.bytes_per_module

    @contextlib.contextmanager
    def block_on_device(self, index: int) -> Iterator[None]:
        """Block `index`'s weights on the device for the block (streamed in when they live on
        the host), the next streamed block's copy started meanwhile."""
        place = self.streamed.get(index)
        if place is None:
            yield
            return
        self.stream.enter(place)
        self.stream.prefetch(place + 1)
        try:
            yield
        finally:
            self.stream.leave(place)

    def float8_blocks(self, layers: str) -> list[BlockWeights]:
        """The blocks' weights with FLOAT8_LAYER_SETS[layers] in float8, quantized on first use
        from the current (possibly LoRA-merged) weights; `forget_float8` drops them."""
        if self.stream is not None:
            raise RuntimeError("fast mode's FP8 copies need the whole DiT on the device; with "
                               "streamed blocks the weights are FP8 already")
        if layers not in self._float8_blocks:
            names, rowwise = FLOAT8_LAYER_SETS[layers]
            self._float8_blocks[layers] = [BlockWeights.of(b).in_float8(names, rowwise)
                                           for b in self.model.blocks]
        return self._float8_blocks[layers]

    def forget_float8(self) -> None:
        """Called when the DiT's weights change (LoRA merge or restore)."""
        self._float8_blocks.clear()
        if self.stream is not None:
            self.stream.forget()

    # --- once per clip ------------------------------------------------------------------------------

    @torch.no_grad()
    def prepare(self, *, context, ref_latents, motion_latents, cond_states, audio_input,
                motion_frames=(17, 5), add_last_motion=2, drop_motion_frames=False,
                seq_len=None, sequence: SequenceParallel | None = None,
                **unused) -> ClipConditioning:
        """The clip-constant part of `WanModel_S2V.forward`, same arguments (x and t aside).
        sequence: this process's place in a sequence-parallel group (None: all tokens here)."""
        m = self.model
        add_last_motion = m.add_last_motion * add_last_motion
        audio_input = torch.cat([audio_input[..., 0:1].repeat(1, 1, 1, motion_frames[0]),
                                 audio_input], dim=-1)
        audio = m.casual_audio_encoder(audio_input)
        if m.enbale_adain:
            audio_global, audio = audio
            audio_global = audio_global[:, motion_frames[1]:]
        audio = audio[:, motion_frames[1]:]  # b f n c
        num_frames = audio.shape[1]

        pose = m.cond_encoder(cond_states[0].unsqueeze(0))
        grid = torch.tensor(pose.shape[2:], dtype=torch.long).unsqueeze(0)
        noisy_tokens = int(grid.prod())
        ref = m.patch_embedding(ref_latents[0].unsqueeze(0))
        height, width = ref.shape[3], ref.shape[4]
        ref = ref.flatten(2).transpose(1, 2)
        ref_grid = [torch.tensor([30, 0, 0]).unsqueeze(0), torch.tensor([31, height, width]).unsqueeze(0),
                    torch.tensor([1, height, width]).unsqueeze(0)]  # as in the official forward
        head_dim = m.dim // m.num_heads
        placeholder = torch.zeros(1, noisy_tokens + ref.shape[1], 1, head_dim, device=ref.device)
        freqs = self._rope_precompute(placeholder, [[torch.zeros_like(grid), grid, grid], ref_grid],
                                      m.freqs, start=None)
        motion, motion_freqs = self._motion_tokens(motion_latents, drop_motion_frames,
                                                   add_last_motion)
        prefix = torch.cat([ref, *motion], dim=1)
        token_dtype = torch.promote_types(pose.dtype, prefix.dtype)
        rope = torch.cat([rope_table(f, self.rope_dtype) for f in (freqs, *motion_freqs)])

        labels = torch.cat([torch.ones(ref.shape[1]), torch.full((prefix.shape[1] - ref.shape[1],), 2)])
        mask = m.trainable_cond_mask(labels.long().to(ref.device)).unsqueeze(0).to(token_dtype)
        prefix = prefix.to(token_dtype) + mask
        noisy_mask = m.trainable_cond_mask(torch.zeros(1, 1, dtype=torch.long, device=ref.device))
        seg = noisy_tokens if m.zero_timestep else 0
        noisy = (torch.arange(rope.shape[0], device=ref.device) < seg).unsqueeze(1)

        text = m.text_embedding(torch.stack([
            torch.cat([u, u.new_zeros(m.text_len - u.size(0), u.size(1))]) for u in context]))
        text_kv = []
        for index, block in enumerate(m.blocks):
            ca = block.cross_attn
            with self.block_on_device(index):
                text_kv.append((ca.norm_k(ca.k(text)).view(1, -1, ca.num_heads, ca.head_dim),
                                ca.v(text).view(1, -1, ca.num_heads, ca.head_dim)))

        audio_tokens = audio.flatten(0, 1)  # (b f) n c
        injected = {}
        injector = m.audio_injector
        for block_index, audio_index in injector.injected_block_id.items():
            attn = injector.injector[audio_index]
            shift = scale = None
            if m.enbale_adain and m.adain_mode == "attn_norm":
                adain = injector.injector_adain_layers[audio_index]
                if adain.chunk_dim != 1:
                    raise NotImplementedError("AdaLayerNorm with chunk_dim != 1")
                temb = adain.linear(adain.silu(audio_global.flatten(0, 1)[:, 0]))
                shift, scale = temb.chunk(2, dim=1)
                shift, scale = shift[:, None, :], 1 + scale[:, None, :]
                norm_eps = adain.norm.eps
            else:
                norm_eps = injector.injector_pre_norm_feat[audio_index].eps
            k = attn.norm_k(attn.k(audio_tokens)).view(audio_tokens.shape[0], -1, attn.num_heads,
                                                      attn.head_dim)
            v = attn.v(audio_tokens).view(audio_tokens.shape[0], -1, attn.num_heads, attn.head_dim)
            injected[block_index] = (shift, scale, k, v, norm_eps)
        shard = None
        if sequence is not None and sequence.size > 1:
            shard = TokenShard.of(sequence, rope.shape[0])
            rope, noisy = shard.take(rope, 0), shard.take(noisy, 0)
        return ClipConditioning(pose=pose, noisy_mask_embedding=noisy_mask.to(token_dtype),
                                prefix=prefix, token_dtype=token_dtype, grid_sizes=grid, rope=rope,
                                noisy=noisy, text_kv=text_kv, audio=injected, num_frames=num_frames,
                                shard=shard)

    def _motion_tokens(self, motion_latents, drop_motion_frames, add_last_motion):
        """`WanModel_S2V.inject_motion`'s choice of motion encoder, its tokens and RoPE factors."""
        m = self.model
        if m.enable_motioner:
            return m.process_motion_transformer_motioner(
                motion_latents, drop_motion_frames=drop_motion_frames, add_last_motion=add_last_motion)
        if m.enable_framepack:
            return m.process_motion_frame_pack(
                motion_latents, drop_motion_frames=drop_motion_frames, add_last_motion=add_last_motion)
        return m.process_motion(motion_latents, drop_motion_frames=drop_motion_frames)

    # --- every step ---------------------------------------------------------------------------------

    def _time_embedding(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(head embedding [1, C], block modulation [1, 6, 2, C]) as in the official forward."""
        m = self.model
        if m.zero_timestep:
            t = torch.cat([t, torch.zeros([1], dtype=t.dtype, device=t.device)])
        with torch.autocast("cuda", dtype=torch.float32, enabled=t.is_cuda):
            e = m.time_embedding(self._sinusoidal(m.freq_dim, t).float())
            e0 = m.time_projection(e).unflatten(1, (6, m.dim))
        if m.zero_timestep:
            e, zero_e0, e0 = e[:-1], e0[-1:], e0[:-1]
            e0 = torch.cat([e0.unsqueeze(2), zero_e0.unsqueeze(2).repeat(e0.size(0), 1, 1, 1)], dim=2)
        else:
            e0 = e0.unsqueeze(2).repeat(1, 1, 2, 1)
        return e, e0

    @torch.no_grad()
    def forward(self, x: list[torch.Tensor], t: torch.Tensor, conditioning: ClipConditioning,
                float8: str | None = None, float8_attention: bool = False) -> list[torch.Tensor]:
        """One DiT call for one branch: x = [latents [C, F, H, W]], t = [1] timestep. float8: a
        key of FLOAT8_LAYER_SETS to run those GEMMs in FP8 (fast mode), None for bfloat16;
        float8_attention: self-attention in FP8 too (attention.fa3_float8). Under sequence
        parallelism (conditioning.shard) every rank of the group calls this at once."""
        m, c, shard = self.model, conditioning, conditioning.shard
        # Fast mode's FP8 set (resident FP8 weights serve it as they are), else the weights as
        # the blocks hold them: bfloat16, or FP8 (Float8Linear).
        fast_weights = self.float8_blocks(float8) if float8 and self.stream is None else None
        tokens = m.patch_embedding(x[0].unsqueeze(0))
        tokens = (tokens + c.pose).flatten(2).transpose(1, 2)
        tokens = torch.cat([tokens.to(c.token_dtype) + c.noisy_mask_embedding, c.prefix], dim=1)
        e_head, e0 = self._time_embedding(t)

        # The noisy tokens (a prefix of the sequence) held here, and where they start.
        noisy_start, noisy_here = 0, c.noisy_tokens
        if shard is not None:
            tokens = shard.take(tokens, 1)
            noisy_start = shard.start
            noisy_here = max(0, min(shard.length, c.noisy_tokens - shard.start))
        if self.dynamic_shapes:
            for tensor in (c.noisy, c.rope):
                torch._dynamo.maybe_mark_dynamic(tensor, 0)
        with forward_state(shard.parallel if shard else None, shard.total if shard else 0,
                           float8_attention):
            for index in range(len(m.blocks)):
                run_block = dit_block if index == 0 else self._block
                if self.dynamic_shapes:
                    torch._dynamo.maybe_mark_dynamic(tokens, 1)
                kv = c.text_kv[index]
                with self.block_on_device(index):
                    weights = (fast_weights[index] if fast_weights is not None
                               else BlockWeights.of(m.blocks[index]))
                    if float8 and fast_weights is None:  # streamed FP8 blocks: FP8 GEMMs as stored
                        weights = weights.in_float8(FLOAT8_LAYER_SETS[float8][0], True)
                    tokens = run_block(tokens, e0, c.noisy, c.rope, kv[0], kv[1], weights,
                                       self.num_heads, self.eps)
                if index in c.audio and noisy_here:
                    self._inject_audio(index, tokens, c, noisy_start, noisy_here)

        if shard is None:
            out = m.head(tokens[:, :c.noisy_tokens], e_head)
        else:  # the head is per token: each rank applies it to its shard, then all are gathered
            out = shard.gather(m.head(tokens, e_head), dim=1)[:, :c.noisy_tokens]
        return [u.float() for u in m.unpatchify(out, c.grid_sizes)]

    def _inject_audio(self, index: int, tokens: torch.Tensor, c: ClipConditioning,
                      noisy_start: int, noisy_here: int) -> None:
        """Add block `index`'s audio residual to the noisy tokens held here, in place. They are
        tokens [noisy_start, noisy_start + noisy_here) of the F frames; under sequence
        parallelism the shard may begin or end inside a frame, so it is padded to whole frames
        (the padding's result is dropped: each token attends only to its own frame's audio)."""
        m = self.model
        shift, scale, k, v, norm_eps = c.audio[index]
        attn = m.audio_injector.injector[m.audio_injector.injected_block_id[index]]
        audio_weights = AudioWeights(linear_weight(attn.q), attn.q.bias, linear_weight(attn.o),
                                     attn.o.bias, attn.norm_q.weight)
        noisy_part = tokens[:, :noisy_here]
        frame = c.noisy_tokens // c.num_frames
        first, end = noisy_start // frame, -(-(noisy_start + noisy_here) // frame)
        before, after = noisy_start - first * frame, end * frame - noisy_start - noisy_here
        x = noisy_part
        if before or after:
            x = F.pad(x, (0, 0, before, after))
        if (first, end) != (0, c.num_frames):
            k, v = k[first:end], v[first:end]
            shift = None if shift is None else shift[first:end]
            scale = None if scale is None else scale[first:end]
        if self.dynamic_shapes:
            torch._dynamo.maybe_mark_dynamic(x, 1)
        residual = self._audio(x, shift, scale, k, v, audio_weights, attn.num_heads, norm_eps,
                               attn.norm_q.eps)
        noisy_part += residual[:, before:before + noisy_here] if before or after else residual
