"""Planning a run before renting a pod: compile the real programs for a TPU slice from
abstract shapes and report per-chip HBM and FLOPs (``python -m deepspec_jax.plan``)."""
