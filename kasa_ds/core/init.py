"""The one adapter initialization (PEFT's KaSA init), drawn at the full shape so every sharding gets the same adapter.

    lora_A (r × n_full)  Kaiming-uniform (a = √5): U(−1/√n_full, 1/√n_full); a rank whose input is split keeps
                         its columns
    lora_B (m_i × r)     zeros, so ΔW = 0 at init whatever the generator
    lora_diag (r,)       N(0, 1)
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch


@torch.no_grad()
def init_adapter_(lora_a: torch.Tensor, lora_b: torch.Tensor, lora_diag: torch.Tensor, full_in_features: int,
                  columns: Optional[Union[slice, torch.Tensor]] = None,
                  generator: Optional[torch.Generator] = None) -> None:
    """Fill the three adapter tensors in place. ``columns``: this rank's columns of the full lora_A (None: all)."""
    r = lora_diag.shape[0]
    bound = 1.0 / math.sqrt(full_in_features)
    a = torch.rand((r, full_in_features), generator=generator, dtype=torch.float32).mul_(2 * bound).sub_(bound)
    lora_a.copy_(a if columns is None else a[:, columns])
    lora_b.zero_()
    lora_diag.copy_(torch.randn(r, generator=generator, dtype=torch.float32))
