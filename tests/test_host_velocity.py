"""The host adapter's velocity is what ComfyUI's own sampler machinery predicts, item by item.

ConditionedVelocity batches per-item conditioning with the host's COND concatenation and runs
the host's sampling_function; each item must get exactly the velocity the stock guider gives
for that item's conditioning alone: Flux with distilled guidance and reference latents (Kontext),
SD3 with true CFG and a negative.
"""

from __future__ import annotations

import pytest
import torch

import comfy_host


@pytest.fixture(scope="module")
def host(comfyui):
    comfy_host.load_builtin_nodes()
    comfy_host.load_pack()
    comfy_host.pack_module("host.sampling"), comfy_host.pack_module("host.velocity")
    return comfy_host.pack_module("host")


def _in_guider(host, model, positive, negative, cfg, latents, fn):
    """fn(model_wrap, extra_args) inside the host's guider, after it loaded the model and encoded the conds."""
    import comfy.samplers

    class Capture(comfy.samplers.Sampler):
        def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
                   disable_pbar=False):
            self.result = fn(model_wrap, extra_args)
            return torch.zeros_like(latent_image)

    capture = Capture()
    guider = host.sampling.make_guider(model, positive, negative, cfg)
    guider.sample(torch.zeros_like(latents), latents, capture, torch.tensor([1.0, 0.0]), seed=0, disable_pbar=True)
    return capture.result


def _compare(host, model, positive, negative, cfg, guidance=None):
    count = len(positive)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(count, 16, 8, 8, generator=g)
    items = torch.tensor([2, 0, 1, 2])
    x = torch.randn(len(items), 16, 8, 8, generator=g)
    t = torch.tensor([0.9, 0.5, 0.2, 0.05])

    def ours(model_wrap, extra_args):
        velocity = host.velocity.ConditionedVelocity(model_wrap.inner_model, model_wrap.conds, count, cfg,
                                            extra_args["model_options"], extra_args["seed"])
        return velocity(x, t, item=items, guidance=guidance)

    got = _in_guider(host, model, positive, negative, cfg, latents, ours)
    for row, i in enumerate(items.tolist()):
        pos = [[positive[i][0], dict(positive[i][1])]]
        if guidance is not None:
            pos[0][1]["guidance"] = float(guidance[row])
        neg = None if negative is None else [negative[i]]
        xi, ti = x[row:row + 1], t[row:row + 1]
        want = _in_guider(host, model, pos, neg, cfg, latents[i:i + 1],
                          lambda mw, ea: (xi - mw(xi, ti, **ea)) / ti.reshape(-1, 1, 1, 1))
        # v is read back as (x - denoised) / t: float32 rounding of a batched against a one-item forward
        # grows as 1 / t and with true CFG (seen: up to 1.9e-5 in one element of 1024, depending on test order)
        torch.testing.assert_close(got[row:row + 1], want, rtol=1e-4, atol=2e-5 / ti.item())
    return got


def test_flux_items_get_their_own_conditioning_and_guidance(host):
    import nodes
    _, patcher = comfy_host.tiny_flux(seed=1)
    g = torch.Generator().manual_seed(2)
    positive = [[torch.randn(1, 4 + 2 * i, 32, generator=g),  # different prompt lengths, padded as the host pads
                 {"pooled_output": torch.randn(1, 16, generator=g), "guidance": 1.0 + 2.0 * i}] for i in range(3)]
    # Kontext-style reference latents through the host's own ReferenceLatent node
    reference = nodes.NODE_CLASS_MAPPINGS["ReferenceLatent"].execute(positive[1:2],
                                                                     {"samples": torch.randn(1, 16, 8, 8, generator=g)})
    positive[1] = reference.result[0][0]
    assert "reference_latents" in positive[1][1]
    plain = _compare(host, patcher, positive, None, 1.0)
    drawn = _compare(host, patcher, positive, None, 1.0, guidance=torch.tensor([0.5, 6.0, 3.0, 7.0]))
    assert not torch.allclose(plain, drawn)  # the per-item draw reaches the network


def test_sd3_true_cfg_with_a_negative_per_item(host):
    _, patcher = comfy_host.tiny_sd3(seed=1)
    g = torch.Generator().manual_seed(3)
    positive = [[torch.randn(1, 5, 48, generator=g), {"pooled_output": torch.randn(1, 32, generator=g)}]
                for _ in range(3)]
    negative = [[torch.zeros(1, 5, 48), {"pooled_output": torch.zeros(1, 32)}]] * 3
    with_cfg = _compare(host, patcher, positive, negative, 3.5)
    without = _compare(host, patcher, positive, None, 1.0)
    assert not torch.allclose(with_cfg, without)


def test_one_conditioning_serves_every_latent_and_wrong_counts_are_refused(host):
    _, patcher = comfy_host.tiny_sd3(seed=1)
    positive = [[torch.randn(1, 5, 48), {"pooled_output": torch.randn(1, 32)}]]
    latents = torch.randn(3, 16, 8, 8)

    def build(model_wrap, extra_args, count):
        return host.velocity.ConditionedVelocity(model_wrap.inner_model, model_wrap.conds, count, 1.0,
                                        extra_args["model_options"], 0)

    velocity = _in_guider(host, patcher, positive, None, 1.0, latents, lambda mw, ea: build(mw, ea, 3))
    assert len(velocity.positive) == 3
    with pytest.raises(ValueError, match="positive: has 2 conditionings for 3 latents"):
        _in_guider(host, patcher, positive * 2, None, 1.0, latents, lambda mw, ea: build(mw, ea, 3))
