"""Forward+backward cost of one DSpark and one Eagle3 training step.

    python -m benchmarks.train_step [--steps 3] [--seq 1024] [--dtype float32] [--only dspark,eagle3]

Drafts are built at a SmolLM2-135M-sized shape (hidden 576, 9 heads / 3 KV heads,
head_dim 64, MLP 1536, vocab 49152) with random weights and random target features,
and timed through the training functions the draft modules expose
(``dspark_train.loss_and_grads``, ``eagle3_train.eagle3_loss``), so the numbers track
the code that trains. Reported per family: compile seconds, seconds/step (median of
``--steps`` after one warm-up), XLA's static buffer estimate for the compiled step
(arguments + outputs + temporaries) and the process' peak RSS so far.
"""

from __future__ import annotations

import argparse
import functools
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

SMOLLM2 = dict(
    model_type="qwen3", vocab_size=49152, hidden_size=576, intermediate_size=1536,
    num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
    rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=False,
)
TARGET_LAYERS = 30                       # SmolLM2-135M depth
FEATURE_LAYERS = [1, 8, 15, 22, 28]      # five spread layers, never the last


def dspark_config(args) -> dict:
    return dict(SMOLLM2, architectures=["Qwen3DSparkModel"], num_hidden_layers=args.dspark_layers,
                block_size=args.block_size, num_target_layers=TARGET_LAYERS,
                target_layer_ids=FEATURE_LAYERS, mask_token_id=SMOLLM2["vocab_size"] - 1,
                num_anchors=args.anchors, enable_confidence_head=True,
                confidence_head_with_markov=args.markov_rank > 0, markov_rank=args.markov_rank,
                markov_head_type=args.markov_head_type,
                layer_types=["full_attention"] * args.dspark_layers)


def eagle3_config(args) -> dict:
    return dict(SMOLLM2, architectures=["Qwen3Eagle3Model"], num_hidden_layers=1,
                draft_num_hidden_layers=1, ttt_length=args.ttt, step_loss_decay=0.8,
                num_target_layers=TARGET_LAYERS, target_layer_ids=FEATURE_LAYERS)


def _build(raw: dict, dtype):
    from deepspec_jax.checkpoint import resolve_spec

    spec = resolve_spec(raw, "<benchmark config>")
    model = spec.build_fn(spec.config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    return spec, model


def _inputs(args, d: int, dtype, seed: int = 0):
    rng = np.random.default_rng(seed)
    b, s = args.batch, args.seq
    ids = rng.integers(0, SMOLLM2["vocab_size"] - 1, (b, s)).astype(np.int32)
    loss_mask = np.ones((b, s), np.int32)
    loss_mask[:, : s // 8] = 0  # a prompt prefix, as in chat data
    feats = (rng.standard_normal((b, s, len(FEATURE_LAYERS) * d)) * 0.5).astype(np.float32)
    last = rng.standard_normal((b, s, d)).astype(np.float32)
    return (jnp.asarray(ids), jnp.asarray(loss_mask), jnp.asarray(feats, dtype),
            jnp.asarray(last, dtype))


def dspark_step(args, dtype):
    from deepspec_jax.drafts import dspark_train as dt
    from deepspec_jax.drafts.dspark import DSparkLossConfig

    spec, model = _build(dspark_config(args), dtype)
    graphdef, params, rest = dt.split_trainable(model)
    ids, mask, feats, last = _inputs(args, spec.config.hidden_size, dtype)
    batch = dt.DSparkBatch(ids, mask, feats, last)
    anchors, keep = dt.sample_anchors(jax.random.key(0), mask, args.anchors)
    loss_cfg = DSparkLossConfig.default_for(spec.config)
    step_args = (params, rest, batch, anchors, keep)
    return step_args, dt.loss_and_grads.lower(graphdef, *step_args, loss_cfg=loss_cfg), _count(params)


def eagle3_step(args, dtype):
    from deepspec_jax.drafts.eagle3_train import eagle3_loss

    spec, model = _build(eagle3_config(args), dtype)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ids, mask, feats, last = _inputs(args, spec.config.hidden_size, dtype)

    @functools.partial(jax.jit, static_argnums=0)
    def loss_and_grads(graphdef, params, rest, ids, feats, last, mask):
        def f(p):
            out = eagle3_loss(nnx.merge(graphdef, p, rest), ids, feats, last, mask)
            return out.loss, out

        return jax.value_and_grad(f, has_aux=True)(params)

    step_args = (params, rest, ids, feats, last, mask)
    return step_args, loss_and_grads.lower(graphdef, *step_args), _count(params)


def _count(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def _block(x):
    return jax.block_until_ready(x)


def run(name: str, make, args, dtype) -> dict:
    step_args, lowered, n_params = make(args, dtype)
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    xla_bytes = None
    if mem is not None:
        xla_bytes = sum(getattr(mem, f, 0) or 0 for f in
                        ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes"))
    _block(compiled(*step_args))  # warm-up
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        _block(compiled(*step_args))
        times.append(time.perf_counter() - t)
    return dict(name=name, params=n_params, compile_s=compile_s,
                step_s=statistics.median(times), min_s=min(times), xla_gib=(xla_bytes or 0) / 2**30,
                rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--only", default="dspark,eagle3")
    ap.add_argument("--dspark_layers", type=int, default=2)
    ap.add_argument("--block_size", type=int, default=7)
    ap.add_argument("--anchors", type=int, default=64)
    ap.add_argument("--markov_rank", type=int, default=256)
    ap.add_argument("--markov_head_type", default="vanilla", choices=["vanilla", "gated", "rnn"])
    ap.add_argument("--ttt", type=int, default=7)
    args = ap.parse_args(argv)
    dtype = jnp.float32 if args.dtype == "float32" else jnp.bfloat16
    makers = {"dspark": dspark_step, "eagle3": eagle3_step}
    print(f"devices: {jax.devices()}  batch {args.batch}  seq {args.seq}  dtype {args.dtype}  "
          f"DSpark {args.dspark_layers} layers block {args.block_size} anchors {args.anchors} "
          f"markov {args.markov_head_type}/{args.markov_rank}  Eagle3 TTT {args.ttt}")
    rows = [run(n, makers[n], args, dtype) for n in args.only.split(",")]
    head = f"{'draft':8} {'trainable':>10} {'compile s':>10} {'s/step':>8} {'min s':>8} {'XLA GiB':>8} {'peak RSS GiB':>13}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['name']:8} {r['params'] / 1e6:9.1f}M {r['compile_s']:10.1f} {r['step_s']:8.2f} "
              f"{r['min_s']:8.2f} {r['xla_gib']:8.2f} {r['rss_gib']:13.2f}")


if __name__ == "__main__":
    main()
