"""Recognize tensor-parallel linears of megatron-core and DeepSpeed AutoTP and describe their sharding.

Each integration is one function from a module to a :class:`ShardSpec` (or None when the module is not one of its
layers); everything else (truncation, adapter layer, regularizer, export) is the shared shard math of
:mod:`kasa_ds.tp_shard`. Neither library is imported unless the model already uses it.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch.distributed as dist
from torch import nn

from .tp_shard import ShardSpec


def shard_spec(module: nn.Module, name: str = "module") -> Optional[ShardSpec]:
    """The module's TP sharding, or None for a module that is not a supported TP linear.

    Raises ValueError (naming the layer and the fix) for a TP linear whose layout KaSA cannot adapt.
    """
    if "megatron.core" in sys.modules:
        spec = _megatron_spec(module, name)
        if spec is not None:
            return spec
    if "deepspeed" in sys.modules:
        return _autotp_spec(module, name)
    return None


def _megatron_spec(module: nn.Module, name: str) -> Optional[ShardSpec]:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    if not isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
        return None
    if module.weight is None:
        raise ValueError(f"{name}: skip_weight_param_allocation=True (the weight is passed at run time); KaSA needs "
                         "the layer to own its weight")
    if module.sequence_parallel:
        raise ValueError(f"{name}: sequence parallelism is not supported by KaSA's TP layers yet; set "
                         "sequence_parallel=False in the TransformerConfig")
    if module.explicit_expert_comm:
        raise ValueError(f"{name}: expert-parallel linears are not supported; exclude the MoE experts "
                         "(exclude_modules)")
    tp = dist.get_world_size(module.tp_group) if dist.is_initialized() else 1
    dp_group = parallel_state.get_data_parallel_group() if parallel_state.model_parallel_is_initialized() else None
    if isinstance(module, ColumnParallelLinear):
        # megatron's gated MLP fuses [gate; up] into linear_fc1 and splits each half over the TP ranks
        glu = name.rsplit(".", 1)[-1] == "linear_fc1" and getattr(getattr(module, "config", None),
                                                                  "gated_linear_unit", False)
        return ShardSpec(0, (module.output_size, module.input_size), (module.output_size_per_partition,) * tp,
                         module.tp_group, gather_output=module.gather_output, returns_bias=True, dp_group=dp_group,
                         chunks=2 if glu else 1)
    return ShardSpec(1, (module.output_size, module.input_size), (module.input_size_per_partition,) * tp,
                     module.tp_group, input_is_parallel=module.input_is_parallel, returns_bias=True,
                     dp_group=dp_group)


def _autotp_spec(module: nn.Module, name: str) -> Optional[ShardSpec]:
    from deepspeed.module_inject import layers

    kinds = (layers.LinearLayer, layers.LinearAllreduce)
    if not isinstance(module, kinds):
        return None
    if type(module) not in (layers.LinearLayer, layers.LinearAllreduce, layers.LinearAllreduceWithReplicatedInput):
        raise ValueError(f"{name}: AutoTP {type(module).__name__} splits a fused weight per sub-parameter; KaSA "
                         "adapts plain column/row-parallel layers only: exclude it (exclude_modules) or unfuse it")
    from deepspeed.utils import groups

    sizes = tuple(int(s) for s in module._partition_sizes)
    shape = tuple(int(s) for s in module._orig_weight_shape)
    dp_group = groups.get_data_parallel_group() if dist.is_initialized() else None
    if isinstance(module, layers.LinearLayer):
        return ShardSpec(0, shape, sizes, module.mp_group, gather_output=module.gather_output, dp_group=dp_group)
    return ShardSpec(1, shape, sizes, module.mp_group,
                     input_is_parallel=not isinstance(module, layers.LinearAllreduceWithReplicatedInput),
                     dp_group=dp_group)


def autotp_size(ds_config: Optional[dict]) -> int:
    return int(((ds_config or {}).get("tensor_parallel") or {}).get("autotp_size", 1) or 1)


def autotp_shard(model: nn.Module, ds_config: dict) -> nn.Module:
    """Shard a HF model with DeepSpeed AutoTP now, before KaSA is applied, and return it.

    AutoTP shards inside ``deepspeed.initialize``, but the optimizer given to it must already hold the adapters:
    so a first engine with the config's ``tensor_parallel`` section, batch geometry and no optimizer shards the
    model (marking it ``ds_autotp_parsed``), then ``apply_kasa`` sees LinearLayer / LinearAllreduce bases, and the
    training engine is built on the sharded model (DeepSpeed does not shard it twice).
    """
    import deepspeed

    keys = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "tensor_parallel")
    engine, *_ = deepspeed.initialize(model=model, config={k: ds_config[k] for k in keys if k in ds_config})
    return engine.module
