"""Compile-only TPU devices for a slice named as users name them (``v5e-8``, ``v5p-16``).

libtpu (``pip install 'jax[tpu]==0.10.2'``) compiles for a TPU topology on a machine
without TPUs: ``jax.experimental.topologies.get_topology_desc`` returns devices that
``jax.jit(f).lower(...).compile()`` accepts (they cannot run anything). That is how
``python -m deepspec_jax.plan`` and the CI's TPU compile tests measure per-chip HBM.

Names: ``v5e-N`` / ``v6e-N`` (N chips, one TensorCore each, 8 chips per host),
``v5p-N`` / ``v4-N`` (N TensorCores, two per chip, four chips per host; one JAX device
per chip, megacore). ``HBM_BYTES`` is the capacity XLA plans against per device, as
its ``RESOURCE_EXHAUSTED`` errors report it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from jax.experimental import topologies

# Must be set before libtpu initialises (i.e. before the first TPU topology call):
# skip the GCE metadata query (no network) and let several processes load libtpu
# (otherwise a second process waits on /tmp/libtpu_lockfile).
TPU_ENV = {"TPU_SKIP_MDS_QUERY": "1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Generation:
    prefix: str            # libtpu topology name prefix
    cores_per_chip: int    # N in "v5p-N" counts cores
    chips_per_host: int
    hbm_bytes: int         # per JAX device, as XLA reports it
    dims: int              # 2D (v5e, v6e) or 3D (v4, v5p) torus
    peak_bf16_flops: float  # per chip, datasheet


GENERATIONS = {
    "v5e": Generation("v5e", 1, 8, int(15.75 * GIB), 2, 197e12),
    "v6e": Generation("v6e", 1, 8, int(31.25 * GIB), 2, 918e12),
    "v5p": Generation("v5", 2, 4, int(95.74 * GIB), 3, 459e12),
    "v4": Generation("v4", 2, 4, int(30.75 * GIB), 3, 275e12),
}
_ALIASES = {"v5litepod": "v5e", "v6": "v6e", "v5": "v5p"}


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str              # as the user wrote it, normalised: "v5e-8"
    generation: Generation
    chips: int
    shape: tuple[int, ...]  # chip grid

    @property
    def topology_name(self) -> str:
        return f"{self.generation.prefix}:{'x'.join(map(str, self.shape))}"

    @property
    def hosts(self) -> int:
        return max(1, self.chips // self.generation.chips_per_host)


def _grid(chips: int, dims: int) -> tuple[int, ...]:
    """The most compact power-of-two chip grid: 8 -> 2x4 (2D) or 2x2x2 (3D)."""
    if chips & (chips - 1):
        raise ValueError(f"chip count {chips} is not a power of two")
    e = chips.bit_length() - 1
    shape = [1] * dims
    for i in range(e):
        shape[i % dims] *= 2
    shape = sorted(shape)
    if dims == 3:
        shape = shape[::-1]        # libtpu spells 3D slices largest-first with z last: 2x2x1
    return tuple(shape)


def parse_slice(name: str) -> Slice:
    """``v5e-8`` -> Slice(v5e, 8 chips, 2x4). Raises ValueError naming the accepted forms."""
    m = re.fullmatch(r"\s*([a-z0-9]+?)(?:litepod)?-(\d+)\s*", name.lower())
    gen_key = _ALIASES.get(m.group(1), m.group(1)) if m else None
    if m is None or gen_key not in GENERATIONS:
        raise ValueError(f"--topology={name!r}: use <generation>-<size> with generation one of "
                         f"{sorted(GENERATIONS)}, e.g. v5e-8, v6e-4, v5p-16, v4-8")
    gen = GENERATIONS[gen_key]
    n = int(m.group(2))
    if n % gen.cores_per_chip:
        raise ValueError(f"--topology={name!r}: {gen_key} sizes count TensorCores "
                         f"({gen.cores_per_chip} per chip); use a multiple of {gen.cores_per_chip}")
    chips = n // gen.cores_per_chip
    try:
        shape = _grid(chips, gen.dims)
    except ValueError as e:
        raise ValueError(f"--topology={name!r}: {e}; use a power-of-two size") from None
    return Slice(f"{gen_key}-{n}", gen, chips, shape)


def ensure_tpu_env() -> None:
    for k, v in TPU_ENV.items():
        os.environ.setdefault(k, v)


def compile_only_devices(name: str, num_slices: int = 1) -> list:
    """The devices of slice ``name`` (compile only). Needs libtpu; says how to get it."""
    sl = parse_slice(name)
    ensure_tpu_env()
    hb = tuple(min(s, b) for s, b in zip(sl.shape + (1,) * (3 - len(sl.shape)),
                                         (2, 4, 1) if sl.generation.dims == 2 else (2, 2, 1)))
    try:
        topo = topologies.get_topology_desc(
            topology_name=sl.topology_name, platform="tpu", chip_config_name="default",
            chips_per_host_bounds=hb, num_slices=num_slices, wrap=(False, False, False))
    except Exception as e:  # libtpu missing or a topology it does not know
        raise RuntimeError(
            f"cannot build compile-only devices for {sl.name} ({sl.topology_name}): {e}\n"
            "Compiling for TPU without a TPU needs libtpu: pip install 'jax[tpu]==0.10.2' "
            "(scripts/setup.sh installs it).") from None
    return list(topo.devices)


__all__ = ["GENERATIONS", "Generation", "Slice", "parse_slice", "compile_only_devices",
           "ensure_tpu_env", "TPU_ENV", "GIB"]
