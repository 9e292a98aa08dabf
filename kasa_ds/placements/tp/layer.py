"""KaSAParallelLinear: KaSA around a tensor-parallel linear (megatron-core or DeepSpeed AutoTP), adapters sharded
like the base.

Column-parallel base (rows of W split; output split):           Row-parallel base (columns of W split; input split):
    lora_A  (r, n)    replicated                                     lora_A  (r, n_i)  split on columns
    lora_diag (r,)    replicated                                     lora_diag (r,)    replicated
    lora_B  (m_i, r)  split on rows                                  lora_B  (m, r)    replicated
    z = copy_to_tp(ΔΣ ⊙ A·x)   (identity; grad all-reduced)          h = reduce_from_tp(A_i·x_i)  (all-reduce)
    y_i += (α/r) · B_i z       (then gathered if the base gathers)   y += (α/r) · B (ΔΣ ⊙ h)

so every replicated parameter receives the full gradient on every TP rank, and the sharded one its own rows or
columns: forward, gradients and weights equal the TP=1 layer's, split. The r×r orthogonality Gram of the sharded
factor is a sum over shards (all-reduced in :meth:`KaSAParallelLinear.grams`), the replicated one is local.

With megatron's sequence parallelism the tokens are split too (first dimension, s/t per rank) where the base's are:

    column: x_i [s/t, b, n] (the base all-gathers it)     row: y_i [s/t, b, m] (the base reduce-scatters it)
    z = gather_first_dim(ΔΣ ⊙ A·x_i)   [s, b, r]           h_i = reduce_scatter_first_dim(A_i·x_i)   [s/t, b, r]
    y_i += (α/r) · B_i z                                  y_i += (α/r) · B (ΔΣ ⊙ h_i)

(r-wide tensors cross the ranks, never n- or m-wide ones). A replicated parameter that meets only this rank's tokens
(A and ΔΣ of a column layer, B and ΔΣ of a row layer) is taken through copy_to_tp_region, whose backward sums its
gradient over the TP group: every rank again holds the TP=1 gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...core.layer import DiagLinear, KaSALinear
from ...core.penalty import gram
from ...comm.mappings import (copy_to_tp_region, gather_first_dim, gather_last_dim, reduce_from_tp_region,
                              reduce_scatter_first_dim, split_last_dim)
from .spec import ShardSpec


class KaSAParallelLinear(KaSALinear):
    """KaSA adapter around a TP linear whose weight is this rank's shard (see :class:`ShardSpec`).

    forward returns what the base returns: a tensor (AutoTP) or ``(output, bias)`` (megatron-core).
    """

    stackable_terms = False  # the sharded factor's Gram needs an all-reduce over the TP group

    def __init__(self, base_layer: torch.nn.Module, spec: ShardSpec, r: int, alpha: float, dropout: float = 0.0,
                 beta: float = 1e-4, gamma: float = 1e-3, adapter_dtype: torch.dtype = torch.float32) -> None:
        m, n = spec.full_shape
        local = spec.sizes[spec.tp_rank]
        in_features, out_features = (n, local) if spec.dim == 0 else (local, m)
        columns = spec.local_slice() if spec.dim == 1 else None  # the TP=1 init, this rank's columns of lora_A
        super().__init__(base_layer, in_features, out_features, r, alpha, dropout, beta, gamma, adapter_dtype,
                         full_in_features=n, in_columns=columns)
        self.spec = spec

    def forward(self, x: torch.Tensor, *args, **kwargs):
        out = self.base_layer(x, *args, **kwargs)
        result, bias = out if self.spec.returns_bias else (out, None)
        if not self.merged:
            result = result + self.update(x).to(result.dtype)
        return (result, bias) if self.spec.returns_bias else result

    def update(self, x: torch.Tensor) -> torch.Tensor:
        spec, group = self.spec, self.spec.group
        xa = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        if spec.sequence_parallel and spec.tp_size > 1:
            return self._sequence_parallel_update(xa)
        if spec.dim == 0:
            z = self.lora_A(xa) * self.lora_diag
            if spec.tp_size > 1:
                z = copy_to_tp_region(z, group)
            update = self.lora_B(z) * self.scaling
            if spec.gather_output and spec.tp_size > 1:
                update = gather_last_dim(update, spec.sizes, group)
            return update
        if not spec.input_is_parallel and spec.tp_size > 1:
            xa = split_last_dim(xa, spec.sizes, group)
        h = self.lora_A(xa)
        if spec.tp_size > 1:
            h = reduce_from_tp_region(h, group)
        return self.lora_B(h, self.lora_diag, self.scaling)

    def _sequence_parallel_update(self, xa: torch.Tensor) -> torch.Tensor:
        """The update under sequence parallelism (module docstring): column [s/t, b, n] → [s, b, m_i], row
        [s, b, n_i] → [s/t, b, m]."""
        group = self.spec.group
        diag = copy_to_tp_region(self.lora_diag, group)
        if self.spec.dim == 0:
            z = gather_first_dim(F.linear(xa, copy_to_tp_region(self.lora_A.weight, group)) * diag, group)
            return self.lora_B(z) * self.scaling
        h = reduce_scatter_first_dim(self.lora_A(xa), group)
        return DiagLinear.apply(h, diag, copy_to_tp_region(self.lora_B.weight, group), self.scaling)

    def grams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ΔUᵀΔU, ΔVᵀΔV) r×r float32: the sharded factor's Gram is summed over the TP group (forward all-reduce,
        identity backward), so every TP rank holds the TP=1 Grams."""
        gram_b, gram_a = gram(self.lora_B.weight, rows=False), gram(self.lora_A.weight, rows=True)
        if self.spec.tp_size > 1:
            if self.spec.dim == 0:
                gram_b = reduce_from_tp_region(gram_b, self.spec.group)
            else:
                gram_a = reduce_from_tp_region(gram_a, self.spec.group)
        return gram_b, gram_a

    def set_regularize_in_forward(self, enabled: bool = True) -> None:
        if enabled:
            raise ValueError("tensor-parallel KaSA layers compute the regularizer from all-reduced Grams; ZeRO-3 "
                             "on top of tensor parallelism is not supported (use ZeRO-1/2 with TP)")

    def extra_repr(self) -> str:
        kind = "column" if self.spec.dim == 0 else "row"
        return super().extra_repr() + f", {kind}-parallel tp={self.spec.tp_size}, full={self.spec.full_shape}"
