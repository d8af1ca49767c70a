"""Attaching T-LoRA adapters to a denoiser (a UNet or a transformer) and routing each call's timesteps to them.

Why forward hooks on the projections rather than an attention processor: the attention processor is the
part of a diffusers denoiser that everything else replaces (SDPA vs xformers, IP-Adapter, PAG, custom
processors), so an adapter living there is lost whenever one of those is switched on. The projection
modules (`to_q`, `to_k`, `to_v`, `to_out.0`, and FLUX's `add_*_proj`) are called by every processor. Each
adapted projection keeps its own class; its adapters sit in a `tlora` child `ModuleDict` and a forward hook adds
their update to the projection's output. PEFT (`pipe.load_lora_weights`) wraps a projection by moving it to
`base_layer`, which keeps the hook, so both kinds of adapters add up. A quantised projection (bitsandbytes
`Linear4bit`, `Linear8bitLt`) is still an `nn.Linear` and is adapted the same way; its adapters take the compute dtype.

The timesteps come from the denoiser's own forward arguments: a forward pre-hook on the denoiser reads them as
its model family says (`families.py`: position, keyword, units) and turns them into one `RankState` per adapter
before any projection runs. Any caller of the denoiser, a pipeline or a training loop with a `(B,)` vector of
timesteps, therefore gets per-sample masks.
"""

from __future__ import annotations

import torch
from diffusers.models.attention import AttentionModuleMixin
from torch import nn

from .config import TLoraConfig
from .families import ModelFamily, family_mismatch, family_of_denoiser
from .layers import ADAPTER_CLASSES, RankState, TLoraAdapter
from .schedule import rank_mask, rank_schedule

ROUTER_ATTRIBUTE = "_tlora_router"


class TLoraInjectionError(ValueError):
    """T-LoRA cannot be attached, or its timestep masking cannot hold."""


def _innermost(module: nn.Module) -> nn.Module:
    # PEFT wraps a projection and keeps the original as `base_layer`; attach to the original so that
    # loading or unloading a standard LoRA leaves T-LoRA in place.
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def _parent_attention(denoiser: nn.Module, path: str) -> nn.Module | None:
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        parent = denoiser.get_submodule(".".join(parts[:cut]))
        if hasattr(parent, "fused_projections"):
            return parent
    return None


def _uses_fused_projections(attention: nn.Module) -> bool:
    # Two generations of diffusers attention modules. The UNet's `Attention` switches to a `Fused*` processor,
    # and `unfuse_qkv_projections()` restores the processors but leaves `fused_projections` set, so there the
    # processor in use tells. `AttentionModuleMixin` modules (FLUX) keep their processor class, which reads the
    # flag itself, and unfusing clears it.
    if isinstance(attention, AttentionModuleMixin):
        return bool(attention.fused_projections)
    return "Fused" in type(getattr(attention, "processor", None)).__name__


def _matches(path: str, targets) -> bool:
    return any(path == target or path.endswith("." + target) for target in targets)


def _projections(denoiser: nn.Module):
    """(path, innermost linear) for every linear layer of the denoiser, skipping adapter internals."""
    for path, module in denoiser.named_modules():
        if ".base_layer" in path or ".tlora." in path or ".lora_" in path:
            continue
        inner = _innermost(module)
        if isinstance(inner, nn.Linear):
            yield path, inner


def projection_shapes(denoiser: nn.Module) -> dict[str, tuple[int, int]]:
    """`{module path: (in_features, out_features)}` of the denoiser's linear layers."""
    return {path: (linear.in_features, linear.out_features) for path, linear in _projections(denoiser)}


def find_target_projections(denoiser: nn.Module, target_modules) -> list[str]:
    """Module paths of the denoiser's linear projections named by `target_modules` (PEFT's suffix rule)."""
    paths = []
    for path, module in denoiser.named_modules():
        if ".base_layer" in path or ".tlora." in path or ".lora_" in path or not _matches(path, target_modules):
            continue
        if not isinstance(_innermost(module), nn.Linear):
            raise TLoraInjectionError(
                f"Target module {path!r} is a {type(module).__name__}; T-LoRA adapts linear projections only."
            )
        paths.append(path)
    if not paths:
        family = family_of_denoiser(denoiser)
        raise TLoraInjectionError(
            f"No module of the {family.denoiser_label} matches target_modules={list(target_modules)} "
            f"({family.display_name}, {family.denoiser_class}; its default targets are "
            f"{list(family.default_target_modules)})."
        )
    return paths


def _check_rank_fits(denoiser: nn.Module, rank: int, paths: list[str]) -> None:
    """A rank above what every adapted projection can hold is never used by a layer, yet it sizes the rank masks
    built at each denoiser call: refuse it before anything is attached."""
    linears = [_innermost(denoiser.get_submodule(path)) for path in paths]
    widths = [min(linear.in_features, linear.out_features) for linear in linears]
    if widths and rank > max(widths):
        raise TLoraInjectionError(
            f"Rank {rank} is larger than any adapted projection can hold (the widest allows rank {max(widths)}); "
            "the adapter was made for a larger model, or the rank is a typo."
        )


def _add_tlora_update(projection: nn.Linear, args, output):
    x = args[0]
    for adapter in projection.tlora.values():
        router = adapter.router
        scale = router.scale_of(adapter.adapter_name)
        if scale == 0:
            continue
        state = router.states.get(adapter.adapter_name)
        if state is None:
            raise TLoraInjectionError(
                "A T-LoRA projection ran outside a call of its denoiser (UNet or transformer), so no timestep is "
                "known; call the denoiser itself."
            )
        output = output + (scale * adapter(x, state)).to(output.dtype)
    return output


class _CheckpointWithRankState:
    """Wraps a block's gradient-checkpointing function so that the recomputation in the backward pass uses
    the masks of the forward pass it recomputes, even if the denoiser ran again with other timesteps between."""

    def __init__(self, checkpoint_function, router: "TimestepRouter"):
        self.checkpoint_function = checkpoint_function
        self.router = router

    def __call__(self, module, *args):
        states = self.router.states

        def run(*inputs):
            current = self.router.states
            self.router.states = states
            try:
                return module(*inputs)
            finally:
                self.router.states = current

        return self.checkpoint_function(run, *args)


class TimestepRouter:
    """Per-denoiser state shared by its adapters: configs, user scales and the current call's rank states."""

    def __init__(self, denoiser: nn.Module, family: ModelFamily):
        self.family = family
        self.configs: dict[str, TLoraConfig] = {}
        self.scales: dict[str, float] = {}
        self.states: dict[str, RankState] = {}
        self.rank_routing = "auto"  # see `set_rank_routing`
        self.paths: dict[str, list[str]] = {}
        self.attention_modules: list[nn.Module] = []
        self.checkpointing_modules = [m for m in denoiser.modules() if hasattr(m, "gradient_checkpointing")]
        denoiser.register_forward_pre_hook(self, with_kwargs=True)

    def scale_of(self, adapter_name: str) -> float:
        return self.configs[adapter_name].scale * self.scales[adapter_name]

    def __call__(self, denoiser, args, kwargs):
        if any(_uses_fused_projections(attention) for attention in self.attention_modules):
            raise TLoraInjectionError(
                f"The {self.family.denoiser_attribute}'s attention projections are fused (fuse_qkv_projections), "
                "so the T-LoRA adapters on the separate projections would be skipped. Call "
                "`unfuse_qkv_projections()` first."
            )
        timesteps, sample = self.family.call_timesteps(args, kwargs)
        if timesteps is None:
            raise TLoraInjectionError(
                f"T-LoRA needs the {self.family.denoiser_attribute}'s `timestep` argument to pick the active rank."
            )
        self.states = {name: self._rank_state(config, timesteps, sample) for name, config in self.configs.items()}
        if torch.is_grad_enabled():
            self._wrap_checkpoint_functions()

    def _rank_state(self, config: TLoraConfig, timesteps, sample: torch.Tensor) -> RankState:
        schedule = (config.rank, config.min_rank, config.num_train_timesteps, config.schedule_exponent)
        count = timesteps.numel() if torch.is_tensor(timesteps) else 1
        if count not in (1, sample.shape[0]):
            raise TLoraInjectionError(
                f"Got {count} timesteps for a batch of {sample.shape[0]} samples; T-LoRA needs one per sample or "
                "one for all."
            )
        # Under torch.compile a Python rank would be a constant of the graph, so every new rank would compile
        # again; the mask is a tensor input and one graph serves every step.
        if self.rank_routing != "mask" and not torch.compiler.is_compiling():
            on_host = not torch.is_tensor(timesteps) or timesteps.device.type == "cpu"
            if on_host or self.rank_routing == "skip":
                # One rank for the whole batch (one timestep, or FLUX's per-sample copies of it): a Python rank
                # lets the layers skip the inactive components, with exactly the gradients of the masked form.
                # From an accelerator this copy waits for the work queued before it, so "auto" only takes
                # timesteps that are already on the host.
                ranks = rank_schedule(timesteps, *schedule, device="cpu").reshape(-1)
                if bool((ranks == ranks[0]).all()):
                    return RankState(active_rank=int(ranks[0]))
        return RankState(mask=rank_mask(timesteps, *schedule, dtype=sample.dtype, device=sample.device))

    def _wrap_checkpoint_functions(self) -> None:
        for module in self.checkpointing_modules:
            function = getattr(module, "_gradient_checkpointing_func", None)
            if module.gradient_checkpointing and function is not None:
                if not isinstance(function, _CheckpointWithRankState):
                    module._gradient_checkpointing_func = _CheckpointWithRankState(function, self)

    def unwrap_checkpoint_functions(self) -> None:
        for module in self.checkpointing_modules:
            function = getattr(module, "_gradient_checkpointing_func", None)
            if isinstance(function, _CheckpointWithRankState):
                module._gradient_checkpointing_func = function.checkpoint_function


def _remove_hooks(module: nn.Module, hook) -> None:
    # Found by identity rather than through stored handles: a handle copied along with its module
    # (`copy.deepcopy`) still points at the original module's hook table.
    for table in (module._forward_hooks, module._forward_pre_hooks):
        for key in [key for key, value in table.items() if value is hook]:
            del table[key]
            module._forward_hooks_with_kwargs.pop(key, None)
            module._forward_pre_hooks_with_kwargs.pop(key, None)


def get_router(denoiser: nn.Module) -> TimestepRouter | None:
    return getattr(denoiser, ROUTER_ATTRIBUTE, None)


def adapter_dtype(projection: nn.Linear, denoiser_dtype: torch.dtype) -> torch.dtype:
    """The dtype an adapter on `projection` computes in: the weight's, or for a quantised projection (whose
    weight is packed integers) its compute dtype, else the dtype of the denoiser's other parameters."""
    if projection.weight.is_floating_point():
        return projection.weight.dtype
    return getattr(projection, "compute_dtype", None) or denoiser_dtype


RANK_ROUTINGS = {
    "auto": "skip the inactive components when the timesteps are on the host, masks otherwise",
    "mask": "always multiply all R components and mask them",
    "skip": "copy the timesteps to the host once per denoiser call and skip the inactive components",
}


def set_rank_routing(denoiser: nn.Module, routing: str) -> None:
    """How the adapters of `denoiser` apply the rank schedule: `"auto"`, `"mask"` or `"skip"`.

    All give the same outputs. On a CPU, skipping the inactive components is faster and costs nothing, so
    `"auto"` does it. On an accelerator the timesteps usually live on the device, where reading the rank
    means waiting for the queued work once per call; `"auto"` uses masks there, `"skip"` reads the rank
    anyway. Under torch.compile masks are always used, so that the rank changing from step to step does not
    recompile the graph.
    """
    if routing not in RANK_ROUTINGS:
        choices = "; ".join(f"{name!r}: {text}" for name, text in RANK_ROUTINGS.items())
        raise ValueError(f"Unknown rank routing {routing!r}; expected one of {choices}.")
    router = get_router(denoiser)
    if router is None:
        raise TLoraInjectionError("No T-LoRA adapter is loaded into this denoiser; load one first.")
    router.rank_routing = routing


def inject_tlora(
    denoiser: nn.Module,
    config: TLoraConfig,
    adapter_name: str = "default",
    paths: list[str] | None = None,
    initialize: bool = True,
    generator: torch.Generator | None = None,
) -> dict[str, TLoraAdapter]:
    """Attach a T-LoRA adapter named `adapter_name` to the target projections of a denoiser (UNet or transformer).

    An existing adapter of the same name is replaced. `paths` (module paths) overrides `config.target_modules`,
    as when loading a file. With `initialize=False` the factors are left for the caller to fill
    (as `load_tlora_into_denoiser` does). Returns the new adapters by module path.
    """
    family = family_of_denoiser(denoiser)
    mismatch = family_mismatch(config.model_family, family)
    if mismatch:
        raise TLoraInjectionError(mismatch)
    if paths is None:
        paths = find_target_projections(denoiser, config.target_modules)
    _check_rank_fits(denoiser, config.rank, paths)
    attention_of = {path: _parent_attention(denoiser, path) for path in paths}
    for path, attention in attention_of.items():
        if attention is not None and _uses_fused_projections(attention):
            raise TLoraInjectionError(
                f"{path!r} belongs to fused QKV projections; T-LoRA masks each projection separately. Call "
                "`unfuse_qkv_projections()` before loading."
            )
    projections = {path: _innermost(denoiser.get_submodule(path)) for path in paths}
    if initialize and config.init.startswith("weight"):
        quantised = next((path for path, p in projections.items() if not p.weight.is_floating_point()), None)
        if quantised is not None:
            raise TLoraInjectionError(
                f"Ortho init from the layer's weight needs a float weight, but {quantised!r} is quantised "
                f"({type(projections[quantised]).__name__}); use init='random-last'."
            )

    remove_tlora(denoiser, adapter_name)
    router = get_router(denoiser)
    if router is None:
        router = TimestepRouter(denoiser, family)
        setattr(denoiser, ROUTER_ATTRIBUTE, router)

    denoiser_dtype = next((p.dtype for p in denoiser.parameters() if p.is_floating_point()), torch.float32)
    adapters = {}
    adapter_class = ADAPTER_CLASSES[config.variant]
    for path, projection in projections.items():
        adapter = adapter_class(projection.in_features, projection.out_features, config.rank)
        adapter.to(device=projection.weight.device)
        if initialize:
            adapter.initialize(config, weight=projection.weight, generator=generator)
        adapter.to(dtype=adapter_dtype(projection, denoiser_dtype))
        adapter.router = router
        adapter.adapter_name = adapter_name
        if not hasattr(projection, "tlora"):
            projection.tlora = nn.ModuleDict()
            projection.register_forward_hook(_add_tlora_update)
        projection.tlora[adapter_name] = adapter
        adapters[path] = adapter
        attention = attention_of[path]
        if attention is not None and all(attention is not a for a in router.attention_modules):
            router.attention_modules.append(attention)

    router.configs[adapter_name] = config
    router.scales[adapter_name] = 1.0
    router.paths[adapter_name] = list(paths)
    return adapters


def get_tlora_adapters(denoiser: nn.Module, adapter_name: str = "default") -> dict[str, TLoraAdapter]:
    """The adapters named `adapter_name`, by module path."""
    router = get_router(denoiser)
    if router is None or adapter_name not in router.configs:
        raise KeyError(f"No T-LoRA adapter named {adapter_name!r} is loaded.")
    return {path: _innermost(denoiser.get_submodule(path)).tlora[adapter_name] for path in router.paths[adapter_name]}


def remove_tlora(denoiser: nn.Module, adapter_name: str | None = None) -> None:
    """Detach one adapter (or all with `adapter_name=None`); with none left, the denoiser is exactly as before."""
    router = get_router(denoiser)
    if router is None:
        return
    names = list(router.configs) if adapter_name is None else [adapter_name]
    for name in names:
        for path in router.paths.pop(name, []):
            projection = _innermost(denoiser.get_submodule(path))
            del projection.tlora[name]
            if not len(projection.tlora):
                _remove_hooks(projection, _add_tlora_update)
                del projection.tlora
        router.configs.pop(name, None)
        router.scales.pop(name, None)
    if not router.configs:
        _remove_hooks(denoiser, router)
        router.unwrap_checkpoint_functions()
        delattr(denoiser, ROUTER_ATTRIBUTE)
