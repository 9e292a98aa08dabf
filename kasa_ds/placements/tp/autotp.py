"""DeepSpeed AutoTP's LinearLayer / LinearAllreduce → ShardSpec, and sharding a HF model with AutoTP before KaSA."""

from __future__ import annotations

from typing import Optional

import torch.distributed as dist
from torch import nn

from .spec import ShardSpec


def autotp_spec(module: nn.Module, name: str) -> Optional[ShardSpec]:
    """The layer's sharding, None for a module that is not an AutoTP linear; ValueError naming the fix for a fused
    layout KaSA cannot adapt."""
    from deepspeed.module_inject import layers

    if not isinstance(module, (layers.LinearLayer, layers.LinearAllreduce)):
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
