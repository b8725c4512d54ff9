"""Training through a model built under torch.inference_mode, as ComfyUI builds every model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shortcut_core.config import ShortcutConfig
from shortcut_core.inference_tensors import InferenceTensorAliases
from shortcut_core.trainer import ShortcutTrainer

from hashing import module_hash


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.hidden, self.out = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 8)
        self.norm = nn.LayerNorm(16)  # affine weights: saved for the input's gradient too

    def forward(self, x, t, **_):
        h = torch.nn.functional.silu(self.inp(x) + t[:, None])
        return self.out(self.norm(torch.nn.functional.silu(self.hidden(h))))


def _inference_net() -> Net:
    torch.manual_seed(0)
    with torch.inference_mode():
        net = Net()
    assert all(p.is_inference() for p in net.parameters())
    return net


def _config() -> ShortcutConfig:
    return ShortcutConfig(rank=2, alpha=2, batch_size=4, steps=3, learning_rate=1e-2, checkpoint_every=0,
                          guidance_range=None, gradient_checkpointing=False, resolution_shift_prob=0.0)


def test_plain_autograd_refuses_inference_weights():
    net = _inference_net()
    x = torch.randn(2, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="[Ii]nference tensors"):
        net(x, torch.zeros(2)).sum().backward()


def test_trainer_learns_through_inference_weights_and_restores_them():
    net = _inference_net()
    originals = {name: p for name, p in net.named_parameters()}
    before = module_hash(net)
    latents = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    with ShortcutTrainer(net, lambda x, t, **e: net(x, t), latents, _config()) as trainer:
        result = trainer.run(progress=False)
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    assert any(w.up.abs().sum() > 0 for w in result.lora.values()), "the student did not learn"
    # the very same inference tensors are back in place, unchanged, and no hook is left behind
    assert {name: p for name, p in net.named_parameters()} == originals
    assert all(p.is_inference() for p in net.parameters())
    assert module_hash(net) == before


def test_weights_moved_outside_inference_mode_train_too():
    """A model built under inference_mode and moved outside it (ComfyUI loading it onto the GPU inside the
    training node; a dtype conversion moves it the same way on a CPU) keeps a missing version counter:
    autograd refuses it although it is no longer an inference tensor. Seen on an H200 with bf16 Flux."""
    net = _inference_net()
    net.to(torch.float64)
    assert not any(p.is_inference() for p in net.parameters())
    with pytest.raises(RuntimeError, match="[Ii]nference tensors"):
        net(torch.randn(2, 8, dtype=torch.float64, requires_grad=True), torch.zeros(2, dtype=torch.float64)).sum().backward()
    before = module_hash(net)
    latents = torch.randn(16, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with ShortcutTrainer(net, lambda x, t, **e: net(x, t.to(x.dtype)), latents, _config()) as trainer:
        assert trainer._inference_aliases.count == 8  # every base weight and bias
        result = trainer.run(progress=False)
    assert any(w.up.abs().sum() > 0 for w in result.lora.values()), "the student did not learn"
    assert module_hash(net) == before


def test_aliases_share_storage_and_the_originals_come_back():
    net = _inference_net()
    originals = dict(net.named_parameters())
    pointers = {name: p.data_ptr() for name, p in originals.items()}
    aliases = InferenceTensorAliases(net)
    try:
        assert aliases.count == 8  # weight and bias of inp, hidden, out, norm
        for name, p in net.named_parameters():
            assert p is not originals[name] and not p.is_inference() and not p.requires_grad
            assert p.data_ptr() == pointers[name]  # the same bytes: nothing was copied
        x = torch.randn(2, 8, requires_grad=True)
        net(x, torch.zeros(2)).sum().backward()
        assert x.grad is not None
    finally:
        aliases.restore()
    assert dict(net.named_parameters()) == originals
    assert all(p.is_inference() for p in net.parameters())


def test_aliases_keep_the_attributes_a_host_set_on_its_weights():
    """Newer ComfyUI tags each weight with `_model_dtype` (dynamic VRAM sizes its GPU copy by it)."""
    net = _inference_net()
    net.hidden.weight._model_dtype = torch.bfloat16
    net.norm.bias.note = {"set by": "host"}
    aliases = InferenceTensorAliases(net)
    try:
        assert not net.hidden.weight.is_inference()
        assert net.hidden.weight._model_dtype is torch.bfloat16
        assert net.norm.bias.note == {"set by": "host"}
        assert not hasattr(net.inp.weight, "_model_dtype")
    finally:
        aliases.restore()
    assert net.hidden.weight.is_inference() and net.hidden.weight._model_dtype is torch.bfloat16
