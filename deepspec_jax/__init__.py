"""deepspec_jax: train and evaluate speculative-decoding drafts (Eagle3, DFlash, DSpark)
against frozen target LLMs in JAX."""

from deepspec_jax.target import Target, load_target
from deepspec_jax.drafts import Draft, load_draft
from deepspec_jax.spec_decode import SpecResult, speculative_generate
from deepspec_jax.version import __version__

__all__ = ["Target", "load_target", "Draft", "load_draft", "speculative_generate", "SpecResult",
           "__version__"]
