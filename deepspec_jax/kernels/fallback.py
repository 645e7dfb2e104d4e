"""What ``impl="auto"`` says when an accelerator runs a kernel's jnp reference instead.

On CPU the reference is the expected path and nothing is said. On TPU/GPU a kernel
that cannot take the shapes or the mesh layout (e.g. KV heads that do not divide the
tensor axis) falls back to the reference, which is correct but slower and, for long
sequences, bigger; a silent fallback would hide that from a user sizing a pod, so it
warns (once per call site and reason, Python's default warning filter)."""

from __future__ import annotations

import warnings


class KernelFallbackWarning(UserWarning):
    """An accelerator program runs a kernel's jnp reference (impl="auto")."""


def warn_fallback(kernel: str, reason: str) -> None:
    """Warn that ``kernel`` runs its jnp reference on an accelerator, and why."""
    warnings.warn(f"deepspec_jax.kernels.{kernel}: impl='auto' runs the jnp reference instead "
                  f"of the Pallas kernel: {reason}", KernelFallbackWarning, stacklevel=3)


__all__ = ["KernelFallbackWarning", "warn_fallback"]
