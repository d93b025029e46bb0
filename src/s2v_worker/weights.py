"""Reading the model's weights from a checkpoint folder: the DiT's sharded safetensors, and the
architecture of the T5 and VAE files (their widths read from the tensors, so that the tiny test
checkpoint goes through the same code as the real one)."""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import Checkpoint
from .official import import_official


def load_dit(checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The DiT (`WanModel_S2V`) from the checkpoint's sharded safetensors, onto `device`."""
    model = import_official().model_s2v.WanModel_S2V.from_pretrained(
        str(checkpoint.path), torch_dtype=dtype, device_map=str(device))
    return model.eval().requires_grad_(False)


def infer_t5_architecture(state_dict: dict[str, torch.Tensor]) -> dict[str, int]:
    """The `umt5_xxl` builder arguments that match a T5 encoder state dict (full size: umt5-xxl)."""
    vocab_size, dim = state_dict["token_embedding.weight"].shape
    num_buckets, num_heads = state_dict["blocks.0.pos_embedding.embedding.weight"].shape
    return dict(
        vocab_size=vocab_size, dim=dim,
        dim_attn=state_dict["blocks.0.attn.q.weight"].shape[0],
        dim_ffn=state_dict["blocks.0.ffn.fc1.weight"].shape[0],
        num_heads=num_heads, num_buckets=num_buckets,
        encoder_layers=len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")}),
    )


def infer_vae_width(state_dict: dict[str, torch.Tensor]) -> int:
    return state_dict["encoder.conv1.weight"].shape[0]


def peek_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A `.pth` state dict, memory-mapped: only the shapes are read (the official classes load the
    tensors afterwards)."""
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
