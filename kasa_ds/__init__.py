"""kasa_ds: KaSA fine-tuning (arXiv 2412.06071) for single-process, DeepSpeed and Megatron training.

Public API::

    from kasa_ds import KaSAConfig, apply_kasa, kasa_regularization, save_adapter, load_adapter, merge_kasa

Layers (each imports only from those before it): config, progress, cli → core → formats, comm → placements →
registry → inject, merge → io → training, integrations → commands; launch/ and tools/ import kasa_ds only. See
README, "Architecture".
"""

from . import compat
from .config import KaSAConfig
from .core.layer import KaSALinear, kasa_layers
from .core.regularization import kasa_regularization
from .core.truncation import reference_world, tail_factors, truncate_weight
from .core.types import KaSAReport
from .inject import apply_kasa
from .io.adapter import gathered_adapter_state, load_adapter, save_adapter
from .io.gguf_lora import export_gguf_adapter
from .io.lora import export_lora_adapter
from .merge import merge_kasa

__version__ = "0.3.0"

compat.install()

__all__ = [
    "KaSAConfig", "KaSAReport", "KaSALinear", "apply_kasa", "export_gguf_adapter", "export_lora_adapter",
    "gathered_adapter_state", "kasa_layers", "kasa_regularization", "load_adapter", "merge_kasa", "reference_world", "save_adapter", "tail_factors",
    "truncate_weight", "__version__",
]
