"""kasa_ds: KaSA fine-tuning (arXiv 2412.06071) for single-process, DeepSpeed and Megatron training.

Public API::

    from kasa_ds import KaSAConfig, apply_kasa, kasa_regularization, save_adapter, load_adapter, merge_kasa
"""

from .adapter_io import load_adapter, save_adapter
from .config import KaSAConfig
from .inject import KaSAReport, apply_kasa
from .layer import KaSALinear, kasa_layers
from .merge import merge_kasa
from .regularization import kasa_regularization
from .truncation import reference_world, tail_factors, truncate_weight

__version__ = "0.1.0"

__all__ = [
    "KaSAConfig", "KaSAReport", "KaSALinear", "apply_kasa", "kasa_layers", "kasa_regularization", "load_adapter",
    "merge_kasa", "reference_world", "save_adapter", "tail_factors", "truncate_weight", "__version__",
]
