"""RMSNorm with HF semantics: normalise in fp32, then scale.

Llama/Qwen3 cast back to the input dtype before the scale; Gemma scales in fp32 by
``offset + w`` (Gemma-3: 1 + w) and casts last, and Gemma-4's v-norm has no scale
(``weight=None``). The two orders differ only below fp32."""

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, weight: jax.Array | None, eps: float, *, offset: float = 0.0,
             scale_fp32: bool = False) -> jax.Array:
    dtype = x.dtype
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if weight is None:
        return xf.astype(dtype)
    if scale_fp32 or offset:
        return (xf * (offset + weight.astype(jnp.float32))).astype(dtype)
    return weight * xf.astype(dtype)
