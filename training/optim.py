"""Optimizer and learning-rate schedule, built from the shared flags as diffusers' DreamBooth scripts do."""

from __future__ import annotations

import torch
from accelerate.logging import get_logger
from diffusers.optimization import get_scheduler

logger = get_logger(__name__)


def make_optimizer(args, params):
    """AdamW (8-bit with --use_8bit_adam) or Prodigy; the Adam flags serve both."""
    if args.optimizer == "prodigy":
        import prodigyopt

        if args.learning_rate <= 0.1:
            logger.warning("Prodigy usually works best with --learning_rate around 1.0.")
        return prodigyopt.Prodigy(
            params,
            lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            beta3=args.prodigy_beta3,
            weight_decay=args.adam_weight_decay,
            eps=args.adam_epsilon,
            decouple=args.prodigy_decouple,
            use_bias_correction=args.prodigy_use_bias_correction,
            safeguard_warmup=args.prodigy_safeguard_warmup,
        )
    if args.use_8bit_adam:
        import bitsandbytes

        optimizer_class = bitsandbytes.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(
        params,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )


def make_lr_scheduler(args, optimizer, num_processes: int):
    # The prepared scheduler steps once per process at every optimizer step, as in diffusers' scripts.
    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * num_processes,
        num_training_steps=args.max_train_steps * num_processes,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )
