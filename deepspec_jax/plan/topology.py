"""Compile-only TPU devices for a slice named as users name them (``v5e-8``, ``v5p-16``).

libtpu (``pip install 'jax[tpu]==0.10.2'``) compiles for a TPU topology on a machine
without TPUs: ``jax.experimental.topologies.get_topology_desc`` returns devices that
``jax.jit(f).lower(...).compile()`` accepts (they cannot run anything). That is how
``python -m deepspec_jax.plan`` and the CI's TPU compile tests measure per-chip HBM.

Names: ``v5e-N`` / ``v6e-N`` (N chips, one TensorCore each; one host up to 8 chips,
4 chips per host beyond), ``v5p-N`` / ``v4-N`` (N TensorCores, two per chip, four chips
per host; one JAX device per chip: megacore, as on the TPU VMs; v4's "default" chip
config would give one device per core with half the HBM each). ``Generation.hbm_bytes``
is the capacity XLA plans against per device, as its ``RESOURCE_EXHAUSTED`` errors
report it (checked with libtpu 0.0.42.1: v5e 15.75G, v6e 31.25G, v5p 95.74G, v4
megacore 30.75G).

``cpu-N`` (:func:`cpu_devices`) is N host CPU devices: a stand-in for an N-GPU machine
whose memory figures are the XLA:CPU compiler's, an estimate only (a GPU compile
needs a GPU).
"""

from __future__ import annotations

import dataclasses
import os
import re

import jax
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
    chip_config: str = "default"   # libtpu chip_config_name: "megacore" = one device per chip
    single_host_chips: int = 4     # slices up to this many chips are one host


GENERATIONS = {
    "v5e": Generation("v5e", 1, 4, int(15.75 * GIB), 2, 197e12, single_host_chips=8),
    "v6e": Generation("v6e", 1, 4, int(31.25 * GIB), 2, 918e12, single_host_chips=8),
    "v5p": Generation("v5", 2, 4, int(95.74 * GIB), 3, 459e12, "megacore"),
    "v4": Generation("v4", 2, 4, int(30.75 * GIB), 3, 275e12, "megacore"),
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
    def chips_per_host(self) -> int:
        g = self.generation
        return self.chips if self.chips <= g.single_host_chips else g.chips_per_host

    @property
    def hosts(self) -> int:
        return max(1, self.chips // self.chips_per_host)

    @property
    def host_bounds(self) -> tuple[int, int, int]:
        """libtpu's chips_per_host_bounds: the chip grid of one host."""
        if self.chips <= self.generation.single_host_chips:
            return tuple(self.shape) + (1,) * (3 - len(self.shape))
        return (2, 2, 1)


def _grid(chips: int, dims: int) -> tuple[int, ...]:
    """The most compact power-of-two chip grid: 8 -> 2x4 (2D) or 2x2x2 (3D)."""
    if chips & (chips - 1):
        raise ValueError(f"chip count {chips} is not a power of two")
    e = chips.bit_length() - 1
    shape = [1] * dims
    for i in range(e):
        shape[i % dims] *= 2
    # ascending, size-1 axes last, as GCP spells slices: 2x4, 2x2x1, 2x2x4, 2x4x4
    return tuple(sorted(s for s in shape if s > 1) + [1] * shape.count(1))


def parse_slice(name: str) -> Slice:
    """``v5e-8`` -> Slice(v5e, 8 chips, 2x4). Raises ValueError naming the accepted forms."""
    m = re.fullmatch(r"\s*([a-z0-9]+)-(\d+)\s*", name.lower())
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
    try:
        topo = topologies.get_topology_desc(
            topology_name=sl.topology_name, platform="tpu",
            chip_config_name=sl.generation.chip_config, chips_per_host_bounds=sl.host_bounds,
            num_slices=num_slices, wrap=(False, False, False))
    except Exception as e:  # libtpu missing or a topology it does not know
        raise RuntimeError(
            f"cannot build compile-only devices for {sl.name} ({sl.topology_name}): {e}\n"
            "Compiling for TPU without a TPU needs libtpu: pip install 'jax[tpu]==0.10.2' "
            "(scripts/setup.sh installs it).") from None
    return list(topo.devices)


def cpu_device_count(name: str) -> int | None:
    """``cpu-8`` -> 8; None for any other name (a TPU slice)."""
    m = re.fullmatch(r"\s*cpu-(\d+)\s*", name.lower())
    if m is None:
        return None
    n = int(m.group(1))
    if n < 1:
        raise ValueError(f"--topology={name!r}: cpu-N needs N >= 1")
    return n


def cpu_devices(name: str) -> list:
    """The first N host CPU devices for ``cpu-N``. The CPU backend must have been
    created with at least N devices (``jax_num_cpu_devices``, set by the plan CLI
    before jax initialises)."""
    n = cpu_device_count(name)
    if n is None:
        raise ValueError(f"--topology={name!r} is not cpu-N")
    devs = jax.devices("cpu")
    if len(devs) < n:
        raise RuntimeError(
            f"--topology={name}: the CPU backend has {len(devs)} device(s); it must be started "
            f"with {n} (run the plan CLI in a fresh process, or set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before jax starts).")
    return devs[:n]


__all__ = ["GENERATIONS", "Generation", "Slice", "parse_slice", "compile_only_devices",
           "ensure_tpu_env", "TPU_ENV", "GIB", "cpu_device_count", "cpu_devices"]
