"""Adapters on the UNet: which layers, per-sample timestep routing, and the features that must keep working."""

import copy

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

import pipelines.tlora as tl
from pipelines.tlora.injection import TLoraInjectionError, get_router

from tests.tlora_testing import add_random_tlora, generate, run_unet, unet_inputs


def test_adapters_sit_on_every_attention_projection(tiny_pipe):
    unet = tiny_pipe.unet
    add_random_tlora(unet)
    attention = [name for name, m in unet.named_modules() if isinstance(m, Attention)]
    expected = {f"{a}.{p}" for a in attention for p in ("to_q", "to_k", "to_v", "to_out.0")}
    adapters = tl.get_tlora_adapters(unet)
    assert set(adapters) == expected
    assert {a.rsplit(".", 1)[-1] for a in attention} == {"attn1", "attn2"}
    assert all(unet.get_submodule(path).in_features >= 32 for path in adapters)


def test_target_modules_select_projections(tiny_pipe):
    unet = tiny_pipe.unet
    adapters = tl.inject_tlora(unet, tl.TLoraConfig(rank=8, target_modules=["attn2.to_k", "attn2.to_v"]))
    assert adapters and all(p.endswith(("attn2.to_k", "attn2.to_v")) for p in adapters)
    with pytest.raises(TLoraInjectionError, match="No module of the UNet matches"):
        tl.inject_tlora(unet, tl.TLoraConfig(rank=8, target_modules=["to_nothing"]), "other")
    with pytest.raises(TLoraInjectionError, match="linear projections only"):
        tl.inject_tlora(unet, tl.TLoraConfig(rank=8, target_modules=["conv_in"]), "other")


@pytest.mark.parametrize("variant", ["ortho", "vanilla"])
def test_mixed_timesteps_in_a_batch_match_samples_run_alone(tiny_pipe, variant):
    unet = tiny_pipe.unet
    add_random_tlora(unet, variant=variant, init="random-last" if variant == "ortho" else "normal")
    inputs = unet_inputs(unet, batch=3)
    timesteps = torch.tensor([20, 480, 990])
    alone = []
    for i in range(3):
        single = {k: v[i : i + 1] for k, v in inputs.items() if k != "added_cond_kwargs"}
        single["added_cond_kwargs"] = {k: v[i : i + 1] for k, v in inputs["added_cond_kwargs"].items()}
        alone.append(run_unet(unet, single, timesteps[i : i + 1]))
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            batch = run_unet(unet, inputs, timesteps)
        torch.testing.assert_close(batch.detach(), torch.cat(alone), atol=1e-5, rtol=1e-5)
    # the rank really depends on the sample's own timestep: a shared timestep gives another result
    shared = run_unet(unet, inputs, torch.tensor([20, 20, 20]))
    assert (shared[2] - batch[2]).abs().max() > 1e-4


def test_rank_follows_timestep(tiny_pipe):
    unet = tiny_pipe.unet
    add_random_tlora(unet, rank=16, min_rank=4)
    inputs = unet_inputs(unet, batch=1)
    router = get_router(unet)
    with torch.no_grad():
        run_unet(unet, inputs, torch.tensor(999))
        assert router.states["default"].active_rank == 4
        run_unet(unet, inputs, 0.0)
        assert router.states["default"].active_rank == 16
    run_unet(unet, inputs, torch.tensor([500]))  # training with one timestep: also a Python rank
    assert router.states["default"].active_rank == 10
    run_unet(unet, unet_inputs(unet, batch=2), torch.tensor([500, 999]))
    assert router.states["default"].mask.sum(dim=1).tolist() == [10, 4]


def grads(unet, inputs, timesteps):
    unet.zero_grad()
    run_unet(unet, inputs, timesteps).square().mean().backward()
    return {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_gives_the_same_gradients(tiny_pipe):
    unet = tiny_pipe.unet
    unet.requires_grad_(False)
    add_random_tlora(unet)
    inputs = unet_inputs(unet, batch=2)
    timesteps = torch.tensor([30, 950])
    plain = grads(unet, inputs, timesteps)
    assert plain and all(g.abs().sum() > 0 for g in plain.values())

    unet.enable_gradient_checkpointing()
    unet.train()
    checkpointed = grads(unet, inputs, timesteps)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)

    # the recomputation uses the masks of its own forward pass, even after another UNet call
    unet.zero_grad()
    loss = run_unet(unet, inputs, timesteps).square().mean()
    with torch.no_grad():
        run_unet(unet, inputs, torch.tensor([999, 999]))
    run_unet(unet, inputs, torch.tensor([0, 0]))
    loss.backward()
    for name, parameter in unet.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(parameter.grad, plain[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("processor", [AttnProcessor, AttnProcessor2_0])
def test_works_with_any_attention_processor(tiny_pipe, processor):
    base = generate(tiny_pipe)
    add_random_tlora(tiny_pipe.unet)
    reference = generate(tiny_pipe)
    tiny_pipe.unet.set_attn_processor(processor())
    switched = generate(tiny_pipe)
    assert abs(switched - base).max() > 1e-3
    assert abs(switched - reference).max() < 1e-4


def test_xformers_after_loading(tiny_pipe):
    pytest.importorskip("xformers")
    if not torch.cuda.is_available():
        pytest.skip("xformers attention needs a CUDA device")
    pipe = tiny_pipe.to("cuda")
    base = generate(pipe)
    add_random_tlora(pipe.unet)
    reference = generate(pipe)
    pipe.enable_xformers_memory_efficient_attention()
    switched = generate(pipe)
    assert abs(switched - base).max() > 1e-3
    assert abs(switched - reference).max() < 1e-3


def _ip_adapter_state_dict(unet, image_dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    ip_layers, key_id = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            hidden = unet.get_submodule(name.rsplit(".", 1)[0]).to_q.out_features
            for key in ("to_k_ip", "to_v_ip"):
                ip_layers[f"{key_id}.{key}.weight"] = torch.randn(hidden, cross, generator=generator) * 0.1
            key_id += 2
    image_proj = {
        "proj.weight": torch.randn(4 * cross, image_dim, generator=generator) * 0.1,
        "proj.bias": torch.zeros(4 * cross),
        "norm.weight": torch.ones(cross),
        "norm.bias": torch.zeros(cross),
    }
    return {"image_proj": image_proj, "ip_adapter": ip_layers}


def test_ip_adapter_keeps_tlora(tiny_pipe):
    pipe = tiny_pipe
    add_random_tlora(pipe.unet)
    tlora_only = generate(pipe)
    pipe.unet._load_ip_adapter_weights([_ip_adapter_state_dict(pipe.unet)])
    embeds = [torch.randn(2, 1, 16, generator=torch.Generator().manual_seed(5))]  # negative, positive

    pipe.set_ip_adapter_scale(0.0)
    silent_ip = generate(pipe, ip_adapter_image_embeds=embeds)
    assert abs(silent_ip - tlora_only).max() < 1e-4  # IP-Adapter processors on attn2, T-LoRA still applied

    pipe.set_ip_adapter_scale(1.0)
    both = generate(pipe, ip_adapter_image_embeds=embeds)
    pipe.unload_tlora_weights()
    ip_only = generate(pipe, ip_adapter_image_embeds=embeds)
    assert abs(both - tlora_only).max() > 1e-3 and abs(both - ip_only).max() > 1e-3


def test_fused_projections_are_refused(tiny_pipe):
    pipe = tiny_pipe
    pipe.fuse_qkv_projections()
    with pytest.raises(TLoraInjectionError, match="fused"):
        add_random_tlora(pipe.unet)
    assert get_router(pipe.unet) is None
    pipe.unfuse_qkv_projections()

    add_random_tlora(pipe.unet)
    pipe.fuse_qkv_projections()
    with pytest.raises(TLoraInjectionError, match="unfuse_qkv_projections"):
        generate(pipe, steps=1)
    with pytest.raises(NotImplementedError, match="rank changes with every timestep"):
        pipe.fuse_tlora()


def test_deep_copies_are_independent(tiny_pipe):
    unet = tiny_pipe.unet
    inputs = unet_inputs(unet, batch=1)
    with torch.no_grad():
        base = run_unet(unet, inputs, 500)
        add_random_tlora(unet)
        adapted = run_unet(unet, inputs, 500)
        twin = copy.deepcopy(unet)
        tl.remove_tlora(twin)
        assert torch.equal(run_unet(twin, inputs, 500), base)
        assert torch.equal(run_unet(unet, inputs, 500), adapted)


def test_timestep_batch_must_match_sample_batch(tiny_pipe):
    unet = tiny_pipe.unet
    add_random_tlora(unet)
    with pytest.raises(TLoraInjectionError, match="Got 2 timesteps for a batch of 3"):
        run_unet(unet, unet_inputs(unet, batch=3), torch.tensor([1, 2]))


def _expected_rank(t: int, rank: int, min_rank: int) -> int:
    return int((1000 - t) / 1000 * (rank - min_rank)) + min_rank


@pytest.mark.parametrize("variant", ["ortho", "vanilla"])
def test_rank_routings_give_the_same_outputs_and_gradients(tiny_pipe, variant):
    unet = tiny_pipe.unet.requires_grad_(False)
    add_random_tlora(unet, variant=variant, init="random-last" if variant == "ortho" else "normal")
    inputs = unet_inputs(unet, batch=2)
    router = get_router(unet)
    outputs, gradients, states = {}, {}, {}
    for routing in ("mask", "auto", "skip"):
        tl.set_rank_routing(unet, routing)
        with torch.no_grad():
            outputs[routing] = run_unet(unet, inputs, torch.tensor(600))
        states[routing] = router.states["default"]
        gradients[routing] = grads(unet, inputs, torch.tensor([600, 600]))

    assert states["mask"].active_rank is None and states["mask"].mask.sum().item() == _expected_rank(600, 16, 8)
    assert states["auto"].active_rank == states["skip"].active_rank == _expected_rank(600, 16, 8)
    for routing in ("auto", "skip"):
        torch.testing.assert_close(outputs[routing], outputs["mask"], atol=1e-5, rtol=1e-5)
        for name, gradient in gradients[routing].items():
            torch.testing.assert_close(gradient, gradients["mask"][name], atol=1e-6, rtol=1e-5)
    # samples of one batch at different ranks keep their masks whatever the routing
    run_unet(unet, inputs, torch.tensor([100, 900]))
    assert router.states["default"].mask.sum(dim=1).tolist() == [_expected_rank(t, 16, 8) for t in (100, 900)]


def test_compilation_routes_ranks_through_masks(tiny_pipe, monkeypatch):
    unet = tiny_pipe.unet
    add_random_tlora(unet)
    tl.set_rank_routing(unet, "skip")
    # a Python rank would be a constant of a compiled graph, so it would compile again at every new rank
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.no_grad():
        run_unet(unet, unet_inputs(unet, batch=1), torch.tensor(600))
    state = get_router(unet).states["default"]
    assert state.active_rank is None and state.mask.sum().item() == _expected_rank(600, 16, 8)


def test_unknown_rank_routing_is_refused(tiny_pipe):
    unet = tiny_pipe.unet
    with pytest.raises(TLoraInjectionError, match="No T-LoRA adapter is loaded"):
        tl.set_rank_routing(unet, "skip")
    add_random_tlora(unet)
    with pytest.raises(ValueError, match="Unknown rank routing 'fast'; expected one of 'auto'"):
        tl.set_rank_routing(unet, "fast")
    assert get_router(unet).rank_routing == "auto"
