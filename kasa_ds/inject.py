"""Model-level injection: find target linears, truncate their weights, wrap them in KaSALinear, freeze the rest.

``apply_kasa`` runs four explicit steps, each replaceable by the sharded paths:
    1. plan      every target is found and validated before any SVD runs (bad r, Conv1D, tied weights → error);
    2. truncate  each base weight becomes W_world in place (here: one process; ZeRO-3/TP have their own);
    3. wrap      each target is replaced by a KaSALinear holding it as ``base_layer``;
    4. freeze    only adapter parameters and ``modules_to_save`` stay trainable.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Optional

import torch
from torch import nn

from .config import KaSAConfig
from .layer import KaSALinear, kasa_layers
from .quant import dequantize, is_4bit, requantize_
from .tp_integrations import shard_spec
from .tp_layer import KaSAParallelLinear
from .tp_shard import ShardSpec, truncate_tensor_parallel
from .truncation import TailFactors, check_rank, tail_factors, truncate_weight
from .utils import is_rank_zero, progress

CONFIG_ATTR = "kasa_config"  # where apply_kasa leaves the config on the model


@dataclass
class Target:
    name: str
    module: nn.Module  # nn.Linear, bitsandbytes Linear4bit, or a tensor-parallel linear (spec set)
    correction: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # QKaSA low_rank_correction: (left, right)
    spec: Optional[ShardSpec] = None  # tensor-parallel base: how its weight is split over the TP group

    @property
    def shape(self) -> tuple[int, int]:
        """(m, n) of the whole weight (for a TP base: before splitting)."""
        if self.spec is not None:
            return self.spec.full_shape
        return self.module.out_features, self.module.in_features


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    tail_energy: float  # fraction of ‖W‖²_F dropped by the truncation
    seconds: float


@dataclass
class KaSAReport:
    """What ``apply_kasa`` did: one row per adapted layer, parameter counts and time."""

    layers: list[LayerReport] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)
    trainable_params: int = 0
    total_params: int = 0
    seconds: float = 0.0
    solver: str = "auto"

    def __str__(self) -> str:
        energy = max((lr.tail_energy for lr in self.layers), default=0.0)
        return (f"KaSA: adapted {len(self.layers)} layers (solver={self.solver}, {self.seconds:.2f}s, max dropped "
                f"energy {energy:.2e}); trainable {self.trainable_params:,} / {self.total_params:,} params "
                f"({100 * self.trainable_params / max(self.total_params, 1):.3f}%)"
                + (f"; modules_to_save: {', '.join(self.modules_to_save)}" if self.modules_to_save else ""))


TruncateFn = Callable[[list[Target], KaSAConfig], list[LayerReport]]


def apply_kasa(model: nn.Module, config: KaSAConfig, *, truncate: Optional[TruncateFn] = None,
               show_progress: bool = True) -> KaSAReport:
    """Inject KaSA adapters into ``model`` in place and truncate the targeted base weights.

    ``truncate`` replaces step 2 (the sharded paths pass their own); the default truncates each weight in this process
    on the device it lives on. Returns a :class:`KaSAReport`.
    """
    start = time.perf_counter()
    targets = find_targets(model, config)
    truncate = truncate or partial(default_truncate, show_progress=show_progress)
    layer_reports = truncate(targets, config)
    wrap_targets(model, targets, config)
    saved = set_trainable(model, config)
    setattr(model, CONFIG_ATTR, config)
    numel = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731  (ZeRO-3 partitions report their full size)
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(numel(p) for p in model.parameters())
    return KaSAReport(layer_reports, saved, trainable, total, time.perf_counter() - start, config.svd_solver)


def default_truncate(targets: list[Target], config: KaSAConfig, show_progress: bool = True) -> list[LayerReport]:
    """Tensor-parallel targets over their groups (collective), the others in this process."""
    tp = [t for t in targets if t.spec is not None]
    local = [t for t in targets if t.spec is None]
    reports = truncate_tensor_parallel(tp, config, show_progress=show_progress) if tp else []
    return reports + truncate_locally(local, config, show_progress=show_progress) if local else reports


def find_targets(model: nn.Module, config: KaSAConfig) -> list[Target]:
    """All modules named by ``config.target_modules``, validated; raises before any work if one cannot be adapted."""
    if any(True for _ in kasa_layers(model)):
        raise ValueError("this model already has KaSA layers: apply_kasa runs once per model (use load_adapter to "
                         "load weights into an adapted model, or merge_kasa first)")
    shared = _shared_weight_names(model)
    targets, errors = [], []
    for name, module in model.named_modules():
        if not name or not config.is_target(name):
            continue
        try:
            spec = shard_spec(module, name)
        except ValueError as e:
            errors.append(str(e))
            continue
        if spec is not None:  # a tensor-parallel linear (megatron-core, AutoTP)
            if config.in_module_to_save(name, include_self=False):
                errors.append(f"{name}: it lies inside a module of modules_to_save; add it to exclude_modules")
                continue
            try:
                check_rank(config.r, spec.full_shape, name)
                targets.append(Target(name, module, spec=spec))
            except ValueError as e:
                errors.append(str(e))
            continue
        if type(module).__name__ == "Conv1D":
            errors.append(f"{name}: GPT-2 style Conv1D (transposed weight) is not supported, as in PEFT's KaSA; "
                          "target nn.Linear layers or convert the model to nn.Linear first")
        elif not isinstance(module, nn.Linear):
            if any(isinstance(c, nn.Linear) for c in module.children()):
                continue  # a container whose name matches (e.g. 'attention'); its linears are matched by their names
            errors.append(f"{name}: {type(module).__name__} is not an nn.Linear")
        elif config.in_module_to_save(name, include_self=False):
            errors.append(f"{name}: it lies inside a module of modules_to_save, which is trained in full; add it "
                          "to exclude_modules")
        elif name + ".weight" in shared:
            errors.append(f"{name}: its weight is tied to {shared[name + '.weight']}; truncating it would change that "
                          "module too. Exclude it (exclude_modules) or untie the weights")
        else:
            try:
                check_rank(config.r, (module.out_features, module.in_features), name)
            except ValueError as e:
                errors.append(str(e))
                continue
            targets.append(Target(name, module))
    if errors:
        raise ValueError("cannot apply KaSA:\n  " + "\n  ".join(errors))
    if not targets:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"target_modules={config.target_modules!r} matched no module; linear layer names in this "
                         f"model: {linears}")
    return targets


def truncate_locally(targets: list[Target], config: KaSAConfig, show_progress: bool = True) -> list[LayerReport]:
    """Step 2 on one process: W ← W_world for every target, on the device the weight lives on."""
    reports = []
    for t in progress(targets, desc="KaSA truncation", unit="layer", disable=not (show_progress and is_rank_zero())):
        weight = t.module.weight
        if weight.device.type == "meta":
            raise ValueError(f"{t.name}: weight is on the meta device; load the weights before apply_kasa (for "
                             "ZeRO-3 partitioned models use kasa_ds.zero)")
        tic = time.perf_counter()
        with torch.no_grad():
            if is_4bit(t.module):
                tail = truncate_4bit(t, config)
            else:
                world, tail = truncate_weight(weight, config.r, config.svd_solver)
                weight.copy_(world)
        reports.append(LayerReport(t.name, t.shape, tail.tail_energy, time.perf_counter() - tic))
    return reports


def truncate_4bit(t: Target, config: KaSAConfig) -> TailFactors:
    """QKaSA: the tail of the dequantized weight, applied per ``config.quant_mode``."""
    w = dequantize(t.module)
    tail = tail_factors(w, config.r, config.svd_solver)
    left, right = tail.left.float(), tail.right.float()
    if config.quant_mode == "requantize":
        requantize_(t.module, w - left @ right)
    else:
        t.correction = (left, right)
    return tail


def wrap_targets(model: nn.Module, targets: list[Target], config: KaSAConfig) -> None:
    """Step 3: replace each target by a KaSALinear that holds it; adapter init is seeded per layer if asked."""
    dtype = getattr(torch, config.adapter_dtype)
    for index, t in enumerate(targets):
        if t.spec is not None:
            layer = KaSAParallelLinear(t.module, t.spec, config.r, config.alpha, config.dropout, config.beta,
                                       config.gamma, adapter_dtype=dtype)
        else:
            layer = KaSALinear(t.module, t.module.in_features, t.module.out_features, config.r, config.alpha,
                               config.dropout, config.beta, config.gamma, adapter_dtype=dtype)
        if config.init_seed is not None:
            layer.reset_adapter(torch.Generator().manual_seed(config.init_seed * 1_000_003 + index))
        if t.correction is not None:
            layer.set_base_correction(*t.correction)
        model.set_submodule(t.name, layer)


def set_trainable(model: nn.Module, config: KaSAConfig) -> list[str]:
    """Step 4: freeze everything, then unfreeze adapters and modules_to_save. Returns the saved modules' names."""
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in kasa_layers(model):
        for _, p in layer.adapter_parameters():
            p.requires_grad_(True)
    saved = modules_to_save(model, config)
    if config.modules_to_save and not saved:
        raise ValueError(f"modules_to_save={list(config.modules_to_save)} matched no module in the model")
    for name in saved:
        for pname, p in model.get_submodule(name).named_parameters():
            if not p.is_floating_point():
                raise ValueError(f"modules_to_save {name}: {pname} is quantized ({p.dtype}) and cannot be trained; "
                                 "keep that module in 16/32 bits when quantizing the model")
            p.requires_grad_(True)
    return saved


def modules_to_save(model: nn.Module, config: KaSAConfig) -> list[str]:
    """Outermost modules matching ``config.modules_to_save``."""
    names: list[str] = []
    for name, _ in model.named_modules():
        if name and config.is_module_to_save(name) and not any(name.startswith(n + ".") for n in names):
            names.append(name)
    return names


def _shared_weight_names(model: nn.Module) -> dict[str, str]:
    """Parameter name → another name for the same tensor (tied weights)."""
    first: dict[int, str] = {}
    shared: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            shared[name] = first[id(p)]
            shared.setdefault(first[id(p)], name)
        else:
            first[id(p)] = name
    return shared
