"""The one config schema for training runs (ml_collections, MaxText style).

A run is described by a Python config file under ``configs/`` whose ``get_config()``
starts from :func:`base_config` and sets fields; every field can be overridden on the
command line (``--config.train.lr=3e-4``). The dict is locked, so a typo in a file or
an override (``--config.train.lrr``) is an error instead of a silently ignored value.
"""

from __future__ import annotations

import ml_collections

from deepspec_jax.drafts.registry import KINDS


def base_config(kind: str) -> ml_collections.ConfigDict:
    """Defaults shared by every run of draft ``kind`` ("dspark", "dflash", "eagle3");
    config files override what differs."""
    if kind not in KINDS:
        raise ValueError(f"draft kind must be one of {list(KINDS)}, got {kind!r}.")
    c = ml_collections.ConfigDict()
    c.name = f"{kind}_run"
    c.output_dir = ""             # default: runs/<name>

    # The frozen target: HF dir, .gguf, or "smollm2-135m".
    c.target = ml_collections.ConfigDict(dict(
        path="smollm2-135m",
        name="",                  # recorded in feature caches / checkpoints; default: basename of path
        dtype="bfloat16",         # target compute dtype (CPU runs use float32)
    ))

    # The draft. Fields left at -1 / "" are derived from the target (hidden size, heads,
    # vocab, rope) exactly as the reference builds its draft configs.
    c.draft = ml_collections.ConfigDict(dict(
        kind=kind,                # "dspark" | "dflash" | "eagle3" (drafts.registry.KINDS)
        init_from="",             # optional draft dir (HF/JAX/speculators) to start from; a
                                  # reduced-vocabulary one keeps its vocabulary (d2t) unless
        init_reselect_vocab=False,  # True: the run selects draft_vocab_size ids (any K, or 0 =
                                  # full) from data.train afresh; ids the init_from draft had
                                  # keep their trained columns (markov_w2), new ones start at 0
        init_grow_layers=False,   # DSpark/DFlash: init_from has fewer layers than
                                  # num_hidden_layers; its layers come first and each added
                                  # one starts as the identity (trainer.grow_layers)
        num_hidden_layers=1,
        intermediate_size=-1,
        target_layer_ids=(-1,),   # must be set by the config file
        block_size=7,             # DSpark/DFlash
        num_anchors=512,          # DSpark/DFlash
        mask_token_id=-1,         # DSpark/DFlash; -1 = a reserved token of the target tokenizer
        markov_rank=0,            # DSpark sequential head (0 = DFlash)
        markov_head_type="",      # "vanilla" | "gated" | "rnn" | "" (none)
        enable_confidence_head=False,
        confidence_head_with_markov=False,
        ttt_length=7,             # Eagle3
        step_loss_decay=0.8,      # Eagle3
        draft_vocab_size=0,       # > 0: reduced draft vocabulary of the K most frequent target
                                  # tokens of data.train (draft_vocab; 0 = the full vocabulary)
    ))

    c.loss = ml_collections.ConfigDict(dict(
        ce_alpha=0.1, l1_alpha=0.9, confidence_alpha=1.0, loss_decay_gamma=4.0,  # DSpark
        eagle3_corrected=False,   # Eagle3: fix the reference's off-by-one targets (see SPEC 7)
        vocab_grad="fused",       # "fused": vocab-loss gradient in the loss's own chunk pass
                                  # (each vocab matmul once); "recompute": chunks redone in
                                  # the backward (less kept: memory-bound accelerators)
    ))

    c.data = ml_collections.ConfigDict(dict(
        train=(),                 # token-store dirs (python -m deepspec_jax.data.tokenize)
        feature_cache="",         # "" = online: the target runs inside the train step;
                                  # else a cache dir per data.train store, comma-separated
        max_length=2048,          # sequence length (longer samples are truncated)
        bucket_boundaries=(),     # padded lengths to choose from; () = max_length only
        shuffle_seed=0,
    ))

    c.train = ml_collections.ConfigDict(dict(
        global_batch_size=16,     # sequences per optimizer step, all hosts together
        micro_batch_size=0,       # per-host sequences per forward; 0 = no accumulation
        num_epochs=1,
        max_steps=0,              # > 0 caps the run (the schedule still spans num_epochs)
        lr=6e-4,
        warmup_ratio=0.04,        # linear warmup fraction, then cosine to min_lr_ratio * lr
        min_lr_ratio=0.0,
        weight_decay=0.0,
        adam_b1=0.9,
        adam_b2=0.95,
        adam_eps=1e-8,
        max_grad_norm=1.0,
        compute_dtype="bfloat16", # draft activations; master weights stay float32
        cpu_library_fusion="dot", # XLA:CPU: "dot" = YNNPACK fuses matmuls only (its vocab-wide
                                  # reductions are slow), "all" = XLA's default (xla_cpu.py)
        seed=0,
        log_every=10,
        checkpoint_every=500,
        keep_checkpoints=3,
        async_checkpoint=True,
        export_hf=True,           # write <output_dir>/hf (DeepSpec format) at the end
        tensorboard=True,
    ))

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1 = remaining devices
    return c
