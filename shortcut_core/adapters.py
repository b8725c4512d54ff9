"""SCFM's LoRA state on any torch module, through peft.

One peft LoRA layer per targeted linear holds several named adapters:
  student   the trainable LoRA (peft "gaussian" init: A ~ N(0, 1/r), B = 0)
  ema_slow  EMA of the student, decay 0.999, zero-initialised (acts as the base model at first)
  ema_fast  EMA of the student, decay 0.99, zero-initialised
  teacher   optional: a given teacher LoRA; without one the teacher is the base model (adapters off)
Switching role flips which adapter each layer runs; no parameter is copied. `detach()` puts
the original modules back, so the module ends exactly as it started.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from typing import Iterator, Mapping, NamedTuple, Sequence

import torch
from torch import nn

STUDENT, EMA_SLOW, EMA_FAST, TEACHER, BASE = "student", "ema_slow", "ema_fast", "teacher", "base"
ROLES = (STUDENT, EMA_SLOW, EMA_FAST, TEACHER, BASE)


class LoraWeights(NamedTuple):
    """One layer's LoRA: delta W = (alpha / rank) * up @ down."""
    down: torch.Tensor  # (rank, in_features), peft's lora_A
    up: torch.Tensor    # (out_features, rank), peft's lora_B
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


LoraState = dict[str, LoraWeights]  # module path (relative to the adapted module) -> weights


def linear_module_names(module: nn.Module) -> list[str]:
    """Names of every nn.Linear inside module (ComfyUI's ops.Linear classes subclass it)."""
    return [name for name, m in module.named_modules() if isinstance(m, nn.Linear) and name]


# adaLN modulation layers by the names flow transformers give them: Flux's img_mod / txt_mod / modulation,
# SD3's and Lumina's adaLN_modulation, Qwen-Image's img_mod. They map the timestep embedding to per-block
# scales and shifts: a few wide layers (a quarter of Flux's LoRA parameters) that see one vector per item.
MODULATION = re.compile(r"(^|\.)(\w+_mod|modulation|adaLN\w*)(\.|$)")


def lora_target_names(module: nn.Module, target_modules: Sequence[str] | None, lora_layers: str = "all",
                      blocks: Sequence[nn.Module] = ()) -> list[str]:
    """The linear layers a LoRA adapts: target_modules with peft's rule for a list (a module name equal to
    an entry or ending in "." + entry; None: every linear layer), then with lora_layers "blocks" only those
    inside `blocks` (the repeated transformer blocks) and outside their modulation layers."""
    names = linear_module_names(module)
    if target_modules is not None:
        names = [n for n in names if any(n == t or n.endswith("." + t) for t in target_modules)]
    if lora_layers == "all":
        return names
    if lora_layers != "blocks":
        raise ValueError(f"lora_layers must be 'all' or 'blocks', got {lora_layers!r}")
    if not blocks:
        raise ValueError("lora_layers 'blocks' needs the model's repeated blocks, and none were found")
    in_blocks = {id(m) for block in blocks for m in block.modules()}
    return [n for n in names if id(module.get_submodule(n)) in in_blocks and not MODULATION.search(n)]


def exact_module_pattern(names) -> str:
    """A peft target_modules regex matching exactly these module paths (a list would match suffixes)."""
    return "|".join(re.escape(n) for n in names)


def uniform_rank_alpha(lora: Mapping[str, LoraWeights], what: str) -> tuple[int, float]:
    if not lora:
        raise ValueError(f"{what} has no layers")
    ranks = {w.rank for w in lora.values()}
    alphas = {w.alpha for w in lora.values()}
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError(f"{what} mixes ranks {sorted(ranks)} / alphas {sorted(alphas)} across layers; the engine "
                         f"needs one rank and alpha (ComfyUI's own LoRA loader applies such files)")
    return ranks.pop(), alphas.pop()


def _lora_layer_class():
    from peft.tuners.lora import LoraLayer
    return LoraLayer


class ShortcutAdapters:
    """Student, dual-EMA and teacher LoRA adapters injected into `module`; a context manager.

    The module must not already contain peft layers. All LoRA parameters live in `dtype`
    (float32 by default: master weights, whatever the base weights are stored in), on `device` when
    given (else beside each base weight: a host that streams weights keeps some of them off the device).
    """

    def __init__(self, module: nn.Module, *, rank: int, alpha: float, target_modules: tuple[str, ...] | list[str] | str | None = None,
                 dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None,
                 teacher: Mapping[str, LoraWeights] | None = None, device: torch.device | str | None = None):
        from peft import LoraConfig, inject_adapter_in_model

        LoraLayer = _lora_layer_class()
        if any(isinstance(m, LoraLayer) for m in module.modules()):
            raise ValueError("the module already holds peft LoRA layers; detach the previous ShortcutAdapters first")
        self.module = module
        self.dtype = dtype
        # Tensors made under torch.inference_mode (ComfyUI loads models that way) take no part in
        # autograd and refuse requires_grad changes outside it: leave their flags alone.
        self._requires_grad = {p: p.requires_grad for p in module.parameters() if not p.is_inference()}
        self._had_peft_config = "peft_config" in module.__dict__
        self._peft_config_before = module.__dict__.get("peft_config")
        self._attached = False

        if isinstance(target_modules, str):
            targets: list[str] | str = target_modules  # a regex peft full-matches against module paths
        elif target_modules is not None:
            targets = list(target_modules)  # peft semantics: module-name suffixes
        else:
            names = linear_module_names(module)
            if not names:
                raise ValueError("the module has no nn.Linear layers for LoRA to adapt")
            targets = exact_module_pattern(names)
        self._attached = True
        try:
            with warnings.catch_warnings():
                # peft warns when a second adapter is injected into the same model; that is the design here.
                warnings.filterwarnings("ignore", message=".*peft_config.*")
                base_cfg = dict(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0)
                inject_adapter_in_model(LoraConfig(init_lora_weights="gaussian", **base_cfg), module, adapter_name=STUDENT)
                for name in (EMA_SLOW, EMA_FAST):
                    inject_adapter_in_model(LoraConfig(init_lora_weights=False, **base_cfg), module, adapter_name=name)
                self.has_teacher = teacher is not None and len(teacher) > 0
                if self.has_teacher:
                    t_rank, t_alpha = uniform_rank_alpha(teacher, "the teacher LoRA")
                    inject_adapter_in_model(
                        LoraConfig(r=t_rank, lora_alpha=t_alpha, target_modules=exact_module_pattern(teacher),
                                   lora_dropout=0.0,
                                   init_lora_weights=False), module, adapter_name=TEACHER)
            self.layers: dict[str, nn.Module] = {n: m for n, m in module.named_modules() if isinstance(m, LoraLayer)}
            if not self.layers:
                raise ValueError(f"no module matched target_modules={targets!r}")
            self._fast_switch = all(hasattr(m, "_active_adapter") and hasattr(m, "_disable_adapters")
                                    for m in self.layers.values())
            for layer in self.layers.values():
                for adapter_dict in (layer.lora_A, layer.lora_B):
                    for key in list(adapter_dict.keys()):
                        adapter_dict[key] = adapter_dict[key].to(device=device, dtype=dtype)
            self._init_weights(generator)
            if self.has_teacher:
                self.load_lora_state(TEACHER, teacher)
            for p in module.parameters():  # base weights and every adapter; the student is switched back on below
                if not p.is_inference():
                    p.requires_grad_(False)
            for p in self.parameters(STUDENT):
                p.requires_grad_(True)
            self._active = STUDENT
            self._activate(STUDENT)
        except BaseException:
            self.detach()
            raise

    # ------------------------------------------------------------------ parameters
    def _init_weights(self, generator: torch.Generator | None) -> None:
        with torch.no_grad():
            for layer in self.layers.values():
                if STUDENT in layer.lora_A:
                    a = layer.lora_A[STUDENT].weight
                    # peft's "gaussian" init, drawn from our generator so a seed fixes the run.
                    a.copy_(torch.randn(a.shape, generator=generator, dtype=torch.float32).mul_(1.0 / layer.r[STUDENT]))
                    layer.lora_B[STUDENT].weight.zero_()
                for name in (EMA_SLOW, EMA_FAST):
                    if name in layer.lora_A:
                        layer.lora_A[name].weight.zero_()
                        layer.lora_B[name].weight.zero_()

    def parameters(self, role: str = STUDENT) -> list[torch.Tensor]:
        """The role's LoRA tensors in a fixed order (layer path order; down then up)."""
        out = []
        for layer in self.layers.values():
            if role in layer.lora_A:
                out += [layer.lora_A[role].weight, layer.lora_B[role].weight]
        return out

    def named_parameters(self, role: str = STUDENT) -> list[tuple[str, torch.Tensor]]:
        out = []
        for path, layer in self.layers.items():
            if role in layer.lora_A:
                out += [(f"{path}.lora_down", layer.lora_A[role].weight), (f"{path}.lora_up", layer.lora_B[role].weight)]
        return out

    def lora_state(self, role: str = STUDENT) -> LoraState:
        """A detached copy of the role's LoRA as {module path: LoraWeights}."""
        return {path: LoraWeights(layer.lora_A[role].weight.detach().clone(), layer.lora_B[role].weight.detach().clone(),
                                  float(layer.lora_alpha[role]))
                for path, layer in self.layers.items() if role in layer.lora_A}

    @torch.no_grad()
    def load_lora_state(self, role: str, state: Mapping[str, LoraWeights], *, strict: bool = True) -> None:
        """Copy weights into the role's adapter. A differing alpha is folded into `up` so the function is kept.

        strict: every adapted layer must be in `state`, else it is zeroed (a no-op layer).
        """
        unknown = sorted(set(state) - {p for p, layer in self.layers.items() if role in layer.lora_A})
        if unknown:
            raise KeyError(f"{len(unknown)} LoRA entries match no {role} layer of the module, e.g. {unknown[:3]}")
        for path, layer in self.layers.items():
            if role not in layer.lora_A:
                continue
            a, b = layer.lora_A[role].weight, layer.lora_B[role].weight
            if path not in state:
                if strict:
                    raise KeyError(f"the LoRA for {role} has no entry for layer {path!r}")
                a.zero_()
                b.zero_()
                continue
            w = state[path]
            if tuple(w.down.shape) != tuple(a.shape) or tuple(w.up.shape) != tuple(b.shape):
                raise ValueError(f"layer {path!r}: LoRA shapes down {tuple(w.down.shape)} / up {tuple(w.up.shape)} do not "
                                 f"match the {role} adapter's {tuple(a.shape)} / {tuple(b.shape)} (rank {layer.r[role]})")
            a.copy_(w.down)
            ratio = (w.alpha / w.rank) / (layer.lora_alpha[role] / layer.r[role])
            b.copy_(w.up if ratio == 1.0 else w.up.to(torch.float64) * ratio)

    @torch.no_grad()
    def copy_adapter(self, source: str, destination: str) -> None:
        torch._foreach_copy_(self.parameters(destination), self.parameters(source))

    # ------------------------------------------------------------------ EMA
    @torch.no_grad()
    def update_ema(self, role: str, decay: float) -> None:
        """ema <- decay * ema + (1 - decay) * student, in place over all layers at once."""
        torch._foreach_lerp_(self.parameters(role), self.parameters(STUDENT), 1.0 - decay)

    @torch.no_grad()
    def restart_emas(self) -> None:
        """Both EMAs restart from the current student (the SD3.5 recipe's ema_restart_steps)."""
        self.copy_adapter(STUDENT, EMA_SLOW)
        self.copy_adapter(STUDENT, EMA_FAST)

    # ------------------------------------------------------------------ switching
    def _activate(self, role: str) -> None:
        off = self._peft_name(role) == "__base__"
        for layer in self.layers.values():
            if self._fast_switch:
                # Flip peft's own two switches; requires_grad stays as set at attach time
                # (student trainable, the rest frozen), so a switch costs no parameter walk.
                layer._disable_adapters = off
                layer._active_adapter = [role] if not off else layer._active_adapter
            else:
                if off:
                    layer.enable_adapters(False)
                else:
                    layer.enable_adapters(True)
                    layer.set_adapter(role)
        if not self._fast_switch:
            for p in self.module.parameters():
                p.requires_grad_(False)
            for p in self.parameters(STUDENT):
                p.requires_grad_(True)
        self._active = role

    @contextlib.contextmanager
    def use(self, role: str) -> Iterator[None]:
        """Run the module as `role` inside the block: student, ema_slow, ema_fast, teacher or base."""
        previous = self._active
        self._activate(role)
        try:
            yield
        finally:
            self._activate(previous)

    def _peft_name(self, role: str) -> str:
        """The peft adapter a role runs; "__base__" (peft's name for none) for the base model and an absent teacher."""
        if role not in ROLES:
            raise ValueError(f"unknown adapter role {role!r}; one of {ROLES}")
        return "__base__" if role == BASE or (role == TEACHER and not self.has_teacher) else role

    @contextlib.contextmanager
    def use_per_item(self, roles: Sequence[str]) -> Iterator[None]:
        """Run batch item i as roles[i], all items in one forward (peft's mixed-adapter batches: the
        base layer once over the whole batch, each adapter on its rows). Under no_grad only. A layer
        that sees k * len(roles) rows (cond and uncond of CFG stacked by the host) repeats the roles
        k times, in that order."""
        names = [self._peft_name(r) for r in roles]

        def with_roles(layer: nn.Module, args: tuple, kwargs: dict):
            rows = args[0].shape[0]
            if rows % len(names):
                raise RuntimeError(f"a LoRA layer saw {rows} rows for {len(names)} items; per-item roles need the "
                                   f"batch first (or stacked whole batches)")
            return args, dict(kwargs, adapter_names=names * (rows // len(names)))

        previous = self._active
        handles = []
        try:
            self._activate(STUDENT)
            for layer in self.layers.values():
                layer._disable_adapters = False
                handles.append(layer.register_forward_pre_hook(with_roles, with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._activate(previous)

    @property
    def active(self) -> str:
        return self._active

    def set_strength(self, role: str, strength: float) -> None:
        """Scale the role's LoRA output: scaling = strength * alpha / rank."""
        for layer in self.layers.values():
            layer.set_scale(role, strength)

    # ------------------------------------------------------------------ lifetime
    def detach(self) -> None:
        """Remove every LoRA layer and restore requires_grad flags: the module is as it was before."""
        if not self._attached:
            return
        LoraLayer = _lora_layer_class()
        for path, layer in [(n, m) for n, m in self.module.named_modules() if isinstance(m, LoraLayer)]:
            parent_path, _, child = path.rpartition(".")
            parent = self.module.get_submodule(parent_path) if parent_path else self.module
            setattr(parent, child, layer.get_base_layer())
        if self._had_peft_config:
            self.module.__dict__["peft_config"] = self._peft_config_before
        else:
            self.module.__dict__.pop("peft_config", None)
        for p, flag in self._requires_grad.items():
            p.requires_grad_(flag)
        self.layers = {}
        self._attached = False

    def __enter__(self) -> "ShortcutAdapters":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()
