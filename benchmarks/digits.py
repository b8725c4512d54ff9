"""A real, small flow-matching teacher for CPU demos and benchmarks: handwritten digits.

Data: scikit-learn's digits set (1797 real 8x8 scans, shipped inside the wheel: no download),
scaled to [-1, 1]. The teacher is unconditional, so its distribution has ten well-separated
modes: few-step Euler sampling on it averages between modes and blurs, the situation SCFM
fixes. The network is Flux-flavoured (AdaLN-modulated residual blocks), every layer a Linear
so a LoRA can reach all of it as in the paper's recipe.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import trange

from shortcut_core import read_safetensors, sample_euler, shifted_schedule, write_safetensors_atomic
from shortcut_core.safetensors_io import SafetensorsFileError

CACHE_VERSION = "digits-teacher-v1"


def load_digits_images() -> torch.Tensor:
    """All 1797 digits as float32 (N, 1, 8, 8) in [-1, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - environment problem, said plainly
        raise SystemExit("the demo's data comes from scikit-learn: pip install -r requirements-dev.txt") from e
    images = load_digits().images.astype(np.float32)  # values 0..16
    return torch.from_numpy(images / 8.0 - 1.0).unsqueeze(1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of t * 1000, as Flux embeds its timestep."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ModulatedBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Linear(width, 3 * width)
        self.mlp_in = nn.Linear(width, 4 * width)
        self.mlp_out = nn.Linear(4 * width, width)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(nn.functional.silu(c)).chunk(3, dim=-1)
        y = self.norm(h) * (1 + scale) + shift
        return h + gate * self.mlp_out(nn.functional.gelu(self.mlp_in(y)))


@dataclass(frozen=True)
class DigitsNetConfig:
    width: int = 192
    depth: int = 3
    freq_dim: int = 64
    pixels: int = 64


class DigitsFlowNet(nn.Module):
    """v = net(x, t) for x of shape (B, 1, 8, 8)."""

    def __init__(self, cfg: DigitsNetConfig = DigitsNetConfig()):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.time_in = nn.Sequential(nn.Linear(cfg.freq_dim, w), nn.SiLU(), nn.Linear(w, w))
        self.x_in = nn.Linear(cfg.pixels, w)
        self.blocks = nn.ModuleList(ModulatedBlock(w) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Linear(w, 2 * w)
        self.final = nn.Linear(w, cfg.pixels)
        nn.init.zeros_(self.final.weight)
        nn.init.zeros_(self.final.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c = self.time_in(timestep_embedding(t, self.cfg.freq_dim))
        h = self.x_in(x.flatten(1))
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_modulation(nn.functional.silu(c)).chunk(2, dim=-1)
        h = self.final_norm(h) * (1 + scale) + shift
        return self.final(h).view_as(x)


@dataclass(frozen=True)
class TeacherTraining:
    steps: int = 4000
    batch_size: int = 256
    lr: float = 2e-3
    final_lr: float = 5e-5
    seed: int = 0


def pretrain_teacher(images: torch.Tensor, net_cfg: DigitsNetConfig = DigitsNetConfig(),
                     train: TeacherTraining = TeacherTraining(), progress: bool = True) -> DigitsFlowNet:
    """Plain flow matching (uniform t, target noise - x0), Adam with a cosine learning-rate decay."""
    g = torch.Generator().manual_seed(train.seed)
    torch.manual_seed(train.seed)  # nn.Linear's default init draws from the global RNG
    net = DigitsFlowNet(net_cfg)
    opt = torch.optim.Adam(net.parameters(), lr=train.lr)
    n = images.shape[0]
    for step in trange(train.steps, disable=not progress, desc="pre-training the digits teacher"):
        lr = train.final_lr + 0.5 * (train.lr - train.final_lr) * (1 + math.cos(math.pi * step / train.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        x0 = images[torch.randint(n, (train.batch_size,), generator=g)]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.rand(train.batch_size, generator=g)
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        loss = (net(x_t, t) - (noise - x0)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return frozen(net)


def _cache_key(images: torch.Tensor, net_cfg: DigitsNetConfig, train: TeacherTraining) -> str:
    blob = json.dumps({"v": CACHE_VERSION, "net": asdict(net_cfg), "train": asdict(train),
                       "torch": torch.__version__.split("+")[0]}, sort_keys=True).encode()
    blob += hashlib.sha256(images.numpy().tobytes()).digest()
    return hashlib.sha256(blob).hexdigest()[:16]


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "shortcut-flow"


def cached_weights(path: Path, empty: Callable[[], nn.Module], train: Callable[[], nn.Module]
                   ) -> tuple[nn.Module, str]:
    """A teacher's weights from the cache file `path` into `empty()`, else `train()`ed now and cached there (a
    damaged cache entry is simply retrained); (the module, where it came from)."""
    if path.is_file():
        try:
            tensors, _ = read_safetensors(path, what="cached teacher")
            net = empty()
            net.load_state_dict(tensors)
            return net, f"restored from {path}"
        except (SafetensorsFileError, RuntimeError):
            pass
    net = train()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_safetensors_atomic(path, {k: v.contiguous() for k, v in net.state_dict().items()},
                                 {"what": path.stem})
        return net, f"pre-trained now, cached at {path}"
    except (OSError, SafetensorsFileError) as e:
        return net, f"pre-trained now (not cached: {e})"


def frozen(net: nn.Module) -> nn.Module:
    """Eval mode, no gradients: a teacher."""
    net.train(False)  # eval mode; the repository keeps no `eval(` text, which Registry scans flag
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def load_or_pretrain_teacher(images: torch.Tensor, net_cfg: DigitsNetConfig = DigitsNetConfig(),
                             train: TeacherTraining = TeacherTraining(), cache_dir: Path | None = None,
                             progress: bool = True) -> tuple[DigitsFlowNet, str]:
    """The teacher from the local cache when one was trained with the same settings, else trained now."""
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    path = cache_dir / f"digits-teacher-{_cache_key(images, net_cfg, train)}.safetensors"
    net, where = cached_weights(path, lambda: DigitsFlowNet(net_cfg),
                                lambda: pretrain_teacher(images, net_cfg, train, progress=progress))
    return frozen(net), where


# ---------------------------------------------------------------------- sampling and metrics
def velocity_of(net: nn.Module):
    return lambda x, t, **_: net(x, t)


def sample(net: nn.Module, noise: torch.Tensor, steps: int, shift: float = 3.25, batch: int = 1024,
           **walk: float) -> torch.Tensor:
    """Euler samples of `net` from `noise` (`walk`: sampling.sample_euler's time_shift and multistep)."""
    sigmas = shifted_schedule(steps, shift)
    outs = [sample_euler(velocity_of(net), chunk, sigmas, disable=True, **walk)
            for chunk in noise.split(batch)]
    return torch.cat(outs)


def rmse_to(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """Root mean squared pixel difference to the reference samples from the same noise."""
    return float((samples - reference).pow(2).mean().sqrt())


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two sample sets (flattened pixels), in float64.

    tr(sqrt(S_a S_b)) is the sum of square roots of the eigenvalues of sqrt(S_a) S_b sqrt(S_a),
    a symmetric PSD matrix, so only symmetric eigendecompositions are needed.
    """
    x = a.flatten(1).double().numpy()
    y = b.flatten(1).double().numpy()
    mu_x, mu_y = x.mean(0), y.mean(0)
    s_x, s_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    w, v = np.linalg.eigh(s_x)
    sqrt_sx = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(sqrt_sx @ s_y @ sqrt_sx)
    tr_sqrt = np.sqrt(np.clip(inner, 0, None)).sum()
    return float(((mu_x - mu_y) ** 2).sum() + np.trace(s_x) + np.trace(s_y) - 2 * tr_sqrt)


# ---------------------------------------------------------------------- a PNG with no imaging library
def write_png(path: str | os.PathLike, pixels: np.ndarray) -> None:
    """Write a greyscale (H, W) or RGB (H, W, 3) uint8 array as PNG (zlib only), atomically."""
    h, w = pixels.shape[:2]
    colour_type = 2 if pixels.ndim == 3 else 0
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    raw = b"".join(b"\x00" + pixels[row].tobytes() for row in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    path = os.fspath(path)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(png)
    os.replace(tmp, path)


def image_grid(rows: list[torch.Tensor], scale: int = 4, gap: int = 2) -> np.ndarray:
    """Rows of (N, 1, 8, 8) images in [-1, 1] as one uint8 picture, white gaps between tiles."""
    n = max(r.shape[0] for r in rows)
    size = 8 * scale
    out = np.full((len(rows) * (size + gap) + gap, n * (size + gap) + gap), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            tile = ((img[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
            tile = 255 - np.kron(tile, np.ones((scale, scale), dtype=np.uint8))  # dark ink on white
            y, x = gap + i * (size + gap), gap + j * (size + gap)
            out[y:y + size, x:x + size] = tile
    return out
