"""deepspec_jax: train and evaluate speculative-decoding drafts (Eagle3, DFlash, DSpark)
against frozen target LLMs in JAX."""

from deepspec_jax.target import Target, load_target

__all__ = ["Target", "load_target"]
__version__ = "0.1.0"
