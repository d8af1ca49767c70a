"""Attaching T-LoRA adapters to a UNet and routing each call's timesteps to them.

Why forward hooks on the projections rather than an attention processor: the attention processor is the
part of a diffusers UNet that everything else replaces (SDPA vs xformers, IP-Adapter, PAG, custom
processors), so an adapter living there is lost whenever one of those is switched on. The projection
modules (`to_q`, `to_k`, `to_v`, `to_out.0`) are called by every processor. Each adapted projection keeps
its own class; its adapters sit in a `tlora` child `ModuleDict` and a forward hook adds their update to the
projection's output. PEFT (`pipe.load_lora_weights`) wraps a projection by moving it to `base_layer`,
which keeps the hook, so both kinds of adapters add up.

The timesteps come from the UNet's own forward arguments: a forward pre-hook on the UNet turns them into
one `RankState` per adapter before any projection runs. Any caller of the UNet, a pipeline or a training
loop with a `(B,)` vector of timesteps, therefore gets per-sample masks.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import TLoraConfig
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


def _parent_attention(unet: nn.Module, path: str) -> nn.Module | None:
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        parent = unet.get_submodule(".".join(parts[:cut]))
        if hasattr(parent, "fused_projections"):
            return parent
    return None


def _uses_fused_projections(attention: nn.Module) -> bool:
    # `unfuse_qkv_projections()` restores the original processors but leaves `fused_projections` set, so the
    # processor in use is what tells whether `to_q`/`to_k`/`to_v` are still called.
    return "Fused" in type(getattr(attention, "processor", None)).__name__


def _matches(path: str, targets) -> bool:
    return any(path == target or path.endswith("." + target) for target in targets)


def _projections(unet: nn.Module):
    """(path, innermost linear) for every linear layer of the UNet, skipping adapter internals."""
    for path, module in unet.named_modules():
        if ".base_layer" in path or ".tlora." in path or ".lora_" in path:
            continue
        inner = _innermost(module)
        if isinstance(inner, nn.Linear):
            yield path, inner


def projection_shapes(unet: nn.Module) -> dict[str, tuple[int, int]]:
    """`{module path: (in_features, out_features)}` of the UNet's linear layers."""
    return {path: (linear.in_features, linear.out_features) for path, linear in _projections(unet)}


def find_target_projections(unet: nn.Module, target_modules) -> list[str]:
    """Module paths of the UNet's linear projections named by `target_modules` (PEFT's suffix rule)."""
    paths = []
    for path, module in unet.named_modules():
        if ".base_layer" in path or ".tlora." in path or ".lora_" in path or not _matches(path, target_modules):
            continue
        if not isinstance(_innermost(module), nn.Linear):
            raise TLoraInjectionError(
                f"Target module {path!r} is a {type(module).__name__}; T-LoRA adapts linear projections only."
            )
        paths.append(path)
    if not paths:
        raise TLoraInjectionError(f"No module of the UNet matches target_modules={list(target_modules)}.")
    return paths


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
                "A T-LoRA projection ran outside a UNet call, so no timestep is known; call the UNet itself."
            )
        output = output + (scale * adapter(x, state)).to(output.dtype)
    return output


class _CheckpointWithRankState:
    """Wraps a block's gradient-checkpointing function so that the recomputation in the backward pass uses
    the masks of the forward pass it recomputes, even if the UNet ran again with other timesteps between."""

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
    """Per-UNet state shared by its adapters: configs, user scales and the current call's rank states."""

    def __init__(self, unet: nn.Module):
        self.configs: dict[str, TLoraConfig] = {}
        self.scales: dict[str, float] = {}
        self.states: dict[str, RankState] = {}
        self.paths: dict[str, list[str]] = {}
        self.attention_modules: list[nn.Module] = []
        self.checkpointing_modules = [m for m in unet.modules() if hasattr(m, "gradient_checkpointing")]
        unet.register_forward_pre_hook(self, with_kwargs=True)

    def scale_of(self, adapter_name: str) -> float:
        return self.configs[adapter_name].scale * self.scales[adapter_name]

    def __call__(self, unet, args, kwargs):
        if any(_uses_fused_projections(attention) for attention in self.attention_modules):
            raise TLoraInjectionError(
                "The UNet's attention projections are fused (fuse_qkv_projections), so the T-LoRA adapters on "
                "to_q/to_k/to_v would be skipped. Call `unfuse_qkv_projections()` first."
            )
        timesteps = args[1] if len(args) > 1 else kwargs.get("timestep")
        if timesteps is None:
            raise TLoraInjectionError("T-LoRA needs the UNet's `timestep` argument to pick the active rank.")
        sample = args[0] if args else kwargs.get("sample")
        self.states = {name: self._rank_state(config, timesteps, sample) for name, config in self.configs.items()}
        if torch.is_grad_enabled():
            self._wrap_checkpoint_functions()

    @staticmethod
    def _rank_state(config: TLoraConfig, timesteps, sample: torch.Tensor) -> RankState:
        schedule = (config.rank, config.min_rank, config.num_train_timesteps, config.schedule_exponent)
        count = timesteps.numel() if torch.is_tensor(timesteps) else 1
        if count not in (1, sample.shape[0]):
            raise TLoraInjectionError(
                f"Got {count} timesteps for a batch of {sample.shape[0]} samples; T-LoRA needs one per sample or "
                "one for all."
            )
        on_host = not torch.is_tensor(timesteps) or timesteps.device.type == "cpu"
        if count == 1 and on_host:
            # One timestep for the batch: a Python rank lets the layers skip the inactive components (with
            # exactly the gradients of the masked form). Only for timesteps already on the host, so this never
            # waits for an accelerator.
            return RankState(active_rank=int(rank_schedule(timesteps, *schedule)))
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


def get_router(unet: nn.Module) -> TimestepRouter | None:
    return getattr(unet, ROUTER_ATTRIBUTE, None)


def inject_tlora(
    unet: nn.Module,
    config: TLoraConfig,
    adapter_name: str = "default",
    paths: list[str] | None = None,
    initialize: bool = True,
    generator: torch.Generator | None = None,
) -> dict[str, TLoraAdapter]:
    """Attach a T-LoRA adapter named `adapter_name` to the UNet's target projections.

    An existing adapter of the same name is replaced. `paths` (module paths) overrides `config.target_modules`,
    as when loading a file. With `initialize=False` the factors are left for the caller to fill
    (as `load_tlora_into_unet` does). Returns the new adapters by module path.
    """
    if paths is None:
        paths = find_target_projections(unet, config.target_modules)
    attention_of = {path: _parent_attention(unet, path) for path in paths}
    for path, attention in attention_of.items():
        if attention is not None and _uses_fused_projections(attention):
            raise TLoraInjectionError(
                f"{path!r} belongs to fused QKV projections; T-LoRA masks each projection separately. Call "
                "`unfuse_qkv_projections()` before loading."
            )

    remove_tlora(unet, adapter_name)
    router = get_router(unet)
    if router is None:
        router = TimestepRouter(unet)
        setattr(unet, ROUTER_ATTRIBUTE, router)

    adapters = {}
    adapter_class = ADAPTER_CLASSES[config.variant]
    for path in paths:
        projection = _innermost(unet.get_submodule(path))
        adapter = adapter_class(projection.in_features, projection.out_features, config.rank)
        adapter.to(device=projection.weight.device)
        if initialize:
            adapter.initialize(config, weight=projection.weight, generator=generator)
        adapter.to(dtype=projection.weight.dtype)
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


def get_tlora_adapters(unet: nn.Module, adapter_name: str = "default") -> dict[str, TLoraAdapter]:
    """The adapters named `adapter_name`, by module path."""
    router = get_router(unet)
    if router is None or adapter_name not in router.configs:
        raise KeyError(f"No T-LoRA adapter named {adapter_name!r} is loaded.")
    return {path: _innermost(unet.get_submodule(path)).tlora[adapter_name] for path in router.paths[adapter_name]}


def remove_tlora(unet: nn.Module, adapter_name: str | None = None) -> None:
    """Detach one adapter (or all with `adapter_name=None`); with none left, the UNet is exactly as before."""
    router = get_router(unet)
    if router is None:
        return
    names = list(router.configs) if adapter_name is None else [adapter_name]
    for name in names:
        for path in router.paths.pop(name, []):
            projection = _innermost(unet.get_submodule(path))
            del projection.tlora[name]
            if not len(projection.tlora):
                _remove_hooks(projection, _add_tlora_update)
                del projection.tlora
        router.configs.pop(name, None)
        router.scales.pop(name, None)
    if not router.configs:
        _remove_hooks(unet, router)
        router.unwrap_checkpoint_functions()
        delattr(unet, ROUTER_ATTRIBUTE)
