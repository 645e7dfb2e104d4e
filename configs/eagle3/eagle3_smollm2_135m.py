"""Eagle3 draft for SmolLM2-135M-Instruct, sized for a 2-core CPU.

Why these sizes: the issue's proof run trains three drafts for the embedded
SmolLM2-135M target on a 2-core CPU in a few hours in total, in resumable pieces.
Everything is float32 (bf16 matmuls are ~10x slower on such CPUs). The target runs
online inside the train step: each sequence is seen once (one epoch), so a feature
cache (~7 KB per token, ~8 GB for this run) would save no compute. 512 tokens fit a
typical gsm8k or short-chat prompt with its answer (longer samples are truncated);
8 sequences per optimizer step x 300 steps = 2,400 sequences, one pass over a subsample
of the regenerated data (give the token store about that many sequences so the cosine
schedule, which spans ``num_epochs`` of the data, ends at step 300; ``max_steps`` only
caps the run). One draft layer keeps the draft's cost far below the 30-layer target's,
which is what a wall-clock speedup on CPU needs. The optimiser settings are the
reference's (lr 6e-4, 4% warmup, cosine, AdamW(0.9, 0.999), clip 1.0); checkpoints
every 50 steps let a run continue across sessions.

Eagle3 specifics: the reference's TTT length 7 and step decay 0.8 (the eval proposes up
to 7 tokens, like the block drafts). TTT unrolls the draft 7 times over all 512
positions, so one sequence produces 7 x [512, 49152] fp32 logits (~700 MB, twice that
with the softmaxes kept for the backward pass): micro-batches of 2 keep peak memory
near 3 GB.

Run::

    python -m deepspec_jax.train --config=configs/eagle3/eagle3_smollm2_135m.py
"""

import importlib.util
import pathlib

from deepspec_jax.train.config import base_config

# configs/ is not a package: load the shared target facts (configs/_targets.py) by path.
_spec = importlib.util.spec_from_file_location(
    "_deepspec_config_targets", pathlib.Path(__file__).resolve().parents[1] / "_targets.py")
_targets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_targets)


def get_config():
    c = base_config("eagle3")
    c.name = "eagle3_smollm2_135m"
    # configs/_targets.py: target.path="smollm2-135m", target_layer_ids=(1, 8, 15, 22, 28)
    # (30 layers, never the last), data.train=("data/smollm2/tokens",).
    _targets.apply_target(c, "smollm2_135m")
    c.target.dtype = "float32"
    c.draft.num_hidden_layers = 1
    c.draft.ttt_length = 7
    c.draft.step_loss_decay = 0.8
    c.loss.eagle3_corrected = False              # the reference's targets (SPEC section 7)

    c.data.max_length = 512
    c.train.global_batch_size = 8
    c.train.micro_batch_size = 2                 # 4 micro-batches of 2: TTT logits are large
    c.train.num_epochs = 1
    c.train.max_steps = 300
    c.train.compute_dtype = "float32"
    c.train.lr = 6.0e-4                          # the reference's optimiser (see the
    c.train.warmup_ratio = 0.04                  #   Qwen3 configs for the sources)
    c.train.min_lr_ratio = 0.0
    c.train.weight_decay = 0.0
    c.train.adam_b1 = 0.9
    c.train.adam_b2 = 0.999
    c.train.adam_eps = 1e-8
    c.train.max_grad_norm = 1.0
    c.train.seed = 0
    c.train.log_every = 10
    c.train.checkpoint_every = 50
    c.train.keep_checkpoints = 3
    c.mesh.data = -1                             # all local devices (one on a plain CPU)
    c.lock()
    return c
