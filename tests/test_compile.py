"""`torch.compile` of a denoiser carrying T-LoRA: the denoising loop compiles once and gives the eager images.

The backend is aot_eager (dynamo's graph capture and AOT autograd's tracing, then eager kernels), so the test needs
no compiler toolchain and checks what inductor would be handed. It is wrapped in a counter of the graphs it gets:
a graph compiled again when the rank changes from step to step would show up there.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch._dynamo.backends.debugging import aot_eager
from torch._dynamo.utils import counters

import pipelines.tlora as tl

from tests.tlora_testing import add_random_tlora, generate, run_unet, unet_inputs

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


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_compiled_pipeline_compiles_once_and_matches_eager(request, tmp_path, family):
    pipe = request.getfixturevalue({"sdxl": "tiny_pipe", "flux": "tiny_flux_pipe"}[family])
    denoiser, described = tl.denoiser_of(pipe)
    config = add_random_tlora(denoiser, rank=RANK, min_rank=MIN_RANK)
    layers = {f"{described.denoiser_attribute}_tlora_layers": tl.get_tlora_state_dict(denoiser)}
    tl.save_tlora_weights(tmp_path, tlora_config=config, **layers)
    tl.remove_tlora(denoiser)
    pipe.load_tlora_weights(tmp_path)
    eager = generate(pipe, steps=4)

    backend, graphs_after_first_step, timesteps = CountingBackend(), [], []

    def after_step(pipe, step, timestep, callback_kwargs):
        graphs_after_first_step.append(backend.graphs) if step == 0 else None
        timesteps.append(float(timestep))  # both pipelines report t in [0, 1000]
        return {}

    _fresh_compiler_state()
    setattr(pipe, described.denoiser_attribute, torch.compile(denoiser, backend=backend))
    compiled = generate(pipe, steps=4, callback_on_step_end=after_step)

    assert len({_rank(t) for t in timesteps}) == 4, "the test needs a rank that changes from step to step"
    assert backend.graphs and graphs_after_first_step == [backend.graphs], "compiled again in a later step"
    assert not counters["graph_break"], dict(counters["graph_break"])
    np.testing.assert_allclose(compiled, eager, atol=1e-4)


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
