"""Speculative vs autoregressive decode cost on the real SmolLM2-135M target.

The draft is a RANDOMLY INITIALISED DSpark draft sized for SmolLM2 (its config derived from the target's; embeddings and
lm_head copied from the target as DeepSpec's trainer does). It accepts almost
nothing (tau ~ 1), so the numbers measure the per-round cost of the engine
(draft block + (block+1)-token verify + bookkeeping), not a speed-up. Greedy,
generation forced to ``--new_tokens`` (no stop token) so both sides do the same
number of output tokens.

    python benchmarks/spec_decode.py --batch_sizes 1,8 --new_tokens 128
"""

from __future__ import annotations

import os
import platform
import sys
import time

import jax
from absl import flags
from flax import nnx

from deepspec_jax import atomic, cli, load_target
from deepspec_jax.drafts import Draft
from deepspec_jax.drafts.registry import family_for
from deepspec_jax.spec_decode import speculative_generate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_prompts import PROMPTS  # noqa: E402

FLAGS = flags.FlagValues()
flags.DEFINE_string("batch_sizes", "1,8", "Comma-separated batch sizes.", flag_values=FLAGS)
flags.DEFINE_integer("new_tokens", 128, "Tokens generated per prompt.", flag_values=FLAGS)
flags.DEFINE_integer("block_size", 7, "Draft block size.", flag_values=FLAGS)
flags.DEFINE_integer("draft_layers", 1, "Draft decoder layers.", flag_values=FLAGS)
flags.DEFINE_integer("markov_rank", 64, "Draft Markov head rank (0 = none).", flag_values=FLAGS)
flags.DEFINE_integer("repeats", 2, "Timed runs (best is reported).", flag_values=FLAGS)
flags.DEFINE_string("out", "", "Also write the results here (JSON).", flag_values=FLAGS)


def random_dspark_for(target, block_size: int, draft_layers: int, markov_rank: int, seed: int = 0):
    """An untrained DSpark draft whose config is derived from ``target.config``."""
    t = target.config
    n = t.num_hidden_layers
    ids = sorted({1, n // 4, n // 2, (3 * n) // 4, n - 3})   # spread, never the last layer
    raw = dict(architectures=["Qwen3DSparkModel"], model_type="qwen3", vocab_size=t.vocab_size,
               hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
               num_hidden_layers=draft_layers, num_attention_heads=t.num_attention_heads,
               num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim,
               rms_norm_eps=t.rms_norm_eps, rope_theta=t.rope_theta,
               max_position_embeddings=t.max_position_embeddings, block_size=block_size,
               num_target_layers=n, target_layer_ids=ids, mask_token_id=t.vocab_size - 1,
               num_anchors=512, markov_rank=markov_rank,
               markov_head_type="gated" if markov_rank else None,
               enable_confidence_head=True, confidence_head_with_markov=bool(markov_rank))
    family = family_for(raw, "random SmolLM2 draft")
    cfg = family.config_from_dict(raw, "random SmolLM2 draft")
    model = family.build(cfg, rngs=nnx.Rngs(seed))
    tmodel = target.model
    embed = tmodel.embed.get_value()
    model.embed.set_value(embed)
    head = tmodel.lm_head.get_value() if hasattr(tmodel, "lm_head") else embed.T
    model.lm_head.set_value(head)
    graphdef, state = nnx.split(model)
    return Draft(cfg, family, graphdef, state, target.mesh, None, source="random-untrained-dspark")


def timed(fn, repeats):
    fn()  # compile
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None) -> int:
    args = cli.parse(FLAGS, argv, __doc__)
    target = load_target()
    draft = random_dspark_for(target, args.block_size, args.draft_layers, args.markov_rank)
    rows = []
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        prompts = [target.apply_chat_template(PROMPTS[i % len(PROMPTS)]) for i in range(b)]
        n = args.new_tokens
        ar_s, ar_out = timed(lambda: target.generate(prompts, max_new_tokens=n, stop_token_ids=[]),
                             args.repeats)
        sp_s, sp_out = timed(lambda: speculative_generate(target, draft, prompts, max_new_tokens=n,
                                                          stop_token_ids=[]), args.repeats)
        assert [r.tokens for r in sp_out] == ar_out, "speculative greedy output differs"
        rounds = max(r.num_rounds for r in sp_out)   # the loop runs until the slowest row ends
        tau = sum(sum(r.accepted_lengths) for r in sp_out) / sum(r.num_rounds for r in sp_out)
        rows.append(dict(batch=b, new_tokens=n, ar_tok_s=b * n / ar_s, ar_steps_s=n / ar_s,
                         spec_tok_s=b * n / sp_s, spec_rounds_s=rounds / sp_s, rounds=rounds,
                         tau=tau, speedup=ar_s / sp_s))
    dev = jax.devices()[0]
    print(f"target: SmolLM2-135M-Instruct (fp32) | draft: RANDOM, UNTRAINED DSpark "
          f"(block {args.block_size}, {args.draft_layers} layer(s), markov rank "
          f"{args.markov_rank}) -- tau ~ 1 by construction: per-round cost only, not a "
          f"speed-up | device: {dev.platform} ({dev.device_kind}) | {platform.machine()}")
    hdr = f"{'batch':>5} {'AR tok/s':>10} {'AR step/s':>10} {'spec tok/s':>11} {'rounds/s':>9} " \
          f"{'rounds':>7} {'tau':>6} {'spec/AR':>8}"
    print(hdr)
    for r in rows:
        print(f"{r['batch']:>5} {r['ar_tok_s']:>10.1f} {r['ar_steps_s']:>10.1f} {r['spec_tok_s']:>11.1f} "
              f"{r['spec_rounds_s']:>9.1f} {r['rounds']:>7} {r['tau']:>6.3f} {r['speedup']:>8.3f}")
    if args.out:
        atomic.write_json(args.out, dict(rows=rows, draft="random-untrained-dspark",
                                         device=str(dev)), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
