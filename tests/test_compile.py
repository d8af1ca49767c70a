"""`torch.compile` of a denoiser carrying T-LoRA: the denoising loop compiles once and gives the eager images.

The backend is aot_eager (dynamo's graph capture and AOT autograd's tracing, then eager kernels), so the test needs
no compiler toolchain and checks what inductor would be handed. It is wrapped in a counter of the graphs it gets:
a graph compiled again when the rank changes from step to step would show up there.
"""

from __future__ import annotations

import numpy as np
import torch
from torch._dynamo.backends.debugging import aot_eager
from torch._dynamo.utils import counters

import pipelines.tlora as tl
from tests.tlora_testing import add_random_tlora, generate

RANK, MIN_RANK = 16, 4


def test_compiled_pipeline_compiles_once_and_matches_eager(tiny_pipe, tmp_path):
    config = add_random_tlora(tiny_pipe.unet, rank=RANK, min_rank=MIN_RANK, variant="ortho", init="random-last")
    tl.save_tlora_weights(tmp_path, tl.get_tlora_state_dict(tiny_pipe.unet), config)
    tl.remove_tlora(tiny_pipe.unet)
    tiny_pipe.load_tlora_weights(tmp_path)
    eager = generate(tiny_pipe, steps=4)

    graphs, graphs_after_first_step, timesteps = [], [], []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return aot_eager(graph_module, example_inputs)

    def after_step(pipe, step, timestep, callback_kwargs):
        graphs_after_first_step.append(len(graphs)) if step == 0 else None
        timesteps.append(float(timestep))
        return {}

    torch._dynamo.reset()
    counters.clear()
    tiny_pipe.unet = torch.compile(tiny_pipe.unet, backend=counting_backend)
    compiled = generate(tiny_pipe, steps=4, callback_on_step_end=after_step)

    ranks = {int((1000 - t) / 1000 * (RANK - MIN_RANK)) + MIN_RANK for t in timesteps}
    assert len(ranks) == 4, "the test needs a rank that changes from step to step"
    assert graphs and graphs_after_first_step == [len(graphs)], "the denoiser was compiled again in a later step"
    assert not counters["graph_break"], dict(counters["graph_break"])
    np.testing.assert_allclose(compiled, eager, atol=1e-4)
