"""`torch.compile` of a denoiser carrying T-LoRA: the denoising loop compiles once and gives the eager images.

The backend is aot_eager (dynamo's graph capture and AOT autograd's tracing, then eager kernels), so the test needs
no compiler toolchain and checks what inductor would be handed. It is wrapped in a counter of the graphs it gets:
a graph compiled again when the rank changes from step to step would show up there.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch._dynamo.backends.debugging import aot_eager
from torch._dynamo.utils import counters

import pipelines.tlora as tl
from tests.tlora_testing import add_random_tlora, flux_inputs, generate, perturb_adapters, run_unet, unet_inputs

RANK, MIN_RANK = 16, 4


def _rank(t: float) -> int:
    return int((1000 - t) / 1000 * (RANK - MIN_RANK)) + MIN_RANK


class CountingBackend:
    """aot_eager, counting the graphs it is handed."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return aot_eager(graph_module, example_inputs)


def _fresh_compiler_state() -> None:
    torch._dynamo.reset()
    counters.clear()


def test_compiled_pipeline_compiles_once_and_matches_eager(tiny_pipe, tmp_path):
    config = add_random_tlora(tiny_pipe.unet, rank=RANK, min_rank=MIN_RANK, variant="ortho", init="random-last")
    tl.save_tlora_weights(tmp_path, tl.get_tlora_state_dict(tiny_pipe.unet), config)
    tl.remove_tlora(tiny_pipe.unet)
    tiny_pipe.load_tlora_weights(tmp_path)
    eager = generate(tiny_pipe, steps=4)

    backend, graphs_after_first_step, timesteps = CountingBackend(), [], []

    def after_step(pipe, step, timestep, callback_kwargs):
        graphs_after_first_step.append(backend.graphs) if step == 0 else None
        timesteps.append(float(timestep))
        return {}

    _fresh_compiler_state()
    tiny_pipe.unet = torch.compile(tiny_pipe.unet, backend=backend)
    compiled = generate(tiny_pipe, steps=4, callback_on_step_end=after_step)

    assert len({_rank(t) for t in timesteps}) == 4, "the test needs a rank that changes from step to step"
    assert backend.graphs and graphs_after_first_step == [backend.graphs], "compiled again in a later step"
    assert not counters["graph_break"], dict(counters["graph_break"])
    np.testing.assert_allclose(compiled, eager, atol=1e-4)


def test_compiled_flux_transformer_compiles_once_and_matches_eager():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(2, 2, 4),
    ).eval()
    config = tl.TLoraConfig.for_family("flux", rank=RANK, min_rank=MIN_RANK)
    perturb_adapters(tl.inject_tlora(transformer, config, generator=torch.Generator().manual_seed(0)))
    inputs = flux_inputs(transformer, batch=2)
    # FluxPipeline's loop: sigma in [0, 1], one copy per sample
    sigmas = [1.0, 0.75, 0.5, 0.25]
    assert len({_rank(1000 * sigma) for sigma in sigmas}) == 4

    def denoise(model, sigmas) -> list[torch.Tensor]:
        with torch.no_grad():
            return [model(timestep=torch.full((2,), sigma), **inputs).sample for sigma in sigmas]

    eager = denoise(transformer, sigmas)
    backend = CountingBackend()
    _fresh_compiler_state()
    compiled_model = torch.compile(transformer, backend=backend)
    compiled = denoise(compiled_model, sigmas[:1])
    graphs_after_first_step = backend.graphs
    compiled += denoise(compiled_model, sigmas[1:])

    assert backend.graphs == graphs_after_first_step > 0, "compiled again as the rank changed"
    assert not counters["graph_break"], dict(counters["graph_break"])
    for step, (a, b) in enumerate(zip(compiled, eager)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"step {step}")


def test_training_a_compiled_unet_gives_the_eager_gradients(tiny_pipe):
    # without gradient checkpointing: with it, training works too but each checkpointed block breaks the graph
    unet = tiny_pipe.unet.requires_grad_(False)
    add_random_tlora(unet, rank=RANK, min_rank=MIN_RANK, variant="ortho", init="random-last")
    unet.train()
    eager = copy.deepcopy(unet)
    backend = CountingBackend()
    _fresh_compiler_state()
    compiled = torch.compile(unet, backend=backend)
    inputs = unet_inputs(unet, batch=2)
    graphs = []
    for timesteps in ([100, 900], [500, 20], [999, 0]):  # per-sample timesteps, as a training step draws them
        results = []
        for model in (eager, compiled):
            model.zero_grad()
            output = run_unet(model, inputs, torch.tensor(timesteps))
            output.square().mean().backward()
            results.append((output.detach(), [p.grad for p in model.parameters() if p.requires_grad]))
        graphs.append(backend.graphs)
        (eager_output, eager_grads), (compiled_output, compiled_grads) = results
        torch.testing.assert_close(compiled_output, eager_output, atol=1e-5, rtol=1e-5)
        assert len(compiled_grads) == len(eager_grads) > 0
        for compiled_grad, eager_grad in zip(compiled_grads, eager_grads):
            torch.testing.assert_close(compiled_grad, eager_grad, atol=1e-6, rtol=1e-4)

    assert graphs[0] > 0 and graphs == [graphs[0]] * 3, "compiled again as the ranks changed"
    assert not counters["graph_break"], dict(counters["graph_break"])
