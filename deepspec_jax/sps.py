"""SPS profile: the target's verify steps per second at each verify batch size B.

The scheduler policy (``spec_decode.schedule_lengths``) trades expected accepted tokens
against what verifying costs on *this* machine: SPS(B) = target steps/s when a round
verifies B tokens in total over R requests of up to ``width`` tokens each (current
token + drafts). ``measure`` times exactly the engine's packed verify programs
(``CausalLM.extend_packed`` at every compiled size of ``spec_decode.verify_buckets``)
at a given context, ``LOOP_STEPS`` steps in one jitted loop as the engine runs them;
between two compiled sizes the cost is the larger one's (a staircase: the engine pads
up to the next size).

Profiles are cached as JSON (with a PNG of the curve) under
``~/.cache/deepspec_jax/sps`` (or ``$DEEPSPEC_JAX_SPS_DIR``), keyed by the target's config, dtype, device kind, jax
version, rows, width and context; a stale or foreign file is refused by name.

    python -m deepspec_jax.sps                      # SmolLM2, rows 1 and 4, width 5
    python -m deepspec_jax.sps --rows=1,4,16,32 --width=5 --context=256
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from deepspec_jax import atomic, cli
from deepspec_jax.errors import ConfigError
from deepspec_jax.evaluation.plots import plt
from deepspec_jax.sampling import SamplingParams
from deepspec_jax.spec_decode import (_draft_commit, _draft_init, _draft_propose,
                                      _holding, _proposal_width, check_compatible, verify_buckets)
from deepspec_jax.drafts import DEFAULT_DRAFT_DIR, load_draft
from deepspec_jax.target import load_target

# 2: sizes of one token per request timed on the one-token grid; the fixed policy's
#    extend; the cache reset and the draft state updated in place (not copied) when timed
# 3: every program timed round-robin (a slow spell no longer lands on one entry)
# 4: every program timed as 8 steps in one jitted fori_loop, as the engine's loop runs it
# 5: the decoder's products of a few rows are weight-first (layers.linear): older
#    profiles timed slower verify passes
# 6: the tied output projection of 2-32 rows is weight-first too
VERSION = 6
LOOP_STEPS = 8   # steps per timed call (one jitted fori_loop)
DEFAULT_DIR = os.environ.get("DEEPSPEC_JAX_SPS_DIR") or os.path.join(
    os.path.expanduser("~"), ".cache", "deepspec_jax", "sps")


@dataclasses.dataclass(frozen=True)
class SPSProfile:
    """Median seconds per verify step at each compiled packed size (``buckets``)."""

    buckets: tuple[int, ...]
    seconds: tuple[float, ...]
    rows: int
    width: int            # tokens per request per round: current token + drafts
    context: int
    key: str              # what it was measured on (``profile_key``)
    propose_seconds: float | None = None   # the draft's round (propose + commit), if measured
    draft: str | None = None               # which draft that was
    ar_seconds: float | None = None        # one plain decode step of ``rows`` requests
    fixed_seconds: float | None = None     # ``extend`` of [rows, width]: the fixed policy's verify

    def seconds_at(self, b: int) -> float:
        """Cost of a round verifying ``b`` tokens: the smallest measured size >= b
        (past the largest, linear in b)."""
        for size, sec in zip(self.buckets, self.seconds):
            if b <= size:
                return sec
        return self.seconds[-1] * b / self.buckets[-1]

    def steps_per_second(self, n: int) -> np.ndarray:
        """SPS(B) for B = 1..n: the table ``speculative_generate(sps=...)`` reads."""
        return np.asarray([1.0 / self.seconds_at(b) for b in range(1, n + 1)], np.float64)

    def scaled(self, factor: float) -> "SPSProfile":
        """Every time x ``factor``: the same machine in a slower (> 1) or faster spell."""
        mul = lambda v: None if v is None else v * factor   # noqa: E731
        return dataclasses.replace(self, seconds=tuple(v * factor for v in self.seconds),
                                   propose_seconds=mul(self.propose_seconds),
                                   ar_seconds=mul(self.ar_seconds),
                                   fixed_seconds=mul(self.fixed_seconds))

    def to_json(self) -> dict:
        return dict(version=VERSION, buckets=list(self.buckets), seconds=list(self.seconds),
                    rows=self.rows, width=self.width, context=self.context, key=self.key,
                    propose_seconds=self.propose_seconds, draft=self.draft,
                    ar_seconds=self.ar_seconds, fixed_seconds=self.fixed_seconds)


def profile_key(target, rows: int, width: int, context: int, draft=None) -> str:
    """What a profile is valid for: the target's architecture and dtype, the device kind
    and the jax version (the compiler), the shape of the batch, the draft (by path)
    whose proposal was timed with it, and the format version (what was timed)."""
    cfg = json.dumps(dataclasses.asdict(target.config), sort_keys=True, default=str)
    dev = jax.devices()[0]
    raw = json.dumps(dict(cfg=cfg, dtype=str(jnp.dtype(target.dtype)), device=dev.device_kind,
                          platform=dev.platform, ndev=len(jax.devices()), jax=jax.__version__,
                          rows=rows, width=width, context=context, version=VERSION,
                          draft=None if draft is None else os.path.abspath(draft.source)),
                     sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def save(profile: SPSProfile, path: str) -> None:
    """Atomic JSON write (``deepspec_jax.atomic``; creates the directory)."""
    atomic.write_json(path, profile.to_json(), indent=1)


def load(path: str, key: str | None = None) -> SPSProfile:
    """A saved profile, validated; ``key`` (``profile_key``) refuses one measured on
    another target/machine/shape."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a readable SPS profile ({e}); re-measure it with "
                          "`python -m deepspec_jax.sps`.") from e
    if not isinstance(raw, dict) or raw.get("version") != VERSION:
        raise ConfigError(f"{path}: field 'version' is {raw.get('version') if isinstance(raw, dict) else raw!r}, "
                          f"expected {VERSION}; re-measure with `python -m deepspec_jax.sps`.")
    buckets, seconds = raw.get("buckets"), raw.get("seconds")
    if (not isinstance(buckets, list) or not isinstance(seconds, list) or not buckets
            or len(buckets) != len(seconds) or buckets != sorted(set(buckets))
            or not all(isinstance(s, (int, float)) and s > 0 for s in seconds)):
        raise ConfigError(f"{path}: fields 'buckets'/'seconds' must be equally long, buckets "
                          "strictly increasing and seconds positive; re-measure it.")
    if key is not None and raw.get("key") != key:
        raise ConfigError(f"{path}: measured for {raw.get('key')!r}, not this target/machine "
                          f"({key!r}: config, dtype, device, jax version, rows, width, context); "
                          "re-measure with `python -m deepspec_jax.sps`.")
    prop, ar, fixed = raw.get("propose_seconds"), raw.get("ar_seconds"), raw.get("fixed_seconds")
    for name, v in (("propose_seconds", prop), ("ar_seconds", ar), ("fixed_seconds", fixed)):
        if v is not None and not (isinstance(v, (int, float)) and v > 0):
            raise ConfigError(f"{path}: field '{name}' must be a positive number or null.")
    return SPSProfile(tuple(int(b) for b in buckets), tuple(float(s) for s in seconds),
                      int(raw["rows"]), int(raw["width"]), int(raw["context"]), str(raw["key"]),
                      None if prop is None else float(prop), raw.get("draft"),
                      None if ar is None else float(ar), None if fixed is None else float(fixed))


def _counts(b: int, rows: int, width: int) -> np.ndarray:
    """B verify tokens over ``rows`` requests as the engine packs them: every request
    its anchor, the rest spread evenly (at most ``width`` per request); B < rows means
    finished requests (0 tokens)."""
    out = np.zeros(rows, np.int32)
    for i in range(b):
        out[i % rows] += 1
    return np.minimum(out, width)


def _interleaved_medians(fns: dict, repeats: int) -> dict:
    """Median seconds per step of each ``fns[name]`` (a callable running ``.steps`` steps
    and returning something to block on), after one untimed call each (the compiles),
    timed round-robin: a slow spell of a shared machine then hits every entry of the
    profile alike, so its parts stay consistent with each other (one scale, which
    ``simulate --rescale`` can correct)."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append((time.perf_counter() - t0) / fn.steps)
    return {name: float(np.median(t)) for name, t in times.items()}


class ProposalRound:
    """The draft's round for ``rows`` requests at ``context`` tokens, at most ``calls``
    calls (its cache's capacity). Calling it runs ``steps`` rounds of the draft's part of
    a round in one jitted ``fori_loop`` (as the engine's loop runs them): propose a
    block, then commit its target features with one new position (a round that
    accepted nothing, l_r = 0); the state is carried (donated) across calls."""

    def __init__(self, target, draft, rows: int, context: int = 256, calls: int = 8,
                 steps: int = LOOP_STEPS):
        layer_ids = check_compatible(target, draft)
        w = _proposal_width(draft.kind, draft.config)
        # every round commits one position into the carried draft state
        cache_len = int(-(-(context + (calls + 1) * steps + w + 1) // 256) * 256)
        rng = np.random.default_rng(1)
        vocab = target.config.vocab_size
        prompt = jnp.asarray(rng.integers(0, vocab - 1, (rows, context)), jnp.int32)
        lens = jnp.full((rows,), context, jnp.int32)
        out = target.forward(np.asarray(prompt), layer_ids=layer_ids)
        sp = SamplingParams(0.0).validate()
        g, kind = draft.graphdef, draft.kind
        feats = out.features[:, : w + 1]
        self._dstate = jax.jit(lambda s, p, pl, f: _draft_init(
            kind, nnx.merge(g, s), rows, cache_len, p, pl, jnp.zeros((rows,), jnp.int32),
            f))(draft.state, prompt, lens, out.features)

        @functools.partial(jax.jit, donate_argnums=1)   # updated in place, as in the loop
        def rounds(s, ds):
            d = nnx.merge(g, s)

            def body(i, carry):
                cur, ds = carry
                toks, _, _, ds = _draft_propose(kind, d, ds, cur, jax.random.key(i), sp)
                committed = jnp.concatenate([toks, cur[:, None]], axis=1)
                ds = _draft_commit(kind, d, ds, feats, committed, jnp.ones((rows,), jnp.int32))
                return toks[:, 0], ds

            return jax.lax.fori_loop(0, steps, body, (jnp.zeros((rows,), jnp.int32), ds))

        self._rounds, self._state, self.steps = rounds, draft.state, steps

    def __call__(self):
        toks, self._dstate = self._rounds(self._state, self._dstate)
        return toks


def measure(target, rows: int, width: int, context: int = 256, repeats: int = 7,
            cache_len: int | None = None, draft=None, log=print) -> SPSProfile:
    """Time the engine's packed verify at every compiled size (``verify_buckets``) for
    ``rows`` requests at ``context`` cached tokens each, one plain decode step, the fixed
    policy's ``extend`` and, with ``draft``, its proposal (``ProposalRound``): each a
    jitted loop of ``LOOP_STEPS`` steps, median of ``repeats`` calls each, round-robin over all."""
    if rows < 1 or width < 1 or context < 1:
        raise ValueError(f"rows, width and context must be >= 1, got {rows}, {width}, {context}.")
    cache, ids = _filled_cache(target, rows, width, context, cache_len)
    box = {"cache": cache}                    # one cache, stepped and reset by every program
    buckets = verify_buckets(rows, width)
    fns = {}
    for size in buckets:
        counts = _counts(size, rows, width)
        # the program the engine runs for these counts (``spec_decode._packed_verify``):
        # at most one token per request -> the one-token grid at the size holding rows
        prog = ((_holding(buckets, rows), 1) if counts.max() <= 1
                else (size, min(width, size)))
        fns[size] = CacheStep(target, box, context, lambda g, st, c, n=jnp.asarray(counts),
                              prog=prog:
                              _extend_packed(g, st, c, ids, n, *prog))
    # one plain decode step ([rows, 1] through ``extend``, as ``Target.generate`` runs
    # it) and the fixed policy's verify ([rows, width] through ``extend``)
    fns["plain"] = CacheStep(target, box, context, lambda g, st, c: _extend(g, st, c, ids[:, :1]))
    fns["fixed"] = CacheStep(target, box, context, lambda g, st, c: _extend(g, st, c, ids))
    if draft is not None:
        fns["propose"] = ProposalRound(target, draft, rows, context, repeats + 1)
    med = _interleaved_medians(fns, repeats)
    seconds = [med[size] for size in buckets]
    ar, fixed, prop = med["plain"], med["fixed"], med.get("propose")
    if log:
        for size, sec in zip(buckets, seconds):
            log(f"  B={size:4d}: {sec * 1e3:8.2f} ms/step ({1 / sec:7.2f} steps/s)")
        log(f"  plain decode step ({rows} requests): {ar * 1e3:.2f} ms; "
            f"extend of {width} tokens each (fixed policy): {fixed * 1e3:.2f} ms")
        if prop is not None:
            log(f"  proposal ({draft.kind}, {rows} requests): {prop * 1e3:.2f} ms/round")
    return SPSProfile(buckets, tuple(seconds), rows, width, context,
                      profile_key(target, rows, width, context, draft), prop,
                      None if draft is None else draft.source, ar, fixed)


def _filled_cache(target, rows: int, width: int, context: int, cache_len: int | None = None):
    """A cache of ``rows`` random prompts of ``context`` tokens (capacity: context +
    width + 1 rounded up to 256, as the engine allocates) and ``width`` random ids per row."""
    cache_len = cache_len or int(-(-(context + width + 1) // 256) * 256)
    vocab = target.config.vocab_size
    rng = np.random.default_rng(0)
    prompt = target._put(rng.integers(0, vocab - 1, (rows, context)).astype(np.int32))
    lens = target._put(np.full((rows,), context, np.int32))
    _, cache = target.extend(target.init_cache(rows, cache_len), prompt, lens)
    return cache, target._put(rng.integers(0, vocab - 1, (rows, width)).astype(np.int32))


class CacheStep:
    """Calling it runs ``steps`` target steps ``fn(graphdef, state, cache) -> (logits,
    cache)`` over the cache in ``box`` in one jitted ``fori_loop`` (as the engine's loop
    runs them, not as separately dispatched calls), each followed by its greedy pick
    (``argmax``, which keeps the logits live) and the lengths' reset to ``context`` (a
    copy of the cache is not a step); the cache is donated and updated in place. Steps
    sharing a box share one cache."""

    def __init__(self, target, box: dict, context: int, fn, steps: int = LOOP_STEPS):
        graphdef = target.graphdef

        @functools.partial(jax.jit, donate_argnums=1)
        def run(state, cache):
            def body(_, carry):
                picked, c = carry
                logits, c = fn(graphdef, state, c)
                c = c._replace(lengths=jnp.full_like(c.lengths, context))
                return picked + jnp.argmax(logits, axis=-1).sum().astype(jnp.int32), c

            return jax.lax.fori_loop(0, steps, body, (jnp.zeros((), jnp.int32), cache))

        self._run, self._target, self._box, self.steps = run, target, box, steps

    def __call__(self):
        picked, self._box["cache"] = self._run(self._target.state, self._box["cache"])
        return picked


def plain_step(target, rows: int, width: int, context: int) -> CacheStep:
    """The profile's plain decode step (``measure``'s ``ar_seconds`` program, same cache
    capacity), to re-time it elsewhere: the serving benchmark times it between its runs,
    so the calculator can scale a profile measured in a slower or faster spell."""
    cache, ids = _filled_cache(target, rows, width, context)
    return CacheStep(target, {"cache": cache}, context,
                     lambda g, st, c: _extend(g, st, c, ids[:, :1]))


def _extend(graphdef, state, cache, ids):
    out, cache = nnx.merge(graphdef, state).extend(
        cache, ids, jnp.full(ids.shape[:1], ids.shape[1], jnp.int32))
    return out.logits, cache


def _extend_packed(graphdef, state, cache, ids, counts, size, grid):
    out, cache = nnx.merge(graphdef, state).extend_packed(cache, ids, counts, size, grid=grid)
    return out.logits, cache


def cached(target, rows: int, width: int, context: int = 256, directory: str = DEFAULT_DIR,
           draft=None, log=print) -> SPSProfile:
    """The profile for this target/machine/shape (and ``draft``'s proposal) from
    ``directory``, measured (and saved, with its PNG) the first time."""
    key = profile_key(target, rows, width, context, draft)
    path = os.path.join(directory, f"sps_{key}.json")
    if os.path.exists(path):
        return load(path, key)
    if log:
        log(f"measuring the SPS profile (rows {rows}, width {width}, context {context}) -> {path}")
    prof = measure(target, rows, width, context, draft=draft, log=log)
    save(prof, path)
    plot(prof, path[:-5] + ".png")
    return prof


def plot(profile: SPSProfile, path: str) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.step(profile.buckets, [1 / s for s in profile.seconds], where="post", marker="o")
    ax.set_xlabel("verify tokens per round B")
    ax.set_ylabel("target steps / s")
    ax.set_title(f"SPS: {profile.rows} requests x {profile.width}, context {profile.context}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic.write_bytes(path, buf.getvalue())


def main(argv=None) -> int:
    fv = flags.FlagValues()
    flags.DEFINE_string("target", None, "Target (default: embedded SmolLM2-135M).", flag_values=fv)
    flags.DEFINE_string("rows", "1,4", "Comma-separated request counts R.", flag_values=fv)
    flags.DEFINE_integer("width", 5, "Tokens per request per round (current + drafts).",
                         flag_values=fv)
    flags.DEFINE_integer("context", 256, "Cached tokens per request.", flag_values=fv)
    flags.DEFINE_string("dir", DEFAULT_DIR, "Where profiles are cached.", flag_values=fv)
    flags.DEFINE_string("draft", None, "Draft whose proposal is timed too (default: the "
                        "shipped draft; 'none': the target alone).", flag_values=fv)
    args = cli.parse(fv, argv, __doc__)
    target = load_target(args.target)
    draft = None
    if args.draft != "none":
        draft = load_draft(args.draft or DEFAULT_DRAFT_DIR, dtype=target.dtype, target=target)
    for rows in (int(r) for r in args.rows.split(",")):
        prof = cached(target, rows, args.width, args.context, args.dir, draft=draft)
        path = os.path.join(args.dir, f"sps_{prof.key}.json")
        print(json.dumps(dict(rows=rows, buckets=prof.buckets, path=path,
                              ms=[round(s * 1e3, 2) for s in prof.seconds],
                              propose_ms=prof.propose_seconds and round(prof.propose_seconds * 1e3, 2),
                              ar_ms=prof.ar_seconds and round(prof.ar_seconds * 1e3, 2),
                              fixed_ms=prof.fixed_seconds and round(prof.fixed_seconds * 1e3, 2))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
