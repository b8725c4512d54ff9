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

from .knobs import FREE, LAYOUT, OPTIONS, TEXT_LIST, TRAIN, Knob, knob, knobs_of
from .training_recipe import TRAINING_RECIPES


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
    # Each knob is declared here once (knob()): default, range, tooltip and the node that shows it. The nodes'
    # widgets, the node-to-config mapping, the headless command's arguments and the checkpoint's resume rules are
    # read off these declarations.

    # --- LoRA (rank 64, alpha 64, every linear layer) ---
    rank: int = knob(64, "LoRA rank, on every linear layer.", 1, None, shown_on=TRAIN, slot=3, resume=LAYOUT, cap=1024)
    alpha: float = knob(64.0, "LoRA alpha; scale = alpha / rank. The paper keeps alpha = rank (64): set it to your rank "
                        "to keep that scale.", 0.01, None, 1.0, shown_on=OPTIONS, slot=0, resume=LAYOUT, cap=4096.0)
    # None: every nn.Linear of the module. Otherwise peft semantics: a module-name suffix list.
    target_modules: tuple[str, ...] | None = knob(
        None, "Empty: LoRA on every linear layer (the paper). Else comma-separated module names or suffixes, e.g. "
        "'img_attn.qkv, linear1'.", shown_on=OPTIONS, slot=21, resume=LAYOUT, kind=TEXT_LIST)
    # Which of those layers: "all" (the paper), or "blocks": only inside the repeated transformer blocks and
    # not their modulation (adaLN) layers, a quarter less LoRA state on Flux (see LORA_LAYERS).
    lora_layers: str = knob("all", "all: " + LORA_LAYERS["all"] + ". blocks: " + LORA_LAYERS["blocks"] + " (about a "
                            "quarter less LoRA memory on Flux).", shown_on=OPTIONS, slot=27, resume=LAYOUT,
                            choices=tuple(LORA_LAYERS))

    # --- SCFM objective ---
    # sub-steps the target walks; first half teacher/fast EMA, second slow EMA
    t_skip: int = knob(0, "Sub-steps each target walks (even): first half teacher or fast EMA, second half slow EMA. "
                       "0 (auto): the recipe's (paper 2, fast 4).", 0, None, shown_on=OPTIONS, slot=7, cap=64)
    teacher_ratio: float = knob(0.4, "Share of items whose target starts with the teacher.", 0.0, 1.0,
                                shown_on=OPTIONS, slot=8)
    teacher_min_steps: int = knob(32, "Teacher items use schedules of this many steps...", 2, None,
                                  shown_on=OPTIONS, slot=9, cap=1_000_000)
    teacher_max_steps: int = knob(32, "...up to this many, in strides of t_skip.", 2, None, shown_on=OPTIONS,
                                  slot=10, cap=1_000_000)
    # "pre-training fusion": share of items with the plain target noise - x0
    non_shortcut_ratio: float = knob(0.0, "Share of items with the plain flow-matching target (pre-training fusion; "
                                     "0 for Flux).", 0.0, 1.0, shown_on=OPTIONS, slot=11)
    # fixed shift drawn from U[shift_min, shift_max] or, with resolution_shift_prob, the resolution shift exp(mu(tokens))
    shift_min: float = knob(2.5, "Training schedules use a shift drawn from [min, max]. 0 (auto): the connected "
                            "model's own, the paper's draw scaled to the shift it samples at (Flux 2.5-4.5, Wan 8: "
                            "6.15-11.1; docs/model-families.md).", 0.01, None, shown_on=OPTIONS, slot=12, auto=0.0, cap=100.0)
    shift_max: float = knob(4.5, "Upper end of the shift draw. 0 (auto): the connected model's own.", 0.01, None,
                            shown_on=OPTIONS, slot=13, auto=0.0, cap=100.0)
    resolution_shift_prob: float = knob(0.1, "Probability of Flux's resolution shift e^mu instead. -1 (auto): 0.1 for "
                                        "Flux and Chroma, 0 for the other families (as the SD3.5 recipe).", 0.0, 1.0,
                                        shown_on=OPTIONS, slot=14, auto=-1.0)
    # first schedule point; avoids feeding pure noise at t = 1
    t_max: float = knob(1.0 - 1e-5, "First schedule point (the paper: 1 - 1e-5, never pure noise).", 0.5, 1.0, 1e-5,
                        shown_on=OPTIONS, slot=25)
    # Per-item guidance drawn from U[lo, hi) for guidance-distilled models (Flux dev); None: no draw.
    guidance_range: tuple[float, float] | None = knob(
        (0.0, 7.5), ("Guidance-distilled models (Flux dev): per-item guidance drawn from [min, max); ignored by models "
                     "without a guidance input.", "Upper end of the guidance draw."), 0.0, 100.0, 0.1,
        shown_on=OPTIONS, slot=1, widgets=("guidance_min", "guidance_max"))

    # --- dual EMA of the student LoRA (both start at zero, i.e. as the base model) ---
    ema_slow_decay: float = knob(0.999, "Slow EMA decay (second half of each target).", 0.0, 0.999999, 0.0001,
                                 shown_on=OPTIONS, slot=15)
    ema_fast_decay: float = knob(0.99, "Fast EMA decay (first half of self items).", 0.0, 0.999999, 0.0001,
                                 shown_on=OPTIONS, slot=16)
    # The SD3.5 recipe restarts both EMAs from the student every 2000 steps.
    ema_restart_every: int = knob(0, "Restart both EMAs from the student every this many steps (0: never; SD3.5 "
                                  "recipe: 2000).", 0, None, shown_on=OPTIONS, slot=17, cap=1_000_000)

    # --- how learning rate, EMA decays and teacher share move over the run (training_recipe.py) ---
    recipe: str = knob("paper", "paper: the authors' recipe (2 sub-steps a target). fast: 4 sub-steps a target "
                       "(t_skip at 0): better few-step results early in a run, worse at the full budget on the digits "
                       "teacher (benchmarks/convergence.py).", shown_on=OPTIONS, slot=30,
                       choices=tuple(TRAINING_RECIPES))

    # --- optimisation (AdamW, constant lr) ---
    learning_rate: float = knob(2e-5, "AdamW learning rate (constant).", 1e-8, None, 1e-6, shown_on=TRAIN, slot=2, cap=1.0)
    weight_decay: float = knob(1e-4, "AdamW weight decay.", 0.0, None, 1e-5, shown_on=OPTIONS, slot=18, cap=1.0)
    adam_betas: tuple[float, float] = knob((0.9, 0.999), ("AdamW beta1.", "AdamW beta2."), 0.0, (0.9999, 0.99999),
                                           (0.001, 0.0001), shown_on=OPTIONS, slot=22,
                                           widgets=("adam_beta1", "adam_beta2"))
    adam_eps: float = knob(1e-8, "AdamW epsilon.", 1e-12, None, 1e-9, shown_on=OPTIONS, slot=24, cap=1e-2)
    max_grad_norm: float = knob(10.0, "Gradient-norm clip (10 Flux, 2 SD3.5).", 0.001, None, 0.1, shown_on=OPTIONS,
                                slot=19, cap=1e6)
    batch_size: int = knob(8, "Items per step, drawn from the latents.", 1, None, shown_on=TRAIN, slot=1, cap=4096)
    grad_accum_steps: int = knob(1, "Micro-batches per optimizer step.", 1, None, shown_on=OPTIONS, slot=20, cap=1024)
    steps: int = knob(10_000, "Optimizer steps (the authors: about 10k for Flux).", 1, None, shown_on=TRAIN,
                      slot=0, resume=FREE, cap=1_000_000)
    seed: int = knob(0, "Seeds the LoRA init, every draw and the preview noise: a run is reproducible (and not "
                     "re-trained on every queue).", 0, None, shown_on=TRAIN, slot=4,
                     widget={"control_after_generate": False}, cap=0xFFFFFFFFFFFFFFFF)
    # 0: only at the end (and on interrupt)
    checkpoint_every: int = knob(200, "Write the LoRA and training state every this many steps (0: only at the "
                                 "end). Cancel also writes them.", 0, None, shown_on=TRAIN, slot=6, resume=FREE, cap=1_000_000)
    gradient_checkpointing: bool = knob(True, "Recompute block activations in backward: much less memory, about a "
                                        "third more time.", shown_on=OPTIONS, slot=3, resume=FREE)
    # AdamW's two moments (with a master copy of the LoRA and its gradients) in CPU memory, the step on the
    # CPU: a third of the LoRA state off the device, same arithmetic (bit-identical on a CPU).
    offload_optimizer: bool = knob(False, "Keep AdamW's state in RAM and step it on the CPU: a third of the LoRA's "
                                   "memory off the GPU, same result, some time per step.", shown_on=OPTIONS, slot=28,
                                   resume=FREE)

    # --- speed (GPU): the result is the same run's (compile: to float rounding; fp8 targets: within fp8's error) ---
    compile_blocks: bool = knob(False, "Compile the model's repeated blocks with torch.compile, as ComfyUI's "
                                "TorchCompileModel does for sampling: faster steps after a warm-up of a minute or "
                                "more in the first step. Needs a working Triton (GPU).", shown_on=OPTIONS, slot=31,
                                resume=FREE)
    fp8_targets: bool = knob(False, "Run the targets' no-grad passes (teacher and EMA sub-steps) as fp8 matmuls on "
                             "cards with fp8 tensor cores (RTX 40xx and 50xx, L40, H100, H200): faster steps, targets "
                             "rounded to fp8; the student's own pass stays exact. No effect on other GPUs (on a CPU "
                             "the fp8 numerics run, at no gain).",
                             shown_on=OPTIONS, slot=32, resume=FREE)

    # --- what a LoRA trained with this config recommends for sampling (written to file metadata) ---
    sample_steps: int = knob(3, "Steps the LoRA is meant for: previews, calibration and the file's recipe.", 1, None,
                             shown_on=OPTIONS, slot=4, resume=FREE, cap=100)
    sample_shift: float = knob(3.25, "Shift the LoRA is meant for (calibration searches around it). 0 "
                               "(auto): the shift the connected model samples at (Flux: the paper's 3.25).", 0.01,
                               None, shown_on=OPTIONS, slot=5, resume=FREE, auto=0.0, cap=100.0)
    sample_strength: float = knob(1.0, "Strength written to the file when calibrate is off.", 0.01, None,
                                  shown_on=OPTIONS, slot=6, resume=FREE, cap=4.0)

    # free-form notes carried into metadata
    extra: dict[str, Any] = field(default_factory=dict, metadata={"knob": Knob("Free-form notes carried into the "
                                                                               "LoRA's metadata.", resume=FREE)})

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
        lo = max(self.teacher_min_steps, self.substeps)
        return tuple(range(lo, self.teacher_max_steps + self.substeps, self.substeps))

    @property
    def self_schedule_lengths(self) -> tuple[int, ...]:
        """Schedule lengths for self items: the powers of two from t_skip up to below teacher_min_steps.

        With t_skip = 2 and teacher_min_steps = 32 this is (2, 4, 8, 16): a jump over t_skip
        sub-steps of an N-step schedule is one step of the N / t_skip-step sampler, so self
        items teach the 1-, 2-, 4- and 8-step samplers from the EMA student's finer steps.
        """
        out, n = [], self.substeps
        while n < self.teacher_min_steps:
            out.append(n)
            n *= 2
        return tuple(out)

    @property
    def substeps(self) -> int:
        """The sub-steps each target walks: t_skip, or at 0 (auto) the training recipe's."""
        return self.t_skip or TRAINING_RECIPES[self.recipe].t_skip

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

        # each knob's own range, as declared beside it
        for f, k in knobs_of(type(self)):
            value = getattr(self, f.name)
            if k.choices:
                need(value in k.choices, f.name, f"must be one of {', '.join(k.choices)}")
            elif isinstance(f.default, bool):
                need(isinstance(value, bool), f.name, "must be True or False")
            elif isinstance(f.default, (int, float)) and k.low is not None:
                whole = isinstance(f.default, int)
                typed = (isinstance(value, int) if whole else isinstance(value, (int, float))
                         and math.isfinite(value)) and not isinstance(value, bool)
                kind = "an integer" if whole else "a finite number"
                need(typed and k.low <= value and (k.high is None or value <= k.high), f.name,
                     f"must be {kind} >= {k.low:g}" if k.high is None else f"must be {kind} from {k.low:g} to {k.high:g}")
        # what ties knobs together
        need(self.t_skip == 0 or (self.t_skip >= 2 and self.t_skip % 2 == 0), "t_skip",
             "must be 0 (auto) or even: the first half of the sub-steps comes from the teacher or fast EMA, the second from the slow EMA")
        need(self.shift_max >= self.shift_min, "shift_max", f"must be >= shift_min ({self.shift_min})")
        need(self.teacher_min_steps % self.substeps == 0, "teacher_min_steps", f"must be a multiple of t_skip ({self.substeps})")
        need(self.teacher_max_steps >= self.teacher_min_steps, "teacher_max_steps",
             f"must be >= teacher_min_steps ({self.teacher_min_steps})")
        need(self.teacher_max_steps % self.substeps == 0, "teacher_max_steps", f"must be a multiple of t_skip ({self.substeps})")
        need(self.teacher_ratio == 1.0 or len(self.self_schedule_lengths) > 0, "teacher_min_steps",
             f"must be > t_skip ({self.substeps}) so that self items have a schedule, or set teacher_ratio = 1")
        need(len(self.adam_betas) == 2 and all(0.0 <= b < 1.0 for b in self.adam_betas), "adam_betas",
             "must be two numbers in [0, 1)")
        if self.guidance_range is not None:
            lo_hi = self.guidance_range
            need(len(lo_hi) == 2 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in lo_hi)
                 and lo_hi[0] <= lo_hi[1], "guidance_range", "must be None or (low, high) with low <= high")
        if self.target_modules is not None:
            need(len(self.target_modules) > 0 and all(isinstance(s, str) and s for s in self.target_modules),
                 "target_modules", "must be None (every linear layer) or a non-empty list of module names")
        need(isinstance(self.extra, dict), "extra", "must be a dict")
        # fp8's patched layer forwards are untested under compilation
        need(not (self.compile_blocks and self.fp8_targets), "compile_blocks",
             "cannot run together with fp8_targets yet; switch one of them off")

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


# The schedule knobs a model family sets for itself (host/families.py: family_recipe): those with an "auto" value.
SCHEDULE_KNOBS = tuple(f.name for f, k in knobs_of(ShortcutConfig) if k.auto is not None)


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
