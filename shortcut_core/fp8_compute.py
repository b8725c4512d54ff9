"""fp8 matmuls for the no-grad forwards of SCFM training (the targets' sub-steps); opt-in.

Why: every SCFM step runs t_skip no-grad forwards of the frozen base model (teacher and EMA roles) for one student
forward and backward. On cards with fp8 tensor cores (NVIDIA sm_89+: 4090, L40, H100, H200) those forwards' linear
layers can run as fp8 matmuls at about twice the bf16 rate, as ComfyUI's `--fast` sampling does (comfy/ops.py,
fp8_linear). The targets are only regressed on, so their rounding enters the gradient as a small noise: e4m3 keeps 3
mantissa bits, a relative error of at most 1/16 per element, about 3.5 % relative (Frobenius) error on a product of
Gaussian matrices; the walk of a few EMA sub-steps the target is already errs by more. The student's forward and
backward never run in fp8.

What runs: for every frozen nn.Linear under the roots (LoRA factor layers and layers carrying ComfyUI weight
patches excluded), while the model is called without grad, the input is scaled per tensor (amax / 448) into
float8_e4m3fn, the weight likewise (or used as stored when it already is e4m3fn, with ComfyUI's `scale_weight` when
it has one, else scale 1, as ComfyUI does), and the product is torch._scaled_mm (float32 accumulation, output in the
input's dtype) on a card with fp8 compute. Elsewhere (CPU, older GPUs) the same quantized values are multiplied in
float32: _scaled_mm's own arithmetic (products of e4m3 values are exact in float32), so the CPU checks the path's
numerics, at no speed gain. Layers whose in or out features are not multiples of 16 (_scaled_mm's rule), other
input dtypes, weights on another device than the input (ComfyUI's lowvram casting) and tensor subclasses run their
own forward, everywhere alike.

"Called without grad" is the grad mode when a root module is called, not only inside the layer: a checkpointed block
(activation_checkpointing.py) runs the student's forward inside an autograd Function, where grad is off, and only
recomputes it with grad in the backward; reading the mode in the layer alone would put the student's prediction
through fp8 and differentiate a forward that differs from it. Pass the module the velocity calls (or its blocks).

Memory: the quantized weights are cached per layer for the context, one fp8 copy of the patched weights: half their
bf16 size, a quarter of float32 (about 12 GB for Flux's 12B parameters in bf16). `cache_weights=False` quantizes on
every call instead (one extra pass over each weight per forward). A cached copy is dropped when its weight tensor is
freed (block streaming puts fresh tensors in each forward, so a streamed block keeps no copy on the device) and
recomputed when the weight is another tensor or was modified in place (its _version; inference tensors have none).
Weights stored in e4m3fn are used as they are: no copy.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Iterable

import torch
from torch import nn

from .forward_patches import own_forward, restore_forwards

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # largest finite float8_e4m3fn
ALIGNMENT = 16    # torch._scaled_mm needs in and out features divisible by this
_ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, E4M3)


def fp8_compute_supported(device: torch.device | str | None = None) -> bool:
    """Whether `device` (default: the current CUDA device) multiplies fp8 on tensor cores: NVIDIA compute capability
    8.9 or newer (Ada, Hopper, Blackwell) and a torch with _scaled_mm. ROCm's fp8 (e4m3fnuz) is not used here."""
    if not hasattr(torch, "_scaled_mm") or not torch.cuda.is_available() or torch.version.hip:
        return False
    device = torch.device("cuda") if device is None else torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def quantize_e4m3(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(t / scale as contiguous float8_e4m3fn, scale as a float32 scalar tensor), scale = amax|t| / 448: per-tensor
    scaling that puts the largest entry at e4m3's largest finite value. In float32, on t's device, no host sync."""
    t32 = t.float()
    scale = t32.abs().amax().clamp_min(1e-30) / E4M3_MAX
    return (t32 / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3).contiguous(), scale


def fp8_matmul(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None, out_dtype: torch.dtype, *, kernel: bool) -> torch.Tensor:
    """(xq @ wq^T) * x_scale * w_scale + bias in out_dtype, from xq (M, K) and wq (N, K), both contiguous e4m3.
    kernel: torch._scaled_mm (wq^T is then the column-major operand it wants); else the same arithmetic in float32.
    _scaled_mm fuses a bias only into half-precision outputs; a float32 output gets it added after."""
    if not kernel:
        out = (xq.float() @ wq.float().t()) * (x_scale * w_scale)
        return (out if bias is None else out + bias.float()).to(out_dtype)
    fused = bias is not None and out_dtype in (torch.float16, torch.bfloat16)
    out = torch._scaled_mm(xq, wq.t(), scale_a=x_scale, scale_b=w_scale, bias=bias.to(out_dtype) if fused else None,
                           out_dtype=out_dtype)
    out = out[0] if isinstance(out, tuple) else out  # torch < 2.5 also returned amax
    return out if bias is None or fused else out + bias.to(out_dtype)


def _weight_patched(module: nn.Module) -> bool:
    """ComfyUI's patch lists (LoRAs applied on the fly, lowvram patches): the weight used is not module.weight."""
    return bool(getattr(module, "weight_function", None)) or bool(getattr(module, "bias_function", None))


def frozen_linears(roots: Iterable[nn.Module]) -> list[tuple[str, nn.Linear]]:
    """The layers fp8 may run: each nn.Linear under the roots (ComfyUI's ops.Linear classes subclass it; peft's LoRA
    wrappers do not) with a frozen 2-D weight whose sides are multiples of 16, outside LoRA factors (names with
    "lora_": the adapters stay in their own precision) and without ComfyUI weight patches. Each module once, in the
    roots' order."""
    out, seen = [], set()
    for root in roots:
        for name, m in root.named_modules():
            w = getattr(m, "weight", None)
            if (isinstance(m, nn.Linear) and id(m) not in seen and "lora_" not in name and isinstance(w, torch.Tensor)
                    and w.dim() == 2 and not w.requires_grad and not _weight_patched(m)
                    and w.shape[0] % ALIGNMENT == 0 and w.shape[1] % ALIGNMENT == 0):
                seen.add(id(m))
                out.append((name, m))
    return out


class Fp8NoGradLinears:
    """While entered, the frozen linear layers under `roots` run fp8 matmuls in forwards made without grad (see the
    module docstring); with grad they run their own forward, bit for bit. On exit every layer is as before (its
    instance `forward`, if it had one, put back) and the cached weights are freed. enabled=False: does nothing.
    kernel: None, torch._scaled_mm where fp8_compute_supported(input device), else the float32 emulation; True or
    False forces one (True on a CPU runs torch's CPU _scaled_mm: the same call the GPU gets)."""

    def __init__(self, roots: nn.Module | Iterable[nn.Module], *, enabled: bool = True, cache_weights: bool = True,
                 kernel: bool | None = None):
        self.roots = [roots] if isinstance(roots, nn.Module) else list(roots)
        self.enabled = enabled
        self.cache_weights = cache_weights
        self.kernel = kernel
        self.patched: list[str] = []   # names (relative to their root) of the layers patched
        self.fp8_calls = 0             # forwards that ran in fp8, for tests and logs
        self._saved: list[tuple[nn.Module, Any]] = []                  # (layer, its instance forward or None)
        self._cache: dict[int, tuple[weakref.ref, int | None, torch.Tensor, torch.Tensor]] = {}
        self._root_calls: list[bool] = []                              # grad mode of each root call in progress
        self._hooks: list = []
        self._kernel_on: dict[torch.device, bool | None] = {}
        # switched off, the layers run their own forward: the trainer keeps the context open for the run (one
        # weight cache) and switches it on around the targets only, so previews and calibration stay exact
        self.active = True

    @property
    def cached_bytes(self) -> int:
        """Device memory held by the cached fp8 weights now (half the bf16 size of the layers run so far)."""
        return sum(entry[2].numel() for entry in self._cache.values())

    # ------------------------------------------------------------------ lifetime
    def __enter__(self) -> "Fp8NoGradLinears":
        self.patched = []
        if not self.enabled:
            return self
        try:
            for root in self.roots:
                self._hooks.append(root.register_forward_pre_hook(self._root_called))
                self._hooks.append(root.register_forward_hook(self._root_returned, always_call=True))
            for name, layer in frozen_linears(self.roots):
                self._saved.append((layer, own_forward(layer)))
                layer.__dict__["forward"] = self._forward(layer, layer.forward)
                self.patched.append(name)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Put every layer's forward back, remove the hooks, free the cached weights (idempotent)."""
        restore_forwards(self._saved)
        for h in self._hooks:
            h.remove()
        self._saved, self._hooks, self._root_calls = [], [], []
        self._cache.clear()

    # ------------------------------------------------------------------ the patched forward
    def _root_called(self, module: nn.Module, args: Any) -> None:
        self._root_calls.append(torch.is_grad_enabled())

    def _root_returned(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._root_calls:
            self._root_calls.pop()

    def _forward(self, layer: nn.Linear, original):
        def forward(x: Any, *args: Any, **kwargs: Any) -> Any:
            if args or kwargs or not self._without_grad():
                return original(x, *args, **kwargs)
            out = self._fp8_linear(layer, x)
            return original(x) if out is None else out
        return forward

    def _without_grad(self) -> bool:
        """No grad here, nor when the innermost root call in progress began (a checkpointed student's blocks run
        without grad inside their autograd Function: their forward must stay exact)."""
        return self.active and not torch.is_grad_enabled() and not (self._root_calls and self._root_calls[-1])

    def _fp8_linear(self, layer: nn.Linear, x: Any) -> torch.Tensor | None:
        """The layer's output through fp8, or None where fp8 does not apply (the layer then runs its own forward)."""
        w, bias = layer.weight, layer.bias
        if (type(x) is not torch.Tensor or x.dtype not in _ACTIVATION_DTYPES
                or x.numel() == 0 or type(w) not in (torch.Tensor, nn.Parameter) or w.dtype not in _WEIGHT_DTYPES
                or w.dim() != 2 or w.requires_grad or w.device != x.device or x.shape[-1] != w.shape[1]
                or _weight_patched(layer)):
            return None
        n, k = w.shape
        if n % ALIGNMENT or k % ALIGNMENT:
            return None
        kernel = self._use_kernel(x.device)
        if kernel is None:
            return None
        weight = self._weight(layer, w)
        if weight is None:
            return None
        xq, x_scale = quantize_e4m3(x.reshape(-1, k))
        bias = None if bias is None else bias.to(x.device)
        try:
            out = fp8_matmul(xq, x_scale, weight[0], weight[1], bias, x.dtype, kernel=kernel)
        except RuntimeError as e:
            if not kernel:
                raise
            warnings.warn(f"fp8 matmul failed on {x.device} ({e}); the no-grad forwards run without fp8 from here",
                          RuntimeWarning, stacklevel=2)
            self._kernel_on[x.device] = None
            return None
        self.fp8_calls += 1
        return out.reshape(*x.shape[:-1], n)

    def _use_kernel(self, device: torch.device) -> bool | None:
        """Whether to call torch._scaled_mm on `device` (None once it failed there: fp8 is then off there)."""
        if device not in self._kernel_on:
            self._kernel_on[device] = fp8_compute_supported(device) if self.kernel is None else self.kernel
        return self._kernel_on[device]

    def _weight(self, layer: nn.Linear, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(e4m3 weight, its float32 scale): a stored e4m3fn weight as is, else quantized (cached while `w` lives and
        is not modified)."""
        if w.dtype == E4M3:
            scale = getattr(layer, "scale_weight", None)  # ComfyUI's scaled fp8 checkpoints
            if scale is None:
                return w.contiguous(), torch.ones((), device=w.device, dtype=torch.float32)
            if not isinstance(scale, torch.Tensor) or scale.numel() != 1:
                return None
            return w.contiguous(), scale.detach().to(device=w.device, dtype=torch.float32).reshape(())
        if not self.cache_weights:
            return quantize_e4m3(w.detach())
        key, version = id(layer), _version(w)
        entry = self._cache.get(key)
        if entry is not None and entry[0]() is w and entry[1] == version:
            return entry[2], entry[3]
        wq, scale = quantize_e4m3(w.detach())
        cache = self._cache

        def forget(ref: weakref.ref) -> None:  # the weight was freed: so is its copy
            if cache.get(key, (None,))[0] is ref:
                del cache[key]

        self._cache[key] = (weakref.ref(w, forget), version, wq, scale)
        return wq, scale


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter
        return None


def fp8_no_grad_linears(roots: nn.Module | Iterable[nn.Module], *, enabled: bool = True, cache_weights: bool = True,
                        kernel: bool | None = None) -> Fp8NoGradLinears:
    """`with fp8_no_grad_linears(model):` the model's no-grad forwards run their frozen linear layers in fp8
    (Fp8NoGradLinears). Typically enabled=fp8_compute_supported(device)."""
    return Fp8NoGradLinears(roots, enabled=enabled, cache_weights=cache_weights, kernel=kernel)


__all__ = ["Fp8NoGradLinears", "fp8_no_grad_linears", "fp8_compute_supported", "frozen_linears", "quantize_e4m3",
           "fp8_matmul", "E4M3_MAX"]
