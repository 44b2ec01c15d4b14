"""The built-in models: real StableDiffusionPipelines with random weights, no download.

`tiny`: small random weights.

Every component is the genuine diffusers/transformers class (UNet2DConditionModel,
AutoencoderKL, CLIPTextModel, CLIPTokenizer, a scheduler), only shrunk, and the
weights are drawn from a fixed seed, so every process builds the same model with
no download. Its images are noise-like, but its code path, step callbacks,
seeding and PNG output are those of a full-size model: it is what tests, CI and
`make demo` run. The VAE downsamples by 8 like Stable Diffusion's.

`sd15-random`: the full-size Stable Diffusion 1.5 architecture (860M-parameter
UNet, its VAE and CLIP ViT-L/14 text encoder) with random weights, built on the
device in bf16 (float32 on CPU). A denoising step costs what it costs with the
real weights, so GPU benchmarks can run it offline; its images are meaningless.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

TINY_MODEL = "tiny"
SD15_RANDOM_MODEL = "sd15-random"
_WEIGHTS_SEED = 0


def _byte_level_alphabet() -> list[str]:
    """GPT-2/CLIP's printable stand-in for each of the 256 byte values."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def tiny_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP tokenizer with no merges: every byte is a token."""
    alphabet = _byte_level_alphabet()
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), "<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build_tiny_pipeline() -> Any:
    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_WEIGHTS_SEED)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_attention_heads=4,
                num_hidden_layers=2,
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=16,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=(16, 16, 16, 16),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=64,
        )
    return _assemble(vae, text_encoder, tokenizer, unet)


def build_sd15_random_pipeline(device: str = "cpu") -> Any:
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    tokenizer = tiny_tokenizer()  # token ids only index the (full-size) embedding table
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(_WEIGHTS_SEED)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=768,
                intermediate_size=3072,
                num_attention_heads=12,
                num_hidden_layers=12,
                max_position_embeddings=77,
                hidden_act="quick_gelu",
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # SD 1.x
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
        )
    modules: list[Any] = [vae, text_encoder, unet]
    if dtype != torch.float32:
        vae, text_encoder, unet = (module.to(dtype) for module in modules)
    return _assemble(vae, text_encoder, tokenizer, unet)


def _assemble(vae: Any, text_encoder: Any, tokenizer: Any, unet: Any) -> Any:
    """A StableDiffusionPipeline over these modules, with SD 1.5's Euler schedule."""
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)  # type: ignore[attr-defined]
    return pipeline
