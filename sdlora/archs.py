"""Full-size architectures of SD 1.5, SD 2.1 and SDXL, built without weights (for module names and shapes).

The configurations are the published facts of these models. Building on the meta device costs no
memory, so a LoRA can be checked or converted against the real module layout without any download.
"""

from __future__ import annotations

import functools

import torch

CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
OPENCLIP_H = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                  num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512)
OPENCLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                     num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)

_SD_BLOCKS = dict(
    layers_per_block=2, block_out_channels=(320, 640, 1280, 1280), in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
UNETS = {
    "sd1": dict(_SD_BLOCKS, sample_size=64, cross_attention_dim=768, attention_head_dim=8),
    "sd2": dict(_SD_BLOCKS, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                use_linear_projection=True),
    "sdxl": dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
                 cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816),
}
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              layers_per_block=2, norm_num_groups=32, sample_size=512)  # SD 1.x, 2.x and SDXL share this shape
TEXT_ENCODERS = {"sd1": [CLIP_L], "sd2": [OPENCLIP_H], "sdxl": [CLIP_L, OPENCLIP_BIGG]}
TITLES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}


@functools.cache
def meta_models(family: str) -> dict[str, torch.nn.Module]:
    """{'unet': ..., 'text_encoder': ..., ['text_encoder_2': ...]} of a family, with no weights allocated."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with init_empty_weights():
        out = {"unet": UNet2DConditionModel(**UNETS[family])}
        for i, cfg in enumerate(TEXT_ENCODERS[family]):
            cls = CLIPTextModelWithProjection if (family == "sdxl" and i == 1) else CLIPTextModel
            out["text_encoder" if i == 0 else "text_encoder_2"] = cls(CLIPTextConfig(**cfg))
    return out
