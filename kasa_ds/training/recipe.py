"""The fine-tuning recipe as an object: setup → train_step per step (evaluate, save) → final evaluation and adapter.

    recipe = Recipe(load_train_config(path, overrides))   # config validated; nothing loaded yet
    recipe.preflight()      # checks that need no model: launcher, resume checkpoint, memory plan
    exit_code = recipe.run()  # setup, train, save; PREEMPTED_EXIT when asked to stop

or all of it, with errors as one ``error:`` line (exit 2): ``run_recipe(config)``.

Setup order: processes → tokenizer, data → model (placed by the backend) → KaSA (truncate + inject) → optimizer and
engine → resume. Each step's loss is the task loss + the KaSA regularizer, logged separately.
"""

from __future__ import annotations

import math
import sys
import time
import uuid
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Optional

import torch

from ..comm.processes import barrier, launcher_rank, launcher_world_size, shutdown_processes
from ..inject import adapter_module_name, apply_kasa
from ..io.adapter import adapter_metadata, gathered_adapter_state, load_adapter_state, write_adapter
from ..io.files import atomic_directory
from ..io.hf_checkpoint import content_digest
from ..io.svd_cache import SVDCache
from ..progress import progress
from . import checkpoint
from .backends import make_backend
from .config import ConfigError, TrainConfig, dump
from .chat import set_chat_template
from .data import IGNORE_INDEX, PackedDataset, collate, eval_subset, global_batches, rank_slice, to_device
from .evaluation import TrainingDiverged, evaluate, fmt
from .memory_plan import check_recipe_plan
from .metrics import MetricsLogger
from .models import check_targets, load_tokenizer, model_dir
from .preemption import PREEMPTED_EXIT, Interrupted, StopRequest
from .processes import mean_over_ranks, setup_distributed
from .run_lock import RunLock
from .samples import answer, prompt_of
from .sources import resolve
from .tokenized import Encoding, checked, tokenized


EXIT_DIVERGED = 3
EXIT_DISK_FULL = 4


class Recipe:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.fingerprint: dict = {}  # of the settings and data contents (preflight: reading data may fail)
        self.resume_from: Optional[Path] = None
        self.resume_meta: dict = {}
        self.lock = RunLock(cfg.output_dir)
        self.run_id = uuid.uuid4().hex[:12]  # a resumed run takes its checkpoint's (preflight)
        self.nonfinite = 0  # consecutive steps with a NaN/inf loss or gradient
        self.loss_scale_skips = 0  # float16 overflows skipped by loss scaling (counted apart)

    # ---- before anything loads -------------------------------------------------------------------------------
    def preflight(self) -> None:
        """Refuse several ranks with nothing to synchronize them, a run the memory planner says will not fit, a
        second training on the same output_dir, and a checkpoint written with other settings — before any work.
        Checks that write nothing come first; then rank 0 takes the directory (and, with resume=none, moves an
        earlier run's files aside)."""
        ranks = launcher_world_size()
        if ranks > 1 and self.cfg.ds_config is None and self.cfg.backend != "megatron":
            raise ConfigError(f"{ranks} ranks without --ds_config: nothing would synchronize their gradients; pass "
                              "--ds_config ds_configs/zero0.json (data parallel) or zero2/zero3")
        if self.cfg.train.max_memory_gib is not None and self.cfg.ds_config is None:
            print(check_recipe_plan(self.cfg))
        self.read_data()
        check_targets(self.cfg.model, self.cfg.kasa_config())
        if launcher_rank() == 0:  # one training per output directory, held for the whole run
            self.lock.acquire()
            moved = checkpoint.move_aside(self.cfg.output_dir) if self.cfg.resume == "none" else None
            if moved is not None:
                print(f"resume=none: the earlier run in {self.cfg.output_dir} was moved to {moved}", flush=True)
        self.resume_from, self.resume_meta = checkpoint.find_resume_checkpoint(self.cfg, self.fingerprint)
        self.run_id = self.resume_meta.get("run_id") or self.run_id  # rank 0's is the one checkpoints record

    def read_data(self) -> None:
        """Find the train and eval data and check every record (DataError naming file, line and fix), streamed;
        a check of the same contents and settings in an earlier run is reused (kasa_ds.training.tokenized)."""
        d, task = self.cfg.data, self.cfg.model.task
        self.sources = {"train": resolve(d.train), **({"eval": resolve(d.eval)} if d.eval else {})}
        num_labels = self.cfg.model.num_labels if task == "seq_cls" else None
        formats = {split: checked(source, source.cache_dir(d.cache_dir), task, d.format, d.text_field,
                                  d.label_field, num_labels)[0] for split, source in self.sources.items()}
        self.data_format = formats["train"]
        if len(set(formats.values())) > 1:  # one encoding serves both splits
            raise ConfigError(f"data.eval={d.eval} reads as {formats['eval']} but data.train={d.train} as "
                              f"{formats['train']}: write both in one format (or set data.format)")
        if task == "causal_lm" and d.format == "auto":
            print(f"data.format=auto: {d.train} reads as {self.data_format}", flush=True)
        self.fingerprint = checkpoint.run_fingerprint(self.cfg, self.sources["train"].digest,
                                                      content_digest(model_dir(self.cfg.model)), launcher_world_size())

    # ---- setup -----------------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        self.stop = StopRequest()  # from here SIGUSR1/SIGTERM mean "checkpoint after this step and exit"
        self.env = setup_distributed(cfg)
        self.rank, self.device = self.env.rank, self.env.device
        self.output_dir = Path(cfg.output_dir)
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(dump(cfg))
        torch.manual_seed(cfg.train.seed + self.rank)
        self.backend = make_backend(cfg, self.env)
        self.setup_data()
        self.setup_model()
        self.backend.build(self.model)
        self.start_step = 0
        if self.resume_from is not None:
            self.restore()
        self.logger = MetricsLogger(self.output_dir, enabled=self.rank == 0, tensorboard=cfg.tensorboard)

    def setup_data(self) -> None:
        """Tokenize the train and eval data once (rank 0; cached beside the data) and memory-map the examples."""
        cfg, d = self.cfg, self.cfg.data
        if not hasattr(self, "sources"):  # run() without preflight()
            self.read_data()
        self.tokenizer = load_tokenizer(cfg.model)
        if cfg.model.task == "causal_lm":
            set_chat_template(self.tokenizer, d.chat_template)
            if self.data_format in ("messages", "sharegpt") and not self.tokenizer.chat_template:
                raise ConfigError(f"data.format={self.data_format} needs a chat template and the tokenizer of "
                                  f"{cfg.model.path} has none; set data.chat_template to a Jinja file or string")
        encoding = Encoding(cfg.model.task, self.data_format, cfg.model.max_length, d.train_on_prompt, d.overlong,
                            d.text_field, d.label_field)
        sets = {}
        for split, source in self.sources.items():
            sets[split] = tokenized(source, encoding, self.tokenizer, source.cache_dir(d.cache_dir), self.rank == 0,
                                    barrier)
            self.say(f"data.{split}: {len(sets[split])} examples " + (f"read from the cache {sets[split].path}"
                     if sets[split].cached else f"tokenized, cached as {sets[split].path}"))
        if len(sets["train"]) == 0:
            raise ConfigError(f"{d.train}: no example has a response token within model.max_length="
                              f"{cfg.model.max_length}; raise model.max_length")
        self.train_set = sets["train"]
        self.eval_set = eval_subset(sets["eval"], d.max_eval_examples) if "eval" in sets else None
        counts = [f"{n} {what}" for what in ("truncated", "dropped") if (n := getattr(self.train_set, what, 0))]
        if counts:  # counted on the examples, before packing wraps them
            self.say(f"train examples longer than model.max_length={cfg.model.max_length}: {', '.join(counts)} "
                     f"(data.overlong={cfg.data.overlong})")
        if d.packing:  # evaluation stays unpacked: the same metric with or without packing
            self.train_set = PackedDataset(self.train_set, cfg.model.max_length)
            self.say(f"packing: {self.train_set.examples} examples into {len(self.train_set)} rows of at most "
                     f"{cfg.model.max_length} tokens "
                     f"({self.train_set.tokens / (len(self.train_set) * cfg.model.max_length):.0%} full)")
        self.batch_of = partial(collate, pad_id=self.tokenizer.pad_token_id)

    def setup_model(self) -> None:
        """Load (partitioned under ZeRO-3), place or shard, then truncate and inject KaSA (the truncation work is
        spread over the ranks when there are several)."""
        cfg, backend = self.cfg, self.backend
        self.kasa_config = cfg.kasa_config()
        backend.before_loading()
        keep = self.kasa_config.in_module_to_save  # modules trained in full stay unquantized
        model = backend.load(cfg.model, self.tokenizer.pad_token_id, keep)
        self.model = backend.place(model)
        if backend.dp_world != self.env.world or cfg.backend == "megatron":
            self.say(f"tensor parallel: {cfg.tensor_parallel}-way {'megatron-core' if cfg.backend == 'megatron' else 'AutoTP'} "
                     + (f"× {cfg.pipeline_parallel} pipeline stages " if cfg.pipeline_parallel > 1 else "")
                     + f"× {backend.dp_world} data-parallel replicas")
        if getattr(model, "is_gradient_checkpointing", False):  # what the model reports, not what was asked
            self.say("gradient checkpointing: each decoder layer is recomputed in backward")
        truncate = None
        if cfg.kasa.svd_cache:
            cache = SVDCache(cfg.kasa.svd_cache, model_dir(cfg.model), self.kasa_config)
            truncate = partial(cache.truncate, show_progress=self.rank == 0,
                               name_of=partial(adapter_module_name, self.model))
        self.say(apply_kasa(self.model, self.kasa_config, truncate=truncate, show_progress=self.rank == 0,
                            distributed=backend.distributed_truncation, max_gather_bytes=cfg.kasa.max_gather_mb << 20))
        backend.prepare(self.model)

    # ---- one step --------------------------------------------------------------------------------------------
    def train_step(self, step: int, indices: list[int]) -> dict:
        """One optimizer step over this rank's share ``indices`` of the global batch (all micro-batches).

        The task loss is the mean over the step's examples (classification: every micro-batch and rank holds as
        many) or over its label tokens across every micro-batch and rank (causal LM: each micro-batch's mean is
        weighted by its share of the step's tokens, so accumulation, data parallelism and packing change nothing).
        """
        t, backend = self.cfg.train, self.backend
        tic = time.perf_counter()
        items = [[self.train_set[i] for i in indices[k * t.micro_batch_size:(k + 1) * t.micro_batch_size]]
                 for k in range(t.gradient_accumulation_steps)]
        batches = [to_device(self.batch_of(part), self.device) for part in items]
        weights = self.loss_weights(batches)
        task_losses, reg_value = backend.forward_backward(batches, weights, step + 1)
        task_sum = sum(loss * weight for loss, weight in zip(task_losses, weights) if weight)
        grad_norm = backend.step()
        loss = mean_over_ranks(task_sum / t.gradient_accumulation_steps, self.device, self.env.world)
        self.check_finite(step + 1, loss, grad_norm)
        tokens = torch.tensor([sum(len(x["input_ids"]) for part in items for x in part),
                               sum(b["input_ids"].numel() for b in batches)], dtype=torch.float64, device=self.device)
        if self.env.world > 1:
            torch.distributed.all_reduce(tokens)  # every rank's tokens
            tokens /= self.env.world // self.backend.dp_world  # a replica's TP ranks read the same batch
        seconds = time.perf_counter() - tic
        record = {"loss": loss, "kasa_reg": reg_value, "lr": backend.lr(),
                  **({"grad_norm": grad_norm} if grad_norm is not None else {}), "step_time": seconds, "tokens_per_s": tokens[0].item() / seconds,
                  "padding": 1 - (tokens[0] / tokens[1]).item(), "loss_scale_skips": self.loss_scale_skips}
        if self.device.type == "cuda":
            record["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / (1 << 30)
        return record

    def loss_weights(self, batches: list[dict]) -> list[float]:
        """Per micro-batch, what its mean task loss is multiplied by before backward, relative to a plain mean over
        micro-batches and ranks (which the backends take: backward divides by the accumulation steps, data
        parallelism averages over ranks). Classification: 1. Causal LM: n_k · ranks · steps / N, with n_k the
        micro-batch's label tokens (after the causal shift) and N the step's over every micro-batch and rank."""
        if self.cfg.model.task != "causal_lm":
            return [1.0] * len(batches)
        counts = torch.tensor([float((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches],
                              dtype=torch.float64, device=self.device)
        total = counts.sum()
        if self.env.world > 1:
            torch.distributed.all_reduce(total)  # tensor-parallel ranks count the same tokens: world/N cancels it
        scale = self.env.world * len(batches) / total.item() if total.item() > 0 else 0.0
        return [c * scale for c in counts.tolist()]

    def check_finite(self, step: int, loss: float, grad_norm: Optional[float]) -> None:
        """Count consecutive non-finite steps (the same decision on every rank: the loss is all-reduced); stop
        after train.max_nonfinite_steps of them. A float16 overflow the loss scaler skipped is counted apart: it
        applied no update and lowers the scale, as loss scaling is meant to."""
        if math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm) or self.backend.loss_scale_skipped):
            self.nonfinite = 0
            self.loss_scale_skips += self.backend.loss_scale_skipped
            return
        self.nonfinite += 1
        limit = self.cfg.train.max_nonfinite_steps
        self.say(f"step {step}: non-finite loss {loss} / gradient norm {grad_norm} ({self.nonfinite} of {limit} "
                 "allowed in a row; " + ("the step was skipped)" if self.cfg.ds_config is None else "DeepSpeed)"))
        if self.nonfinite >= limit:
            raise TrainingDiverged(f"training diverged: {limit} consecutive steps up to step {step} had a NaN/inf "
                                   f"loss or gradient (train.lr={self.cfg.train.lr:g}); nothing non-finite was "
                                   "written. Lower train.lr, check the data, or resume from an earlier checkpoint")

    def evaluate(self, step: int = 0) -> dict:
        """Eval-set metrics (the same on every rank; collective), and sample answers if train.sample_prompts."""
        if self.eval_set is None:
            return {}
        metrics = evaluate(self.backend.forward, self.eval_set, self.batch_of, self.cfg.train.micro_batch_size,
                           self.device, self.backend.dp_rank, self.backend.dp_world, self.cfg.model.task,
                           check_stop=self.check_stop)
        if self.cfg.train.sample_prompts:
            self.log_samples(step)
        return metrics

    def log_samples(self, step: int) -> None:
        """Answer the first train.sample_prompts eval prompts (every rank: forwards may be collective)."""
        rows = [record for _, record in islice(self.sources["eval"].records(), self.cfg.train.sample_prompts)]
        prompts = [p for p in (prompt_of(r, self.data_format, self.tokenizer) for r in rows) if p is not None]
        answers = answer(self.model, self.tokenizer, prompts, self.device, self.cfg.train.sample_max_new_tokens,
                         max_prompt_tokens=self.cfg.model.max_length, check_stop=self.check_stop)
        for i, (prompt, text) in enumerate(zip(prompts, answers), start=1):
            self.say(f"sample {i} at step {step}: {prompt[-80:]!r} → {text!r}")
        self.logger.log("sample", step, {}, {"samples": [{"prompt": p, "answer": a} for p, a in zip(prompts, answers)]})

    def check_stop(self) -> None:
        """Inside evaluation and generation: a stop request (SIGTERM, SIGUSR1, the stop file) raises Interrupted on
        every rank (collective)."""
        self.stop.check(self.device)

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def save(self, step: int) -> None:
        """<output_dir>/checkpoints/step-N: trainer state, RNG, and the adapter (the same files as save_adapter).
        Skipped right after a non-finite step (the same decision on every rank): nothing non-finite is written."""
        if self.nonfinite:
            self.say(f"checkpoint at step {step} skipped: the step was not finite")
            return
        tmp = checkpoint.begin(self.cfg.output_dir, step)
        try:
            self.backend.save_state(tmp)
            checkpoint.save_rng(tmp, self.rank)
            self.write_adapter(tmp)
        except Exception as e:  # writers report a full disk in their own words (safetensors: "unexpected pos")
            checkpoint.abort_if_disk_full(self.cfg.output_dir, tmp, step, e)
            raise
        checkpoint.commit(tmp, {"step": step, "run_id": self.run_id, "fingerprint": self.fingerprint},
                          keep=self.cfg.train.keep_checkpoints)

    def write_adapter(self, directory: Path) -> None:
        """The gathered adapter (collective when sharded), written by rank 0 into an existing directory."""
        state = gathered_adapter_state(self.model)
        if self.rank == 0:
            self.write_adapter_files(directory, state)

    def write_adapter_files(self, directory: Path, state: dict) -> None:
        meta = adapter_metadata(self.model)
        meta["base_model_name_or_path"] = self.cfg.model.path
        write_adapter(directory, state, self.kasa_config, **meta)

    def restore(self) -> None:
        """Continue from the checkpoint preflight chose: adapter, trainer state, RNG, step."""
        path = self.resume_from
        if self.cfg.ds_config is None:  # under DeepSpeed, load_checkpoint restores the (partitioned) trainables
            load_adapter_state(self.model, checkpoint.load_tensors(path / "adapter_model.safetensors"))
        self.backend.restore_state(path)
        checkpoint.restore_rng(path, self.rank)
        self.start_step = self.resume_meta["step"]
        self.say(f"resuming from {path} at step {self.start_step}" + (" (the run is complete: evaluating only; "
                 "pass --resume none for a fresh run)" if self.start_step >= self.cfg.train.max_steps else ""))

    # ---- the run ---------------------------------------------------------------------------------------------
    def run(self) -> int:
        """Evaluate, train with checkpoints, evaluate; a stop request (preemption) at a step boundary, or inside an
        evaluation or a sample's generation, checkpoints the last finished step and exits for requeueing."""
        self.setup()
        self.done = self.saved = self.start_step  # the last finished step; the last one checkpointed
        try:
            before = self.evaluate(self.start_step)
            if before:
                self.say("eval before: " + fmt(before))
                self.logger.log("eval", self.start_step, before, {"when": "before"})
            if self.train_loop():
                return self.finish(before)
        except Interrupted:
            pass
        return self.preempted()

    def train_loop(self) -> bool:
        """The steps from start_step to max_steps; False when a stop request ends them early."""
        t, backend = self.cfg.train, self.backend
        global_batch = t.micro_batch_size * t.gradient_accumulation_steps * backend.dp_world
        batches = global_batches(len(self.train_set), global_batch, t.seed, self.start_step)
        bar = progress(range(self.start_step, t.max_steps), disable=self.rank != 0, desc="train", unit="step",
                       initial=self.start_step, total=t.max_steps)
        self.model.train()
        window = []
        for step in bar:
            record = self.train_step(step, rank_slice(next(batches), backend.dp_rank, backend.dp_world))
            self.done = done = step + 1
            window.append(record["loss"])
            self.logger.log("train", done, record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", reg=f"{record['kasa_reg']:.2e}", refresh=False)
            if done % t.log_every == 0 or done == t.max_steps:
                self.log_line(bar, done, window, record)
                window = []
            if self.eval_set is not None and done % t.eval_every == 0 and done < t.max_steps:
                metrics = self.evaluate(done)
                self.logger.log("eval", done, metrics)
                self.say(f"eval at step {done}: " + fmt(metrics))
                self.model.train()
            if done % t.save_every == 0 or done == t.max_steps:
                self.save(done)
                self.saved = done
            if done < t.max_steps and self.stop.agreed(self.device):  # collective, every step
                return False
        return True

    def log_line(self, bar, done: int, window: list[float], record: dict) -> None:
        if self.rank == 0:
            bar.write(f"step {done}/{self.cfg.train.max_steps} | loss {sum(window) / len(window):.4f} | kasa_reg "
                      f"{record['kasa_reg']:.3e} | lr {record['lr']:.2e}"
                      + (f" | grad_norm {record['grad_norm']:.3f}" if "grad_norm" in record else "") +
                      f" | {record['step_time']:.2f} s/step | {record['tokens_per_s']:.0f} tok/s | "
                      f"pad {record['padding']:.0%}" + (f" | peak {record['peak_memory_gib']:.1f} GiB"
                                                        if "peak_memory_gib" in record else ""))

    def preempted(self) -> int:
        """Checkpoint the last finished step unless it is saved (or nothing was trained), say so, exit 75."""
        if self.done > self.saved:
            self.save(self.done)
        where = f"checkpoint saved in {self.cfg.output_dir}/checkpoints" if self.done > 0 else "nothing trained yet"
        self.say(f"stopping after step {self.done} ({self.stop.reason}): {where}; exit {PREEMPTED_EXIT} — run again "
                 "with resume=auto (the default) to continue")
        self.logger.close()
        return PREEMPTED_EXIT

    def finish(self, before: dict) -> int:
        after = self.evaluate(self.cfg.train.max_steps)
        if after:
            self.logger.log("eval", self.cfg.train.max_steps, after, {"when": "after"})
            self.say("eval before: " + fmt(before) + "\neval after:  " + fmt(after))
        state = gathered_adapter_state(self.model)  # collective when sharded
        if self.rank == 0:
            with atomic_directory(self.output_dir / "adapter") as tmp:
                self.write_adapter_files(tmp, state)
            self.say(f"adapter written to {self.output_dir / 'adapter'}")
        self.logger.close()
        return 0

    def say(self, *args) -> None:
        if getattr(self, "rank", 0) == 0:
            print(*args, flush=True)


def run_recipe(cfg: TrainConfig) -> int:
    """Preflight and run ``cfg``; a refused configuration or checkpoint is one ``error:`` line and exit code 2."""
    recipe = Recipe(cfg)
    try:
        try:
            recipe.preflight()
        except (ConfigError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        try:
            rc = recipe.run()
        except ConfigError as e:  # found during setup (DeepSpeed JSON vs recipe): the same on every rank
            print(f"error: {e}", file=sys.stderr)
            return 2
        except TrainingDiverged as e:  # decided on the all-reduced loss: the same on every rank
            print(f"error: {e}", file=sys.stderr)
            rc = EXIT_DIVERGED
        except checkpoint.DiskFull as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_DISK_FULL
        shutdown_processes()
        return rc
    finally:
        recipe.lock.release()
