"""Model families: FLUX.1 and SD 1.x/2.x through the same adapter core as SD-XL.

FLUX's reference below is written from SPEC §9 with plain torch (the package's code is not its own oracle): each
adapted projection computes `W x + b + U (m(t) * (D x))`, with `t = 1000 * sigma` per sample.
"""

from __future__ import annotations

import copy
import math

import diffusers
import pytest
import torch
from torch import nn

import pipelines.tlora as tl
from pipelines.tlora.file_format import TLoraFileError, read_safetensors
from pipelines.tlora.injection import TLoraInjectionError, get_router
from training.quantization import quantize_linear_layers

from tests.tlora_testing import add_random_tlora, flux_inputs, generate

FLUX_DOUBLE = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj")
FLUX_SINGLE = ("to_q", "to_k", "to_v")


def _family_pipe(request, family: str):
    return request.getfixturevalue({"sd": "tiny_sd_pipe", "sdxl": "tiny_pipe", "flux": "tiny_flux_pipe"}[family])


def _flux_generate(pipe, **kwargs):
    return generate(pipe, height=32, width=32, max_sequence_length=16, **kwargs)


def _generate(pipe, **kwargs):
    return _flux_generate(pipe, **kwargs) if isinstance(pipe, diffusers.FluxPipeline) else generate(pipe, **kwargs)


def test_each_stock_denoiser_has_its_family(tiny_pipe, tiny_sd_pipe, tiny_flux_pipe):
    assert tl.denoiser_of(tiny_pipe)[1].name == "sdxl"
    assert tl.denoiser_of(tiny_sd_pipe)[1].name == "sd"
    transformer, family = tl.denoiser_of(tiny_flux_pipe)
    assert family.name == "flux" and transformer is tiny_flux_pipe.transformer
    with pytest.raises(ValueError, match="does not know the denoiser"):
        tl.family_of_denoiser(nn.Linear(2, 2))


def test_every_pipeline_of_every_family_gains_the_api():
    methods = ("load_tlora_weights", "unload_tlora_weights", "set_tlora_scale", "save_tlora_weights")
    for family in tl.FAMILIES.values():
        for name in family.pipeline_classes:
            if family.name in ("sd", "sdxl", "flux"):  # the families this project tests: all classes must exist
                assert hasattr(diffusers, name), name
            cls = getattr(diffusers, name, None)
            if cls is not None:
                assert all(callable(getattr(cls, m, None)) for m in methods), name
                with pytest.raises(NotImplementedError):
                    cls.fuse_tlora(None)
    assert diffusers.FluxControlNetPipeline in tl.REGISTERED_PIPELINES
    assert diffusers.StableDiffusionControlNetPipeline in tl.REGISTERED_PIPELINES


def test_flux_default_targets_are_the_authors_projections(tiny_flux_pipe):
    transformer = tiny_flux_pipe.transformer
    config = add_random_tlora(transformer)
    assert config.variant == "vanilla" and config.model_family == "flux"
    expected = {
        f"transformer_blocks.{i}.attn.{p}" for i in range(len(transformer.transformer_blocks)) for p in FLUX_DOUBLE
    }
    expected |= {
        f"single_transformer_blocks.{i}.attn.{p}"
        for i in range(len(transformer.single_transformer_blocks))
        for p in FLUX_SINGLE
    }
    assert set(tl.get_tlora_adapters(transformer)) == expected


class _ReferenceVanilla(nn.Module):
    """SPEC §9's projection with a masked LoRA update, for a per-sample sigma set on `self.sigma`."""

    def __init__(self, linear: nn.Linear, down: torch.Tensor, up: torch.Tensor, rank: int, min_rank: int):
        super().__init__()
        self.linear, self.down, self.up = linear, down.clone(), up.clone()
        self.rank, self.min_rank = rank, min_rank
        self.sigma: list[float] = []

    def forward(self, x):
        rows = []
        for i, sigma in enumerate(self.sigma):
            t = 1000.0 * sigma
            r = math.floor((1000 - t) * (self.rank - self.min_rank) / 1000) + self.min_rank
            mask = torch.tensor([1.0 if k < r else 0.0 for k in range(self.rank)])
            rows.append(x[i] @ self.down.T * mask @ self.up.T)
        return self.linear(x) + torch.stack(rows)


@pytest.mark.parametrize("sigmas", [[0.05, 0.5, 0.999], [0.3, 0.3, 0.3], [1.0, 0.0, 0.71]])
def test_flux_matches_the_reference_math(tiny_flux_pipe, sigmas):
    transformer = tiny_flux_pipe.transformer.eval()
    reference = copy.deepcopy(transformer)
    add_random_tlora(transformer, rank=8, min_rank=2)
    wrappers = []
    for path, adapter in tl.get_tlora_adapters(transformer).items():
        assert adapter.down.abs().sum() > 0 and adapter.up.abs().sum() > 0
        parent, _, name = path.rpartition(".")
        wrapper = _ReferenceVanilla(reference.get_submodule(path), adapter.down.detach(), adapter.up.detach(), 8, 2)
        setattr(reference.get_submodule(parent), name, wrapper)
        wrappers.append(wrapper)
    for wrapper in wrappers:
        wrapper.sigma = sigmas
    inputs = flux_inputs(transformer, batch=3)
    timestep = torch.tensor(sigmas)
    with torch.no_grad():
        expected = reference(timestep=timestep, **inputs).sample
        base = tiny_flux_pipe.transformer
        got = base(timestep=timestep, **inputs).sample
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        tl.set_tlora_scale(tiny_flux_pipe, 0.0)
        assert (got - base(timestep=timestep, **inputs).sample).abs().max() > 1e-4  # the adapter did something


def test_flux_pipeline_rank_follows_1000_sigma_with_true_cfg(tiny_flux_pipe):
    pipe = tiny_flux_pipe
    add_random_tlora(pipe.transformer, rank=16, min_rank=1)
    router = get_router(pipe.transformer)
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs["timestep"].clone(), router.states["default"].active_rank)),
        with_kwargs=True,
    )
    _flux_generate(pipe, steps=4, negative_prompt="blurry", true_cfg_scale=2.0)
    handle.remove()
    assert len(seen) == 8  # two transformer calls per step
    for timestep, rank in seen:
        t = 1000.0 * float(timestep.float()[0])
        assert rank == math.floor((1000 - t) * 15 / 1000) + 1
    assert [r for _, r in seen][::2] == [r for _, r in seen][1::2]  # both CFG calls share the step's rank
    assert len({r for _, r in seen}) > 1


def test_flux_bf16_timesteps_give_a_rank_off_by_at_most_one():
    family = tl.get_family("flux")
    sigma = torch.linspace(0, 1, 997)
    exact, _ = family.call_timesteps((), {"timestep": sigma})
    rounded, _ = family.call_timesteps((), {"timestep": sigma.to(torch.bfloat16)})
    ranks = [tl.rank_schedule(t, 32, 1) for t in (exact, rounded)]
    # bf16 keeps 8 significant bits: 1000 * sigma moves by up to 2, a rank step is 1000 / 31 timesteps wide
    assert (ranks[0] - ranks[1]).abs().max() <= 1


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_save_load_unload_and_scale_zero(request, tmp_path, family):
    pipe = _family_pipe(request, family)
    denoiser, described = tl.denoiser_of(pipe)
    base = _generate(pipe)
    config = add_random_tlora(denoiser)
    adapted = _generate(pipe)
    assert abs(adapted - base).max() > 1e-3

    layers = {f"{described.denoiser_attribute}_tlora_layers": tl.get_tlora_state_dict(pipe)}
    pipe.save_tlora_weights(tmp_path, tlora_config=config, **layers)
    tensors, metadata = read_safetensors(tmp_path / tl.WEIGHT_NAME)
    assert all(key.startswith(described.key_prefix) for key in tensors)
    assert f'"model_family": "{family}"' in metadata["tlora_config"]

    pipe.unload_tlora_weights()
    assert (_generate(pipe) == base).all()
    pipe.load_tlora_weights(tmp_path)
    assert (_generate(pipe) == adapted).all()
    pipe.set_tlora_scale(0.0)
    assert (_generate(pipe) == base).all()
    pipe.unload_tlora_weights()
    assert get_router(denoiser) is None and (_generate(pipe) == base).all()


def test_flux_gradient_checkpointing_gives_the_same_gradients(tiny_flux_pipe):
    transformer = tiny_flux_pipe.transformer.train().requires_grad_(False)
    add_random_tlora(transformer, variant="ortho", init="random-last")
    inputs = flux_inputs(transformer, batch=2)
    timestep = torch.tensor([0.9, 0.1])

    def gradients():
        transformer.zero_grad()
        out = transformer(timestep=timestep, **inputs).sample
        # another call with other timesteps between forward and backward must not change the recomputation
        with torch.no_grad():
            transformer(timestep=torch.tensor([0.5, 0.5]), **inputs)
        out.square().mean().backward()
        return {n: p.grad.clone() for n, p in transformer.named_parameters() if p.grad is not None}

    plain = gradients()
    transformer.enable_gradient_checkpointing()
    checkpointed = gradients()
    assert plain and set(plain) == set(checkpointed) and all(".tlora." in n for n in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


def _standard_lora(pipe, tmp_path):
    """A seeded PEFT LoRA on `to_q`/`to_v` of the pipeline's denoiser, saved as diffusers saves LoRAs."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    denoiser, family = tl.denoiser_of(pipe)
    denoiser = copy.deepcopy(denoiser)
    denoiser.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"]))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in denoiser.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    layers = {f"{family.denoiser_attribute}_lora_layers": get_peft_model_state_dict(denoiser)}
    type(pipe).save_lora_weights(tmp_path, **layers)
    return tmp_path


@pytest.mark.parametrize("family", ["sd", "sdxl", "flux"])
@pytest.mark.parametrize("tlora_first", [True, False])
def test_standard_lora_alongside(request, tmp_path, family, tlora_first):
    pipe = _family_pipe(request, family)
    denoiser = tl.denoiser_of(pipe)[0]
    lora_dir = _standard_lora(pipe, tmp_path)
    pipe.load_lora_weights(lora_dir)
    lora_only = _generate(pipe)
    pipe.unload_lora_weights()
    if tlora_first:
        add_random_tlora(denoiser)
        tlora_only = _generate(pipe)
        pipe.load_lora_weights(lora_dir)
    else:
        pipe.load_lora_weights(lora_dir)
        add_random_tlora(denoiser)
        pipe.unload_lora_weights()
        tlora_only = _generate(pipe)
        pipe.load_lora_weights(lora_dir)
    both = _generate(pipe)
    assert abs(both - lora_only).max() > 1e-3 and abs(both - tlora_only).max() > 1e-3
    pipe.unload_lora_weights()  # removes the standard LoRA only
    assert abs(_generate(pipe) - tlora_only).max() < 1e-5
    pipe.load_lora_weights(lora_dir)
    pipe.unload_tlora_weights()  # removes T-LoRA only
    assert abs(_generate(pipe) - lora_only).max() < 1e-5


def test_flux_several_adapters(tiny_flux_pipe):
    pipe = tiny_flux_pipe
    add_random_tlora(pipe.transformer, seed=1, adapter_name="a")
    only_a = _flux_generate(pipe)
    add_random_tlora(pipe.transformer, seed=2, adapter_name="b")
    both = _flux_generate(pipe)
    pipe.unload_tlora_weights("a")
    only_b = _flux_generate(pipe)
    add_random_tlora(pipe.transformer, seed=1, adapter_name="a")
    assert abs(_flux_generate(pipe) - both).max() < 1e-5  # the same sum, added in another order
    assert abs(both - only_a).max() > 1e-3 and abs(both - only_b).max() > 1e-3


def test_flux_ip_adapter_keeps_tlora(tiny_flux_pipe):
    from diffusers.models.embeddings import ImageProjection
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    pipe = tiny_flux_pipe
    transformer = pipe.transformer
    add_random_tlora(transformer)
    inputs = flux_inputs(transformer, batch=1)
    timestep = torch.tensor([0.4])
    with torch.no_grad():
        tlora_only = transformer(timestep=timestep, **inputs).sample
    config = transformer.config
    inner = config.num_attention_heads * config.attention_head_dim
    processors = {}
    for name in transformer.attn_processors:
        if name.startswith("transformer_blocks."):
            processors[name] = FluxIPAdapterAttnProcessor(
                inner, config.joint_attention_dim, scale=1.0, num_tokens=(4,)
            )
        else:
            processors[name] = transformer.attn_processors[name]
    ip_processors = [p for p in processors.values() if isinstance(p, FluxIPAdapterAttnProcessor)]
    transformer.set_attn_processor(processors)  # empties `processors`
    image_dim = 16
    transformer.encoder_hid_proj = diffusers.models.embeddings.MultiIPAdapterImageProjection(
        [
            ImageProjection(
                image_embed_dim=image_dim, cross_attention_dim=config.joint_attention_dim, num_image_text_embeds=4
            )
        ]
    )
    embeds = [torch.randn(1, 1, image_dim, generator=torch.Generator().manual_seed(4))]
    with torch.no_grad():
        for processor in ip_processors:
            processor.scale = [0.0]
        silent = transformer(timestep=timestep, joint_attention_kwargs={"ip_adapter_image_embeds": embeds}, **inputs)
        assert (silent.sample - tlora_only).abs().max() < 1e-5  # T-LoRA survives the processor swap
        for processor in ip_processors:
            processor.scale = [1.0]
        both = transformer(timestep=timestep, joint_attention_kwargs={"ip_adapter_image_embeds": embeds}, **inputs)
        assert (both.sample - tlora_only).abs().max() > 1e-4


def test_flux_fused_projections_are_refused(tiny_flux_pipe):
    pipe = tiny_flux_pipe
    pipe.transformer.fuse_qkv_projections()
    with pytest.raises(TLoraInjectionError, match="fused"):
        add_random_tlora(pipe.transformer)
    assert get_router(pipe.transformer) is None
    pipe.transformer.unfuse_qkv_projections()

    add_random_tlora(pipe.transformer)
    pipe.transformer.single_transformer_blocks[0].attn.fuse_projections()  # the single-stream blocks alone
    with pytest.raises(TLoraInjectionError, match="unfuse_qkv_projections"):
        _flux_generate(pipe, steps=1)
    pipe.transformer.single_transformer_blocks[0].attn.unfuse_projections()
    _flux_generate(pipe, steps=1)


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_quantized_flux_base_loads_runs_and_trains(tiny_flux_pipe, mode):
    pytest.importorskip("bitsandbytes")
    transformer = tiny_flux_pipe.transformer.requires_grad_(False)
    replaced = quantize_linear_layers(transformer, mode, "cpu", torch.float32, keep=("proj_out",))
    projection = transformer.get_submodule("transformer_blocks.0.attn.to_q")
    assert "transformer_blocks.0.attn.to_q" in replaced and not projection.weight.is_floating_point()
    inputs = flux_inputs(transformer, batch=2)
    timestep = torch.tensor([0.2, 0.8])
    with torch.no_grad():
        base = transformer(timestep=timestep, **inputs).sample
    config = add_random_tlora(transformer, rank=8, min_rank=2)
    adapter = tl.get_tlora_adapters(transformer)["transformer_blocks.0.attn.to_q"]
    assert adapter.down.dtype == torch.float32 and config.variant == "vanilla"

    out = transformer(timestep=timestep, **inputs).sample
    assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-4
    out.square().mean().backward()
    assert adapter.up.grad is not None and adapter.up.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in transformer.named_parameters() if ".tlora." not in n)
    with pytest.raises(TLoraInjectionError, match="quantised"):
        tl.inject_tlora(
            transformer, tl.TLoraConfig.for_family("flux", rank=4, variant="ortho", init="weight-last"), "w"
        )


def test_adapters_of_another_family_are_refused_naming_both(tiny_pipe, tiny_sd_pipe, tiny_flux_pipe, tmp_path):
    config = add_random_tlora(tiny_flux_pipe.transformer)
    tiny_flux_pipe.save_tlora_weights(
        tmp_path / "flux", transformer_tlora_layers=tl.get_tlora_state_dict(tiny_flux_pipe), tlora_config=config
    )
    with pytest.raises(TLoraFileError, match=r"FLUX\.1.*Stable Diffusion XL"):
        tiny_pipe.load_tlora_weights(tmp_path / "flux")
    assert get_router(tiny_pipe.unet) is None

    # an SD-XL file from before families (no model_family): its `unet.` keys tell
    add_random_tlora(tiny_pipe.unet)
    tiny_pipe.save_tlora_weights(tmp_path / "sdxl", tl.get_tlora_state_dict(tiny_pipe), tl.get_tlora_config(tiny_pipe))
    with pytest.raises(TLoraFileError, match="for a `unet`.*has a `transformer`"):
        tiny_flux_pipe.load_tlora_weights(tmp_path / "sdxl")

    sd_config = add_random_tlora(tiny_sd_pipe.unet)
    tiny_sd_pipe.save_tlora_weights(tmp_path / "sd", tl.get_tlora_state_dict(tiny_sd_pipe), sd_config)
    tiny_pipe.unload_tlora_weights()
    with pytest.raises(TLoraFileError, match=r"Stable Diffusion 1\.x/2\.x.*Stable Diffusion XL"):
        tiny_pipe.load_tlora_weights(tmp_path / "sd")
    assert get_router(tiny_pipe.unet) is None


def test_unknown_targets_name_the_family(tiny_flux_pipe):
    config = tl.TLoraConfig.for_family("flux", rank=4, target_modules=["attn1.to_q"])
    with pytest.raises(TLoraInjectionError, match=r"No module of the transformer matches.*FLUX\.1.*add_q_proj"):
        tl.inject_tlora(tiny_flux_pipe.transformer, config)


def test_authors_flux_checkpoint_points_to_the_converter(tiny_flux_pipe, tmp_path):
    (tmp_path / "lora.pt").write_bytes(b"not even read")
    with pytest.raises(TLoraFileError, match="import-official"):
        tiny_flux_pipe.load_tlora_weights(tmp_path / "lora.pt")
    with pytest.raises(TLoraFileError, match="import-official"):
        tiny_flux_pipe.load_tlora_weights(tmp_path, weight_name="lora.pt")
