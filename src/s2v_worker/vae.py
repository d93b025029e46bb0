"""The official Wan2.1 VAE as the worker runs it: inputs cast to its dtype, decoded in pieces."""
from __future__ import annotations

from typing import Iterator

import torch

from .official import import_official

_official = import_official()


class VideoVAE(_official.vae.Wan2_1_VAE):
    """The official Wan2.1 VAE, with inputs cast to its dtype (float32) before encoding/decoding.

    The official callers hand it bfloat16 pixels and rely on CUDA autocast(float32) inside
    `Wan2_1_VAE.encode` to cast them at the first convolution. Casting up front gives the same
    numbers (bf16 -> fp32 is exact and nothing before that convolution computes) and also works on
    the CPU, where CUDA autocast does nothing.
    """

    def encode(self, videos):
        return super().encode([u.to(self.dtype) for u in videos])

    def decode(self, zs):
        return super().decode([u.to(self.dtype) for u in zs])

    def decode_chunks(self, z: torch.Tensor) -> Iterator[torch.Tensor]:
        """`decode([z])[0]` ([3, frames, H, W]) in pieces as they are computed: the loop of the
        official `WanVAE_.decode`, one latent frame (1, then 4 video frames) at a time, each
        piece made float32 and clamped as `Wan2_1_VAE.decode` does with the whole; the pieces
        concatenated are the same tensor. Lets the MP4 encoder start before the clip is done."""
        model = self.model
        scale_mean, scale_inv_std = (s.view(1, model.z_dim, 1, 1, 1) for s in self.scale)
        model.clear_cache()
        try:
            with torch.amp.autocast("cuda", dtype=self.dtype, enabled=z.is_cuda):
                x = model.conv2(z.to(self.dtype).unsqueeze(0) / scale_inv_std + scale_mean)
            for i in range(x.shape[2]):
                with torch.amp.autocast("cuda", dtype=self.dtype, enabled=z.is_cuda):
                    model._conv_idx = [0]
                    out = model.decoder(x[:, :, i:i + 1], feat_cache=model._feat_map,
                                        feat_idx=model._conv_idx)
                yield out.float().clamp_(-1, 1).squeeze(0)
        finally:
            model.clear_cache()
