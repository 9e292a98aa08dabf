"""Old import paths (the flat 0.1 package's ``kasa_ds.zero``, ``kasa_ds.tp_shard``, …; 0.2's ``kasa_ds.dist``), kept
for one release.

Each old module is served on import as a module holding the names it had, taken from where they live now (the
table below, old name → ``new.module:name``), with a DeprecationWarning naming the new path. This module imports
nothing from kasa_ds at import time: the table is strings, resolved when an old path is first imported.
Remove in 0.4.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

_MOVED: dict[str, dict[str, str]] = {
    "adapter_io": {n: "io.adapter" for n in (
        "PREFIX CONFIG_FILE WEIGHTS_FILE EXTRA_FILE EXTRA_KEYS adapter_param_items adapter_state_dict save_adapter "
        "base_quantization read_base_quantization read_adapter_config load_adapter load_adapter_state").split()}
    | {"get_config": "inject"},
    "assets": {n: "training.assets" for n in "REPO_ROOT DATA_DIR embedded_model_dir".split()},
    "checkpoint": {n: "training.checkpoint" for n in (
        "checkpoint_root latest_checkpoint begin commit read_meta save_tensors load_tensors").split()},
    "data": {n: "training.data" for n in (
        "IGNORE_INDEX ALPACA_PROMPT load_records ClassificationDataset InstructionDataset format_prompt collate "
        "global_batches rank_slice eval_subset").split()},
    "hf_checkpoint": {n: "io.hf_checkpoint" for n in (
        "TensorInfo weight_files list_tensors read_tensor iter_tensors fingerprint ShardWriter module_key").split()},
    "layer": {n: "core.layer" for n in "KaSALinear AdapterFactor kasa_layers".split()},
    "megatron_gpt": {n: "training.megatron_model" for n in "SDPACoreAttention build_gpt".split()},
    "memory_plan": {n: "training.memory_plan" for n in (
        "GiB RunShape ModelShape model_shape shape_of plan format_plan recipe_estimate recipe_run").split()},
    "metrics": {"MetricsLogger": "training.metrics"},
    "models": {n: "training.models" for n in "model_dir load_tokenizer load_model".split()},
    "preemption": {n: "training.preemption" for n in "PREEMPTED_EXIT STOP_FILE_ENV StopRequest".split()},
    "quant": {n: "formats.bnb4" for n in (
        "is_4bit training_layout_ dequantize requantize_ quantize_linears_ quantize_roundtrip effective_weight "
        "HEADS").split()} | {"QUANT_MODES": "config"},
    "regularization": {n: "core.regularization" for n in "kasa_regularization regularization_terms".split()},
    "single_device": {n: "training.precision" for n in (
        "build_optimizer autocast grad_scaler MemoryGuard GiB").split()},
    "svd_cache": {n: "io.svd_cache" for n in "INDEX cache_fingerprint SVDCache".split()},
    "tp_integrations": {"shard_spec": "placements.tp", "autotp_shard": "placements.tp.autotp"},
    "tp_layer": {"KaSAParallelLinear": "placements.tp.layer"},
    "tp_shard": {n: "placements.tp.spec" for n in "ShardSpec sharded_factor full_indices split_factor join_factor"
                 .split()}
    | {n: "placements.tp.truncate" for n in "use_gram truncate_tensor_parallel".split()}
    | {n: "comm.mappings" for n in "copy_to_tp_region reduce_from_tp_region".split()}
    | {"tp_layers": "placements.tp", "gathered_tp_adapter_state": "io.adapter:gathered_adapter_state"},
    "train_config": {n: "training.config" for n in (
        "EMBEDDED_MODEL OPTIMIZERS ConfigError ModelSection DataSection KaSASection TrainSection TrainConfig "
        "load_train_config resolve_path validate dump").split()},
    "truncation": {n: "core.truncation" for n in (
        "TailFactors check_rank tail_factors factors_from_gram_basis gram_tail_basis truncate_weight "
        "reference_world").split()},
    "utils": {"progress": "progress", "atomic_directory": "io.files", "rank": "comm.collectives",
              "is_rank_zero": "comm.collectives"},
    # 0.3: kasa_ds.dist (a name build tools skip as an output folder) became kasa_ds.comm
    "dist": {"comm": "comm.collectives:", "schedule": "comm.schedule:", "mappings": "comm.mappings:"},
    "dist.comm": {n: "comm.collectives" for n in (
        "is_distributed rank world_size is_rank_zero global_rank comm_device gather_to_owner broadcast_from_owner "
        "all_gather_uneven").split()},
    "dist.schedule": {n: "comm.schedule" for n in "DEFAULT_MAX_GATHER_BYTES WorkItem Assignment assign_owners svd_cost"
                      .split()},
    "dist.mappings": {n: "comm.mappings" for n in (
        "copy_to_tp_region reduce_from_tp_region gather_last_dim "
        "split_last_dim local_slice").split()},
    "zero": {n: "comm.schedule" for n in "DEFAULT_MAX_GATHER_BYTES WorkItem Assignment svd_cost".split()}
    | {n: "placements.zero3" for n in "is_partitioned prepare_for_zero3".split()}
    | {"plan": "comm.schedule:assign_owners", "work_items": "placements.scheduled",
       "truncate_distributed": "placements.scheduled:truncate_scheduled",
       "rewrite_local": "placements.zero3:rewrite_shard", "gathered_adapter_state": "io.adapter"},
}


def resolve(old_module: str, name: str):
    """The object an old ``kasa_ds.<old_module>.<name>`` now is (``"module:"``: the module itself)."""
    module, colon, attr = _MOVED[old_module][name].partition(":")
    target = importlib.import_module(f"{__package__}.{module}")
    return target if colon and not attr else getattr(target, attr or name)


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        old = fullname.removeprefix(f"{__package__}.")
        if old != fullname and old in _MOVED:
            is_package = any(k.startswith(old + ".") for k in _MOVED)
            return importlib.machinery.ModuleSpec(fullname, self, is_package=is_package)
        return None

    def create_module(self, spec):
        return types.ModuleType(spec.name)

    def exec_module(self, module):
        old = module.__name__.removeprefix(f"{__package__}.")
        homes = sorted({v.partition(":")[0] for v in _MOVED[old].values()})
        warnings.warn(f"{module.__name__} moved in kasa_ds {'0.3' if old.startswith('dist') else '0.2'}: import from "
                      f"{', '.join(f'{__package__}.{h}' for h in homes)} (the old path goes in 0.4)",
                      DeprecationWarning, stacklevel=2)
        for name in _MOVED[old]:
            setattr(module, name, resolve(old, name))


_FINDER = _Finder()


def install() -> None:
    if _FINDER not in sys.meta_path:
        sys.meta_path.append(_FINDER)
