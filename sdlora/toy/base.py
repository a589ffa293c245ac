"""The toy base: its tokenizer, component configurations, and loading of the shipped weights.

The classes are Stable Diffusion 1.x's (AutoencoderKL, CLIPTextModel, UNet2DConditionModel), so training
and generation on `--base toy` run through exactly the code paths a real model uses.
"""

from __future__ import annotations

import json
from pathlib import Path

from .render import BACKGROUNDS, COLOURS, SHAPES, STYLES

WEIGHTS = Path(__file__).resolve().parent / "weights"
WORDS = ["a", "on", "background", ",", "style", "of", "and", "with", *COLOURS, *SHAPES, *BACKGROUNDS,
         *STYLES.values(), "striped", "outlined", "checked", "dotted"]
MAX_TOKENS = 24

VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64),
                  down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                  layers_per_block=1, norm_num_groups=16, sample_size=32)
UNET_CONFIG = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128),
                   down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                   cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        prediction_type="epsilon", timestep_spacing="leading", steps_offset=1)


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: repeatedly merge the best-ranked adjacent pair."""
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:], strict=False))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2:]
    return pieces


def tokenizer_files() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP BPE vocabulary in which every toy word is one token (characters remain for anything else).
    Merges needed by a word are appended after all earlier ones, so they never fire inside an earlier word
    (whose own next merge always ranks higher)."""
    from ..vocab import byte_vocab

    vocab = byte_vocab()
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in WORDS:
        while len(pieces := _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
    return vocab, merges


def toy_tokenizer():
    from transformers import CLIPTokenizer

    vocab, merges = tokenizer_files()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)


def text_config():
    from transformers import CLIPTextConfig

    vocab, _ = tokenizer_files()
    return CLIPTextConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=64,
                          hidden_act="quick_gelu", bos_token_id=vocab["<|startoftext|>"],
                          eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])


def build_components(seed: int = 0):
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    return (AutoencoderKL(**VAE_CONFIG), CLIPTextModel(text_config()), UNet2DConditionModel(**UNET_CONFIG),
            toy_tokenizer(), EulerDiscreteScheduler(**SCHEDULER_CONFIG))


def load_toy():
    """The shipped pretrained toy base: (unet, vae, [text encoder], [tokenizer], scheduler), as a Base takes them."""
    import torch

    from ..errors import ModelError
    from ..safefiles import read_safetensors

    missing = [n for n in ("vae", "text_encoder", "unet") if not (WEIGHTS / f"{n}.safetensors").is_file()]
    if missing:
        raise ModelError(f"the toy base's weights are missing ({', '.join(missing)} in {WEIGHTS}); "
                         "make them with `python -m sdlora.toy.pretrain`")
    with torch.random.fork_rng(devices=[]):  # building seeds torch's generator; leave the caller's as it was
        vae, te, unet, tok, sched = build_components()
    for name, module in (("vae", vae), ("text_encoder", te), ("unet", unet)):
        tensors, meta = read_safetensors(WEIGHTS / f"{name}.safetensors")
        module.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()})
        module.eval()
        if name == "vae":
            vae.register_to_config(scaling_factor=float(meta["scaling_factor"]))
    return unet, vae, [te], [tok], sched


def info() -> dict:
    path = WEIGHTS / "pretrain.json"
    return json.loads(path.read_text()) if path.is_file() else {}
