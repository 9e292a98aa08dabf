"""Model-level injection: find target linears, truncate their weights, wrap them in KaSA layers, freeze the rest.

``apply_kasa`` runs four explicit steps:
    1. find      every target is classified (registry: format × placement) and validated before any SVD runs
                 (bad r, Conv1D, tied weights, a refused combination → one error listing every problem);
    2. truncate  each base weight becomes W_world, grouped by placement (ZeRO-3 and TP groups are collective);
    3. wrap      each target is replaced by its placement's KaSA layer holding it as ``base_layer``;
    4. freeze    only adapter parameters and ``modules_to_save`` stay trainable.
"""

from __future__ import annotations

import time
import warnings
from typing import Callable, Optional

import torch
from torch import nn

from .config import KaSAConfig
from .core import fingerprint
from .core.experts import expert_layers
from .core.layer import kasa_layers
from .core.truncation import check_rank
from .core.types import ExpertsTarget, KaSAReport, LayerReport, Target
from .comm.schedule import DEFAULT_MAX_GATHER_BYTES
from . import registry
from .registry import classify, classify_experts, experts_layout_of

CONFIG_ATTR = "kasa_config"  # where apply_kasa leaves the config on the model
FINGERPRINT_ATTR = "kasa_base_fingerprint"  # and the sampled base weights (kasa_ds.core.fingerprint)

TruncateFn = Callable[[list[Target], KaSAConfig], list[LayerReport]]


def apply_kasa(model: nn.Module, config: KaSAConfig, *, truncate: Optional[TruncateFn] = None,
               show_progress: bool = True, distributed: bool = False,
               max_gather_bytes: int = DEFAULT_MAX_GATHER_BYTES,
               fingerprint: Optional[dict[str, dict]] = None) -> KaSAReport:
    """Inject KaSA adapters into ``model`` in place and truncate the targeted base weights.

    Each target's placement truncates it: whole weights in this process, ZeRO-3 partitioned weights and
    tensor-parallel shards collectively (every rank must call, with the same model). ``distributed=True`` spreads
    the solves of whole (replicated) weights over the ranks too, every rank calling. ``max_gather_bytes`` caps the
    bytes one rank gathers at once. ``truncate`` replaces step 2 (e.g. an SVD cache). The base weights are sampled
    first (:func:`base_fingerprint`; ``fingerprint``: already taken) and kept on the model, so that every adapter
    written from it names its base. Returns a :class:`KaSAReport`.
    """
    start = time.perf_counter()
    targets, experts = find_targets(model, config), find_expert_targets(model, config)
    warn_left_out_experts(model, config)
    fingerprint = fingerprint if fingerprint is not None else base_fingerprint(targets, model, experts)
    if truncate is not None:
        layer_reports = truncate(targets, config) if targets else []
    else:
        layer_reports = []
        for placement in registry.PLACEMENTS:  # the registry's order, the same on every rank
            group = [t for t in targets if t.placement is placement]
            if group:
                layer_reports += placement.truncate(group, config, show_progress=show_progress,
                                                    distributed=distributed, max_gather_bytes=max_gather_bytes)
    for placement in registry.PLACEMENTS:
        group = [t for t in experts if t.placement is placement]
        if group:
            layer_reports += placement.truncate_experts(group, config, show_progress=show_progress,
                                                        distributed=distributed, max_gather_bytes=max_gather_bytes)
    wrap_targets(model, targets, config)
    wrap_experts(model, experts, config)
    saved = set_trainable(model, config)
    setattr(model, CONFIG_ATTR, config)
    setattr(model, FINGERPRINT_ATTR, across_stages(model, fingerprint))  # an adapter names every stage's base
    if hasattr(model, "save_pretrained"):
        model.save_pretrained = refuse_save_pretrained  # this instance only; merge_kasa removes it
    counts = getattr(model, "parameter_counts", None)  # a model split over TP ranks and stages counts them whole
    if counts is not None:
        trainable, total = counts()
    else:
        numel = registry.whole_numel(model)  # TP shards and ZeRO-3 partitions: the tensors they were cut from
        trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
        total = sum(numel(p) for p in model.parameters())
    return KaSAReport(layer_reports, saved, trainable, total, time.perf_counter() - start, config.svd_solver,
                      [(t.name, t.layout.num_experts, t.projections) for t in experts])


def adapter_module_name(model: Optional[nn.Module], name: str) -> str:
    """The name adapter files give module ``name``: its own, or the one the model maps it to (a model whose modules
    compute another model's: a Megatron model's projections take the HF model's names, see
    kasa_ds.training.megatron_model.MegatronCausalLM.adapter_module_name)."""
    rename = getattr(model, "adapter_module_name", None)
    return rename(name) if rename is not None else name


def across_stages(model: Optional[nn.Module], tensors: dict) -> dict:
    """``tensors`` (keyed by adapter names) of every pipeline stage of ``model``, merged on every rank: collective over
    the pipeline group for a model split into stages (its ``gather_stages``, kasa_ds.training.megatron_model); the
    input itself for any other model."""
    merge = getattr(model, "gather_stages", None)
    return merge(tensors) if merge is not None else tensors


def base_fingerprint(targets: list[Target], model: Optional[nn.Module] = None,
                     experts: list[ExpertsTarget] = ()) -> dict[str, dict]:
    """{target name (as adapter files name it): its sampled values and dtype} of the weights as they are now (before
    truncation), on every rank; collective where a placement is sharded (every rank, same targets, same order).
    An experts module's projection is one entry, its experts stacked ((E·m) × n)."""
    layers = {adapter_module_name(model, t.name): fingerprint.record(
        t.placement.sample_weight(t, fingerprint.sample_positions(t.shape)), t.format.sample_dtype(t.module))
        for t in targets}
    for t in experts:
        for p in t.projections:
            (m, n), e = t.layout.shape(p), t.layout.num_experts
            values = t.placement.sample_experts(t, p, fingerprint.sample_positions((e * m, n)))
            layers[f"{adapter_module_name(model, t.name)}.{p}"] = fingerprint.record(
                values, t.module.down_proj.dtype)
    return layers


def find_targets(model: nn.Module, config: KaSAConfig) -> list[Target]:
    """All modules named by ``config.target_modules``, validated; raises before any work if one cannot be adapted."""
    if any(True for _ in kasa_layers(model)) or any(True for _ in expert_layers(model)):
        raise ValueError("this model already has KaSA layers: apply_kasa runs once per model (use load_adapter to "
                         "load weights into an adapted model, or merge_kasa first)")
    shared = _shared_weight_names(model)
    targets, errors = [], []
    for name, module in model.named_modules():
        if not name or not config.is_target(name):
            continue
        if experts_layout_of(module) is not None:
            continue  # a fused experts module: find_expert_targets
        try:
            target = classify(module, name)
            if target is None:
                if any(isinstance(c, nn.Linear) for c in module.children()):
                    continue  # a container whose name matches (e.g. 'attention'); its linears match by their names
                raise ValueError(f"{name}: {type(module).__name__} is not an nn.Linear")
            if config.in_module_to_save(name, include_self=False):
                raise ValueError(f"{name}: it lies inside a module of modules_to_save, which is trained in full; add "
                                 "it to exclude_modules")
            if name + ".weight" in shared:
                raise ValueError(f"{name}: its weight is tied to {shared[name + '.weight']}; truncating it would "
                                 "change that module too. Exclude it (exclude_modules) or untie the weights")
            check_rank(config.r, target.shape, name)
            targets.append(target)
        except ValueError as e:
            errors.append(str(e))
    if errors:
        raise ValueError("cannot apply KaSA:\n  " + "\n  ".join(errors))
    if not targets and not find_expert_targets(model, config):
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"target_modules={config.target_modules!r} matched no module; linear layer names in this "
                         f"model: {linears}")
    return targets


def find_expert_targets(model: nn.Module, config: KaSAConfig) -> list[ExpertsTarget]:
    """The fused experts modules with projections ``config`` selects (kasa_ds.core.experts.targeted_projections),
    validated; raises before any work if one cannot be adapted."""
    targets, errors = [], []
    for name, module in model.named_modules():
        try:
            target = classify_experts(module, name, config)
            if target is not None:
                for p in target.projections:
                    check_rank(config.r, target.layout.shape(p), f"{name}.{p}")
                targets.append(target)
        except ValueError as e:
            errors.append(str(e))
    if errors:
        raise ValueError("cannot apply KaSA:\n  " + "\n  ".join(errors))
    return targets


def warn_left_out_experts(model: nn.Module, config: KaSAConfig) -> None:
    """One warning line when the targets leave a model's fused experts out (they hold most of an MoE model)."""
    left_out = [name for name, m in model.named_modules()
                if experts_layout_of(m) is not None and classify_experts(m, name, config) is None]
    if left_out:
        warnings.warn(f"KaSA: the experts of {len(left_out)} mixture-of-experts module(s) are not adapted (e.g. "
                      f"{left_out[0]}): target_modules names none of gate_proj, up_proj, down_proj (or gate_up_proj, "
                      "experts); add them to adapt the experts", stacklevel=3)


def wrap_experts(model: nn.Module, targets: list[ExpertsTarget], config: KaSAConfig) -> None:
    """Replace each experts module by a KaSAExperts holding it; adapter init seeded per module if asked."""
    for index, t in enumerate(targets):
        layer = t.placement.wrap_experts(t, config)
        layer.placement = t.placement
        if config.init_seed is not None:
            layer.reset_adapter(torch.Generator().manual_seed(config.init_seed * 1_000_003 + 500_009 + index))
        model.set_submodule(t.name, layer)


def wrap_targets(model: nn.Module, targets: list[Target], config: KaSAConfig) -> None:
    """Step 3: replace each target by its placement's KaSA layer; adapter init is seeded per layer if asked (by the
    target's index in the whole model: a pipeline stage's model says where its targets start, ``adapter_index_offset``
    (kasa_ds.training.megatron_model))."""
    offset = getattr(model, "adapter_index_offset", None)
    first = offset(len(targets)) if offset is not None else 0
    for index, t in enumerate(targets, start=first):
        layer = t.placement.wrap(t, config)
        layer.placement = t.placement  # the one decision, remembered: io/ asks the layer's placement
        if config.init_seed is not None:
            layer.reset_adapter(torch.Generator().manual_seed(config.init_seed * 1_000_003 + index))
        if t.correction is not None:
            layer.set_base_correction(*t.correction)
        model.set_submodule(t.name, layer)


def set_trainable(model: nn.Module, config: KaSAConfig) -> list[str]:
    """Step 4: freeze everything, then unfreeze adapters and modules_to_save. Returns the saved modules' names."""
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in [*kasa_layers(model), *expert_layers(model)]:
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


def refuse_save_pretrained(*args, **kwargs):
    """``save_pretrained`` of a KaSA model: it would write the truncated base and the adapter tensors under names
    plain ``from_pretrained`` does not read (the adapted layers come back re-initialized). Refused, with the calls
    that do what was meant."""
    raise ValueError("save_pretrained on a KaSA model would write a checkpoint that from_pretrained loads with the "
                     "adapted layers re-initialized: save the adapter with kasa_ds.save_adapter(model, DIR) (PEFT "
                     "format; kasa_ds.load_adapter or PEFT load it on the original base), or a plain merged model with "
                     "kasa_ds.merge_kasa(model).save_pretrained(DIR)")


def get_config(model: nn.Module) -> KaSAConfig:
    config = getattr(model, CONFIG_ATTR, None)
    if config is None:
        raise ValueError("model has no KaSA adapter: call kasa_ds.apply_kasa(model, config) or load_adapter first")
    return config


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
