"""SigLIP So400m/14 vision tower, as PaliGemma uses it (no pooling head, no cls token).

Module names follow the checkpoint keys `vision_tower.vision_model.{embeddings,encoder,post_layernorm}`.
Meta-safe: `__init__` creates parameters only. There is no `position_ids` buffer: positions are
`0..N-1` at native resolution, so the position table is added whole (docs/model.md, "Forward pass").

Axes: B batch, N patches (= image tokens), D width (1152), H heads (16), K head dim (72).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import defaults
from ..formats.dense import Embedding, Linear
from .config import SiglipConfig


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = Embedding(cfg.num_patches, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        w = self.patch_embedding.weight
        x = self.patch_embedding(pixel_values.to(w.dtype))  # (B, D, S/p, S/p), "valid" patches
        x = x.flatten(2).transpose(1, 2)  # (B, N, D), row-major patch order
        positions = self.position_embedding.weight.shape[0]
        if x.shape[1] != positions:
            raise ValueError(f"image gives {x.shape[1]} patches but the model has {positions} positions")
        return x + self.position_embedding.weight


class SiglipAttention(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        d = cfg.hidden_size
        self.q_proj, self.k_proj, self.v_proj = Linear(d, d), Linear(d, d), Linear(d, d)
        self.out_proj = Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (
            p(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        # Full bidirectional attention. SDPA (transformers' default for SigLIP too): 0.24 s vs 0.34 s for the
        # 224 tower on 2 cores in bf16, since the (B, H, N, N) weights never round-trip through float32. Queries
        # ATTENTION_QUERY_CHUNK at a time: an 896-px image's 4,096 patches would hold H x 4,096 x 4,096 scores.
        c = defaults.ATTENTION_QUERY_CHUNK
        out = torch.cat([F.scaled_dot_product_attention(q[:, :, i : i + c], k, v, scale=self.scale)
                         for i in range(0, n, c)], 2)  # (B, H, N, K)  # fmt: skip
        out = out.transpose(1, 2).reshape(b, n, -1)  # (B, N, D)
        return self.out_proj(out)


class SiglipMLP(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # gelu_pytorch_tanh (docs/model.md, "Forward pass"), in place on fc1's fresh output
        return self.fc2(torch.ops.aten.gelu_(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class SiglipVisionTransformer(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.post_layernorm(self.encoder(self.embeddings(pixel_values)))  # (B, N, D)


class SiglipVisionModel(nn.Module):
    """`vision_tower`: holds `vision_model`, as the Hub keys do."""

    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.vision_model = SiglipVisionTransformer(cfg)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values)
