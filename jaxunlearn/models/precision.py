"""The one matmul-precision rule shared by the model's layers and the losses' vocabulary projection."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def matmul_precision(dtype: Any) -> jax.lax.Precision:
    """``HIGHEST`` for fp32 operands, else ``DEFAULT``.

    fp32 compute must mean fp32 matmuls also on TPU/GPU, where the default silently uses bf16 passes or TF32;
    bf16 operands keep the fast default.
    """
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT
