"""megatron-core's Column/RowParallelLinear → ShardSpec (megatron is imported only when the model uses it)."""

from __future__ import annotations

from typing import Optional

import torch.distributed as dist
from torch import nn

from .fused import ProjectionView
from .spec import ShardSpec


def megatron_spec(module: nn.Module, name: str) -> Optional[ShardSpec]:
    """The layer's sharding, None for a module that is not a megatron TP linear; ValueError naming the fix for a
    layout KaSA cannot adapt. A :class:`~.fused.ProjectionView` gets its projection's sharding: rows
    ``full_rows`` × n split evenly over the TP ranks, picked out of the fused shard by ``rows``."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    if isinstance(module, ProjectionView):
        spec = megatron_spec(module.fused, name)
        if spec is None or module.rows is None:
            return spec
        tp = spec.tp_size
        return ShardSpec(0, (module.full_rows, spec.full_shape[1]), (len(module.rows),) * tp, spec.group,
                         returns_bias=True, dp_group=spec.dp_group, rows=module.rows, stage_group=spec.stage_group,
                         sequence_parallel=spec.sequence_parallel)
    if not isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
        return None
    if module.weight is None:
        raise ValueError(f"{name}: skip_weight_param_allocation=True (the weight is passed at run time); KaSA needs "
                         "the layer to own its weight")
    if module.explicit_expert_comm:
        raise ValueError(f"{name}: expert-parallel linears are not supported; exclude the MoE experts "
                         "(exclude_modules)")
    tp = dist.get_world_size(module.tp_group) if dist.is_initialized() else 1
    initialized = parallel_state.model_parallel_is_initialized()
    dp_group = parallel_state.get_data_parallel_group() if initialized else None
    stage = (parallel_state.get_tensor_and_data_parallel_group()
             if initialized and parallel_state.get_pipeline_model_parallel_world_size() > 1 else None)
    if isinstance(module, ColumnParallelLinear):
        # megatron's gated MLP fuses [gate; up] into linear_fc1 and splits each half over the TP ranks
        glu = name.rsplit(".", 1)[-1] == "linear_fc1" and getattr(getattr(module, "config", None),
                                                                  "gated_linear_unit", False)
        return ShardSpec(0, (module.output_size, module.input_size), (module.output_size_per_partition,) * tp,
                         module.tp_group, gather_output=module.gather_output, returns_bias=True, dp_group=dp_group,
                         chunks=2 if glu else 1, stage_group=stage, sequence_parallel=module.sequence_parallel)
    return ShardSpec(1, (module.output_size, module.input_size), (module.input_size_per_partition,) * tp,
                     module.tp_group, input_is_parallel=module.input_is_parallel, returns_bias=True,
                     dp_group=dp_group, stage_group=stage, sequence_parallel=module.sequence_parallel)
