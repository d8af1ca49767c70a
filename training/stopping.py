"""Stopping a run cleanly: the first Ctrl-C (SIGINT) or SIGTERM ends the run after the current optimizer step,
with a checkpoint to resume from and exit code 130; a second Ctrl-C interrupts at once. A run whose gradients
become NaN or infinite stops before the optimizer applies them, so no checkpoint ever holds a diverged adapter."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import torch
from accelerate import Accelerator

from .checkpoints import checkpoint_step, save_checkpoint
from .errors import INTERRUPTED_EXIT_CODE, InputError


class StopRequest:
    """Turns the first Ctrl-C or SIGTERM into a request to stop after the current step."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nStopping after this step and saving a checkpoint (Ctrl-C again to abort now).", file=sys.stderr)

    def agreed(self, accelerator: Accelerator) -> bool:
        """Whether any process was asked to stop: all processes must stop at the same step."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def exit_stopped(accelerator: Accelerator, args, step: int, last_checkpoint: Path | None):
    """End a stopped run: save a checkpoint of `step` unless the last one is of it, say how to resume, exit 130."""
    output_dir = Path(args.output_dir)
    saved = last_checkpoint is not None and checkpoint_step(last_checkpoint) == step
    if accelerator.is_main_process and not saved:
        last_checkpoint = save_checkpoint(accelerator, output_dir, step, args.checkpoints_total_limit)
    accelerator.end_training()
    accelerator.print(
        f"Stopped at step {step}; saved {last_checkpoint}. Continue with the same command and "
        "--resume_from_checkpoint latest."
    )
    raise SystemExit(INTERRUPTED_EXIT_CODE)


def stop_if_diverged(grad_norm, accelerator: Accelerator, step: int, last_checkpoint: Path | None, progress) -> None:
    """Stop before the optimizer step if the gradients are NaN or infinite (a too high learning rate, a broken
    image): the adapter, and every checkpoint saved so far, stay as they were. `grad_norm` is the clipped norm of
    the synchronised gradients, so every process decides alike. With fp16 loss scaling, infinite gradients are
    part of the method (the scaler skips the step and lowers the scale), so they are left to it."""
    if grad_norm is None or accelerator.scaler is not None or bool(torch.isfinite(grad_norm)):
        return
    progress.close()  # the message gets a line of its own
    kept = f"the last checkpoint, {last_checkpoint}, is intact" if last_checkpoint else "no checkpoint was saved yet"
    raise InputError(
        f"training diverged at step {step}: the gradients are {float(grad_norm)} (lower --learning_rate, or check "
        f"the images). Nothing of this step was applied and nothing more is saved; {kept}."
    )
