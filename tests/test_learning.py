"""End to end: SCFM distillation of a tiny 2-D flow-matching teacher makes its 3-step sampler much better."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from shortcut_core import ShortcutConfig, ShortcutTrainer, sample_euler, shifted_schedule

MODES = 8
RADIUS = 3.0
STD = 0.1


class VelocityMLP(nn.Module):
    """v(x, t) for 2-D points: 3 residual hidden layers of width 128 with SiLU."""

    def __init__(self, width: int = 128):
        super().__init__()
        self.inp = nn.Linear(3, width)
        self.hidden = nn.ModuleList([nn.Linear(width, width) for _ in range(3)])
        self.out = nn.Linear(width, 2)

    def forward(self, x, t):
        h = self.inp(torch.cat([x, t.reshape(-1, 1).to(x.dtype)], dim=1))
        for layer in self.hidden:
            h = h + layer(nn.functional.silu(h))
        return self.out(nn.functional.silu(h))


def mode_centres() -> torch.Tensor:
    angle = torch.arange(MODES) * (2 * math.pi / MODES)
    return torch.stack([torch.cos(angle), torch.sin(angle)], dim=1) * RADIUS


def sample_data(n: int, g: torch.Generator) -> torch.Tensor:
    k = torch.randint(MODES, (n,), generator=g)
    return mode_centres()[k] + STD * torch.randn(n, 2, generator=g)


def train_teacher(steps: int = 2000, batch: int = 512) -> VelocityMLP:
    torch.manual_seed(0)  # module construction only
    net = VelocityMLP()
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(steps):
        x0 = sample_data(batch, g)
        noise = torch.randn(batch, 2, generator=g)
        t = torch.rand(batch, generator=g)
        x_t = (1 - t[:, None]) * x0 + t[:, None] * noise
        loss = (net(x_t, t) - (noise - x0)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


@pytest.mark.slow
def test_short_training_on_a_tiny_teacher_lowers_its_3_step_error():
    net = train_teacher()

    def velocity(x, t):
        return net(x, t)

    z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(123))
    reference = sample_euler(velocity, z, shifted_schedule(128, 3.25), disable=True)
    # the teacher did learn the data: its fine-step samples sit on the modes
    nearest = torch.cdist(reference, mode_centres()).min(dim=1).values
    assert nearest.mean().item() < 5 * STD

    three = shifted_schedule(3, 3.25)
    teacher_3 = sample_euler(velocity, z, three, disable=True)
    teacher_error = (teacher_3 - reference).norm(dim=1).mean().item()

    latents = sample_data(4096, torch.Generator().manual_seed(7))
    config = ShortcutConfig(rank=16, alpha=16, learning_rate=1e-3, batch_size=256, steps=1500, guidance_range=None,
                            resolution_shift_prob=0.0, weight_decay=0.0, ema_slow_decay=0.99, ema_fast_decay=0.9,
                            checkpoint_every=0)
    with ShortcutTrainer(net, velocity, latents, config) as trainer:
        result = trainer.run(progress=False)
        student_3 = sample_euler(velocity, z, three, disable=True)  # the student adapter is active here
    student_error = (student_3 - reference).norm(dim=1).mean().item()

    assert result.steps == 1500 and all(math.isfinite(v) for v in result.losses)
    assert student_error * 2 <= teacher_error, (teacher_error, student_error)
    # the trainer left the teacher as it was
    assert torch.equal(sample_euler(velocity, z, three, disable=True), teacher_3)
