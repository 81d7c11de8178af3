"""CFFM in PyTorch, transcribed op by op from SPEC.md sections 3-4: the benchmark's stand-in for the official code.

The issue's reference figures were measured on one machine; on any other machine the benchmark had only an estimate
of the official code's time (scaled by a PyTorch peer). This module makes the same computation in PyTorch, the way
the SPEC describes the official code doing it, so that it can be timed next to ours on the same machine:

* the MiT backbone (SPEC 3) as NCHW convolutions, token LayerNorms and ``q @ k^T`` attention;
* the all-MLP decoder (SPEC 4.2) with ``F.interpolate``, the 1x1 ``linear_fuse`` conv + BatchNorm + ReLU and the
  per-frame ``linear_pred`` for every frame (the official eval forward computes them before its early exit);
* the CFFM blocks (SPEC 4.3) with ``torch.roll``, window partitions, ``valid_ind_rolled``, ``nn.Linear`` window
  pooling, ``F.unfold`` key windows with masks made by unfolding ones, and the relative-position bias gathered from
  the index buffers.

Module and parameter names are the official state-dict names, so the official state dict loads with
``strict=True`` (:func:`load_official_state_dict`; tests check the fixture's outputs to its tolerance). Eval only:
no dropout, BatchNorm with its running statistics. The output is the test-mode head's 1/4-resolution logits of the
target frame (SPEC 4.2 step 8), what our clip-mode benchmark case times. It is clean-room code written from the
SPEC, not the official code: where the official code does more work (the segmentor's final resize, mmseg's
wrappers, debug prints) this transcription is, if anything, faster than the official code.

Requires ``torch`` (the optional ``torch`` / ``test`` extras).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cffm_jax.models.cffm_attention import index_buffers

ROLL_SHIFTS = ((-3, -3), (-3, 3), (3, -3), (3, 3))  # SPEC 4.3 step 4b, expand_size 3
# (kernel, stride) of the key unfolds: the pooled target (4c), then reference frames 0, 1, 2 (4d).
UNFOLDS = ((5, 1), (7, 1), (5, 2), (3, 3))

# ---------------------------------------------------------------------------------------------------------
# MiT backbone (SPEC 3).


class OverlapPatchEmbed(nn.Module):
    def __init__(self, in_channels: int, dim: int, kernel: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel, stride, kernel // 2)
        self.norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        _, _, h, w = x.shape
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class EfficientAttention(nn.Module):
    def __init__(self, dim: int, heads: int, sr_ratio: int):
        super().__init__()
        self.heads, self.sr_ratio = heads, sr_ratio
        self.scale = (dim // heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        d = c // self.heads
        q = self.q(x).reshape(b, n, self.heads, d).permute(0, 2, 1, 3)
        if self.sr_ratio > 1:
            x = self.sr(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)
            x = self.norm(x)
        kv = self.kv(x).reshape(b, -1, 2, self.heads, d).permute(2, 0, 3, 1, 4)  # k: the first c outputs
        attn = ((q @ kv[0].transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ kv[1]).transpose(1, 2).reshape(b, n, c))


class DWConv(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, _, c = x.shape
        return self.dwconv(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)


class MixFFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return self.fc2(F.gelu(self.dwconv(self.fc1(x), h, w)))


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: in training, each sample's residual branch is dropped with probability ``rate``."""
    if not training or rate == 0.0:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1.0 - rate)
    return x * keep / (1.0 - rate)


class MiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, sr_ratio: int, mlp_ratio: int, drop_path_rate: float = 0.0):
        super().__init__()
        self.drop_path_rate = drop_path_rate
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = EfficientAttention(dim, heads, sr_ratio)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MixFFN(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x), h, w), self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x), h, w), self.drop_path_rate, self.training)


class MixTransformer(nn.Module):
    """Stages ``patch_embed{s}`` / ``block{s}`` / ``norm{s}``; returns the four NCHW stage outputs."""

    def __init__(self, embed_dims, num_heads, depths, sr_ratios, mlp_ratios, drop_path_rate: float = 0.1):
        super().__init__()
        in_channels = 3
        rates = np.linspace(0.0, drop_path_rate, sum(depths)).tolist()  # over all blocks in order (SPEC 3)
        for s in range(4):
            kernel, stride = (7, 4) if s == 0 else (3, 2)
            dim = embed_dims[s]
            setattr(self, f"patch_embed{s + 1}", OverlapPatchEmbed(in_channels, dim, kernel, stride))
            blocks = [MiTBlock(dim, num_heads[s], sr_ratios[s], mlp_ratios[s], rates.pop(0)) for _ in range(depths[s])]
            setattr(self, f"block{s + 1}", nn.ModuleList(blocks))
            setattr(self, f"norm{s + 1}", nn.LayerNorm(dim, eps=1e-6))
            in_channels = dim

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for s in range(1, 5):
            x, h, w = getattr(self, f"patch_embed{s}")(x)
            for block in getattr(self, f"block{s}"):
                x = block(x, h, w)
            x = getattr(self, f"norm{s}")(x)
            x = x.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()
            outs.append(x)
        return outs


# ---------------------------------------------------------------------------------------------------------
# CFFM transformer (SPEC 4.3), channels-last maps (B, H, W, C).


def window_partition(x: torch.Tensor, ws: int = 7) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, ws * ws, C): windows batch-major, then row-major; positions row-major."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def unfold_keys(x: torch.Tensor, kernel: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, gh, gw, C) -> keys (B * nW, kernel^2, C) of a zero-padded unfold, and its -100 mask (nW, kernel^2)."""
    b, _, _, c = x.shape
    cols = F.unfold(x.permute(0, 3, 1, 2), kernel, padding=kernel // 2, stride=stride)
    keys = cols.reshape(b, c, kernel * kernel, -1).permute(0, 3, 2, 1).reshape(-1, kernel * kernel, c)
    ones = F.unfold(x.new_ones(1, 1, *x.shape[1:3]), kernel, padding=kernel // 2, stride=stride)
    mask = torch.zeros_like(ones[0].T).masked_fill(ones[0].T == 0, -100.0)
    return keys, mask


def window_pool(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """``linear`` = ``nn.Linear(ws^2, 1)`` over the row-major positions of non-overlapping ws x ws windows."""
    b, h, w, c = x.shape
    ws = math.isqrt(linear.in_features)
    pooled = linear(window_partition(x, ws).transpose(1, 2))  # (B * nW, C, 1)
    return pooled.reshape(b, h // ws, w // ws, c)


class WindowAttention(nn.Module):
    """``WindowAttention3d3`` (SPEC 4.3 steps 3-5). The bias tables start at zero (speed does not depend on them);
    real values come with :func:`load_official_state_dict`. The index buffers are recomputed, as the SPEC defines
    them (the official state dict's copies load over them)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        buffers = index_buffers()
        n_ring = len(buffers["valid_ind_rolled"])
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(169, heads))
        self.relative_position_bias_table_to_neighbors = nn.Parameter(torch.zeros(1, heads, 49, n_ring))
        self.relative_position_bias_table_to_windows = nn.ParameterList([nn.Parameter(torch.zeros(heads, 121))])
        self.relative_position_bias_table_to_windows_clips = nn.ParameterList(
            [nn.Parameter(torch.zeros(heads, (6 + kk) ** 2)) for kk in (7, 5, 3)]
        )
        for name, value in buffers.items():
            self.register_buffer(name, torch.from_numpy(value))

    def bias(self) -> torch.Tensor:
        """(heads, 49, 289) relative-position bias in key order."""
        parts = [
            self.relative_position_bias_table[self.relative_position_index].permute(2, 0, 1),
            self.relative_position_bias_table_to_neighbors[0],
            self.relative_position_bias_table_to_windows[0][:, self.relative_position_index_0],
        ]
        for j, table in enumerate(self.relative_position_bias_table_to_windows_clips):
            parts.append(table[:, getattr(self, f"relative_position_index_clips_{j}")])
        return torch.cat(parts, dim=-1)

    def forward(self, y: torch.Tensor, pooled: Sequence[torch.Tensor]) -> torch.Tensor:
        """y: normed, padded target (B, Hp, Wp, E); pooled: target then reference maps -> (B, Hp, Wp, E)."""
        b, hp, wp, e = y.shape
        d = e // self.heads
        q, k, v = self.qkv(y).chunk(3, dim=-1)
        keys, values = [window_partition(k)], [window_partition(v)]
        for src, out in ((k, keys), (v, values)):
            rolled = torch.cat([window_partition(torch.roll(src, s, dims=(1, 2))) for s in ROLL_SHIFTS], dim=1)
            out.append(rolled[:, self.valid_ind_rolled])
        n_win = keys[0].shape[0] // b
        masks = [y.new_zeros(n_win, 49 + self.valid_ind_rolled.numel())]
        for p, (kernel, stride) in zip(pooled, UNFOLDS, strict=True):
            _, pk, pv = self.qkv(p).chunk(3, dim=-1)
            (kk, mask), (vv, _) = unfold_keys(pk, kernel, stride), unfold_keys(pv, kernel, stride)
            keys.append(kk), values.append(vv), masks.append(mask)
        keys, values, mask = torch.cat(keys, 1), torch.cat(values, 1), torch.cat(masks, 1)

        def heads(m: torch.Tensor) -> torch.Tensor:  # (B * nW, n, E) -> (B * nW, heads, n, d)
            return m.reshape(m.shape[0], m.shape[1], self.heads, d).transpose(1, 2)

        scores = (heads(window_partition(q)) * d**-0.5) @ heads(keys).transpose(-2, -1) + self.bias()
        scores = scores + mask.repeat(b, 1)[:, None, None, :]
        out = (scores.softmax(dim=-1) @ heads(values)).transpose(1, 2).reshape(-1, 49, e)
        out = self.proj(out)
        return out.reshape(b, hp // 7, wp // 7, 7, 7, e).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, e)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class CFFMBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.pool_layers = nn.ModuleList([nn.Linear(49, 1)])
        self.pool_layers_clips = nn.ModuleList([nn.Linear((7 // level) ** 2, 1) for level in (1, 2, 3)])
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = WindowAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, h, w, E) -> the same with the target frame (T - 1) enhanced."""
        _, t, h, w, _ = x.shape
        hp, wp = 7 * math.ceil(h / 7), 7 * math.ceil(w / 7)
        xn = F.pad(self.norm1(x), (0, 0, 0, wp - w, 0, hp - h))
        y = xn[:, -1]
        pooled = [window_pool(y, self.pool_layers[0])]
        for j, pool in enumerate(self.pool_layers_clips):
            level, ws = j + 1, math.isqrt(pool.in_features)
            size = (level * hp // 7 * ws, level * wp // 7 * ws)
            ref = xn[:, j]
            if tuple(ref.shape[1:3]) != size:
                ref = F.interpolate(ref.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False)
                ref = ref.permute(0, 2, 3, 1)
            pooled.append(window_pool(ref, pool))
        z = x[:, -1] + self.attn(y, pooled)[:, :h, :w]
        z = z + self.mlp(self.norm2(z))
        return torch.cat([x[:, :-1], z[:, None]], dim=1)


class DecoderFocal(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int):
        super().__init__()
        self.blocks = nn.ModuleList([CFFMBlock(dim, heads) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, E, h, w) -> (B, T, E, h, w)."""
        x = x.permute(0, 1, 3, 4, 2)
        for block in self.blocks:
            x = block(x)
        return x.permute(0, 1, 4, 2, 3)


# ---------------------------------------------------------------------------------------------------------
# Head and segmentor (SPEC 4.2, 7).


class TokenLinear(nn.Module):
    """The decoder's per-pixel ``MLP``: flatten to tokens, ``proj``."""

    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(in_channels, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.flatten(2).transpose(1, 2))


class ConvBNReLU(nn.Module):
    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, dim, 1, bias=False)
        self.bn = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class CFFMHead(nn.Module):
    def __init__(self, in_channels: Sequence[int], dim: int, depth: int, heads: int, num_classes: int):
        super().__init__()
        for s, c in enumerate(in_channels, start=1):
            setattr(self, f"linear_c{s}", TokenLinear(c, dim))
        self.linear_fuse = ConvBNReLU(4 * dim, dim)
        self.linear_pred = nn.Conv2d(dim, num_classes, 1)
        self.linear_pred2 = nn.Conv2d(2 * dim, num_classes, 1)
        self.decoder_focal = DecoderFocal(dim, depth, heads)
        self.dropout = nn.Dropout2d(0.1)  # one module before both classifiers (identity in eval)

    def forward(self, feats: Sequence[torch.Tensor], batch: int, num_frames: int) -> torch.Tensor:
        """Stage outputs of all B*T frames -> in eval the target's 1/4-resolution logits (B, K, h, w); in training
        the per-frame logits and the target's, (B, T + 1, K, h, w)."""
        h, w = feats[0].shape[-2:]
        parts = []
        for s in (4, 3, 2, 1):
            c = feats[s - 1]
            x = getattr(self, f"linear_c{s}")(c).permute(0, 2, 1).reshape(c.shape[0], -1, *c.shape[-2:])
            if s != 1:
                x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
            parts.append(x)
        fused = self.linear_fuse(torch.cat(parts, dim=1))
        x = self.linear_pred(self.dropout(fused))  # every frame's logits (the official eval forward computes them too)
        h8, w8 = int(h / 2), int(w / 2)
        f = F.interpolate(fused, size=(h8, w8), mode="bilinear", align_corners=False)
        f = f.reshape(batch, num_frames, -1, h8, w8)
        g = self.decoder_focal(f)
        x2 = self.linear_pred2(self.dropout(torch.cat([f[:, -1], g[:, -1]], dim=1)))
        x2 = F.interpolate(x2, size=(h, w), mode="bilinear", align_corners=False)
        if not self.training:
            return x2
        return torch.cat([x.reshape(batch, num_frames, *x.shape[1:]), x2[:, None]], dim=1)


class CFFM(nn.Module):
    """``backbone`` + ``decode_head``; ``forward(clip (B, T, 3, H, W))`` -> in eval the target's logits
    (B, K, H/4, W/4), in training (``.train()``) all T + 1 logit maps (B, T + 1, K, H/4, W/4)."""

    def __init__(
        self, embed_dims, num_heads, depths, sr_ratios, mlp_ratios, dim, depth, heads, num_classes, drop_path_rate=0.1
    ):
        super().__init__()
        self.backbone = MixTransformer(embed_dims, num_heads, depths, sr_ratios, mlp_ratios, drop_path_rate)
        self.decode_head = CFFMHead(embed_dims, dim, depth, heads, num_classes)

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        b, t = clip.shape[:2]
        return self.decode_head(self.backbone(clip.flatten(0, 1)), b, t)


def from_config(config) -> CFFM:
    """The transcription of a ``cffm_jax.models.model_config`` CFFM config (arch 'cffm'), in eval mode."""
    if config.arch != "cffm":
        raise ValueError(f"the PyTorch transcription covers CFFM only, not {config.name!r} (arch {config.arch!r})")
    return CFFM(
        config.embed_dims,
        config.num_heads,
        config.depths,
        config.sr_ratios,
        config.mlp_ratios,
        config.decoder_embed_dim,
        config.decoder_depth,
        config.decoder_num_heads,
        config.num_classes,
        config.drop_path_rate,
    ).eval()


def load_official_state_dict(model: CFFM, state_dict: Mapping[str, np.ndarray]) -> None:
    """Loads an official CFFM state dict (numpy arrays) with ``strict=True``; the unused ``conv_seg`` is dropped."""
    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items() if ".conv_seg." not in k}
    model.load_state_dict(tensors, strict=True)


# ---------------------------------------------------------------------------------------------------------
# Training (SPEC 8-9).


def seg_loss(outputs: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """``loss_seg`` of SPEC 8: training outputs (B, T + 1, K, h, w), labels (B, T, H, W) (integer).

    0.5 x the cross entropy of the T per-frame maps against all T labels + 1.0 x that of the target map against the
    last frame's labels, each map bilinearly resized to the label size; each mean over all pixels, ignored ones
    included (they add 0).
    """
    b, t = labels.shape[:2]
    size = labels.shape[-2:]

    def ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum") / target.numel()

    frames = ce(outputs[:, :t].flatten(0, 1), labels.flatten(0, 1).long())
    return 0.5 * frames + ce(outputs[:, t], labels[:, -1].long())


def official_param_groups(model: CFFM, base_lr: float, weight_decay: float, head_lr_mult: float) -> list[dict]:
    """AdamW parameter groups of SPEC 9: ``decode_head.*`` at ``head_lr_mult`` x the learning rate with full weight
    decay; backbone parameters whose name contains 'norm' without weight decay; the rest as given."""
    groups = {"head": [], "norm": [], "other": []}
    for name, param in model.named_parameters():
        key = "head" if "head" in name else "norm" if "norm" in name else "other"
        groups[key].append(param)
    return [
        {"params": groups["head"], "lr": base_lr * head_lr_mult, "weight_decay": weight_decay},
        {"params": groups["norm"], "lr": base_lr, "weight_decay": 0.0},
        {"params": groups["other"], "lr": base_lr, "weight_decay": weight_decay},
    ]


def make_train_step(model: CFFM, base_lr: float = 6e-5, weight_decay: float = 0.01, head_lr_mult: float = 10.0):
    """One official training step as a function ``step(clips (B, T, 3, H, W), labels (B, T, H, W)) -> loss``:
    forward in training mode (dropout, drop-path, BatchNorm batch statistics), ``seg_loss``, backward, AdamW
    (betas (0.9, 0.999), eps 1e-8) over :func:`official_param_groups`. The poly schedule's learning rate does not
    change the work of a step and is left out. The model is left in training mode."""
    groups = official_param_groups(model, base_lr, weight_decay, head_lr_mult)
    optimizer = torch.optim.AdamW(groups, lr=base_lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)

    def step(clips: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss = seg_loss(model(clips), labels)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step
