"""Build a target-feature cache from a token store: ``python -m deepspec_jax.data.build_features``.

    python -m deepspec_jax.data.build_features --tokens=TOKEN_STORE_DIR \\
        --target=smollm2-135m --layer_ids=1,9,17 --output=CACHE_DIR --batch_size=8 --dtype=bfloat16

Runs the frozen target over every sample in length-bucketed batches (a fixed batch
size and a short geometric list of padded lengths, so the forward compiles at most
once per bucket), and writes each sample's valid rows (see ``feature_cache``). The
bytes the cache will need are printed before anything is computed; ``--estimate_only``
stops there (it needs neither the model weights nor, given ``--num_samples``,
``--total_tokens`` and ``--max_length``, a token store). The build is resumable: rerun
the same command after an interruption and finished samples are skipped;
``--max_batches`` bounds the work of one run, so a long build can go in pieces.
``--repair`` re-reads every written sample and recomputes unreadable ones.

Pass negative layer ids with ``=`` (``--layer_ids=-1,1,9``). Exit codes: 0 success
(also a build stopped by ``--max_batches``), 1 a data/model problem, 2 bad flags.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import sys
from typing import Sequence

import gguf
import jax
import numpy as np
from absl import flags
from flax import nnx
from tqdm.auto import tqdm

from deepspec_jax import cli
from deepspec_jax.config import load_config_json, target_config_from_dict
from deepspec_jax.data.feature_cache import (DTYPES, COMPRESSIONS, FeatureCacheWriter, SizeEstimate,
                                             estimate_bytes, format_bytes, target_name,
                                             token_store_fingerprint)
from deepspec_jax.data.jsonl import DataError
from deepspec_jax.data.token_store import TokenStore
from deepspec_jax.errors import ConfigError, DeepSpecError
from deepspec_jax.sharding import batch_sharding
from deepspec_jax.target import DEFAULT_TARGET, load_target, resolve_target_path


# ---------------------------------------------------------------------------
# batching (pure)
# ---------------------------------------------------------------------------

def length_buckets(max_length: int, smallest: int = 64) -> tuple[int, ...]:
    """Padded lengths: smallest * {1, 1.5, 2, 3, 4, 6, ...} below ``max_length``, then
    ``max_length`` itself. At most ~2 log2(max_length / smallest) + 1 compiles, and a
    batch is padded by less than 50%."""
    if max_length < 1 or smallest < 1:
        raise ValueError(f"max_length and smallest must be >= 1, got {max_length}, {smallest}.")
    out, b = {int(max_length)}, int(smallest)
    while b < max_length:
        out.add(b)
        if b * 3 // 2 < max_length:
            out.add(b * 3 // 2)
        b *= 2
    return tuple(sorted(out))


def plan_batches(lengths: np.ndarray, todo: np.ndarray, batch_size: int,
                 buckets: Sequence[int]) -> list[tuple[np.ndarray, int]]:
    """Group samples ``todo`` by length into batches of exactly ``batch_size`` rows
    (index -1 = padding row) and the smallest bucket that holds the batch's longest
    sample. Returns ``[(indices [batch_size], padded_length), ...]``."""
    lengths = np.asarray(lengths)
    todo = np.asarray(todo, np.int64)
    if todo.size and lengths[todo].max() > max(buckets):
        raise ValueError(f"a sample has {lengths[todo].max()} tokens, above the largest bucket "
                         f"{max(buckets)}.")
    order = todo[np.argsort(lengths[todo], kind="stable")]
    out = []
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        need = max(1, int(lengths[idx].max()))
        padded = next(b for b in sorted(buckets) if b >= need)
        out.append((np.pad(idx, (0, batch_size - len(idx)), constant_values=-1), padded))
    return out


# ---------------------------------------------------------------------------
# the target forward (features only; XLA drops the unused logits)
# ---------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _features(graphdef, state, input_ids, layer_ids, out_dtype):
    """Features and last hidden state of one padded batch, in the stored dtype."""
    out = nnx.merge(graphdef, state)(input_ids, layer_ids)
    return out.features.astype(out_dtype), out.last_hidden.astype(out_dtype)


@dataclasses.dataclass
class BuildResult:
    path: str
    estimate: SizeEstimate
    num_samples: int
    written_now: int
    written_total: int
    complete: bool
    padded_lengths: tuple[int, ...]   # distinct padded lengths run (= compilations) this run
    repaired: tuple[int, ...] = ()


def _store_path(store) -> str | None:
    p = getattr(store, "path", None)
    return os.path.abspath(os.fspath(p)) if p else None


def _free_bytes(path: str) -> int:
    p = os.path.abspath(path)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    return shutil.disk_usage(p).free


def build_feature_cache(store, target, layer_ids: Sequence[int], output: str, *,
                        name: str | None = None, batch_size: int = 8, dtype: str = "bfloat16",
                        compression: str = "zstd", smallest_bucket: int = 64,
                        max_batches: int | None = None, repair: bool = False,
                        progress: bool = True, log=print) -> BuildResult:
    """Write (or resume) the feature cache of ``store`` (a ``TokenStore``) for ``target``
    (a loaded ``Target``). ``name``: the target name recorded (default: derived from
    ``target.source``). ``max_batches``: stop after that many batches (resume later)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    layer_ids = target.validate_layer_ids(layer_ids)
    if not layer_ids:
        raise ValueError("layer_ids must name at least one target layer.")
    cfg = target.config
    n = len(store)
    store_lengths = np.asarray(store.lengths, np.int64)
    max_length = int(store.manifest.get("max_length") or (store_lengths.max() if n else 1))
    too_long = np.flatnonzero(store_lengths > max_length)
    if too_long.size:
        i = int(too_long[0])
        raise DataError(f"token store sample {i} has {store_lengths[i]} tokens, more than its "
                        f"max_length {max_length}; re-tokenise with truncation.")
    d = cfg.hidden_size
    est = estimate_bytes(n, store_lengths, max_length, len(layer_ids), d, dtype, compression)
    log(est.describe())
    free = _free_bytes(output)
    if est.expected_bytes > free:
        msg = (f"{output}: the cache needs about {format_bytes(est.expected_bytes)} but only "
               f"{format_bytes(free)} is free there")
        if compression == "none":
            raise DataError(msg + "; free space, choose another --output or use --compression=zstd.")
        log("warning: " + msg + ".")

    plan = {"target": name or target_name(target.source), "target_path": str(target.source),
            "target_config": {"model_type": cfg.model_type, "vocab_size": cfg.vocab_size,
                              "hidden_size": d, "num_hidden_layers": cfg.num_hidden_layers},
            "target_dtype": target.dtype, "layer_ids": list(layer_ids), "hidden_size": d,
            "feature_width": len(layer_ids) * d, "dtype": dtype, "compression": compression,
            "num_samples": n, "max_length": max_length,
            "token_store_fingerprint": token_store_fingerprint(store),
            "token_store_path": _store_path(store)}
    writer = FeatureCacheWriter(output, plan, store_lengths.astype(np.int32))
    repaired: list[int] = []
    if repair:
        with tqdm(total=int(writer.written.sum()), desc="verify", unit="sample",
                  disable=not progress) as bar:
            repaired = writer.unmark_unreadable(bar.update)
        log(f"repair: {len(repaired)} unreadable sample(s) will be recomputed"
            + (f": {repaired[:20]}" if repaired else ""))
    todo = np.flatnonzero(~writer.written)
    if not todo.size:
        writer.finalize()
        log(f"{output}: complete ({n} samples).")
        return BuildResult(output, est, n, 0, n, True, (), tuple(repaired))
    if writer.written.any():
        log(f"{output}: resuming, {n - todo.size} of {n} samples already written.")

    batches = plan_batches(store_lengths, todo, batch_size, length_buckets(max_length, smallest_bucket))
    if max_batches:
        batches = batches[:max_batches]
    fn = _features
    out_dtype = DTYPES[dtype]
    sharding = None
    written_now, seen = 0, set()
    pending = None
    with tqdm(total=int(sum((idx >= 0).sum() for idx, _ in batches)), desc="features",
              unit="sample", disable=not progress) as bar:
        for idx, padded in batches:
            ids = np.zeros((batch_size, padded), np.int32)
            for b, i in enumerate(idx):
                if i >= 0:
                    toks = np.asarray(store[int(i)]["input_ids"], np.int64)
                    if toks.size and (toks.min() < 0 or toks.max() >= cfg.vocab_size):
                        raise DataError(
                            f"token store sample {i}: token ids in [{toks.min()}, {toks.max()}] "
                            f"outside the target's vocabulary [0, {cfg.vocab_size}); the store "
                            f"was tokenised for {store.manifest.get('target')!r}, not this target.")
                    ids[b, :toks.size] = toks
            sharding = sharding or batch_sharding(target.mesh, 2, batch_size)
            feats, last = fn(target.graphdef, target.state, jax.device_put(ids, sharding),
                             layer_ids, out_dtype)          # async: overlaps the commit below
            seen.add(padded)
            if pending is not None:
                writer.commit(pending)
                written_now += pending.indices.size
                bar.update(pending.indices.size)
            pending = writer.write_batch(idx, np.asarray(feats), np.asarray(last))
        if pending is not None:
            writer.commit(pending)
            written_now += pending.indices.size
            bar.update(pending.indices.size)
    complete = writer.finalize()
    total = int(writer.written.sum())
    log(f"{output}: " + ("complete" if complete else
                         f"stopped after {len(batches)} batch(es): {total} of {n} samples "
                         "written; rerun the same command to resume")
        + f" (compiled padded lengths this run: {sorted(seen)}).")
    return BuildResult(output, est, n, written_now, total, complete, tuple(sorted(seen)),
                       tuple(repaired))


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

def _target_dims(target: str) -> tuple[int, int]:
    """(hidden_size, num_hidden_layers) of a target without loading its weights."""
    path = resolve_target_path(target)
    if os.path.isdir(path):
        cfg_path = os.path.join(path, "config.json")
        cfg = target_config_from_dict(load_config_json(cfg_path), cfg_path)
        return cfg.hidden_size, cfg.num_hidden_layers
    if path.endswith(".gguf") and os.path.exists(path):
        fields = gguf.GGUFReader(path).fields
        arch = fields["general.architecture"].contents()
        return (int(fields[f"{arch}.embedding_length"].contents()),
                int(fields[f"{arch}.block_count"].contents()))
    raise ConfigError(f"--target={target}: not a model directory, a .gguf file or "
                      f"{DEFAULT_TARGET!r}; for --estimate_only you may pass --hidden_size instead.")


FLAGS = flags.FlagValues()
flags.DEFINE_string("tokens", None, "Token store directory (from the tokeniser).", flag_values=FLAGS)
flags.DEFINE_string("target", DEFAULT_TARGET, "Target: HF dir, .gguf file or 'smollm2-135m'.",
                    flag_values=FLAGS)
flags.DEFINE_enum("target_dtype", "float32", ["float32", "bfloat16"],
                  "Dtype the target computes in (bfloat16 on accelerators).", flag_values=FLAGS)
flags.DEFINE_list("layer_ids", None, "Target layers whose outputs are the features, e.g. 1,9,17 "
                  "(-1 = embeddings; write --layer_ids=-1,... with '=').", flag_values=FLAGS,
                  required=True)
flags.DEFINE_string("output", None, "Cache directory (created, or resumed if it exists).",
                    flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 8, "Samples per target forward.", flag_values=FLAGS)
flags.DEFINE_enum("dtype", "bfloat16", sorted(DTYPES), "Stored dtype.", flag_values=FLAGS)
flags.DEFINE_enum("compression", "zstd", list(COMPRESSIONS), "Chunk codec.", flag_values=FLAGS)
flags.DEFINE_integer("smallest_bucket", 64, "Smallest padded length.", flag_values=FLAGS)
flags.DEFINE_integer("max_batches", 0, "Stop after this many batches (0 = all); rerun to resume.",
                     flag_values=FLAGS)
flags.DEFINE_boolean("repair", False, "Re-read every written sample and recompute unreadable "
                     "ones.", flag_values=FLAGS)
flags.DEFINE_boolean("estimate_only", False, "Print the bytes the cache will need and exit.",
                     flag_values=FLAGS)
flags.DEFINE_integer("num_samples", None, "--estimate_only without --tokens.", flag_values=FLAGS)
flags.DEFINE_integer("total_tokens", None, "--estimate_only without --tokens.", flag_values=FLAGS)
flags.DEFINE_integer("max_length", None, "--estimate_only without --tokens.", flag_values=FLAGS)
flags.DEFINE_integer("hidden_size", None, "--estimate_only without a readable --target.",
                     flag_values=FLAGS)
flags.DEFINE_boolean("no_progress", False, "No progress bar.", flag_values=FLAGS)


def _layer_ids() -> tuple[int, ...]:
    try:
        ids = tuple(int(x) for x in FLAGS.layer_ids if x.strip())
    except ValueError:
        cli.usage_error(f"--layer_ids must be comma-separated ints, got {FLAGS.layer_ids!r}")
    if not ids:
        cli.usage_error("--layer_ids is empty")
    return ids


def main(argv: Sequence[str] | None = None) -> int:
    a = cli.parse(FLAGS, argv, __doc__)
    layer_ids = _layer_ids()
    try:
        if a.estimate_only:
            if a.tokens:
                store = TokenStore(a.tokens)
                lengths = np.asarray(store.lengths, np.int64)
                n, tokens = len(store), lengths
                max_length = a.max_length or int(store.manifest.get("max_length") or lengths.max())
            elif None in (a.num_samples, a.total_tokens, a.max_length):
                cli.usage_error("--estimate_only needs --tokens, or all of --num_samples, "
                                "--total_tokens and --max_length.")
            else:
                n, tokens, max_length = a.num_samples, a.total_tokens, a.max_length
            if a.hidden_size:
                hidden = a.hidden_size
            else:
                hidden, num_layers = _target_dims(a.target)
                bad = [i for i in layer_ids if not -1 <= i < num_layers]
                if bad:
                    cli.usage_error(f"--layer_ids {bad} out of range for a target with "
                                    f"{num_layers} layers (use -1..{num_layers - 1}).")
            est = estimate_bytes(n, tokens, max_length, len(layer_ids), hidden, a.dtype,
                                 a.compression)
            print(est.describe())
            return 0
        if not a.tokens or not a.output:
            cli.usage_error("--tokens and --output are required (or use --estimate_only).")
        store = TokenStore(a.tokens)
        target = load_target(a.target, dtype=a.target_dtype)
        try:
            target.validate_layer_ids(layer_ids)
        except ValueError as e:
            cli.usage_error(str(e))
        res = build_feature_cache(store, target, layer_ids, a.output,
                                  name=target_name(a.target), batch_size=a.batch_size,
                                  dtype=a.dtype, compression=a.compression,
                                  smallest_bucket=a.smallest_bucket,
                                  max_batches=a.max_batches or None, repair=a.repair,
                                  progress=not a.no_progress)
        return 0 if res.complete or a.max_batches else 1
    except (DeepSpecError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
