"""Autoregressive greedy decode throughput: deepspec_jax vs transformers (PyTorch eager).

Same machine, same GGUF weights (SmolLM2-135M-Instruct, dequantised to fp32), same
prompts, one run. Generation is forced to ``--new_tokens`` tokens (no stop token) so
both sides do identical work. Prints a table and writes JSON to ``--out`` if given.

    python benchmarks/ar_decode.py --batch_sizes 1,8 --new_tokens 64
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

from absl import flags

from deepspec_jax import atomic, cli
from deepspec_jax.target import load_target, smollm2_gguf_path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_prompts import PROMPTS  # noqa: E402

FLAGS = flags.FlagValues()
flags.DEFINE_string("batch_sizes", "1,8", "Comma-separated batch sizes.", flag_values=FLAGS)
flags.DEFINE_integer("new_tokens", 64, "Tokens generated per prompt.", flag_values=FLAGS)
flags.DEFINE_integer("repeats", 2, "Timed runs (best is reported).", flag_values=FLAGS)
flags.DEFINE_boolean("skip_torch", False, "Skip the transformers side.", flag_values=FLAGS)
flags.DEFINE_string("out", "", "Also write the results here (JSON).", flag_values=FLAGS)


def bench_jax(target, prompts, new_tokens, repeats):
    target.generate(prompts, max_new_tokens=new_tokens, stop_token_ids=[])  # compile
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = target.generate(prompts, max_new_tokens=new_tokens, stop_token_ids=[])
        best = min(best, time.perf_counter() - t)
    assert all(len(o) == new_tokens for o in out)
    return len(prompts) * new_tokens / best, out


def bench_torch(model, prompts, new_tokens, repeats, pad_id):
    import torch

    width = max(len(p) for p in prompts)  # left padding for batched HF generation
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              pad_token_id=pad_id)
    best = float("inf")
    with torch.no_grad():
        model.generate(ids[:, :], attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=pad_id)
        for _ in range(repeats):
            t = time.perf_counter()
            out = model.generate(ids, attention_mask=mask, **kw)
            best = min(best, time.perf_counter() - t)
    return len(prompts) * new_tokens / best, out[:, width:].tolist()


def main(argv=None) -> int:
    args = cli.parse(FLAGS, argv, __doc__)
    target = load_target()
    rows = []
    model = None
    if not args.skip_torch:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(os.cpu_count())
        path = smollm2_gguf_path()
        model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                     dtype=torch.float32).eval()
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        prompts = [target.apply_chat_template(PROMPTS[i % len(PROMPTS)]) for i in range(b)]
        jax_tps, jax_out = bench_jax(target, prompts, args.new_tokens, args.repeats)
        row = {"batch": b, "jax_tokens_per_s": round(jax_tps, 2)}
        if model is not None:
            torch_tps, torch_out = bench_torch(model, prompts, args.new_tokens, args.repeats,
                                               target.tokenizer.pad_token_id or 0)
            # HF's min_new_tokens bans the stop token, so compare up to our first stop.
            stops = set(target.stop_token_ids)
            k = next((i for i, t in enumerate(jax_out[0]) if t in stops), len(jax_out[0]))
            row.update(torch_tokens_per_s=round(torch_tps, 2), speedup=round(jax_tps / torch_tps, 2),
                       same_tokens_before_stop=(jax_out[0][:k] == torch_out[0][:k]))
        rows.append(row)
        print(json.dumps(row), flush=True)
    info = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "new_tokens": args.new_tokens,
            "date": time.strftime("%Y-%m-%d"), "rows": rows}
    print("\n| batch | deepspec_jax tok/s | transformers tok/s | speedup |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['jax_tokens_per_s']} | {r.get('torch_tokens_per_s', '-')} | {r.get('speedup', '-')} |")
    if args.out:
        atomic.write_json(args.out, info, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
