"""AdamW with linear warmup + cosine decay and global-norm clipping (the reference's recipe)."""

from __future__ import annotations

import optax


def learning_rate_schedule(tc, total_steps: int) -> optax.Schedule:
    """Linear warmup over ``warmup_ratio * total_steps`` to ``lr``, then cosine to
    ``min_lr_ratio * lr`` at ``total_steps``."""
    total = max(int(total_steps), 1)
    warmup = min(int(round(tc.warmup_ratio * total)), total - 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=tc.lr, warmup_steps=warmup, decay_steps=total,
        end_value=tc.lr * tc.min_lr_ratio)


def make_optimizer(tc, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    sched = learning_rate_schedule(tc, total_steps)
    parts = []
    if tc.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(tc.max_grad_norm))
    parts.append(optax.adamw(sched, b1=tc.adam_b1, b2=tc.adam_b2, eps=tc.adam_eps,
                             weight_decay=tc.weight_decay))
    return optax.chain(*parts), sched
