"""What TrainShortcut shows while it trains: few-step samples, decoded by the host's latent previewer.

The samples come from the engine (ShortcutTrainer.sample_as),
the pictures from ComfyUI's own latent previewer (TAESD or latent-to-RGB, no VAE needed), and they
reach the node through its progress bar, the channel KSampler's previews use.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import latent_preview

from ..shortcut_core.adapters import STUDENT, TEACHER
from ..shortcut_core.calibration import Recipe
from ..shortcut_core.schedules import shifted_schedule
from ..shortcut_core.trainer import ShortcutTrainer, StepReport

MIN_PANEL_HEIGHT = 160  # latent-to-RGB pictures are at latent size: enlarged so the labels and shapes read
LABEL_BAND = 20
LABEL_SIZE = 13


def latent_previewer(patcher):
    """The host's previewer for this model as the user set previews up (TAESD, latent-to-RGB); latent-to-RGB
    when the host's previews are off, since TrainShortcut's own previews are switched by preview_every."""
    latent_format = patcher.model.latent_format
    previewer = latent_preview.get_previewer(patcher.load_device, latent_format)
    if previewer is None and latent_format.latent_rgb_factors is not None:
        previewer = latent_preview.Latent2RGBPreviewer(latent_format.latent_rgb_factors,
                                                       latent_format.latent_rgb_factors_bias)
    return previewer


def side_by_side(previewer, panels: list[torch.Tensor], labels: list[str]) -> Image.Image:
    """Each latent decoded by the previewer, enlarged to a readable size, in a row under its label."""
    images = [previewer.decode_latent_to_preview(panel) for panel in panels]
    scale = max(1, math.ceil(MIN_PANEL_HEIGHT / images[0].height))
    images = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in images]
    gap = 4
    out = Image.new("RGB", (sum(im.width for im in images) + gap * (len(images) - 1), images[0].height + LABEL_BAND),
                    (24, 24, 24))
    draw = ImageDraw.Draw(out)
    try:
        font = ImageFont.load_default(size=LABEL_SIZE)  # Pillow >= 10.1 ships a scalable default font
    except TypeError:
        font = ImageFont.load_default()
    x = 0
    for image, label in zip(images, labels):
        out.paste(image, (x, LABEL_BAND))
        draw.text((x + 4, 3), label, fill=(235, 235, 235), font=font)
        x += image.width + gap
    return out


def to_image_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL picture as ComfyUI's IMAGE: [1, height, width, 3] floats in [0, 1]."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]


class TrainingPreview:
    """The teacher and the student at the LoRA's few steps beside the teacher at many, from one fixed
    noise (seeded) for the first training conditioning. The teacher's two samples are made once; the
    student's every `every` steps (0: only when asked). Sampling touches nothing the training uses."""

    def __init__(self, trainer: ShortcutTrainer, previewer, show, latent_shape: tuple[int, ...], every: int):
        cfg = trainer.config
        self.trainer, self.previewer, self.show, self.every = trainer, previewer, show, every
        self.noise = torch.randn((1, *latent_shape), generator=torch.Generator().manual_seed(cfg.seed))
        self.extra = {"item": torch.zeros(1, dtype=torch.long)}
        few = shifted_schedule(cfg.sample_steps, cfg.sample_shift, t_max=cfg.t_max)
        many = shifted_schedule(cfg.reference_steps, cfg.sample_shift, t_max=cfg.t_max)
        self.teacher_few = trainer.sample_as(TEACHER, self.noise, few, self.extra)
        self.teacher_many = trainer.sample_as(TEACHER, self.noise, many, self.extra)
        if every:
            self.show(trainer.step_count, self.picture())

    def __call__(self, report: StepReport) -> None:
        if self.every and report.step % self.every == 0:
            self.show(report.step, self.picture())

    def picture(self, recipe: Recipe | None = None) -> Image.Image:
        """The comparison, the student sampled with `recipe` (default: the LoRA's steps and shift, strength 1)."""
        cfg = self.trainer.config
        recipe = recipe or Recipe(cfg.sample_steps, 1.0, cfg.sample_shift)
        sigmas = shifted_schedule(recipe.steps, recipe.shift, t_max=cfg.t_max)
        student = self.trainer.sample_as(STUDENT, self.noise, sigmas, self.extra, strength=recipe.strength,
                                         **recipe.walk)
        strength = "" if recipe.strength == 1.0 else f" x{recipe.strength:g}"
        labels = [f"teacher {cfg.sample_steps} steps", f"student {recipe.steps} steps{strength}",
                  f"teacher {cfg.reference_steps} steps"]
        return side_by_side(self.previewer, [self.teacher_few, student, self.teacher_many], labels)
