"""The teachers the convergence benchmark distils, each behind one small interface.

A `Teacher` is a pre-trained flow model with what a measurement needs: its network and velocity callable, the
training latents (with per-latent arguments, e.g. a prompt), the config sized for it (the paper's recipe with
the changes a tiny CPU model needs, at its full budget), held-out noises for the calibration and for the
evaluation, the teacher's many-step reference samples from the evaluation noises, and real data with a feature
map for a distribution measure (Fréchet distance).

Teachers of different kinds: the digits demo's (8x8 greyscale, unconditional), procedural scenes (3x16x16 RGB,
a text-like prompt; the data a few-shot user brings, 8192 of them), and ComfyUI's own Flux and Wan 2.1 classes at tiny widths (pre-trained on a four-mode
latent distribution, as tests/test_host_family_teachers.py does; these need a ComfyUI checkout).
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from shortcut_core import ShortcutConfig, sample_euler, shifted_schedule
from shortcut_core.trajectories import TeacherTrajectories, record_euler_trajectories

from .digits import cached_weights, default_cache_dir, frechet_distance

REFERENCE_STEPS = 128
EVAL_NOISES = 1000
CALIBRATION_NOISES = 16


@torch.no_grad()
def euler_samples(velocity: Callable, noise: torch.Tensor, args: dict[str, Any], steps: int, shift: float,
                  sampler: Callable | None = None, batch: int = 250) -> torch.Tensor:
    """Euler samples of `velocity` (or `sampler(noise, sigmas, args)`) from `noise`, in batches of per-item args."""
    sigmas = shifted_schedule(steps, shift)
    if sampler is None:
        def sampler(noise, sigmas, args):
            return sample_euler(velocity, noise, sigmas, args, disable=True)
    return torch.cat([sampler(noise[i:i + batch], sigmas, {k: v[i:i + batch] if isinstance(v, torch.Tensor) else v
                                                            for k, v in args.items()})
                      for i in range(0, noise.shape[0], batch)])


@dataclass
class Teacher:
    name: str
    kind: str                                   # a few words: data, size, condition
    module: nn.Module
    velocity: Callable[..., torch.Tensor]
    latents: torch.Tensor
    extra_args: dict[str, Any]                  # per training latent
    config: ShortcutConfig                      # the paper's recipe sized for this teacher, at its full budget
    shift: float                                # the shift teacher and student sample at
    real: torch.Tensor                          # data for the distribution measure
    features: Callable[[torch.Tensor], torch.Tensor]
    make_args: Callable[[int, int], dict[str, Any]]   # (count, seed) -> per-item arguments for fresh noises
    blocks: tuple[nn.Module, ...] = ()          # repeated blocks (ShortcutTrainer's blocks: some add in place)
    trajectories: TeacherTrajectories | None = None   # data-free: the teacher's walks that made the latents
    # the schedule knobs a user gets by default (the config's, or the host's family recipe): config has the
    # teacher's best shift instead, which a user does not know (convergence.py --user-shifts)
    user_schedule: dict[str, float] = field(default_factory=lambda: {
        k: getattr(ShortcutConfig(), k) for k in ("shift_min", "shift_max", "sample_shift")})
    eval_noise: torch.Tensor = field(init=False)
    eval_args: dict[str, Any] = field(init=False)
    reference: torch.Tensor = field(init=False)
    teacher_fd: dict[int, float] = field(init=False)
    teacher_rmse: dict[int, float] = field(init=False)

    def __post_init__(self) -> None:
        shape = self.latents.shape[1:]
        self.eval_noise = torch.randn(EVAL_NOISES, *shape, generator=torch.Generator().manual_seed(2025))
        self.eval_args = self.make_args(EVAL_NOISES, 2025)
        self.reference = self.sample(REFERENCE_STEPS, self.shift)
        self.teacher_fd = {n: self.fd(self.sample(n, self.shift)) for n in (1, 2, 3, 4, 32)}
        self.teacher_rmse = {n: self.rmse(self.sample(n, self.shift)) for n in (1, 2, 3, 4)}

    def calibration_noise(self, seed: int) -> tuple[torch.Tensor, dict[str, Any]]:
        shape = self.latents.shape[1:]
        g = torch.Generator().manual_seed(10_000 + seed)
        return torch.randn(CALIBRATION_NOISES, *shape, generator=g), self.make_args(CALIBRATION_NOISES, 10_000 + seed)

    def sample(self, steps: int, shift: float, sampler: Callable | None = None) -> torch.Tensor:
        """Euler samples from the evaluation noises: the teacher's, or `sampler(noise, sigmas, args)`'s (a live
        trainer's student: ShortcutTrainer.sample_as)."""
        return euler_samples(self.velocity, self.eval_noise, self.eval_args, steps, shift, sampler)

    def rmse(self, samples: torch.Tensor) -> float:
        return float((samples.double() - self.reference.double()).pow(2).mean().sqrt())

    def fd(self, samples: torch.Tensor) -> float:
        return frechet_distance(self.features(samples), self.features(self.real))


# ---------------------------------------------------------------------- digits
def digits_teacher() -> Teacher:
    from .demo import demo_config
    from .digits import load_digits_images, load_or_pretrain_teacher, velocity_of

    real = load_digits_images()
    net, _ = load_or_pretrain_teacher(real, progress=False)
    return Teacher("digits", "8x8 scans, unconditional, 0.4M-parameter AdaLN MLP", net, velocity_of(net), real, {},
                   demo_config(1000), 0.5, real, lambda x: x, lambda n, seed: {})


# ---------------------------------------------------------------------- scenes
def scenes_teacher() -> Teacher:
    """Procedurally drawn 3x16x16 RGB scenes with a 3-token prompt (colour, shape, background): sharp-edged,
    many modes, conditioned like a text-to-image model (benchmarks/scenes.py)."""
    from .scenes import draw_prompts, load_or_pretrain_scenes_teacher, make_scenes, scene_features, \
        velocity_of_scenes

    images, tokens = make_scenes(8192, 0)
    net, _ = load_or_pretrain_scenes_teacher(images, tokens, progress=False)
    real, _ = make_scenes(2000, 1)
    # the demo's adaptations to a small CPU model; the teacher's best 3-step shift on these scenes is 2
    config = ShortcutConfig(rank=32, alpha=32.0, learning_rate=1e-3, batch_size=128, steps=600, shift_min=1.4,
                            shift_max=2.8, sample_shift=2.0, resolution_shift_prob=0.0, guidance_range=None,
                            gradient_checkpointing=False, checkpoint_every=0)
    return Teacher("scenes", "3x16x16 RGB scenes, 3-token prompt, 3.3M-parameter AdaLN + patch attention",
                   net, velocity_of_scenes(net), images, {"tokens": tokens}, config, 2.0, real, scene_features,
                   lambda n, seed: {"tokens": draw_prompts(n, seed)})


# ---------------------------------------------------------------------- ComfyUI families
FAMILY_CASES = {  # family: (latent of one item, pre-training steps, batch, lr)
    "flux": ((16, 8, 8), 400, 16, 3e-3),
    "wan2.1": ((16, 3, 8, 8), 300, 16, 3e-3),
}


def family_teacher(family: str, seed: int = 0) -> Teacher:
    """A ComfyUI model class at tiny width, pre-trained with plain flow matching on four modes (+ 0.1 noise) of
    its latent shape through the host's own BaseModel.apply_model, as tests/test_host_family_teachers.py."""
    tests = Path(__file__).resolve().parent.parent / "tests"
    if str(tests) not in sys.path:
        sys.path.insert(0, str(tests))
    import comfy_host
    comfy_host.pack_or_exit()  # ComfyUI found as the host tests find it, else exit saying why
    from test_host_family_teachers import model_inputs, norms_at_their_usual_init, pretrain

    latent, steps, batch, lr = FAMILY_CASES[family]
    spec = comfy_host.FAMILIES[family]
    model, patcher = spec.build(seed=seed, std=0.02)
    norms_at_their_usual_init(model.diffusion_model)
    positive = [[torch.zeros_like(context), options] for context, options in spec.positive(6, seed)]
    key = f"family-teacher-v1 {family} {latent} {steps} {batch} {lr} {seed} {torch.__version__}"
    net = model.diffusion_model

    def pretrained() -> nn.Module:
        pretrain(model, positive, latent, steps=steps, batch=batch, lr=lr, seed=seed)
        return net
    cached_weights(default_cache_dir() / f"teacher-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors",
                   lambda: net, pretrained)
    for p in net.parameters():
        p.requires_grad_(False)

    shared = model_inputs(model, positive, 1, latent)
    each = (-1,) + (1,) * len(latent)

    def make_args(count: int, _seed: int) -> dict[str, Any]:
        return {k: (v.expand(count, *v.shape[1:]).contiguous() if isinstance(v, torch.Tensor) and v.shape[0] == 1
                    else v) for k, v in shared.items()}

    def velocity(x: torch.Tensor, t: torch.Tensor, **inputs: Any) -> torch.Tensor:
        sigma = t.clamp_min(1e-4).to(x.dtype)
        denoised = model.apply_model(x, sigma, **inputs)
        return (x - denoised) / sigma.view(each)

    velocity.keeps_batch_whole = True
    config = ShortcutConfig(rank=16, alpha=16.0, learning_rate=2e-3, batch_size=16, steps=600, shift_min=1.0,
                            shift_max=1.0, sample_shift=1.0, resolution_shift_prob=0.0, guidance_range=None,
                            gradient_checkpointing=False, checkpoint_every=0)
    # data-free, as the family tests and workflow 3: the teacher's own 32-step samples are the training latents;
    # the distribution a shortcut should match is the teacher's own (its 128-step samples from other noises)
    def teacher_samples(count: int, noise_seed: int, steps: int) -> torch.Tensor:
        noise = torch.randn(count, *latent, generator=torch.Generator().manual_seed(noise_seed))
        return euler_samples(velocity, noise, make_args(count, noise_seed), steps, 1.0)

    # ... recorded with every state of the walk, for the trajectory-target lever (teacher_samples' very walk)
    noise = torch.randn(64, *latent, generator=torch.Generator().manual_seed(7 + seed))
    with torch.no_grad():
        walks = record_euler_trajectories(velocity, noise, shifted_schedule(32, 1.0), make_args(64, 7 + seed))
    families = comfy_host.pack_module("host.families")
    return Teacher(family, f"ComfyUI {family} class at tiny width, {list(latent)} latents, data-free",
                   net, velocity, walks.latents, make_args(64, 0), config, 1.0,
                   teacher_samples(2000, 99, 128), lambda x: x.flatten(1)[:, :: max(1, x[0].numel() // 128)],
                   make_args, tuple(families.repeated_blocks(net)), walks,
                   families.family_recipe(patcher).schedule)


def with_walks(teacher: Teacher, count: int, seed: int = 7) -> Teacher:
    """A data-free teacher trained on `count` walks of its own instead (as a user asks Shortcut Teacher Latents for
    more latents): recorded over the same schedule from other noises, with fresh per-item arguments."""
    if teacher.trajectories is None:
        raise ValueError(f"{teacher.name} trains on data, not on its own walks")
    noise = torch.randn(count, *teacher.latents.shape[1:], generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        walks = record_euler_trajectories(teacher.velocity, noise, teacher.trajectories.times.float(),
                                          teacher.make_args(count, seed))
    teacher.latents, teacher.extra_args, teacher.trajectories = walks.latents, teacher.make_args(count, 0), walks
    return teacher


TEACHERS: dict[str, Callable[[], Teacher]] = {
    "digits": digits_teacher,
    "scenes": scenes_teacher,
    "flux": lambda: family_teacher("flux"),
    "wan2.1": lambda: family_teacher("wan2.1"),
}
