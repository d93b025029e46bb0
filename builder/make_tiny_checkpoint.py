"""Write a tiny, random-weight stand-in for the Wan-AI/Wan2.2-S2V-14B checkpoint.

    python builder/make_tiny_checkpoint.py DIR [--seed N]

The folder gets the exact file layout of the Hugging Face repository, so the worker's real loading
code reads it unchanged:

    config.json                                       diffusers config of WanModel_S2V (tiny sizes)
    diffusion_pytorch_model-0000{1..4}-of-00004.safetensors   the DiT, bfloat16, in 4 shards
    diffusion_pytorch_model.safetensors.index.json    which shard holds which tensor
    models_t5_umt5-xxl-enc-bf16.pth                   T5 encoder state dict, bfloat16
    Wan2.1_VAE.pth                                    Wan 2.1 VAE state dict, float32
    google/umt5-xxl/                                  a small Unigram tokenizer (tokenizers format)
    wav2vec2-large-xlsr-53-english/                   a small Wav2Vec2ForCTC with its processor files
    tiny-checkpoint.json                              marker: random weights, small max_area per resolution

Every weight is drawn from a seeded generator: the same seed gives the same tensors. The weights are
random, so the videos made from this checkpoint are noise. It exists so that the whole worker (loading,
text/audio encoding, sampling, VAE decoding, video muxing) can run on a CPU in seconds, in tests and CI.

Sizes are chosen so that every shape the worker reads or infers stays consistent with the official
code; the comments at the constants say which constraint each number comes from.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import string
import sys
import time
import types
import zlib
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from torch import nn

logger = logging.getLogger(__name__)

MARKER = "tiny-checkpoint.json"
STAGING_DIR = ".tiny-checkpoint-staging"

# --- architecture ----------------------------------------------------------------------------------

# wav2vec2 (Wav2Vec2ForCTC). The keys not listed keep the values of the real
# jonatasgrosman/wav2vec2-large-xlsr-53-english config, which transformers' defaults do not all match.
WAV2VEC_HIDDEN = 32
WAV2VEC_CONFIG = dict(
    architectures=["Wav2Vec2ForCTC"],
    # The DiT's CausalAudioEncoder mixes exactly 25 hidden states (embeddings + 24 layers).
    num_hidden_layers=24,
    hidden_size=WAV2VEC_HIDDEN,
    num_attention_heads=2,
    intermediate_size=64,
    # Default kernels/strides (total stride 320: 50 feature frames per second at 16 kHz), which the
    # official audio code assumes; only the channel count is small.
    conv_dim=(32,) * 7,
    conv_kernel=(10, 3, 3, 3, 3, 2, 2),
    conv_stride=(5, 2, 2, 2, 2, 2, 2),
    conv_bias=True,
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=16,  # must divide hidden_size
    feat_extract_norm="layer",
    do_stable_layer_norm=True,
    feat_extract_activation="gelu",
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    mask_time_prob=0.05,
    layerdrop=0.05,
    ctc_loss_reduction="mean",
    ctc_zero_infinity=True,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
# CTC character vocabulary laid out like the real English model's (33 entries).
WAV2VEC_VOCAB = ["<pad>", "<s>", "</s>", "<unk>", "|", "'", "-", *string.ascii_uppercase]

# T5 encoder (wan.modules.t5.T5Encoder, shared_pos=False as umt5_xxl builds it). `dim` stays at the
# real 4096: diffusers never passes `text_dim` from config.json to WanModel_S2V (it is in the class's
# `ignore_for_config`), so the DiT's text projection always expects 4096-wide text features. The
# attention and feed-forward widths, which nothing outside T5 sees, are what keeps it small.
T5_ARCH = dict(dim=4096, dim_attn=32, dim_ffn=64, num_heads=2, num_layers=2, num_buckets=32)
# The real checkpoint's embedding has more rows (256384, a multiple of 128) than the tokenizer has
# tokens; padding the tiny one the same way keeps code from assuming the two are equal.
T5_VOCAB_MULTIPLE = 128

# Wan 2.1 VAE (wan.modules.vae2_1.WanVAE_): everything as in _video_vae() except the width (real: 96).
# Width 4: every clip decodes the 73 motion frames too, and on a 2-core CPU width 8 takes 3x longer.
VAE_ARCH = dict(dim=4, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                temperal_downsample=[False, True, True], dropout=0.0)

# DiT (wan.modules.s2v.model_s2v.WanModel_S2V): wan/configs/wan_s2v_14B.py with small widths.
# patch_size, text_dim, window_size, qk_norm and cross_attn_norm are absent on purpose: the class lists
# them in `ignore_for_config`, so the real config.json does not have them and diffusers would not pass
# them on anyway (the DiT gets its defaults, which are the official values).
# head_dim 32: rope splits it into 12 + 10 + 10. Four heads, so that the multi-GPU code can split
# them over 2 or 4 processes in the tests (as it splits the real 40 over 2, 4, 5 or 8 GPUs).
DIT_DIM, DIT_HEADS, DIT_LAYERS = 128, 4, 3
DIT_CONFIG = dict(
    cond_dim=16,
    audio_dim=WAV2VEC_HIDDEN,
    num_audio_token=4,
    enable_adain=True,
    adain_mode="attn_norm",
    audio_inject_layers=list(range(DIT_LAYERS)),
    zero_init=True,
    zero_timestep=True,
    enable_motioner=False,
    add_last_motion=True,
    enable_tsm=False,
    trainable_token_pos_emb=False,
    motion_token_num=1024,
    enable_framepack=True,
    framepack_drop_mode="padd",
    model_type="s2v",
    text_len=512,
    in_dim=16,
    dim=DIT_DIM,
    ffn_dim=2 * DIT_DIM,
    freq_dim=256,
    out_dim=16,
    num_heads=DIT_HEADS,
    num_layers=DIT_LAYERS,
    eps=1e-6,
)
DIT_SHARDS = 4


class Sizes(NamedTuple):
    """The widths a tiny checkpoint may change; the defaults are the tiny checkpoint's own."""

    dit_dim: int = DIT_DIM
    dit_heads: int = DIT_HEADS
    wav2vec_hidden: int = WAV2VEC_HIDDEN
    wav2vec_heads: int = WAV2VEC_CONFIG["num_attention_heads"]

    def dit_config(self) -> dict:
        """DIT_CONFIG at these widths (the feed-forward twice the width, as in DIT_CONFIG)."""
        return {**DIT_CONFIG, "dim": self.dit_dim, "ffn_dim": 2 * self.dit_dim,
                "num_heads": self.dit_heads, "audio_dim": self.wav2vec_hidden}

    def wav2vec_config(self) -> dict:
        """WAV2VEC_CONFIG at these widths (the feed-forward twice the width, as in WAV2VEC_CONFIG)."""
        return {**WAV2VEC_CONFIG, "hidden_size": self.wav2vec_hidden,
                "num_attention_heads": self.wav2vec_heads, "intermediate_size": 2 * self.wav2vec_hidden}


# The widths ComfyUI's loaders can read back from the tensors, for the ComfyUI-layout test files
# (builder/make_tiny_comfy.py): those files carry no config, and the readers take the DiT's heads
# as dim // 128 (ComfyUI's Wan loader: head_dim 128; rope splits it into 44 + 42 + 42) and
# wav2vec2's as hidden // 64 (the real large model's 1024 / 16). The rest stays tiny.
COMFY_SIZES = Sizes(dit_dim=256, dit_heads=2, wav2vec_hidden=128, wav2vec_heads=2)

# Output sizes the worker may choose for this checkpoint: it picks height and width as multiples of
# 64 whose product stays under these, as the official code does, so a CPU job takes seconds
# (480p: one 64x64 latent-friendly frame; 720p: twice that area, so the two sizes differ).
MAX_AREA = {"480p": 64 * 64, "720p": 128 * 64}

WEIGHT_STD = 0.02

# --- tokenizer vocabulary --------------------------------------------------------------------------

NEGATIVE_PROMPT = (
    "画面模糊，最差质量，画面模糊，细节模糊不清，情绪激动剧烈，手快速抖动，字幕，丑陋的，残缺的，多余的手指，"
    "画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，"
    "背景人很多，倒着走")
# Whole words, so that typical English prompts tokenize into a few pieces rather than characters.
ENGLISH_WORDS = """
a an the and or of to in on at with from by for as is are was be it its this that his her their
man woman person people girl boy child face head eyes mouth lips hair hand hands body
talk talking speak speaking sing singing smile smiling laugh look looking sit sitting stand standing
camera video shot close up medium wide portrait front view background light lighting natural soft
room studio outdoor street stage microphone music song voice news anchor interview
young old happy calm red blue green black white dark bright warm cold realistic cinematic
high quality detailed sharp blurry static moving slowly fast
""".split()
SUFFIXES = ["s", "es", "ed", "ing", "er", "ly", "tion"]
SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in google/umt5-xxl
METASPACE = "\u2581"  # "▁", SentencePiece's word-start marker


# --- official code -----------------------------------------------------------------------------------

def import_official_classes() -> types.SimpleNamespace:
    """WanModel_S2V, T5Encoder and WanVAE_ from the installed `wan22` package, imported the way the
    worker imports them (s2v_worker.official), which also works on a machine without a GPU."""
    from s2v_worker.official import import_official

    official = import_official()
    return types.SimpleNamespace(T5Encoder=official.t5.T5Encoder, WanVAE_=official.vae.WanVAE_,
                                 WanModel_S2V=official.model_s2v.WanModel_S2V)


# --- random weights ----------------------------------------------------------------------------------

def component_generator(seed: int, component: str) -> torch.Generator:
    """A generator per component, so that changing one model's size leaves the others' weights alone."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{component}".encode()))


def _is_norm_scale(module: nn.Module, param_name: str) -> bool:
    # LayerNorm, WanLayerNorm, WanRMSNorm, T5LayerNorm, RMS_norm (its scale is called gamma), ...
    return "norm" in type(module).__name__.lower() and param_name in ("weight", "gamma")


def random_state_dict(model: nn.Module, generator: torch.Generator, dtype: torch.dtype,
                      special: dict[str, Callable[[torch.Size, torch.Generator], torch.Tensor]] | None = None,
                      ) -> dict[str, torch.Tensor]:
    """Random values for every tensor of `model.state_dict()`, with the same names and shapes.

    The model may live on the meta device: only names and shapes are read. Norm scales are drawn
    around 1 and everything else around 0 (std WEIGHT_STD); none is left at the zero or constant
    values the official initialisation uses (zero_init), which would hide wiring mistakes in tests.
    `special` maps a tensor name to its own draw where a plain normal would break the model.
    """
    special = special or {}
    owners = {}
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            owners[f"{module_name}.{param_name}" if module_name else param_name] = (module, param_name)
    result = {}
    for name, tensor in model.state_dict().items():
        if name not in owners:
            # A buffer: none of the three models has one today. Fail loudly rather than guess a value.
            raise ValueError(f"{type(model).__name__} has a buffer {name!r}; decide how to fill it")
        if name in special:
            values = special[name](tensor.shape, generator)
        else:
            values = torch.randn(tensor.shape, generator=generator) * WEIGHT_STD
            if _is_norm_scale(*owners[name]):
                values += 1.0
        result[name] = values.to(dtype).contiguous()
    return result


# --- DiT ---------------------------------------------------------------------------------------------

def build_dit(official: types.SimpleNamespace, seed: int, dit_config: dict = DIT_CONFIG,
              ) -> tuple[dict, dict[str, torch.Tensor]]:
    """The DiT's config.json contents and its bfloat16 state dict."""
    with torch.device("meta"):
        model = official.WanModel_S2V(**dit_config)
    # Exactly what save_pretrained writes: the registered init arguments plus _class_name/_diffusers_version.
    config = json.loads(model.to_json_string())

    def audio_layer_weights(shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
        # CausalAudioEncoder divides by the sum of SiLU(weights) over the 25 wav2vec2 layers; a
        # zero-mean draw could make that sum ~0. Keep them positive like the official 0.01 init.
        return 0.01 + torch.rand(shape, generator=generator) * WEIGHT_STD

    state = random_state_dict(model, component_generator(seed, "dit"), torch.bfloat16,
                              special={"casual_audio_encoder.weights": audio_layer_weights})
    return config, state


def shard_assignment(sizes: list[int], num_shards: int) -> list[int]:
    """Split tensors, in order, into `num_shards` contiguous non-empty groups of similar byte size."""
    if len(sizes) < num_shards:
        raise ValueError(f"cannot split {len(sizes)} tensors into {num_shards} shards")
    target = sum(sizes) / num_shards
    assignment, shard, filled = [], 0, 0
    for index, size in enumerate(sizes):
        tensors_left = len(sizes) - index
        shards_left = num_shards - 1 - shard
        if filled and shard < num_shards - 1 and (filled + size > target or tensors_left <= shards_left):
            shard, filled = shard + 1, 0
        assignment.append(shard)
        filled += size
    return assignment


def write_dit(folder: Path, config: dict, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    names = list(state)
    sizes = [state[name].numel() * state[name].element_size() for name in names]
    shard_files = [f"diffusion_pytorch_model-{i + 1:05d}-of-{DIT_SHARDS:05d}.safetensors"
                   for i in range(DIT_SHARDS)]
    weight_map = {name: shard_files[shard]
                  for name, shard in zip(names, shard_assignment(sizes, DIT_SHARDS))}
    for shard_file in shard_files:
        save_file({name: state[name] for name in names if weight_map[name] == shard_file},
                  str(folder / shard_file), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(folder / "diffusion_pytorch_model.safetensors.index.json", index)
    _write_json(folder / "config.json", config)


# --- T5 text encoder and its tokenizer ------------------------------------------------------------

def tokenizer_vocabulary() -> list[tuple[str, float]]:
    """(piece, log-probability) pairs for a Unigram model: specials, words, then single characters.

    Unigram picks the segmentation with the highest total score, so whole words (score -6) win over
    spelling them out character by character (-9 or -10 each).
    """
    pieces: dict[str, float] = {token: 0.0 for token in SPECIAL_TOKENS}

    def add(piece: str, score: float) -> None:
        pieces.setdefault(piece, score)

    add(METASPACE, -4.0)
    for word in ENGLISH_WORDS:
        add(METASPACE + word, -6.0)
        add(METASPACE + word.capitalize(), -6.5)
    for suffix in SUFFIXES:
        add(suffix, -7.0)
    for char in string.ascii_letters + string.digits:
        add(METASPACE + char, -9.0)
    for char in string.ascii_letters + string.digits + string.punctuation:
        add(char, -10.0)
    # The Chinese default negative prompt, character by character, in order of first appearance,
    # plus the usual full-width punctuation.
    for char in NEGATIVE_PROMPT + "。、！？：；“”（）":
        add(char, -10.0)
    return list(pieces.items())


def build_tokenizer():
    """A tokenizers.Tokenizer shaped like google/umt5-xxl's: Unigram, Metaspace, `$A </s>` template.

    It is built the way transformers' T5Tokenizer rebuilds one from tokenizer.json (whitespace split,
    then Metaspace; no normalizer, since only a SentencePiece-precompiled one would be kept), so that
    the file and the loaded tokenizer behave the same.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram

    vocab = tokenizer_vocabulary()
    tokenizer = Tokenizer(Unigram(vocab, unk_id=SPECIAL_TOKENS.index("<unk>"), byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True),
    ])
    tokenizer.decoder = decoders.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True)
    eos_id = SPECIAL_TOKENS.index("</s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", eos_id)])
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                  for token in SPECIAL_TOKENS])
    return tokenizer


def write_tokenizer(folder: Path) -> int:
    """google/umt5-xxl/ files; returns the number of tokens (the T5 embedding must cover them)."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save(str(folder / "tokenizer.json"))
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    # extra_ids must be explicit: T5Tokenizer otherwise appends 100 <extra_id_N> sentinel tokens.
    _write_json(folder / "tokenizer_config.json", {
        **special,
        "additional_special_tokens": [],
        "extra_ids": 0,
        "sp_model_kwargs": {},
        "tokenizer_class": "T5Tokenizer",
    })
    _write_json(folder / "special_tokens_map.json", {**special, "additional_special_tokens": []})
    return tokenizer.get_vocab_size(with_added_tokens=True)


def build_t5(official: types.SimpleNamespace, num_tokens: int, seed: int) -> dict[str, torch.Tensor]:
    vocab = -(-num_tokens // T5_VOCAB_MULTIPLE) * T5_VOCAB_MULTIPLE
    with torch.device("meta"):
        model = official.T5Encoder(vocab=vocab, shared_pos=False, dropout=0.1, **T5_ARCH)
    return random_state_dict(model, component_generator(seed, "t5"), torch.bfloat16)


# --- VAE ---------------------------------------------------------------------------------------------

def build_vae(official: types.SimpleNamespace, seed: int) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = official.WanVAE_(**VAE_ARCH)
    return random_state_dict(model, component_generator(seed, "vae"), torch.float32)


# --- wav2vec2 ----------------------------------------------------------------------------------------

def write_wav2vec2(folder: Path, seed: int, wav2vec_config: dict = WAV2VEC_CONFIG) -> None:
    """Wav2Vec2ForCTC config + weights and the processor files (feature extractor + CTC tokenizer)."""
    from safetensors.torch import save_file
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    folder.mkdir(parents=True, exist_ok=True)
    config = Wav2Vec2Config(vocab_size=len(WAV2VEC_VOCAB), **wav2vec_config)
    with torch.device("meta"):
        model = Wav2Vec2ForCTC(config)
    state = random_state_dict(model, component_generator(seed, "wav2vec2"), torch.float32)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.to_json_file(str(folder / "config.json"))

    _write_json(folder / "preprocessor_config.json", {
        "do_normalize": True,
        "feature_extractor_type": "Wav2Vec2FeatureExtractor",
        "feature_size": 1,
        "padding_side": "right",
        "padding_value": 0.0,
        "processor_class": "Wav2Vec2Processor",
        "return_attention_mask": True,
        "sampling_rate": 16000,
    })
    _write_json(folder / "vocab.json", {token: i for i, token in enumerate(WAV2VEC_VOCAB)})
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    _write_json(folder / "tokenizer_config.json", {
        **special,
        "do_lower_case": False,
        "word_delimiter_token": "|",
        "processor_class": "Wav2Vec2Processor",
        "tokenizer_class": "Wav2Vec2CTCTokenizer",
    })
    _write_json(folder / "special_tokens_map.json", special)


# --- files -------------------------------------------------------------------------------------------

def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True) + "\n",
                    encoding="utf-8")


def _check_target(out_dir: Path) -> None:
    # Overwriting is for rebuilding a tiny checkpoint. Refuse anything else that has files in it: a
    # mistyped path must not replace the config.json or the weights of a real 50 GB checkpoint.
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} exists and is not a folder")
    foreign = [p.name for p in out_dir.iterdir() if p.name != STAGING_DIR]
    if foreign and not (out_dir / MARKER).is_file():
        raise FileExistsError(f"{out_dir} is not empty and holds no {MARKER}: refusing to overwrite it")


def _move_into_place(staging: Path, out_dir: Path) -> None:
    """Replace the files one by one (os.replace is atomic); the marker goes last.

    Staging inside `out_dir` keeps everything on one filesystem, so a build that fails before this
    point leaves the previous checkpoint untouched.
    """
    files = sorted(p for p in staging.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == MARKER)
    for source in files:
        # safetensors creates its files owner-only (0600); a checkpoint built as root must stay
        # readable by a worker running as another user.
        source.chmod(0o644)
        target = out_dir / source.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
    shutil.rmtree(staging)


def write_all(folder: Path, official: types.SimpleNamespace, seed: int, sizes: Sizes = Sizes()) -> None:
    """Every file of the checkpoint into `folder`, the marker included."""
    dit_config, dit_state = build_dit(official, seed, sizes.dit_config())
    write_dit(folder, dit_config, dit_state)

    num_tokens = write_tokenizer(folder / "google" / "umt5-xxl")
    torch.save(build_t5(official, num_tokens, seed), folder / "models_t5_umt5-xxl-enc-bf16.pth")
    torch.save(build_vae(official, seed), folder / "Wan2.1_VAE.pth")
    write_wav2vec2(folder / "wav2vec2-large-xlsr-53-english", seed, sizes.wav2vec_config())

    _write_json(folder / MARKER, {
        "random_weights": True,
        "note": "Tiny random-weight stand-in for Wan-AI/Wan2.2-S2V-14B, written by "
                "builder/make_tiny_checkpoint.py for tests: the videos it makes are noise.",
        "seed": seed,
        "max_area": MAX_AREA,
    })


def make_tiny_checkpoint(out_dir: Path, seed: int = 0, sizes: Sizes = Sizes()) -> Path:
    """Write the tiny checkpoint into `out_dir` (created or overwritten) and return that folder.
    `sizes` changes its widths (COMFY_SIZES: the ones the ComfyUI-layout tests need)."""
    out_dir = Path(out_dir)
    _check_target(out_dir)
    start = time.perf_counter()
    official = import_official_classes()

    staging = out_dir / STAGING_DIR
    if staging.exists():
        shutil.rmtree(staging)  # left over from an interrupted build
    staging.mkdir(parents=True)
    try:
        write_all(staging, official, seed, sizes)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _move_into_place(staging, out_dir)
    logger.info("tiny checkpoint (seed %d) written to %s in %.1f s", seed, out_dir,
                time.perf_counter() - start)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder to write (created, or a previous tiny one)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(make_tiny_checkpoint(args.out_dir, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
