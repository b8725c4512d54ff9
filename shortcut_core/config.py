"""One dataclass for every SCFM knob, with the authors' released Flux.1-dev recipe as defaults.

Sources: Cai et al., "Shortcutting Pre-trained Flow Matching Diffusion Models is
Almost Free Lunch" (NeurIPS 2025), and the released trainer
(scripts/train_flux_scfm.sh, trainer/flux_scfm.py, src/utils/train_utils.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping


LORA_LAYERS = {
    "all": "every linear layer (the paper)",
    "blocks": "linear layers of the transformer blocks, without modulation (adaLN) layers, embedders or final layer",
}


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the field and says what to do."""

    def __init__(self, field_name: str, message: str):
        self.field = field_name
        super().__init__(f"ShortcutConfig.{field_name}: {message}")


@dataclass
class ShortcutConfig:
    # --- LoRA (rank 64, alpha 64, every linear layer) ---
    rank: int = 64
    alpha: float = 64.0
    # None: every nn.Linear of the module. Otherwise peft semantics: a module-name suffix list.
    target_modules: tuple[str, ...] | None = None
    # Which of those layers: "all" (the paper), or "blocks": only inside the repeated transformer blocks and
    # not their modulation (adaLN) layers, a quarter less LoRA state on Flux (see LORA_LAYERS).
    lora_layers: str = "all"

    # --- SCFM objective ---
    t_skip: int = 2                    # sub-steps the target walks; first half teacher/fast EMA, second slow EMA
    teacher_ratio: float = 0.4         # share of shortcut items whose first half comes from the teacher
    teacher_min_steps: int = 32        # teacher items use schedules of this many steps ...
    teacher_max_steps: int = 32        # ... up to this many, in strides of t_skip
    non_shortcut_ratio: float = 0.0    # "pre-training fusion": share of items with the plain target noise - x0
    shift_min: float = 2.5             # fixed shift drawn from U[shift_min, shift_max] ...
    shift_max: float = 4.5
    resolution_shift_prob: float = 0.1  # ... or, with this probability, the resolution shift exp(mu(tokens))
    t_max: float = 1.0 - 1e-5          # first schedule point; avoids feeding pure noise at t = 1
    # Per-item guidance drawn from U[lo, hi) for guidance-distilled models (Flux dev); None: no draw.
    guidance_range: tuple[float, float] | None = (0.0, 7.5)

    # --- dual EMA of the student LoRA (both start at zero, i.e. as the base model) ---
    ema_slow_decay: float = 0.999
    ema_fast_decay: float = 0.99
    ema_restart_every: int = 0         # 0: never. The SD3.5 recipe restarts both EMAs from the student every 2000 steps.

    # --- optimisation (AdamW, constant lr) ---
    learning_rate: float = 2e-5
    weight_decay: float = 1e-4
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: float = 10.0        # 2.0 in the SD3.5 recipe
    batch_size: int = 8
    grad_accum_steps: int = 1
    steps: int = 10_000
    seed: int = 0
    checkpoint_every: int = 200        # 0: only at the end (and on interrupt)
    gradient_checkpointing: bool = True
    # AdamW's two moments (with a master copy of the LoRA and its gradients) in CPU memory, the step on the
    # CPU: a third of the LoRA state off the device, same arithmetic (bit-identical on a CPU).
    offload_optimizer: bool = False

    # --- what a LoRA trained with this config recommends for sampling (written to file metadata) ---
    sample_steps: int = 3
    sample_shift: float = 3.25
    sample_strength: float = 1.0

    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes carried into metadata

    def __post_init__(self) -> None:
        if self.target_modules is not None:
            self.target_modules = tuple(self.target_modules)
        if self.guidance_range is not None:
            self.guidance_range = tuple(self.guidance_range)  # type: ignore[assignment]
        self.adam_betas = tuple(self.adam_betas)  # type: ignore[assignment]
        self.validate()

    # ------------------------------------------------------------------ derived schedule lengths
    @property
    def teacher_schedule_lengths(self) -> tuple[int, ...]:
        """Schedule lengths for teacher items: range(teacher_min, teacher_max + t_skip, t_skip)."""
        lo = max(self.teacher_min_steps, self.t_skip)
        return tuple(range(lo, self.teacher_max_steps + self.t_skip, self.t_skip))

    @property
    def self_schedule_lengths(self) -> tuple[int, ...]:
        """Schedule lengths for self items: the powers of two from t_skip up to below teacher_min_steps.

        With t_skip = 2 and teacher_min_steps = 32 this is (2, 4, 8, 16): a jump over t_skip
        sub-steps of an N-step schedule is one step of the N / t_skip-step sampler, so self
        items teach the 1-, 2-, 4- and 8-step samplers from the EMA student's finer steps.
        """
        out, n = [], self.t_skip
        while n < self.teacher_min_steps:
            out.append(n)
            n *= 2
        return tuple(out)

    @property
    def reference_steps(self) -> int:
        """Steps of the teacher's reference samples (previews, calibration): its longest training schedule,
        and at least four times the LoRA's steps."""
        return max(self.teacher_max_steps, 4 * self.sample_steps)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def need(ok: bool, name: str, message: str) -> None:
            if not ok:
                raise ConfigError(name, f"{message} (got {getattr(self, name)!r})")

        def is_int(name: str) -> bool:
            v = getattr(self, name)
            return isinstance(v, int) and not isinstance(v, bool)

        def is_real(name: str) -> bool:
            v = getattr(self, name)
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for name in ("rank", "t_skip", "teacher_min_steps", "teacher_max_steps", "batch_size",
                     "grad_accum_steps", "steps", "sample_steps"):
            need(is_int(name) and getattr(self, name) >= 1, name, "must be an integer >= 1")
        for name in ("seed", "ema_restart_every", "checkpoint_every"):
            need(is_int(name) and getattr(self, name) >= 0, name, "must be an integer >= 0")
        for name in ("alpha", "learning_rate", "max_grad_norm", "adam_eps", "sample_shift", "sample_strength",
                     "shift_min", "shift_max"):
            need(is_real(name) and getattr(self, name) > 0, name, "must be a finite number > 0")
        need(is_real("weight_decay") and self.weight_decay >= 0, "weight_decay", "must be a finite number >= 0")
        for name in ("teacher_ratio", "non_shortcut_ratio", "resolution_shift_prob"):
            need(is_real(name) and 0.0 <= getattr(self, name) <= 1.0, name, "must be a probability in [0, 1]")
        for name in ("ema_slow_decay", "ema_fast_decay"):
            need(is_real(name) and 0.0 <= getattr(self, name) < 1.0, name, "must be in [0, 1); 0.999 / 0.99 are the paper's")
        need(is_real("t_max") and 0.5 < self.t_max <= 1.0, "t_max", "must be in (0.5, 1]; the paper uses 1 - 1e-5")
        need(self.t_skip % 2 == 0, "t_skip",
             "must be even: the first half of the sub-steps comes from the teacher or fast EMA, the second from the slow EMA")
        need(self.shift_max >= self.shift_min, "shift_max", f"must be >= shift_min ({self.shift_min})")
        need(self.teacher_min_steps % self.t_skip == 0, "teacher_min_steps", f"must be a multiple of t_skip ({self.t_skip})")
        need(self.teacher_max_steps >= self.teacher_min_steps, "teacher_max_steps",
             f"must be >= teacher_min_steps ({self.teacher_min_steps})")
        need(self.teacher_max_steps % self.t_skip == 0, "teacher_max_steps", f"must be a multiple of t_skip ({self.t_skip})")
        need(self.teacher_ratio == 1.0 or len(self.self_schedule_lengths) > 0, "teacher_min_steps",
             f"must be > t_skip ({self.t_skip}) so that self items have a schedule, or set teacher_ratio = 1")
        need(len(self.adam_betas) == 2 and all(0.0 <= b < 1.0 for b in self.adam_betas), "adam_betas",
             "must be two numbers in [0, 1)")
        if self.guidance_range is not None:
            lo_hi = self.guidance_range
            need(len(lo_hi) == 2 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in lo_hi)
                 and lo_hi[0] <= lo_hi[1], "guidance_range", "must be None or (low, high) with low <= high")
        if self.target_modules is not None:
            need(len(self.target_modules) > 0 and all(isinstance(s, str) and s for s in self.target_modules),
                 "target_modules", "must be None (every linear layer) or a non-empty list of module names")
        for name in ("gradient_checkpointing", "offload_optimizer"):
            need(isinstance(getattr(self, name), bool), name, "must be True or False")
        need(self.lora_layers in LORA_LAYERS, "lora_layers", f"must be one of {', '.join(LORA_LAYERS)}")
        need(isinstance(self.extra, dict), "extra", "must be a dict")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, strict: bool = True) -> "ShortcutConfig":
        """Rebuild a config; unknown keys are an error when strict (a typo), ignored otherwise (a newer file)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown and strict:
            raise ConfigError(unknown[0], f"is not a ShortcutConfig field; known fields: {', '.join(sorted(names))}")
        return cls(**{k: v for k, v in data.items() if k in names})

    def replace(self, **changes: Any) -> "ShortcutConfig":
        return dataclasses.replace(self, **changes)


# The schedule knobs a model family may set for itself (nodes/host.py: family_recipe).
SCHEDULE_KNOBS = ("shift_min", "shift_max", "resolution_shift_prob", "sample_shift")


def schedule_around(model_shift: float, resolution_shift_prob: float = 0.0) -> dict[str, float]:
    """The paper's schedule knobs for a model sampled at another shift than Flux: its draw U[2.5, 4.5] around the
    sampling shift 3.25, scaled by model_shift / 3.25 (Wan at 8: U[6.15, 11.1], sampled at 8). The resolution shift
    is Flux's own rule (mu on its 256 / 4096-token line), so other families draw none unless told; the SD3.5 recipe
    likewise sets it to 0."""
    if not (isinstance(model_shift, (int, float)) and math.isfinite(model_shift) and model_shift > 0):
        raise ConfigError("sample_shift", f"a model's sampling shift must be a finite number > 0 (got {model_shift!r})")
    paper = ShortcutConfig()
    scale = model_shift / paper.sample_shift
    return {"shift_min": round(paper.shift_min * scale, 4), "shift_max": round(paper.shift_max * scale, 4),
            "resolution_shift_prob": resolution_shift_prob, "sample_shift": round(float(model_shift), 4)}
