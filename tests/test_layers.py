import pytest
import torch

from pipelines.tlora import OrthoTLoraAdapter, RankState, TLoraConfig, VanillaTLoraAdapter, rank_mask

from tests.tlora_testing import perturb_adapters

IN, OUT, RANK = 48, 40, 16


def ortho(init="random-last", weight=None, seed=0):
    adapter = OrthoTLoraAdapter(IN, OUT, RANK)
    config = TLoraConfig(rank=RANK, min_rank=4, init=init)
    adapter.initialize(config, weight=weight, generator=torch.Generator().manual_seed(seed))
    return adapter


@pytest.mark.parametrize("init", [f"{s}-{p}" for s in ("random", "weight") for p in ("last", "principal", "middle")])
def test_ortho_update_is_exactly_zero_at_init(init):
    adapter = ortho(init, weight=torch.randn(OUT, IN, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(3, 5, IN)
    state = RankState(mask=rank_mask(torch.tensor([0, 400, 999]), RANK, 4))
    with torch.enable_grad():
        assert torch.equal(adapter(x, state), torch.zeros(3, 5, OUT))
    with torch.no_grad():  # the folded inference form sums both branches in one product
        assert adapter(x, state).abs().max() < 1e-6
        assert adapter(x, RankState(active_rank=9)).abs().max() < 1e-6


def test_ortho_init_picks_singular_triplets():
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(OUT, IN, generator=generator) / RANK
    singular = torch.linalg.svdvals(matrix)
    weight = torch.randn(OUT, IN)
    for pick, expected in (
        ("last", singular[-RANK:]),
        ("principal", singular[:RANK]),
        ("middle", singular[(len(singular) - RANK) // 2 :][:RANK]),
    ):
        adapter = ortho(f"random-{pick}", seed=0)
        torch.testing.assert_close(adapter.lam.detach(), expected)
        torch.testing.assert_close(adapter.up.T @ adapter.up, torch.eye(RANK), atol=1e-5, rtol=0)
        torch.testing.assert_close(adapter.down @ adapter.down.T, torch.eye(RANK), atol=1e-5, rtol=0)
        assert torch.equal(adapter.lam_base, adapter.lam.detach())
    from_weight = ortho("weight-principal", weight=weight)
    torch.testing.assert_close(from_weight.lam.detach(), torch.linalg.svdvals(weight)[:RANK])


def vanilla():
    adapter = VanillaTLoraAdapter(IN, OUT, RANK)
    adapter.initialize(
        TLoraConfig(rank=RANK, variant="vanilla", init="normal"), generator=torch.Generator().manual_seed(0)
    )
    return adapter


def test_vanilla_init():
    adapter = vanilla()
    assert torch.equal(adapter.up, torch.zeros(OUT, RANK))
    assert 0.8 / RANK < adapter.down.std() < 1.2 / RANK


def reference(adapter, x, mask):
    """The update written out as in the paper, one sample at a time."""
    rows = []
    for i in range(x.shape[0]):
        m = mask[i if mask.shape[0] > 1 else 0]
        if isinstance(adapter, VanillaTLoraAdapter):
            rows.append((adapter.up @ torch.diag(m) @ adapter.down @ x[i].T).T)
        else:
            trained = adapter.up @ torch.diag(m * adapter.lam) @ adapter.down
            frozen = adapter.up_base @ torch.diag(m * adapter.lam_base) @ adapter.down_base
            rows.append(x[i] @ (trained - frozen).T)
    return torch.stack(rows)


@pytest.mark.parametrize("variant", ["vanilla", "ortho"])
@pytest.mark.parametrize("grad", [True, False])
def test_update_matches_the_paper_formula_per_sample(variant, grad):
    adapter = ortho() if variant == "ortho" else vanilla()
    perturb_adapters({"layer": adapter}, seed=3, std=0.2)
    x = torch.randn(3, 7, IN, generator=torch.Generator().manual_seed(4))
    mask = rank_mask(torch.tensor([10, 500, 990]), RANK, 4)
    with torch.set_grad_enabled(grad):
        got = adapter(x, RankState(mask=mask))
        single = adapter(x, RankState(active_rank=11))
    with torch.no_grad():
        torch.testing.assert_close(got, reference(adapter, x, mask), atol=1e-5, rtol=1e-5)
        eleven = torch.cat([torch.ones(11), torch.zeros(RANK - 11)])[None]
        torch.testing.assert_close(single, reference(adapter, x, eleven), atol=1e-5, rtol=1e-5)


def test_folded_factors_follow_parameter_updates():
    adapter = ortho()
    x = torch.randn(2, IN)
    state = RankState(mask=torch.ones(1, RANK))
    with torch.no_grad():
        before = adapter(x, state)
        adapter.up.add_(0.5)  # an optimizer step changes the parameters in place
        after = adapter(x, state)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, reference(adapter, x[:, None], state.mask)[:, 0], atol=1e-5, rtol=1e-5)


def test_rank_is_capped_by_layer_size():
    adapter = VanillaTLoraAdapter(8, 32, 16)
    assert adapter.down.shape == (8, 8) and adapter.up.shape == (32, 8)
    with pytest.raises(ValueError, match="3 timesteps for a projection input of batch size 2"):
        adapter(torch.randn(2, 4, 8), RankState(mask=torch.ones(3, 16)))


@pytest.mark.parametrize("variant", ["vanilla", "ortho"])
def test_active_rank_gives_the_gradients_of_the_mask(variant):
    x = torch.randn(1, 6, IN, generator=torch.Generator().manual_seed(5))

    def gradients(state):
        adapter = ortho() if variant == "ortho" else vanilla()
        perturb_adapters({"layer": adapter}, seed=3, std=0.2)
        adapter(x, state).square().sum().backward()
        return [p.grad for p in adapter.parameters()]

    masked = gradients(RankState(mask=torch.cat([torch.ones(9), torch.zeros(RANK - 9)])[None]))
    sliced = gradients(RankState(active_rank=9))
    for a, b in zip(masked, sliced):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert masked[0][9:].abs().max() == 0  # inactive components learn nothing
