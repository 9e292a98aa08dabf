"""KaSA inside a transformers Trainer and its subclasses (TRL's SFTTrainer, …): ``KaSATrainer`` and ``with_kasa``.

    trainer = KaSATrainer(model=model, args=TrainingArguments(...), train_dataset=ds, kasa_config=KaSAConfig(r=16))
    SFT = with_kasa(trl.SFTTrainer)
    trainer = SFT(model=model, args=SFTConfig(...), train_dataset=conversations, kasa_config=KaSAConfig(r=16))

What a plain Trainer gets wrong with a KaSA model, and what the mixin does instead:
    loss         task loss + kasa_regularization, counted once per optimizer step whatever the gradient accumulation
                 (backward sees reg / accumulation steps per micro-batch), logged as ``kasa_reg``; evaluation losses
                 stay task losses;
    checkpoints  save_model and every checkpoint hold the PEFT-format adapter (adapter_config.json,
                 adapter_model.safetensors, kasa_ds_config.json; modules_to_save included) gathered under ZeRO-3 —
                 never the truncated base; DeepSpeed checkpoints exclude the frozen base;
    resume       resume_from_checkpoint loads the adapter into the model the script rebuilt (apply_kasa truncates the
                 base again, or reads an SVD cache); under DeepSpeed the engine restores the trainable state and the
                 model accepts its checkpoint without the frozen base;
    ZeRO-3       apply_kasa recognizes the partitioned weights (HfDeepSpeedConfig + from_pretrained) and truncates
                 collectively; the regularizer's terms are computed inside each adapter module's forward.
"""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path
from typing import Optional

import torch
from accelerate.utils import DeepSpeedSchedulerWrapper
from torch import nn
from transformers import Trainer
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer import SCHEDULER_NAME, TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..config import KaSAConfig
from ..core.regularization import kasa_regularization
from ..comm.collectives import is_rank_zero
from ..inject import CONFIG_ATTR, FINGERPRINT_ATTR, apply_kasa, get_config
from ..io import seal
from ..io.adapter import (COMPUTE_FIELDS, WEIGHTS_FILE, adapter_metadata, check_same_base, config_differences,
                          gathered_adapter_state, load_adapter_state, read_adapter_config, read_adapter_tensors,
                          read_base_fingerprint, write_adapter)
from ..io.svd_cache import SVDCache
from ..placements.zero3 import prepare_for_zero3


SEAL_FILE = "kasa_ds_seal.json"  # in every checkpoint-N: the HMAC of each file (kasa_ds.io.seal)
#: what a resumed run must share with the checkpoint's adapter (init_seed and svd_solver do not change the run)
RESUME_FIELDS = COMPUTE_FIELDS + ("dropout", "beta", "gamma", "adapter_dtype")


class KaSATrainerMixin:
    """Put before a Trainer class in the bases (``with_kasa`` does it). ``kasa_config``: apply KaSA to ``model`` here
    (``svd_cache``: a directory from tools/precompute_svd.py for the model's checkpoint, skipping the SVDs); without
    it the model must already be adapted."""

    def __init__(self, *args, kasa_config: Optional[KaSAConfig] = None, svd_cache: Optional[str] = None,
                 trust_checkpoint: bool = False, **kwargs) -> None:
        model = kwargs["model"] if "model" in kwargs else (args[0] if args else None)
        if kwargs.get("peft_config") is not None:  # before any truncation: TRL would wrap the KaSA model in PEFT
            raise ValueError("pass kasa_config, not peft_config: a KaSA trainer adapts the model itself (a "
                             "peft_config would wrap it in a second adapter); drop peft_config")
        if not isinstance(model, nn.Module):
            raise ValueError("KaSA trainers adapt the model in place: pass the model object (loaded with "
                             "from_pretrained; under ZeRO-3 with the DeepSpeed config set first), not a name or path")
        if kasa_config is not None:
            if getattr(model, CONFIG_ATTR, None) is not None:
                raise ValueError("the model already has KaSA adapters: drop kasa_config, or pass a fresh model")
            truncate = None
            if svd_cache is not None:
                cache = SVDCache(svd_cache, model.config._name_or_path, kasa_config)
                truncate = partial(cache.truncate, show_progress=is_rank_zero())
            report = apply_kasa(model, kasa_config, truncate=truncate, show_progress=is_rank_zero())
            if is_rank_zero():
                print(report, flush=True)
        get_config(model)  # the model must be adapted: one message naming the fix otherwise
        if is_deepspeed_zero3_enabled():
            prepare_for_zero3(model)
        super().__init__(*args, **kwargs)
        self.kasa_trust_checkpoint = trust_checkpoint
        self._kasa_reg: list[torch.Tensor] = []
        if self.is_deepspeed_enabled:
            model.register_load_state_dict_pre_hook(_keep_frozen_parameters)

    # ---- loss ---------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if not (self.model.training and torch.is_grad_enabled()):
            return out  # evaluation: the task loss alone
        loss, outputs = out if return_outputs else (out, None)
        reg = kasa_regularization(self.model).to(loss.device)
        self._kasa_reg.append(reg.detach())
        loss = loss + reg * self._regularizer_weight(num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _regularizer_weight(self, num_items_in_batch) -> float:
        """What backward sees of the regularizer per micro-batch so that each optimizer step counts it once: the
        Trainer divides the loss by the accumulation steps itself unless the task loss was already normalized over
        the whole accumulation window (by ``num_items_in_batch`` or a ``compute_loss_func``)."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or \
                self.compute_loss_func is not None
        steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        return 1.0 / steps if scaled else 1.0

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs and self._kasa_reg:
            logs["kasa_reg"] = torch.stack(self._kasa_reg).mean().item()
            self._kasa_reg.clear()
        super().log(logs, *args, **kwargs)

    # ---- saving and resuming ------------------------------------------------------------------------------------
    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """The PEFT-format adapter (gathered: collective under ZeRO-3, call on every rank), tokenizer, arguments."""
        output_dir = output_dir or self.args.output_dir
        state = gathered_adapter_state(self.model)
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            write_adapter(output_dir, state, get_config(self.model), **adapter_metadata(self.model))
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.is_deepspeed_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)  # adapters + their states
        if self.args.should_save and not isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper):
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _save_checkpoint(self, model, trial) -> None:
        """Every file of the checkpoint, sealed with this user's key once all are written (kasa_ds.io.seal)."""
        super()._save_checkpoint(model, trial)
        path = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self.accelerator.wait_for_everyone()  # every rank's files (its RNG state, its DeepSpeed shard) are written
        if self.args.should_save and path.is_dir():
            sealed = seal.seal(path, exclude=(SEAL_FILE,))
            (path / SEAL_FILE).write_text(json.dumps(sealed, indent=1))

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """Before the Trainer loads anything of a checkpoint (its pickles, DeepSpeed's state): it must be one this
        user's KaSA trainer wrote (sealed; ``trust_checkpoint=True``: load another anyway), of this model's KaSA
        settings and base."""
        if resume_from_checkpoint:
            path = get_last_checkpoint(self.args.output_dir) if resume_from_checkpoint is True else \
                resume_from_checkpoint
            if path:
                self._check_resumable(Path(path))
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _check_resumable(self, path: Path) -> None:
        if not (path / WEIGHTS_FILE).is_file():
            raise ValueError(f"{path} holds no KaSA adapter ({WEIGHTS_FILE}); resume from a checkpoint this trainer "
                             "wrote")
        if not self.kasa_trust_checkpoint:
            sealed = json.loads((path / SEAL_FILE).read_text()) if (path / SEAL_FILE).is_file() else None
            reason = seal.unsealed_reason(path, sealed, exclude=(SEAL_FILE,))
            if reason is not None:
                raise ValueError(seal.refusal(path, reason, "KaSATrainer(..., trust_checkpoint=True)"))
        differ = config_differences(read_adapter_config(path), get_config(self.model), RESUME_FIELDS)
        if differ:
            raise ValueError(f"{path} was trained with other KaSA settings than this model has ({'; '.join(differ)}): "
                             "resuming would not continue that run; adapt the model with the checkpoint's settings")
        this_base = getattr(self.model.config, "_name_or_path", None) or type(self.model).__name__
        check_same_base(read_base_fingerprint(path), getattr(self.model, FINGERPRINT_ATTR, None), path, this_base,
                        fix="a model loaded from the base the checkpoint was trained on")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[nn.Module] = None) -> None:
        """Resume (one process, DDP): the checkpoint's adapter into the rebuilt (truncated) model."""
        path = Path(resume_from_checkpoint)
        self._check_resumable(path)
        load_adapter_state(model if model is not None else self.model, read_adapter_tensors(path))


def _keep_frozen_parameters(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook of a KaSA model under DeepSpeed: its checkpoints hold no frozen base (apply_kasa
    rebuilds it), so a missing frozen parameter keeps its current value instead of failing a strict load."""
    for name, p in module.named_parameters():
        if not p.requires_grad and prefix + name not in state_dict:
            state_dict[prefix + name] = p.data


_CLASSES: dict[type, type] = {}


def with_kasa(trainer_cls: type) -> type:
    """``trainer_cls`` with KaSA's loss, checkpoints and resume (e.g. ``with_kasa(trl.SFTTrainer)``)."""
    if not issubclass(trainer_cls, Trainer):
        raise TypeError(f"with_kasa takes a transformers.Trainer subclass, got {trainer_cls!r}")
    if trainer_cls not in _CLASSES:
        _CLASSES[trainer_cls] = type(f"KaSA{trainer_cls.__name__}", (KaSATrainerMixin, trainer_cls),
                                     {"__doc__": f"{trainer_cls.__name__} with KaSA (kasa_ds.integrations."
                                                 "transformers)."})
    return _CLASSES[trainer_cls]


KaSATrainer = with_kasa(Trainer)
