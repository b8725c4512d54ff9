"""A second small flow-matching teacher, on data unlike digits: procedural RGB scenes with a text-like prompt.

Data: 3x16x16 RGB scenes in [-1, 1], drawn with numpy/torch only: a vertical background colour gradient
and one sharp-edged shape (disc, square, ring or stripe) of one colour, at a random position and size.
The prompt is three token ids, (colour word, shape word, background word), from one small vocabulary
(`VOCAB`, id 0 is padding): it fixes what the scene shows, while position, size, a stripe's orientation
and small colour jitters stay random. Every prompt's distribution is thus multi-modal (the shape may be
anywhere) and its images have hard edges: few-step Euler sampling, which averages the modes, blurs them.

The teacher (`ScenesFlowNet`) is Flux-flavoured like the digits one: AdaLN-modulated residual MLP blocks on
the flattened image, conditioned on the timestep plus the mean of the prompt's token embeddings. A global
MLP of width 256 alone could only output velocities in a 256-dimensional subspace of the 768 pixels
(its last Linear), so the noise outside that subspace would never be removed; a per-patch head (2x2
patches, each reading the 4x4 window of pixels around it and its own slice of the global features, through
two small AdaLN MLP blocks shared by all patches) makes the output full rank and denoises locally, at a
fraction of a patch transformer's cost on a CPU. Every layer but the embeddings and the (affine-free) norms is
an nn.Linear, so a LoRA reaches all of it.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import trange

from shortcut_core import sample_euler, shifted_schedule

from .digits import ModulatedBlock, cached_weights, default_cache_dir, frechet_distance, frozen, timestep_embedding

CACHE_VERSION = "scenes-teacher-v1"
SIZE = 16
CHANNELS = 3
EDGE_WEIGHT = 2.0  # scene_features: scales the edge part to about the pooled pixels' spread

# ---------------------------------------------------------------------- the vocabulary
COLOURS = {  # RGB in [0, 1]
    "red": (0.90, 0.10, 0.10), "orange": (1.00, 0.55, 0.00), "yellow": (0.95, 0.90, 0.10),
    "green": (0.10, 0.75, 0.20), "cyan": (0.10, 0.85, 0.90), "blue": (0.15, 0.25, 0.95),
    "magenta": (0.85, 0.10, 0.80), "white": (0.97, 0.97, 0.97),
}
SHAPES = ("disc", "square", "ring", "stripe")
BACKGROUNDS = {  # (top, bottom) RGB in [0, 1]
    "dawn": ((0.95, 0.65, 0.45), (0.45, 0.30, 0.55)),
    "night": ((0.02, 0.02, 0.12), (0.15, 0.10, 0.30)),
    "sea": ((0.55, 0.80, 0.95), (0.05, 0.25, 0.50)),
    "forest": ((0.35, 0.50, 0.25), (0.05, 0.20, 0.08)),
}
PAD = 0
VOCAB: tuple[str, ...] = ("<pad>", *COLOURS, *SHAPES, *BACKGROUNDS)
COLOUR_IDS = tuple(range(1, 1 + len(COLOURS)))
SHAPE_IDS = tuple(range(COLOUR_IDS[-1] + 1, COLOUR_IDS[-1] + 1 + len(SHAPES)))
BACKGROUND_IDS = tuple(range(SHAPE_IDS[-1] + 1, SHAPE_IDS[-1] + 1 + len(BACKGROUNDS)))
PROMPT_LENGTH = 3  # (colour, shape, background)

_COLOUR_RGB = torch.tensor(list(COLOURS.values()))
_BACKGROUND_RGB = torch.tensor(list(BACKGROUNDS.values()))  # (4, 2, 3)


def prompt_text(tokens: torch.Tensor | tuple[int, ...]) -> str:
    """The words of one prompt, e.g. 'red disc, sea'."""
    words = [VOCAB[int(i)] for i in tokens if int(i) != PAD]
    return f"{words[0]} {words[1]}, {words[2]}" if len(words) == 3 else " ".join(words)


def draw_prompts(count: int, seed: int | torch.Generator) -> torch.Tensor:
    """`count` prompts, each word uniform and independent: LongTensor (count, 3) of (colour, shape, background)
    ids, the distribution make_scenes draws from (4 x 8 x 4 = 128 prompts)."""
    g = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    colour = torch.randint(len(COLOURS), (count,), generator=g) + COLOUR_IDS[0]
    shape = torch.randint(len(SHAPES), (count,), generator=g) + SHAPE_IDS[0]
    background = torch.randint(len(BACKGROUNDS), (count,), generator=g) + BACKGROUND_IDS[0]
    return torch.stack([colour, shape, background], dim=1)


def render_scenes(tokens: torch.Tensor, seed: int | torch.Generator) -> torch.Tensor:
    """One scene per prompt (LongTensor (N, 3) of (colour, shape, background) ids): float32 (N, 3, 16, 16) in
    [-1, 1]. Random per scene: the shape's centre and size (fully inside the image; a stripe spans it, across or
    down), colour jitter of +-0.06 per channel and a background brightness offset of +-0.05."""
    g = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    n = tokens.shape[0]
    colour, shape, background = (tokens[:, 0] - COLOUR_IDS[0], tokens[:, 1] - SHAPE_IDS[0],
                                 tokens[:, 2] - BACKGROUND_IDS[0])
    if n and not (colour.min() >= 0 and colour.max() < len(COLOURS) and shape.min() >= 0
                  and shape.max() < len(SHAPES) and background.min() >= 0 and background.max() < len(BACKGROUNDS)):
        raise ValueError("scene prompts are (colour, shape, background) ids of VOCAB")

    def uniform(lo: float | torch.Tensor, hi: float | torch.Tensor) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=g)

    # every draw happens for every scene (whatever its shape), so a scene depends on its index and seed only
    radius = uniform(2.5, 4.5)          # disc
    half = uniform(2.0, 4.0)            # square: half the side
    outer = uniform(4.0, 6.0)           # ring: outer radius ...
    thickness = uniform(1.3, 2.0)       # ... and width
    band = uniform(1.0, 2.0)            # stripe: half its width
    across = torch.rand(n, generator=g) < 0.5
    extent = torch.stack([radius, half, outer, band]).gather(0, shape[None])[0]
    cy, cx = uniform(extent, SIZE - extent), uniform(extent, SIZE - extent)
    colour_jitter = (torch.rand(n, 3, generator=g) - 0.5) * 0.12
    brightness = (torch.rand(n, generator=g) - 0.5) * 0.10

    centres = torch.arange(SIZE, dtype=torch.float32) + 0.5
    dy = centres.view(1, SIZE, 1) - cy.view(n, 1, 1)
    dx = centres.view(1, 1, SIZE) - cx.view(n, 1, 1)
    d2 = dy ** 2 + dx ** 2
    masks = torch.stack([
        d2 <= radius.view(n, 1, 1) ** 2,
        torch.maximum(dy.abs(), dx.abs()) <= half.view(n, 1, 1),
        (d2 <= outer.view(n, 1, 1) ** 2) & (d2 >= (outer - thickness).view(n, 1, 1) ** 2),
        torch.where(across.view(n, 1, 1), dy.abs().expand(n, SIZE, SIZE), dx.abs().expand(n, SIZE, SIZE))
        <= band.view(n, 1, 1),
    ], dim=1)  # (n, 4, 16, 16)
    mask = masks.gather(1, shape.view(n, 1, 1, 1).expand(n, 1, SIZE, SIZE)).float()  # (n, 1, 16, 16)

    top, bottom = _BACKGROUND_RGB[background, 0], _BACKGROUND_RGB[background, 1]  # (n, 3)
    ramp = (centres / SIZE).view(1, 1, SIZE, 1)
    sky = top.view(n, 3, 1, 1) * (1 - ramp) + bottom.view(n, 3, 1, 1) * ramp + brightness.view(n, 1, 1, 1)
    ink = (_COLOUR_RGB[colour] + colour_jitter).view(n, 3, 1, 1)
    image = (sky * (1 - mask) + ink * mask).clamp(0, 1)
    return image * 2 - 1


def make_scenes(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` scenes and their prompts from `seed`: (float32 (count, 3, 16, 16) in [-1, 1], LongTensor (count, 3)
    of (colour, shape, background) token ids; `prompt_text` reads one)."""
    g = torch.Generator().manual_seed(seed)
    tokens = draw_prompts(count, g)
    return render_scenes(tokens, g), tokens


# ---------------------------------------------------------------------- the network
class PatchBlock(nn.Module):
    """A DiT block on the patch tokens, narrow: AdaLN-modulated self-attention (when `heads`) across the patches,
    then a per-patch MLP, both modulated by a `cond_width` conditioning vector."""

    def __init__(self, width: int, cond_width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Linear(cond_width, (6 if heads else 3) * width)
        if heads:
            self.attn_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
            self.qkv = nn.Linear(width, 3 * width)
            self.proj = nn.Linear(width, width)
        self.mlp_in = nn.Linear(width, 4 * width)
        self.mlp_out = nn.Linear(4 * width, width)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        mod = self.modulation(F.silu(c)).unsqueeze(1).chunk(6 if self.heads else 3, dim=-1)
        if self.heads:
            shift, scale, gate = mod[3:]
            y = self.attn_norm(h) * (1 + scale) + shift
            b, n, w = y.shape
            q, k, v = self.qkv(y).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
            h = h + gate * self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, w))
        shift, scale, gate = mod[:3]
        y = self.norm(h) * (1 + scale) + shift
        return h + gate * self.mlp_out(F.gelu(self.mlp_in(y)))


@dataclass(frozen=True)
class ScenesNetConfig:
    width: int = 256          # the global MLP
    depth: int = 3
    patch: int = 2            # the per-patch head: (16 / patch)^2 patches of this size ...
    window: int = 4           # ... each reading the pixels of a window this wide around it (zero-padded)
    patch_width: int = 32     # ... with this width
    patch_depth: int = 2
    patch_heads: int = 2      # self-attention across the patches in each patch block (0: none)
    freq_dim: int = 64
    vocab: int = len(VOCAB)


class ScenesFlowNet(nn.Module):
    """v = net(x, t, tokens) for x of shape (B, 3, 16, 16) and tokens a LongTensor (B, L) of VOCAB ids (PAD = 0 is
    left out of the mean; tokens None: the unconditional velocity, an all-padding prompt)."""

    def __init__(self, cfg: ScenesNetConfig = ScenesNetConfig()):
        super().__init__()
        self.cfg = cfg
        w, pw, p = cfg.width, cfg.patch_width, cfg.patch
        self.grid = SIZE // p
        patches, patch_pixels = self.grid ** 2, CHANNELS * p * p
        if cfg.window < p or (cfg.window - p) % 2:
            raise ValueError("ScenesNetConfig.window: at least the patch size, wider by an even number of pixels")
        self.time_in = nn.Sequential(nn.Linear(cfg.freq_dim, w), nn.SiLU(), nn.Linear(w, w))
        self.token_embedding = nn.Embedding(cfg.vocab, w, padding_idx=PAD)
        self.prompt_in = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.x_in = nn.Linear(CHANNELS * SIZE * SIZE, w)
        self.blocks = nn.ModuleList(ModulatedBlock(w) for _ in range(cfg.depth))
        self.global_norm = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.to_patches = nn.Linear(w, patches * pw)        # global features, one width-pw vector per patch
        self.patch_in = nn.Linear(CHANNELS * cfg.window ** 2, pw)  # the pixels of each patch's window
        self.patch_blocks = nn.ModuleList(PatchBlock(pw, w, cfg.patch_heads) for _ in range(cfg.patch_depth))
        self.final_norm = nn.LayerNorm(pw, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Linear(w, 2 * pw)
        self.final = nn.Linear(pw, patch_pixels)
        nn.init.zeros_(self.final.weight)
        nn.init.zeros_(self.final.bias)

    def condition(self, t: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
        c = self.time_in(timestep_embedding(t, self.cfg.freq_dim))
        if tokens is not None:
            tokens = tokens.to(c.device).long()
            keep = (tokens != PAD).unsqueeze(-1).to(c.dtype)
            pooled = (self.token_embedding(tokens) * keep).sum(1) / keep.sum(1).clamp_min(1.0)
            c = c + self.prompt_in(pooled)
        return c

    def forward(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        b, p, g = x.shape[0], self.cfg.patch, self.grid
        c = self.condition(t, tokens)
        h = self.x_in(x.flatten(1))
        for block in self.blocks:
            h = block(h, c)
        windows = F.unfold(x, self.cfg.window, padding=(self.cfg.window - p) // 2, stride=p).transpose(1, 2)
        z = self.patch_in(windows) + self.to_patches(self.global_norm(h)).view(b, g * g, self.cfg.patch_width)
        for block in self.patch_blocks:
            z = block(z, c)
        shift, scale = self.final_modulation(F.silu(c)).unsqueeze(1).chunk(2, dim=-1)
        out = self.final(self.final_norm(z) * (1 + scale) + shift)
        return out.view(b, g, g, CHANNELS, p, p).permute(0, 3, 1, 4, 2, 5).reshape(x.shape)


def velocity_of_scenes(net: nn.Module):
    """The velocity callable for ShortcutTrainer and sample_euler; per-latent prompts come as extra_args
    {"tokens": LongTensor (N, L)}. One batch-first forward per call, so it keeps the batch whole."""
    def velocity(x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor | None = None, **_) -> torch.Tensor:
        return net(x, t, tokens)
    velocity.keeps_batch_whole = True
    return velocity


# ---------------------------------------------------------------------- pre-training, cached
@dataclass(frozen=True)
class ScenesTeacherTraining:
    steps: int = 3000
    batch_size: int = 128
    lr: float = 2e-3
    final_lr: float = 5e-5
    seed: int = 0


def pretrain_scenes_teacher(images: torch.Tensor, tokens: torch.Tensor, net_cfg: ScenesNetConfig = ScenesNetConfig(),
                            train: ScenesTeacherTraining = ScenesTeacherTraining(),
                            progress: bool = True) -> ScenesFlowNet:
    """Plain flow matching (uniform t, target noise - x0) on (scene, prompt) pairs, Adam with a cosine decay."""
    g = torch.Generator().manual_seed(train.seed)
    torch.manual_seed(train.seed)  # nn.Linear's default init draws from the global RNG
    net = ScenesFlowNet(net_cfg)
    opt = torch.optim.Adam(net.parameters(), lr=train.lr)
    n = images.shape[0]
    for step in trange(train.steps, disable=not progress, desc="pre-training the scenes teacher"):
        lr = train.final_lr + 0.5 * (train.lr - train.final_lr) * (1 + math.cos(math.pi * step / train.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        index = torch.randint(n, (train.batch_size,), generator=g)
        x0, prompt = images[index], tokens[index]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.rand(train.batch_size, generator=g)
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        loss = (net(x_t, t, prompt) - (noise - x0)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return frozen(net)


def _cache_key(images: torch.Tensor, tokens: torch.Tensor, net_cfg: ScenesNetConfig,
               train: ScenesTeacherTraining) -> str:
    blob = json.dumps({"v": CACHE_VERSION, "net": asdict(net_cfg), "train": asdict(train), "vocab": VOCAB,
                       "torch": torch.__version__.split("+")[0]}, sort_keys=True).encode()
    blob += hashlib.sha256(images.contiguous().numpy().tobytes()).digest()
    blob += hashlib.sha256(tokens.long().contiguous().numpy().tobytes()).digest()
    return hashlib.sha256(blob).hexdigest()[:16]


def load_or_pretrain_scenes_teacher(images: torch.Tensor, tokens: torch.Tensor, cache_dir: Path | None = None,
                                    progress: bool = True, net_cfg: ScenesNetConfig = ScenesNetConfig(),
                                    train: ScenesTeacherTraining = ScenesTeacherTraining()
                                    ) -> tuple[ScenesFlowNet, str]:
    """The teacher from the local cache (default ~/.cache/shortcut-flow) when one was trained on the same scenes and
    prompts with the same settings, else trained now and cached; (net, where it came from)."""
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    path = cache_dir / f"scenes-teacher-{_cache_key(images, tokens, net_cfg, train)}.safetensors"
    net, where = cached_weights(path, lambda: ScenesFlowNet(net_cfg),
                                lambda: pretrain_scenes_teacher(images, tokens, net_cfg, train, progress=progress))
    return frozen(net), where


# ---------------------------------------------------------------------- sampling and metrics
def sample_scenes(net: nn.Module, noise: torch.Tensor, tokens: torch.Tensor | None, steps: int, shift: float = 1.0,
                  batch: int = 1000) -> torch.Tensor:
    """Euler samples in `steps` steps of the shifted schedule from `noise` (N, 3, 16, 16) with one prompt per noise."""
    sigmas = shifted_schedule(steps, shift)
    velocity = velocity_of_scenes(net)
    outs = []
    for i in range(0, noise.shape[0], batch):
        args = {} if tokens is None else {"tokens": tokens[i:i + batch]}
        outs.append(sample_euler(velocity, noise[i:i + batch], sigmas, args, disable=True))
    return torch.cat(outs)


def scene_features(x: torch.Tensor) -> torch.Tensor:
    """A fixed 208-dimensional feature map of scenes (N, 3, 16, 16) for a Fréchet distance: the 2x2 average-pooled
    RGB image (8x8x3 = 192 values: colours, layout and coarse shape) and the edge sharpness of the luminance: the
    root mean square of its horizontal and vertical pixel differences over each 4x4 region (16 values, times
    EDGE_WEIGHT to give them the pooled pixels' spread). Mean absolute differences would not do: blurring a step
    edge keeps their sum, while it lowers the RMS (a 3-pixel ramp: by sqrt 3), so this part sees few-step blur.

    Why not raw pixels: 768 dimensions need far more than the ~2000 samples a CPU benchmark draws for a stable
    covariance (FD's bias grows with dimension over sample count); with 208 dimensions two independent sets of
    2000 real scenes are about 0.7 apart, of 1000 about 1.3 (a 3x3 box blur of one: 3.3 from 2000)."""
    x = x.float()
    pooled = F.avg_pool2d(x, 2).flatten(1)
    luma = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    dx = F.pad((luma[..., :, 1:] - luma[..., :, :-1]) ** 2, (0, 1))
    dy = F.pad((luma[..., 1:, :] - luma[..., :-1, :]) ** 2, (0, 0, 0, 1))
    edges = F.avg_pool2d(dx + dy, 4).sqrt().flatten(1)
    return torch.cat([pooled, EDGE_WEIGHT * edges], dim=1)


def scenes_fd(samples: torch.Tensor, real: torch.Tensor) -> float:
    """Fréchet distance between sample sets on `scene_features`."""
    return frechet_distance(scene_features(samples), scene_features(real))


def scene_grid(rows: list[torch.Tensor], scale: int = 4, gap: int = 2) -> np.ndarray:
    """Rows of (N, 3, 16, 16) scenes in [-1, 1] as one RGB uint8 picture (H, W, 3), white gaps between tiles."""
    n = max(r.shape[0] for r in rows)
    size = SIZE * scale
    out = np.full((len(rows) * (size + gap) + gap, n * (size + gap) + gap, 3), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            tile = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
            y, x = gap + i * (size + gap), gap + j * (size + gap)
            out[y:y + size, x:x + size] = np.kron(tile, np.ones((scale, scale, 1), dtype=np.uint8))
    return out
