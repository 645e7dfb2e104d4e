"""Break-even acceptance length of speculative decoding on this machine.

Times the three pieces of a speculative round on the real target and a draft, each
compiled alone: one autoregressive step (target ``extend`` of 1 token), the verify
pass (``extend`` of the draft's width + 1 tokens) and the draft's proposal, all at a
given context length inside a cache of a given capacity. A round replaces
``tau`` autoregressive steps, so a draft pays off only when

    tau > (verify + propose) / AR step        (the break-even tau printed here)

which is a property of the hardware and the compiler as much as of the draft. With
``--sweep`` it also prints the cost of extending by n tokens relative to one token
(the curve that decides block sizes and tree sizes).

    python benchmarks/break_even.py                       # SmolLM2 + the default draft
    python benchmarks/break_even.py --draft=runs/dspark_smollm2_135m/final --sweep=1,2,5,8,17
    python benchmarks/break_even.py --draft=FULL_VOCAB_DRAFT --draft_vocab_sizes=8192,2048

``--tree=topk,nodes`` also times a tree round's parts (the draft's tree, the target over
the flattened tree with tree attention, the KV compaction to an accepted path) and prints
the tree's break-even tau; a tree pays where its tau exceeds that.

    python benchmarks/break_even.py --tree=2,8

``--draft_vocab_sizes`` also times the proposal of the same draft restricted to K output
tokens (``drafts.restrict_vocab``; the K lowest target ids: which K ids does not change the
cost), the lever on the draft's side of the round (its lm_head over the vocabulary). It
needs a full-vocabulary draft: the default draft already predicts over 8,192 tokens, so
its ``propose`` is that cost.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from deepspec_jax import atomic, cli, load_target
from deepspec_jax.draft_vocab import select_draft_vocab
from deepspec_jax.drafts import DEFAULT_DRAFT_DIR, load_draft, restrict_vocab
from deepspec_jax.errors import ConfigError
from deepspec_jax.sampling import SamplingParams
from deepspec_jax.kernels.tree_attention import ancestor_bits
from deepspec_jax.spec_decode import (_draft_init, _draft_propose, _draft_tree, _proposal_width,
                                      check_compatible, parse_tree)
from deepspec_jax.tree import compact_kv_cache

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import median_ms  # noqa: E402

FLAGS = flags.FlagValues()
flags.DEFINE_string("target", None, "Target (default: embedded SmolLM2-135M).", flag_values=FLAGS)
flags.DEFINE_string("draft", None, "Draft dir (default: the embedded default draft).",
                    flag_values=FLAGS)
flags.DEFINE_integer("context", 256, "Tokens already in the cache.", flag_values=FLAGS)
flags.DEFINE_integer("cache_len", 1024, "KV cache capacity.", flag_values=FLAGS)
flags.DEFINE_integer("repeats", 15, "Timed calls (median reported).", flag_values=FLAGS)
flags.DEFINE_string("sweep", "", "Comma-separated n for extend(n)/extend(1).", flag_values=FLAGS)
flags.DEFINE_list("draft_vocab_sizes", [], "Also time the proposal with the draft restricted to "
                  "each of these output vocabulary sizes K.", flag_values=FLAGS)
flags.DEFINE_string("tree", None, "topk,nodes: also time a tree round of this shape.",
                    flag_values=FLAGS)
flags.DEFINE_string("json", None, "Also write the results here.", flag_values=FLAGS)


def main(argv=None) -> int:
    args = cli.parse(FLAGS, argv, __doc__)
    target = load_target(args.target)
    draft = load_draft(args.draft or DEFAULT_DRAFT_DIR, dtype=target.dtype, target=target)
    layer_ids = check_compatible(target, draft)
    if args.draft_vocab_sizes and draft.config.draft_vocab_size is not None:
        raise ConfigError(f"--draft_vocab_sizes restricts a full-vocabulary draft, but "
                          f"{args.draft or DEFAULT_DRAFT_DIR} already has draft_vocab_size = "
                          f"{draft.config.draft_vocab_size} (its propose time is that cost); "
                          "pass --draft=<a full-vocabulary draft> or drop the flag.")
    width = _proposal_width(draft.kind, draft.config)
    rng = np.random.default_rng(0)
    vocab = target.config.vocab_size
    prompt = rng.integers(0, vocab - 1, (1, args.context)).astype(np.int32)
    lens = np.array([args.context], np.int32)

    out, cache = target.extend(target.init_cache(1, args.cache_len), prompt, lens, layer_ids)
    state = {"cache": cache}       # donated by every extend: always use the latest

    def extend_cost(n: int) -> float:
        """extend(n) from the same context every call: lengths are reset, so the cache
        (donated) never grows and every call does identical work. The reset lengths keep
        the sharding extend returned them with: a different one (an uncommitted array)
        recompiles extend on the first timed call and times the compile."""
        ids = jnp.asarray(rng.integers(0, vocab - 1, (1, n)).astype(np.int32))

        def call():
            o, c = target.extend(state["cache"], ids, jnp.full((1,), n, jnp.int32), layer_ids)
            state["cache"] = c._replace(lengths=jax.device_put(lens, c.lengths.sharding))
            return o.logits
        return median_ms(call, args.repeats)

    ar_ms = extend_cost(1)
    verify_ms = extend_cost(width + 1)

    sp = SamplingParams(0.0, 0, 1.0).validate()
    feats = out.features
    cur = jnp.zeros((1,), jnp.int32)
    key = jax.random.key(0)

    def draft_state(d):
        return jax.jit(lambda s, p, pl, f: _draft_init(
            d.kind, nnx.merge(d.graphdef, s), 1, args.cache_len, p, pl,
            jnp.zeros((1,), jnp.int32), f))(d.state, jnp.asarray(prompt), jnp.asarray(lens), feats)

    def propose_cost(d) -> float:
        dstate = draft_state(d)
        propose = jax.jit(lambda s, ds, cur, key: _draft_propose(
            d.kind, nnx.merge(d.graphdef, s), ds, cur, key, sp)[:3])
        return median_ms(lambda: propose(d.state, dstate, cur, key), args.repeats)

    def tree_costs(topk: int, nodes: int) -> dict:
        """ms of the tree proposal (T=0: what verification reads), the target over
        [current, nodes] with tree attention, and compacting the cache to a 3-node path."""
        gate = (jnp.float32(0.0), jnp.ones((width,), jnp.float32))
        build = jax.jit(lambda s, ds, cur, key: _draft_tree(
            draft.kind, nnx.merge(draft.graphdef, s), ds, cur, key, sp, topk, nodes, gate))
        dstate = draft_state(draft)
        tree = build(draft.state, dstate, cur, key)
        t_propose = median_ms(lambda: build(draft.state, dstate, cur, key)[:4], args.repeats)
        n = tree.tokens.shape[1]
        ids = jnp.concatenate([cur[:, None], tree.tokens], axis=1)
        depths = jnp.concatenate([jnp.zeros((1, 1), jnp.int32), tree.depth], axis=1)
        bits = ancestor_bits(jnp.concatenate([jnp.full((1, 1), -1, jnp.int32),
                                              tree.parents + 1], axis=1))
        tgd = target.graphdef
        run_tree = jax.jit(lambda ts, c: nnx.merge(tgd, ts).extend_tree(c, ids, depths, bits,
                                                                        layer_ids),
                           donate_argnums=1)

        def verify():          # extend_tree does not advance lengths: same work every call
            o, state["cache"] = run_tree(target.state, state["cache"])
            return o.logits
        t_verify = median_ms(verify, args.repeats)
        slots = jnp.asarray([[0, 1, 2] + [0] * (width - 2)], jnp.int32)
        compact = jax.jit(lambda c: compact_kv_cache(c, c.lengths, slots,
                                                     jnp.full((1,), 3, jnp.int32)),
                          donate_argnums=0)

        def compaction():      # lengths reset after each call, as extend_cost does
            c = compact(state["cache"])
            state["cache"] = c._replace(lengths=jax.device_put(lens, c.lengths.sharding))
            return c.lengths
        t_compact = median_ms(compaction, args.repeats)
        return dict(nodes=n, propose_ms=round(t_propose, 2), verify_ms=round(t_verify, 2),
                    compact_ms=round(t_compact, 2),
                    round_ms=round(t_propose + t_verify + t_compact, 2),
                    break_even_tau=round((t_propose + t_verify + t_compact) / ar_ms, 2))

    propose_ms = propose_cost(draft)

    round_ms = verify_ms + propose_ms
    res = dict(machine=platform.processor() or platform.machine(), date=time.strftime("%Y-%m-%d"),
               backend=jax.default_backend(), draft=draft.kind, width=width,
               draft_vocab_size=draft.config.draft_vocab_size or vocab,
               context=args.context, cache_len=args.cache_len, ar_step_ms=round(ar_ms, 2),
               verify_ms=round(verify_ms, 2), propose_ms=round(propose_ms, 2),
               round_ms=round(round_ms, 2), verify_over_ar=round(verify_ms / ar_ms, 2),
               break_even_tau=round(round_ms / ar_ms, 2),
               load=round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None)
    if args.draft_vocab_sizes:
        by_k = {}
        for k in (int(v) for v in args.draft_vocab_sizes):
            d2t, t2d = select_draft_vocab({i: 1 for i in range(k)}, k, vocab)
            by_k[k] = propose_cost(restrict_vocab(draft, d2t, t2d))
        res["propose_ms_by_vocab"] = {k: round(ms, 2) for k, ms in by_k.items()}
        res["propose_over_ar_by_vocab"] = {k: round(ms / ar_ms, 3) for k, ms in by_k.items()}
        res["propose_over_ar"] = round(propose_ms / ar_ms, 3)
    if args.tree:
        res["tree"] = dict(shape=args.tree, **tree_costs(*parse_tree(
            args.tree, draft.config.out_vocab_size)))
    if args.sweep:
        res["extend_over_ar"] = {n: round(extend_cost(n) / ar_ms, 2)
                                 for n in (int(v) for v in args.sweep.split(","))}
    print(json.dumps(res, indent=1))
    print(f"a {draft.kind} round (verify {width + 1} tokens + propose) costs "
          f"{res['break_even_tau']:.2f} autoregressive steps here: the draft must accept "
          f"more than {res['break_even_tau'] - 1:.2f} drafted tokens per round (tau > "
          f"{res['break_even_tau']:.2f}) to be faster.")
    if args.tree:
        t = res["tree"]
        print(f"a ({args.tree}) tree round (verify {t['nodes'] + 1} tokens + tree proposal + "
              f"compaction) costs {t['break_even_tau']:.2f} autoregressive steps: the tree "
              f"pays against the chain when tree tau / chain tau > "
              f"{t['break_even_tau'] / res['break_even_tau']:.2f}.")
    if args.json:
        atomic.write_json(args.json, res, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
