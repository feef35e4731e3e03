"""The fine-tuning loop: one task, one method, a plain PyTorch loop that reads top to bottom.

    train(config)     prepare the run (prepare.py: data, model and method; every input check
                      happens there, before anything is written); AdamW with linear warm-up
                      and decay; evaluation after every epoch; a checkpoint every
                      ``save_every`` steps and after every epoch; at the end the adapter (or
                      the whole model for ``full``) and ``results.json`` (run_folder.py).

Determinism and resume. The order of the training rows in epoch e is a permutation drawn from
a generator seeded with (seed, e), and a batch is a slice of it, so the data position is two
integers (epoch, batch). A checkpoint stores the trainable parameters, the optimizer and
scheduler state, every RNG state (dropout draws from torch's) and that position; ``resume``
restores them and skips the batches already seen, so a stopped run continues to the same
parameters and metrics as an uninterrupted one (bitwise on CPU with the same thread count).
Batches are built from the permutation by index, which is what a distributed sampler needs as
well (each rank would take its slice of the same batch).
"""

from __future__ import annotations

import math
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic_files import atomic_directory, atomic_write_json
from ..provenance import environment
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .distributed import Distributed
from .distributed import setup as setup_distributed
from .guards import NonFiniteGuard
from .methods import HEAD_NAMES, count_parameters
from .peak_memory import PeakMemory
from .prepare import Prepared, prepare
from .run_folder import ADAPTER, CHECKPOINTS, RESULTS, _finished_results, check_output
from .task_kinds import TASK_KINDS, _to_device

__all__ = ["epoch_order", "parameter_groups", "train"]


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    task: Any = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    stop_after_steps: int | None = None,
) -> dict[str, Any] | None:
    """Run ``config`` to the end and return its results (also written to results.json).

    ``resume``: continue from the latest checkpoint in ``config.output`` if there is one
    (a finished run's results are returned as they are). ``stop_after_steps`` stops the run
    after that many steps without writing anything more, as a crash would (returns None);
    tests use it to check that resuming reaches the uninterrupted result.
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    output = Path(config.output)
    if resume and (output / RESULTS).is_file():
        finished = _finished_results(output, config)
        if finished is not None:
            log(f"{output / RESULTS}: this run has already finished")
            return finished
    checkpoint = check_output(output, config, resume)
    run = prepare(config, task)
    dist = setup_distributed(run.device)  # rank 0 of 1 unless launched by torchrun/accelerate
    if not dist.is_main:
        log, progress = (lambda message: None), False
    if config.compile:  # in place: the module (and what saves it) stays the same object
        run.model.compile()

    training = _Training(run, dist, output, started)
    if checkpoint is not None:
        training.restore(checkpoint)
        log(f"resuming from {checkpoint} (step {training.step}/{training.total_steps})")
    log(training.summary())

    bar = tqdm(total=training.total_steps, initial=training.step, desc=config.method,
               disable=not progress, dynamic_ncols=True, leave=False)
    forward = dist.wrap(run.model, run.device)  # DDP: all-reduces the gradients in backward
    guard = NonFiniteGuard(run.model, enabled=config.detect_nonfinite)
    with PeakMemory(run.device) as memory, guard:
        run.model.train()
        while training.step < training.total_steps:
            if not training.train_epoch(forward, guard, bar, stop_after_steps):
                bar.close()
                return None
        bar.close()
        test = training.evaluate("test")
    log(f"test: {_format_metrics(test)}")

    results = training.results(test, memory, checkpoint)
    if dist.is_main:  # every rank holds the same parameters; one writes them
        _save_finished_run(output, run, results)
    dist.barrier()
    return results


class _Training:
    """A prepared run being trained: its optimizer and schedule, where it has got to (the
    step, and the data position: the epoch and the batch within it) and its history; a
    checkpoint saves all of them."""

    def __init__(self, run: Prepared, dist: Distributed, output: Path, started: float) -> None:
        self.run, self.config, self.dist = run, run.config, dist
        self.output, self.started = output, started
        config, kind = run.config, run.task.kind
        steps_per_epoch = math.ceil(len(run.splits["train"]) / config.batch_size)
        self.total_steps = config.max_steps or config.epochs * steps_per_epoch
        self.num_epochs = math.ceil(self.total_steps / steps_per_epoch)
        self.lr = config.learning_rate(kind)
        self.head_lr = config.head_learning_rate(TASK_KINDS[kind], kind)
        self.optimizer, self.scheduler = _optimizer(
            run.model, self.lr, self.head_lr, config, self.total_steps
        )
        self.trainable = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.n_trainable, self.n_total = count_parameters(run.model)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.history: dict[str, list] = {"train_loss": [], "step_time_s": [], "evals": []}
        self.elapsed_before = 0.0

    def restore(self, checkpoint: Path) -> None:
        """Continue from ``checkpoint``: parameters, optimizer, schedule, RNGs, position."""
        state = load_checkpoint(checkpoint, model=self.run.model, optimizer=self.optimizer,
                                scheduler=self.scheduler)
        self.step, self.epoch = state["step"], state["epoch"]
        self.batch_in_epoch = state["batch_in_epoch"]
        self.history, self.elapsed_before = state["history"], state["elapsed_s"]

    def summary(self) -> str:
        """The run in one line: task, data, parameters, steps, learning rates, model."""
        run, config, lr, head_lr = self.run, self.config, self.lr, self.head_lr
        return (
            f"{config.method} on {run.task.name} ({run.task.kind}): "
            f"{len(run.splits['train'])} train / "
            f"{len(run.splits['validation'])} validation / {len(run.splits['test'])} test rows, "
            f"{self.n_trainable:,} trainable of {self.n_total:,} parameters, "
            f"{self.total_steps} steps, lr {lr:g}"
            + (f" (head {head_lr:g})" if head_lr != lr else "")
            + f", batch {config.batch_size}, model {run.model_path}"
        )

    def train_epoch(self, forward: nn.Module, guard: NonFiniteGuard, bar: Any,
                    stop_after_steps: int | None) -> bool:
        """The rest of the current epoch (up to ``total_steps``), its validation at the end
        and the checkpoints due on the way. False: stopped at ``stop_after_steps``."""
        config, train_rows = self.config, self.run.splits["train"]
        order = epoch_order(len(train_rows), config.seed, self.epoch)
        size = config.batch_size
        batches = [order[i : i + size] for i in range(0, len(order), size)]
        while self.batch_in_epoch < len(batches) and self.step < self.total_steps:
            tick = time.perf_counter()
            loss = self.train_step(batches[self.batch_in_epoch], forward, guard)
            self.step, self.batch_in_epoch = self.step + 1, self.batch_in_epoch + 1
            self.history["train_loss"].append(loss)
            self.history["step_time_s"].append(time.perf_counter() - tick)
            bar.update(1)
            bar.set_postfix(loss=f"{self.history['train_loss'][-1]:.4f}", epoch=self.epoch)

            end_of_epoch = self.batch_in_epoch == len(batches) or self.step == self.total_steps
            if end_of_epoch:
                result = self.evaluate("validation")
                self.history["evals"].append({"epoch": self.epoch, "step": self.step, **result})
                bar.write(f"epoch {self.epoch} step {self.step}: validation "
                          + _format_metrics(result))
                # Saved as "next: epoch + 1, batch 0".
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            if end_of_epoch or (config.save_every and self.step % config.save_every == 0):
                self.checkpoint()
            if stop_after_steps is not None and stop_after_steps <= self.step < self.total_steps:
                return False
            if end_of_epoch:
                break  # the next epoch has its own order
        return True

    def train_step(self, batch_rows: list[int], forward: nn.Module, guard: NonFiniteGuard) -> float:
        """One optimizer step on the training rows ``batch_rows``; the global batch's loss."""
        run, dist = self.run, self.dist
        guard.step = self.step + 1
        rows, loss_scale = dist.shard(batch_rows)  # all rows on one process
        batch = run.kind.collate([run.splits["train"][i] for i in rows], run)
        loss = forward(**_to_device(batch, run.device)).loss * loss_scale
        dist.backward(loss, run.model)
        guard.check_gradients()
        torch.nn.utils.clip_grad_norm_(self.trainable, self.config.max_grad_norm)
        self.optimizer.step()
        guard.check_parameters()
        loss = dist.mean(loss)  # the global batch's loss
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def evaluate(self, split: str) -> dict[str, float]:
        """The kind's metrics on ``split`` (the model in eval mode meanwhile)."""
        model = self.run.model
        model.eval()
        result = self.run.kind.evaluate(model, self.run.splits[split], self.run)
        model.train()
        return result

    def checkpoint(self) -> None:
        """Save the run's state in ``checkpoints/`` (the main process only)."""
        if not self.dist.is_main:
            return
        save_checkpoint(
            self.output / CHECKPOINTS, step=self.step, model=self.run.model,
            optimizer=self.optimizer, scheduler=self.scheduler,
            trainer_state=self.trainer_state(), keep=self.config.keep_checkpoints,
        )

    def trainer_state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "history": self.history,
            "elapsed_s": self.elapsed_before + time.perf_counter() - self.started,
            "config": self.config.to_dict(),
        }

    def results(self, test: dict[str, float], memory: PeakMemory,
                checkpoint: Path | None) -> dict[str, Any]:
        """The record written to results.json. ``checkpoint``: the one the run resumed from."""
        run, config, history = self.run, self.config, self.history
        validation = history["evals"][-1]  # the last step always ends with an evaluation
        timed = history["step_time_s"][1:] or history["step_time_s"]  # the first step warms up
        return {
            "task": run.task.name,
            "kind": run.task.kind,
            "method": config.method,
            "model": str(run.model_path),
            "data": config.data,
            "primary_metric": run.primary_metric,
            "metrics": {
                "validation": {k: v for k, v in validation.items() if k not in ("epoch", "step")},
                "test": test,
            },
            "trainable_parameters": self.n_trainable,
            "total_parameters": self.n_total,
            "steps": self.step,
            "epochs": self.num_epochs,
            "examples": {split: len(rows) for split, rows in run.splits.items()},
            "learning_rate": config.learning_rate(run.task.kind),
            "step_time_s": {
                "mean": statistics.fmean(timed) if timed else None,
                "median": statistics.median(timed) if timed else None,
            },
            "peak_memory_mib": memory.report(),
            "wall_time_s": self.elapsed_before + time.perf_counter() - self.started,
            "resumed_from_step": None if checkpoint is None else int(checkpoint.name.split("-")[1]),
            "history": history,
            **environment(),
            "command": sys.argv,
            "config": config.to_dict(),
        }


def _optimizer(
    model: nn.Module, lr: float, head_lr: float, config: TrainConfig, total_steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters (``parameter_groups``) and its schedule: linear
    warm-up over ``config.warmup_ratio`` of the steps, then linear decay to zero."""
    warmup = int(config.warmup_ratio * total_steps)
    groups = parameter_groups(model, lr, head_lr)
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(warmup, total_steps))
    return optimizer, scheduler


def parameter_groups(model: nn.Module, lr: float, head_lr: float) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters: the task head's (any parameter under a module
    named like a head, ``methods.HEAD_NAMES``, PEFT's ``modules_to_save`` copies included) at
    ``head_lr``, the rest at ``lr``. One group when the two rates are equal."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if head_lr == lr:
        return [{"params": [p for _, p in trainable], "lr": lr}]
    head = [p for name, p in trainable if HEAD_NAMES.intersection(name.split("."))]
    head_ids = {id(p) for p in head}
    rest = [p for _, p in trainable if id(p) not in head_ids]
    return [group for group in ({"params": rest, "lr": lr}, {"params": head, "lr": head_lr})
            if group["params"]]


def _lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:  # step = optimizer steps already taken
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """The order of the training rows in ``epoch``: a permutation that depends only on
    (seed, epoch), so a resumed run sees the same batches as an uninterrupted one."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_examples, generator=generator).tolist()


def _save_finished_run(output: Path, run: Prepared, results: dict[str, Any]) -> None:
    """A finished run's folder: the trained model (with its tokenizer for ``full``) in
    ``adapter/``, then ``results.json``; its checkpoints are no longer needed."""
    with atomic_directory(output / ADAPTER) as tmp:
        run.model.save_pretrained(tmp)
        if run.config.method == "full" and run.tokenizer is not None:
            run.tokenizer.save_pretrained(tmp)
    atomic_write_json(output / RESULTS, results)
    shutil.rmtree(output / CHECKPOINTS, ignore_errors=True)  # the run is complete


def _format_metrics(result: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in result.items() if k not in ("epoch", "step"))
