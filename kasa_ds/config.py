"""KaSAConfig: what to adapt and how (rank, scaling, regularizer weights, SVD solver)."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence, Union

SVD_SOLVERS = ("auto", "gram", "gram_fp64", "svd", "svd_fp64")  # see kasa_ds.core.truncation
QUANT_MODES = ("low_rank_correction", "requantize")  # 4-bit bases, see kasa_ds.formats.bnb4
ADAPTER_DTYPES = ("float32", "bfloat16", "float16", "float64")
#: KaSAConfig fields PEFT's adapter_config.json has no key for: kasa_ds writes them to kasa_ds_config.json
EXTRA_FIELDS = ("svd_solver", "adapter_dtype", "quant_mode")


@dataclass
class KaSAConfig:
    """Configuration of a KaSA adapter (arXiv 2412.06071).

    Args:
        r: adapter rank; also the number of smallest singular triplets dropped from each target weight.
        alpha: scaling numerator, ΔW = (alpha / r) · ΔU · diag(ΔΣ) · ΔVᵀ.
        dropout: dropout probability on the input of the adapter branch (as in LoRA).
        target_modules: module-name suffixes (``["q_proj", "v_proj"]``: a name matches if it equals a suffix or ends
            with ``"." + suffix``) or one regular expression matched against the whole name (PEFT's rule).
        beta: weight of ‖ΔΣ‖² in the regularizer.
        gamma: weight of ‖ΔUᵀΔU − I_r‖_F + ‖ΔVᵀΔV − I_r‖_F in the regularizer. Both terms are *summed* over adapted
            layers, as PEFT does (the official script divides by the layer count; scale β, γ by 1/L to convert).
        svd_solver: how the r smallest singular triplets are found; see :mod:`kasa_ds.core.truncation`.
        modules_to_save: modules trained in full and saved with the adapter (e.g. ``["classifier"]``).
        exclude_modules: names (same matching rule as ``target_modules``) never adapted.
        adapter_dtype: dtype of ΔU, ΔΣ, ΔV (float32 by default, like PEFT's autocast of 16-bit adapters).
        init_seed: seed for the adapter initialization; None draws from the global torch RNG.
        quant_mode: on bitsandbytes 4-bit bases, ``low_rank_correction`` (keep the 4-bit base, subtract the frozen
            tail in forward) or ``requantize`` (quantize W_world back to 4 bits); see :mod:`kasa_ds.formats.bnb4`.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Union[Sequence[str], str] = ("q_proj", "v_proj")
    beta: float = 1e-4
    gamma: float = 1e-3
    svd_solver: str = "auto"
    modules_to_save: Sequence[str] = field(default_factory=tuple)
    exclude_modules: Sequence[str] = field(default_factory=tuple)
    adapter_dtype: str = "float32"
    init_seed: Optional[int] = None
    quant_mode: str = "low_rank_correction"

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"KaSAConfig.r must be a positive integer, got {self.r!r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"KaSAConfig.alpha must be a finite number > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"KaSAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not (math.isfinite(self.beta) and math.isfinite(self.gamma) and self.beta >= 0 and self.gamma >= 0):
            raise ValueError(f"KaSAConfig.beta and gamma must be finite and >= 0, got beta={self.beta!r} "
                             f"gamma={self.gamma!r}")
        if self.svd_solver not in SVD_SOLVERS:
            raise ValueError(f"KaSAConfig.svd_solver must be one of {SVD_SOLVERS}, got {self.svd_solver!r}")
        if self.adapter_dtype not in ADAPTER_DTYPES:
            raise ValueError(f"KaSAConfig.adapter_dtype must be one of {ADAPTER_DTYPES}, got {self.adapter_dtype!r}")
        if self.quant_mode not in QUANT_MODES:
            raise ValueError(f"KaSAConfig.quant_mode must be one of {QUANT_MODES}, got {self.quant_mode!r}")
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as e:
                raise ValueError(f"KaSAConfig.target_modules is not a valid regular expression: {e}") from None
        else:
            self.target_modules = tuple(self.target_modules)
        if not self.target_modules:
            raise ValueError("KaSAConfig.target_modules is empty: name the linear layers to adapt, e.g. "
                             "['q_proj', 'k_proj', 'v_proj', 'o_proj']")
        self.modules_to_save = tuple(self.modules_to_save or ())
        self.exclude_modules = tuple(self.exclude_modules or ())

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def is_target(self, name: str) -> bool:
        """PEFT's matching rule: a regex fully matches, or a listed suffix ends the dotted name."""
        if _matches(name, self.exclude_modules):
            return False
        return _matches(name, self.target_modules)

    def is_module_to_save(self, name: str) -> bool:
        return _matches(name, self.modules_to_save)

    def in_module_to_save(self, name: str, include_self: bool = True) -> bool:
        """Whether ``name`` (or, with include_self=False, only one of its ancestors) is a module to save."""
        ancestors = [name[:i] for i in range(len(name)) if name[i] == "."]
        return any(self.is_module_to_save(n) for n in ancestors + ([name] if include_self else []))

    # PEFT's adapter_config.json (LoraConfig with kasa_config) <-> KaSAConfig
    def to_peft_dict(self, base_model_name_or_path: Optional[str] = None,
                     task_type: Optional[str] = None) -> dict[str, Any]:
        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return {
            "peft_type": "LORA",
            "task_type": task_type,
            "base_model_name_or_path": base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": targets,
            "exclude_modules": list(self.exclude_modules) or None,
            "modules_to_save": list(self.modules_to_save) or None,
            "kasa_config": {"beta": self.beta, "gamma": self.gamma},
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "use_rslora": False,
            "use_dora": False,
            "rank_pattern": {},
            "alpha_pattern": {},
            "inference_mode": True,
        }

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any]) -> "KaSAConfig":
        if d.get("peft_type", "LORA") != "LORA" or not d.get("kasa_config"):
            raise ValueError("adapter_config.json is not a KaSA adapter: expected peft_type LORA with a kasa_config")
        for key, unsupported in (("rank_pattern", {}), ("alpha_pattern", {}), ("use_rslora", False),
                                 ("use_dora", False), ("fan_in_fan_out", False)):
            if d.get(key) not in (None, unsupported):
                raise ValueError(f"adapter_config.json sets {key}={d[key]!r}, which kasa_ds does not support")
        if d.get("bias", "none") != "none":
            raise ValueError(f"adapter_config.json sets bias={d['bias']!r}; kasa_ds supports bias='none' only")
        return cls(r=int(d["r"]), alpha=float(d["lora_alpha"]), dropout=float(d.get("lora_dropout") or 0.0),
                   target_modules=d["target_modules"], beta=float(d["kasa_config"].get("beta", 1e-4)),
                   gamma=float(d["kasa_config"].get("gamma", 1e-3)), modules_to_save=d.get("modules_to_save") or (),
                   exclude_modules=d.get("exclude_modules") or ())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        d["modules_to_save"] = list(self.modules_to_save)
        d["exclude_modules"] = list(self.exclude_modules)
        return d


def _matches(name: str, patterns: Union[Sequence[str], str]) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)
