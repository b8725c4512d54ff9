"""ShortcutAdapters: student / dual-EMA / teacher LoRA adapters on a plain torch module via peft."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from shortcut_core.adapters import (BASE, EMA_FAST, EMA_SLOW, STUDENT, TEACHER, LoraWeights, ShortcutAdapters,
                                    linear_module_names)

from hashing import tensor_hashes

LORA_ROLES = (STUDENT, EMA_SLOW, EMA_FAST)


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)  # module construction only; the engine's draws use explicit generators
    m = nn.Sequential(
        nn.Linear(6, 16),
        nn.SiLU(),
        nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 16), nn.GELU()),
        nn.Linear(16, 5),
    )
    m[2][1].weight.requires_grad_(False)  # a mix of requires_grad flags that detach must restore
    m.register_buffer("marker", torch.arange(4, dtype=torch.float32))
    return m.to(dtype)


def inputs(n: int = 7, dtype=torch.float32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 6, generator=torch.Generator().manual_seed(seed)).to(dtype)


def randomize(adapters: ShortcutAdapters, role: str, seed: int, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapters.parameters(role):
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def structure(module: nn.Module):
    return {
        "types": [(name, type(m)) for name, m in module.named_modules()],
        "ids": [id(m) for m in module.modules()],
        "dict_keys": [sorted(m.__dict__.keys()) for m in module.modules()],
        "state_keys": list(module.state_dict().keys()),
        "params": [(name, id(p), p.requires_grad) for name, p in module.named_parameters()],
        "buffers": [(name, id(b)) for name, b in module.named_buffers()],
    }


def has_peft_layers(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer
    return any(isinstance(m, LoraLayer) for m in module.modules())


def make_lora(model: nn.Module, rank: int, alpha: float, seed: int, layers=None) -> dict[str, LoraWeights]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in (layers or linear_module_names(model)):
        lin = model.get_submodule(name)
        out[name] = LoraWeights(torch.randn(rank, lin.in_features, generator=g) * 0.3,
                                torch.randn(lin.out_features, rank, generator=g) * 0.3, float(alpha))
    return out


def merged_copy(model: nn.Module, lora: dict[str, LoraWeights], strength: float = 1.0) -> nn.Module:
    """Reference: the LoRA merged into a copy's weights, W + strength * alpha / rank * up @ down."""
    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        for name, w in lora.items():
            lin = ref.get_submodule(name)
            lin.weight += strength * (w.alpha / w.rank) * (w.up.double() @ w.down.double())
    return ref


@pytest.fixture
def model():
    return tiny_model()


# ---------------------------------------------------------------------------------------------- roles

def test_layers_are_every_linear(model):
    with ShortcutAdapters(model, rank=4, alpha=4, generator=torch.Generator().manual_seed(0)) as ad:
        assert sorted(ad.layers) == sorted(["0", "2.0", "2.2", "3"])
        assert sorted(linear_module_names(tiny_model())) == sorted(ad.layers)
        # LayerNorm untouched
        assert type(model[2][1]) is nn.LayerNorm


def test_teacher_and_base_are_bit_identical_to_the_original(model):
    x = inputs()
    y0 = model(x).detach()
    with ShortcutAdapters(model, rank=4, alpha=8, generator=torch.Generator().manual_seed(0)) as ad:
        randomize(ad, STUDENT, 1)
        with torch.no_grad():
            with ad.use(TEACHER):
                assert ad.active == TEACHER
                assert torch.equal(model(x), y0)
            with ad.use(BASE):
                assert torch.equal(model(x), y0)
            # zero-initialised EMAs act as the base model, exactly
            for role in (EMA_SLOW, EMA_FAST):
                with ad.use(role):
                    assert torch.equal(model(x), y0)
            assert ad.active == STUDENT
            y_student = model(x)
        assert not torch.allclose(y_student, y0, atol=1e-3)


def test_fresh_student_is_the_base_model_and_seeded(model):
    x = inputs()
    y0 = model(x).detach()
    model2 = tiny_model()
    with ShortcutAdapters(model, rank=8, alpha=8, generator=torch.Generator().manual_seed(3)) as a, \
            ShortcutAdapters(model2, rank=8, alpha=8, generator=torch.Generator().manual_seed(3)) as b:
        with torch.no_grad():
            assert torch.equal(model(x), y0)  # peft "gaussian": B = 0
        for (na, pa), (nb, pb) in zip(a.named_parameters(STUDENT), b.named_parameters(STUDENT)):
            assert na == nb and torch.equal(pa, pb)
            if na.endswith("lora_up"):
                assert bool((pa == 0).all())
            else:
                assert pa.abs().sum() > 0
        downs = torch.cat([p.flatten() for n, p in a.named_parameters(STUDENT) if n.endswith("lora_down")])
        assert abs(downs.std().item() - 1 / 8) < 0.02  # peft gaussian init: std 1 / rank


def test_student_output_matches_merged_reference(model):
    x = inputs()
    with ShortcutAdapters(model, rank=4, alpha=2, generator=torch.Generator().manual_seed(0)) as ad:
        randomize(ad, STUDENT, 5)
        lora = ad.lora_state(STUDENT)
        ref = merged_copy(tiny_model(), lora)
        with torch.no_grad():
            torch.testing.assert_close(model(x).double(), ref(x.double()), rtol=1e-5, atol=1e-5)


def test_given_teacher_lora_is_used_under_teacher(model):
    x = inputs()
    teacher = make_lora(model, rank=2, alpha=3.0, seed=11)
    ref = merged_copy(model, teacher)
    y0 = model(x).detach()
    with ShortcutAdapters(model, rank=4, alpha=4, generator=torch.Generator().manual_seed(0), teacher=teacher) as ad:
        assert ad.has_teacher
        randomize(ad, STUDENT, 1)
        with torch.no_grad():
            with ad.use(TEACHER):
                y_teacher = model(x)
            with ad.use(BASE):
                assert torch.equal(model(x), y0)
        torch.testing.assert_close(y_teacher.double(), ref(x.double()), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(y_teacher, y0, atol=1e-3)
        # the teacher is not trainable and the EMAs did not pick it up here (the trainer decides that)
        assert all(not p.requires_grad for p in ad.parameters(TEACHER))
        state = ad.lora_state(TEACHER)
        assert set(state) == set(teacher)
        for k, w in teacher.items():
            assert torch.equal(state[k].down, w.down) and torch.equal(state[k].up, w.up) and state[k].alpha == 3.0


def test_teacher_lora_on_some_layers_only(model):
    x = inputs()
    teacher = make_lora(model, rank=3, alpha=3.0, seed=12, layers=["2.2"])
    ref = merged_copy(model, teacher)
    with ShortcutAdapters(model, rank=4, alpha=4, generator=torch.Generator().manual_seed(0), teacher=teacher) as ad:
        randomize(ad, STUDENT, 1)
        with torch.no_grad(), ad.use(TEACHER):
            torch.testing.assert_close(model(x).double(), ref(x.double()), rtol=1e-5, atol=1e-5)


def test_unknown_role_is_rejected(model):
    with ShortcutAdapters(model, rank=2, alpha=2) as ad:
        with pytest.raises(ValueError, match="role"):
            with ad.use("studnet"):
                pass
        assert ad.active == STUDENT


# ---------------------------------------------------------------------------------------------- EMA

@pytest.mark.parametrize("decay, n", [(0.99, 50), (0.999, 30), (0.5, 7), (0.0, 3)])
def test_update_ema_arithmetic(model, decay, n):
    with ShortcutAdapters(model, rank=4, alpha=4, generator=torch.Generator().manual_seed(0)) as ad:
        randomize(ad, STUDENT, 2)
        p = [t.detach().clone() for t in ad.parameters(STUDENT)]
        authors = [torch.zeros_like(t) for t in p]  # EMAs start at zero
        for _ in range(n):
            ad.update_ema(EMA_SLOW, decay)
            for ema, s in zip(authors, p):
                ema.mul_(decay).add_(s, alpha=1 - decay)  # the authors' EMA update
        for ema, s, ref in zip(ad.parameters(EMA_SLOW), p, authors):
            closed = s.double() * (1 - decay ** n)
            torch.testing.assert_close(ema.double(), closed, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(ema, ref, rtol=1e-6, atol=1e-7)
        # the other EMA and the student are untouched
        assert all(bool((t == 0).all()) for t in ad.parameters(EMA_FAST))
        assert all(torch.equal(a, b) for a, b in zip(ad.parameters(STUDENT), p))


def test_update_ema_tracks_a_moving_student(model):
    with ShortcutAdapters(model, rank=2, alpha=2, generator=torch.Generator().manual_seed(0)) as ad:
        ref = [torch.zeros_like(t) for t in ad.parameters(EMA_FAST)]
        for k in range(5):
            randomize(ad, STUDENT, 100 + k)
            ad.update_ema(EMA_FAST, 0.9)
            for ema, s in zip(ref, ad.parameters(STUDENT)):
                ema.mul_(0.9).add_(s.detach(), alpha=0.1)
        for a, b in zip(ad.parameters(EMA_FAST), ref):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_restart_emas_copies_the_student(model):
    x = inputs()
    with ShortcutAdapters(model, rank=4, alpha=4, generator=torch.Generator().manual_seed(0)) as ad:
        randomize(ad, STUDENT, 3)
        randomize(ad, EMA_SLOW, 4)
        ad.restart_emas()
        for role in (EMA_SLOW, EMA_FAST):
            for a, b in zip(ad.parameters(role), ad.parameters(STUDENT)):
                assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
        with torch.no_grad():
            y_student = model(x)
            with ad.use(EMA_FAST):
                assert torch.equal(model(x), y_student)
        # a copy, not an alias: changing the student later leaves the EMAs alone
        randomize(ad, STUDENT, 5)
        assert not torch.equal(ad.parameters(EMA_SLOW)[1], ad.parameters(STUDENT)[1])


# ---------------------------------------------------------------------------------------------- gradients

def test_gradients_reach_the_student_only(model):
    teacher = make_lora(model, rank=2, alpha=2.0, seed=13)
    x = inputs()
    with ShortcutAdapters(model, rank=4, alpha=4, generator=torch.Generator().manual_seed(0), teacher=teacher) as ad:
        randomize(ad, STUDENT, 1)
        randomize(ad, EMA_SLOW, 2)
        with torch.no_grad():
            with ad.use(EMA_SLOW):
                model(x)
        model(x).pow(2).sum().backward()
        student = {id(p) for p in ad.parameters(STUDENT)}
        assert len(student) == 2 * len(ad.layers)
        for name, p in model.named_parameters():
            if id(p) in student:
                assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
            else:
                assert p.grad is None, name
                assert not p.requires_grad, name


def test_switching_roles_copies_no_parameters(model):
    teacher = make_lora(model, rank=2, alpha=2.0, seed=14)
    x = inputs()
    with ShortcutAdapters(model, rank=4, alpha=4, generator=torch.Generator().manual_seed(0), teacher=teacher) as ad:
        randomize(ad, STUDENT, 1)
        randomize(ad, EMA_FAST, 2)

        def snapshot():
            return {(role, i): (t.data_ptr(), t.detach().clone())
                    for role in (*LORA_ROLES, TEACHER) for i, t in enumerate(ad.parameters(role))}

        before = snapshot()
        base_ptrs = [p.data_ptr() for n, p in model.named_parameters() if "lora_" not in n]
        outputs = {}
        with torch.no_grad():
            for role in (STUDENT, EMA_SLOW, EMA_FAST, TEACHER, BASE, STUDENT, TEACHER):
                with ad.use(role):
                    outputs.setdefault(role, []).append(model(x))
        after = snapshot()
        assert before.keys() == after.keys()
        for key in before:
            assert before[key][0] == after[key][0], key
            assert torch.equal(before[key][1], after[key][1]), key
        assert base_ptrs == [p.data_ptr() for n, p in model.named_parameters() if "lora_" not in n]
        # same role, same output; the roles really are different functions
        assert torch.equal(outputs[STUDENT][0], outputs[STUDENT][1])
        assert torch.equal(outputs[TEACHER][0], outputs[TEACHER][1])
        assert not torch.allclose(outputs[STUDENT][0], outputs[EMA_FAST][0])
        assert not torch.allclose(outputs[TEACHER][0], outputs[BASE][0])


def test_nested_use_restores_previous_role(model):
    with ShortcutAdapters(model, rank=2, alpha=2) as ad:
        with ad.use(EMA_SLOW):
            with ad.use(TEACHER):
                assert ad.active == TEACHER
            assert ad.active == EMA_SLOW
            with pytest.raises(RuntimeError):
                with ad.use(BASE):
                    raise RuntimeError("boom")
            assert ad.active == EMA_SLOW
        assert ad.active == STUDENT


# ---------------------------------------------------------------------------------------------- state

def test_lora_state_load_round_trip(model):
    x = inputs()
    with ShortcutAdapters(model, rank=4, alpha=8, generator=torch.Generator().manual_seed(0)) as ad:
        randomize(ad, STUDENT, 6)
        state = ad.lora_state(STUDENT)
        assert set(state) == set(ad.layers)
        for path, w in state.items():
            assert w.alpha == 8.0 and w.rank == 4
            assert w.down.shape == (4, model.get_submodule(path).base_layer.in_features)
            assert not w.down.requires_grad
        # a copy: editing it does not touch the adapter
        next(iter(state.values())).up.add_(1.0)
        assert not torch.equal(next(iter(state.values())).up, ad.parameters(STUDENT)[1])
        state = ad.lora_state(STUDENT)
        ad.load_lora_state(EMA_SLOW, state)
        for a, b in zip(ad.parameters(EMA_SLOW), ad.parameters(STUDENT)):
            assert torch.equal(a, b)
        with torch.no_grad():
            y_student = model(x)
            with ad.use(EMA_SLOW):
                assert torch.equal(model(x), y_student)
        again = ad.lora_state(EMA_SLOW)
        for k in state:
            assert torch.equal(again[k].down, state[k].down) and torch.equal(again[k].up, state[k].up)


def test_load_into_a_fresh_attachment_reproduces_outputs():
    x = inputs()
    m1 = tiny_model()
    with ShortcutAdapters(m1, rank=4, alpha=4, generator=torch.Generator().manual_seed(0)) as ad:
        randomize(ad, STUDENT, 7)
        state = ad.lora_state(STUDENT)
        with torch.no_grad():
            y1 = m1(x)
    m2 = tiny_model()
    with ShortcutAdapters(m2, rank=4, alpha=4, generator=torch.Generator().manual_seed(99)) as ad2:
        ad2.load_lora_state(STUDENT, state)
        with torch.no_grad():
            assert torch.equal(m2(x), y1)


def test_alpha_mismatch_is_folded_into_up(model):
    x = inputs()
    with ShortcutAdapters(model, rank=4, alpha=4, generator=torch.Generator().manual_seed(0)) as ad:
        randomize(ad, STUDENT, 8)
        state = ad.lora_state(STUDENT)  # alpha 4, scale 1
        with torch.no_grad():
            y_student = model(x)
        # the same function with alpha 12 (scale 3) and up / 3
        other = {k: LoraWeights(w.down.clone(), w.up / 3.0, 12.0) for k, w in state.items()}
        ad.load_lora_state(EMA_FAST, other)
        for k, w in ad.lora_state(EMA_FAST).items():
            assert w.alpha == 4.0  # the adapter keeps its own alpha
            torch.testing.assert_close(w.up, other[k].up * 3.0, rtol=1e-6, atol=0)
        with torch.no_grad(), ad.use(EMA_FAST):
            torch.testing.assert_close(model(x), y_student, rtol=1e-5, atol=1e-6)


def test_load_lora_state_strictness(model):
    with ShortcutAdapters(model, rank=4, alpha=4, generator=torch.Generator().manual_seed(0)) as ad:
        randomize(ad, STUDENT, 9)
        randomize(ad, EMA_SLOW, 10)
        state = ad.lora_state(STUDENT)
        partial = {k: v for k, v in state.items() if k != "2.2"}
        with pytest.raises(KeyError, match="2.2"):
            ad.load_lora_state(EMA_SLOW, partial)
        ad.load_lora_state(EMA_SLOW, partial, strict=False)
        loaded = ad.lora_state(EMA_SLOW)
        assert bool((loaded["2.2"].down == 0).all()) and bool((loaded["2.2"].up == 0).all())
        assert torch.equal(loaded["0"].up, state["0"].up)
        with pytest.raises(KeyError, match="nonexistent"):
            ad.load_lora_state(EMA_SLOW, {**state, "nonexistent.layer": state["0"]})
        wrong = dict(state)
        wrong["3"] = LoraWeights(torch.zeros(2, 16), torch.zeros(5, 2), 2.0)  # rank 2 into a rank-4 adapter
        with pytest.raises(ValueError, match="'3'"):
            ad.load_lora_state(EMA_SLOW, wrong)


def test_set_strength_scales_the_delta_linearly():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 9))  # one layer: the output delta is linear in the strength
    x = inputs()
    y0 = m(x).detach()
    with ShortcutAdapters(m, rank=3, alpha=6, generator=torch.Generator().manual_seed(0)) as ad:
        randomize(ad, STUDENT, 1)
        randomize(ad, EMA_SLOW, 2)

        def delta(strength):
            ad.set_strength(STUDENT, strength)
            with torch.no_grad():
                return (m(x) - y0).double()

        d1 = delta(1.0)
        assert d1.abs().max() > 1e-2
        for s in (0.5, 1.6, 2.0, -1.0):
            torch.testing.assert_close(delta(s), s * d1, rtol=1e-5, atol=1e-5)
        ad.set_strength(STUDENT, 0.0)
        with torch.no_grad():
            assert torch.equal(m(x), y0)
            with ad.use(EMA_SLOW):  # other roles keep their own scale
                y_ema = m(x)
        ref = merged_copy(nn.Sequential(copy.deepcopy(m[0].base_layer)), ad.lora_state(EMA_SLOW))
        torch.testing.assert_close(y_ema.double(), ref(x.double()), rtol=1e-5, atol=1e-5)


def test_set_strength_on_a_deep_module_zero_is_base(model):
    x = inputs()
    y0 = model(x).detach()
    with ShortcutAdapters(model, rank=4, alpha=4, generator=torch.Generator().manual_seed(0)) as ad:
        randomize(ad, STUDENT, 1)
        lora = ad.lora_state(STUDENT)
        ad.set_strength(STUDENT, 1.6)
        with torch.no_grad():
            torch.testing.assert_close(model(x).double(), merged_copy(tiny_model(), lora, 1.6)(x.double()),
                                       rtol=1e-5, atol=1e-5)
        ad.set_strength(STUDENT, 0.0)
        with torch.no_grad():
            assert torch.equal(model(x), y0)


# ---------------------------------------------------------------------------------------------- detach

def test_detach_restores_the_module_exactly(model):
    x = inputs()
    y0 = model(x).detach()
    hashes, shape = tensor_hashes(model), structure(model)
    teacher = make_lora(model, rank=2, alpha=2.0, seed=15)
    ad = ShortcutAdapters(model, rank=4, alpha=4, generator=torch.Generator().manual_seed(0), teacher=teacher)
    assert has_peft_layers(model)
    randomize(ad, STUDENT, 1)
    ad.update_ema(EMA_SLOW, 0.5)
    model(x).sum().backward()
    ad.detach()
    assert not has_peft_layers(model)
    assert "peft_config" not in model.__dict__
    assert tensor_hashes(model) == hashes
    assert structure(model) == shape
    assert torch.equal(model(x), y0)
    ad.detach()  # idempotent
    assert structure(model) == shape


def test_detach_keeps_an_existing_peft_config_attribute(model):
    sentinel = {"kept": True}
    model.peft_config = sentinel
    with ShortcutAdapters(model, rank=2, alpha=2):
        pass
    assert model.peft_config is sentinel


def test_detach_happens_on_exception_inside_with(model):
    hashes, shape = tensor_hashes(model), structure(model)
    with pytest.raises(KeyboardInterrupt):
        with ShortcutAdapters(model, rank=4, alpha=4, generator=torch.Generator().manual_seed(0)) as ad:
            randomize(ad, STUDENT, 1)
            raise KeyboardInterrupt
    assert not has_peft_layers(model)
    assert tensor_hashes(model) == hashes and structure(model) == shape


def test_attaching_twice_raises_and_reattach_after_detach_works(model):
    shape = structure(model)
    with ShortcutAdapters(model, rank=2, alpha=2):
        with pytest.raises(ValueError, match="peft"):
            ShortcutAdapters(model, rank=2, alpha=2)
        assert has_peft_layers(model)  # the failed attach did not detach the first one
    assert structure(model) == shape
    with ShortcutAdapters(model, rank=2, alpha=2) as ad:
        assert len(ad.layers) == 4
    assert structure(model) == shape


def test_failed_attach_leaves_the_module_untouched(model):
    shape, hashes = structure(model), tensor_hashes(model)
    mixed = make_lora(model, rank=2, alpha=2.0, seed=16, layers=["0"])
    mixed.update(make_lora(model, rank=3, alpha=2.0, seed=17, layers=["3"]))
    with pytest.raises(ValueError, match="rank"):
        ShortcutAdapters(model, rank=2, alpha=2, teacher=mixed)
    assert not has_peft_layers(model)
    assert structure(model) == shape and tensor_hashes(model) == hashes
    with pytest.raises(ValueError):
        ShortcutAdapters(model, rank=2, alpha=2, target_modules=["no_such_layer"])
    assert not has_peft_layers(model)
    assert structure(model) == shape
    # peft fails part-way (2.0 is a Linear, 2.1 a LayerNorm it cannot adapt): nothing may stay injected
    with pytest.raises(ValueError):
        ShortcutAdapters(model, rank=2, alpha=2, target_modules=r"2\.\d")
    assert not has_peft_layers(model)
    assert structure(model) == shape and tensor_hashes(model) == hashes


def test_module_without_linear_layers_is_rejected():
    m = nn.Sequential(nn.LayerNorm(4), nn.SiLU())
    with pytest.raises(ValueError, match="nn.Linear"):
        ShortcutAdapters(m, rank=2, alpha=2)
    assert not has_peft_layers(m)


def test_target_modules_suffixes_and_regex(model):
    shape = structure(model)
    with ShortcutAdapters(model, rank=2, alpha=2, target_modules=["2.2"]) as ad:
        assert sorted(ad.layers) == ["2.2"]
    with ShortcutAdapters(model, rank=2, alpha=2, target_modules=["0"]) as ad:  # peft: a suffix of the path
        assert sorted(ad.layers) == ["0", "2.0"]
    with ShortcutAdapters(model, rank=2, alpha=2, target_modules=r"2\.[02]|3") as ad:
        assert sorted(ad.layers) == ["2.0", "2.2", "3"]
    assert structure(model) == shape


def test_lora_dtype_float32_on_a_bf16_module():
    model = tiny_model(dtype=torch.bfloat16)
    x = inputs(dtype=torch.bfloat16)
    y0 = model(x).detach()
    hashes, shape = tensor_hashes(model), structure(model)
    with ShortcutAdapters(model, rank=4, alpha=4, generator=torch.Generator().manual_seed(0)) as ad:
        for role in LORA_ROLES:
            assert all(p.dtype == torch.float32 for p in ad.parameters(role))
        randomize(ad, STUDENT, 1)
        with torch.no_grad():
            y = model(x)
            assert y.dtype == torch.bfloat16
            assert not torch.equal(y, y0)
            with ad.use(TEACHER):
                assert torch.equal(model(x), y0)
            with ad.use(EMA_SLOW):
                assert torch.equal(model(x), y0)
    assert tensor_hashes(model) == hashes and structure(model) == shape


def test_parameters_and_named_parameters_agree(model):
    with ShortcutAdapters(model, rank=2, alpha=2) as ad:
        for role in LORA_ROLES:
            named = ad.named_parameters(role)
            params = ad.parameters(role)
            assert len(named) == len(params) == 2 * len(ad.layers)
            assert all(a is b for (_, a), b in zip(named, params))
            assert [n for n, _ in named][:2] == ["0.lora_down", "0.lora_up"]
        assert ad.parameters(TEACHER) == []


@pytest.mark.parametrize("with_teacher_lora", [False, True])
def test_per_item_roles_in_one_forward_equal_one_forward_per_role(model, with_teacher_lora):
    teacher = make_lora(tiny_model(), rank=2, alpha=2.0, seed=5) if with_teacher_lora else None
    x = inputs(n=6)
    roles = [TEACHER, EMA_FAST, EMA_FAST, TEACHER, STUDENT, EMA_FAST]
    with ShortcutAdapters(model, rank=4, alpha=4, generator=torch.Generator().manual_seed(0), teacher=teacher) as ad:
        for role, seed in ((STUDENT, 1), (EMA_FAST, 2)):
            randomize(ad, role, seed)
        with torch.no_grad():
            want = torch.cat([_run_as(ad, model, role, x[i:i + 1]) for i, role in enumerate(roles)])
            with ad.use_per_item(roles):
                got = model(x)
                stacked = model(torch.cat([x, x]))  # e.g. cond and uncond stacked by a host: roles repeat
            with pytest.raises(RuntimeError, match="rows for 6 items"):
                with ad.use_per_item(roles):
                    model(x[:4])
        assert ad.active == STUDENT and not any(layer._forward_pre_hooks for layer in ad.layers.values())
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stacked, torch.cat([want, want]), rtol=1e-6, atol=1e-6)


def _run_as(adapters, model, role, x):
    with adapters.use(role):
        return model(x)
