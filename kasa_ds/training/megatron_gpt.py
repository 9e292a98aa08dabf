"""Moved: the Megatron model is built from a Hugging Face checkpoint by kasa_ds.training.megatron_model (this path
re-exports its attention for one release)."""

import warnings

from .megatron_model import SDPACoreAttention, build_gpt

warnings.warn("kasa_ds.training.megatron_gpt is deprecated: use kasa_ds.training.megatron_model", DeprecationWarning,
              stacklevel=2)

__all__ = ["SDPACoreAttention", "build_gpt"]
