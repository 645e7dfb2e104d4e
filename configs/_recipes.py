"""The settings the training configs in this folder share, each set in one place.

A config file's ``get_config()`` composes these: :func:`reference_config` is a whole
reference run (``base_config(arch)`` + target + the architecture's draft/loss values +
the reference optimiser and run settings); :func:`smollm2_config` is the CPU run for the
embedded SmolLM2 target, given what differs per draft; :func:`gemma3_270m_config` the
same recipe, smaller, for Gemma-3-270M.

``configs/`` is not a Python package (config files are loaded by path through
``ml_collections.config_flags``), so each config file loads this module by path, and this
module loads ``configs/_targets.py`` the same way; nothing here is imported by deepspec_jax.

Reference = deepseek-ai/DeepSpec (MIT). Its twelve files config/<arch>/<arch>_<target>.py
(arch: dspark, dflash, eagle3; target: qwen3_4b, qwen3_8b, qwen3_14b, gemma4_12b) agree on
every value set here; ``# ref:`` comments quote the field as those files spell it, or name
the other reference file a value comes from.
"""

import importlib.util
import pathlib

import ml_collections

from deepspec_jax.errors import ConfigError
from deepspec_jax.train.config import base_config

_spec = importlib.util.spec_from_file_location(
    "_deepspec_config_targets", pathlib.Path(__file__).resolve().parent / "_targets.py")
_targets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_targets)

REFERENCE_TARGETS = ("qwen3_4b", "qwen3_8b", "qwen3_14b", "gemma4_12b")


def start(arch: str, target: str) -> ml_collections.ConfigDict:
    """``base_config(arch)`` named ``<arch>_<target>``, with the target's facts applied:
    target.path, draft.target_layer_ids, (block drafts) draft.mask_token_id, data.train
    (see configs/_targets.py)."""
    c = base_config(arch)
    c.name = f"{arch}_{target}"
    _targets.apply_target(c, target)
    return c


def reference_optimiser(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """AdamW, linear warmup then cosine, gradient clipping: the reference's optimiser for
    every draft (the SmolLM2 CPU runs use it too)."""
    c.train.lr = 6.0e-4                          # ref: lr=6.0e-4
    c.train.warmup_ratio = 0.04                  # ref: warmup_ratio=0.04 (linear, then cosine)
    c.train.min_lr_ratio = 0.0                   # ref: eta_min=0.0 (deepspec/utils/optim.py)
    c.train.weight_decay = 0.0                   # ref: weight_decay=0.0
    c.train.adam_b1 = 0.9                        # ref: deepspec/utils/optim.py builds
    c.train.adam_b2 = 0.999                      #   torch.optim.AdamW without betas/eps,
    c.train.adam_eps = 1e-8                      #   i.e. torch's defaults
    c.train.max_grad_norm = 1.0                  # ref: max_grad_norm=1.0
    return c


def reference_run(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Batch, sequence length, epochs, precision and logging/checkpoint cadence of the
    reference runs (train=dict and data=dict of the reference files)."""
    c.train.global_batch_size = 512              # ref: global_batch_size=512
    c.train.micro_batch_size = 8                 # ref: local_batch_size=1 per GPU on one 8-GPU node
    #                                              (README); ours is per host: set it to
    #                                              devices_per_host x sequences per device.
    c.train.num_epochs = 10                      # ref: num_train_epochs=10
    c.train.max_steps = 0                        # ref: max_train_steps=None
    c.train.compute_dtype = "bfloat16"           # ref: precision="bf16" (fp32 master weights:
    c.target.dtype = "bfloat16"                  #   BF16Optimizer in deepspec/utils/optim.py)
    c.train.log_every = 10                       # ref: logging_steps=10
    c.train.checkpoint_every = 3000              # ref: checkpointing_steps=3000
    c.data.max_length = 4096                     # ref: max_length=4096 (data=dict)
    # Mesh: the reference trains plain data-parallel (sharding_strategy="no_shard") on 80 GB
    # GPUs. We shard everything over fsdp instead (data=1, fsdp=-1 = all devices): on TPU
    # chips of 16 GB (v5e) a replicated Qwen3-4B draft (5 layers, fp32 params + grads + AdamW)
    # plus its share of the cached features does not fit one chip, while fsdp over v5e-8
    # fits at 1 sequence per chip (python -m deepspec_jax.plan --topology=v5e-8). The batch is
    # split over data x fsdp either way; pass --config.mesh.data=-1 --config.mesh.fsdp=1
    # for the reference's data-parallel layout.
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c


def _block_reference(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """What DSpark and DFlash share.  ref: config/{dspark,dflash}/*.py"""
    c.draft.num_hidden_layers = 5                # ref: num_draft_layers=5
    c.draft.block_size = 7                       # ref: block_size=7
    c.draft.num_anchors = 512                    # ref: num_anchors=512
    c.loss.loss_decay_gamma = 4.0                # ref: loss_decay_gamma=4.0
    c.train.seed = 42                            # ref: seed=42
    return c


def dspark_reference(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """DSpark: block drafter + Markov head + confidence head.  ref: config/dspark/dspark_*.py"""
    _block_reference(c)
    c.draft.markov_rank = 256                    # ref: markov_rank=256
    c.draft.markov_head_type = "vanilla"         # ref: markov_head_type="vanilla"
    c.draft.enable_confidence_head = True        # ref: confidence_head_alpha=1.0 > 0 turns it on
    #                                              (deepspec/modeling/dspark/{qwen3,gemma4}/config.py)
    c.draft.confidence_head_with_markov = True   # ref: confidence_head_with_markov=True
    c.loss.ce_alpha = 0.1                        # ref: ce_loss_alpha=0.1
    c.loss.l1_alpha = 0.9                        # ref: l1_loss_alpha=0.9
    c.loss.confidence_alpha = 1.0                # ref: confidence_head_alpha=1.0
    return c


def dflash_reference(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """DFlash: DSpark minus the Markov and confidence heads, CE-only loss.
    ref: config/dflash/dflash_*.py"""
    _block_reference(c)
    c.draft.markov_rank = 0                      # ref: markov_rank=0 ("Disable markov head")
    c.draft.markov_head_type = ""
    c.draft.enable_confidence_head = False       # ref: confidence_head_alpha=0.0
    c.draft.confidence_head_with_markov = False
    # The reference files also set enable_d2_feature=True, d2_prefix_weight_base=0.9;
    # the schema has no such fields (and the reference's draft config builder,
    # deepspec/modeling/dspark/{qwen3,gemma4}/config.py, does not read them).
    c.loss.ce_alpha = 1.0                        # ref: ce_loss_alpha=1.0
    c.loss.l1_alpha = 0.0                        # ref: l1_loss_alpha=0.0
    c.loss.confidence_alpha = 0.0                # ref: confidence_head_alpha=0.0
    return c


def eagle3_reference(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Eagle3: one layer, training-time test unrolled 7 steps.  ref: config/eagle3/eagle3_*.py"""
    c.draft.num_hidden_layers = 1                # ref: draft_num_hidden_layers=1
    c.draft.ttt_length = 7                       # ref: ttt_length=7
    c.draft.step_loss_decay = 0.8                # ref: step_loss_decay=0.8
    c.loss.eagle3_corrected = False              # the reference's own targets (SPEC section 7)
    c.train.seed = 0                             # ref: seed=0
    return c


ARCH_REFERENCE = {"dspark": dspark_reference, "dflash": dflash_reference,
                  "eagle3": eagle3_reference}


def reference_config(arch: str, target: str) -> ml_collections.ConfigDict:
    """The reference run config/<arch>/<arch>_<target>.py of deepseek-ai/DeepSpec, locked."""
    if target not in REFERENCE_TARGETS:
        raise ConfigError(f"configs/_recipes.py reference_config: {target!r} is not a reference "
                          f"target; use one of {REFERENCE_TARGETS}.")
    c = start(arch, target)
    ARCH_REFERENCE[arch](c)
    reference_optimiser(c)
    reference_run(c)
    c.lock()
    return c


def smollm2_config(arch: str, *, batch_size: int, num_epochs: int,
                   **draft) -> ml_collections.ConfigDict:
    """The CPU run for the embedded SmolLM2-135M-Instruct target, locked. ``batch_size``
    sequences per optimizer step, in one micro-batch; ``num_epochs`` passes over the
    data; ``draft``: ``c.draft`` fields that differ from the settings below.

    Why these sizes: the project's proof run (scripts/train_smollm2_drafts.sh) trains
    three drafts for the embedded SmolLM2-135M target on a 2-core CPU in a few hours in
    total, in resumable pieces. Everything is float32 (bf16 matmuls are ~10x slower on
    such CPUs). The target's features are cached once (bf16, ~7 KB per token: five
    feature layers and the last hidden state, built by the script's ``features`` stage),
    so each epoch costs only the draft. 512 tokens fit a typical gsm8k or short-chat
    prompt with its answer (longer samples are truncated); shorter sequences are padded
    to 256 instead. ``max_steps`` 0 runs ``num_epochs`` full passes over the token store,
    which the cosine schedule spans. One draft layer keeps the draft's cost far below
    the 30-layer target's, which is what a wall-clock speedup on CPU needs; block drafts
    use blocks of 4 with 48 anchors (48 x 4 = 192 draft queries per 512-token
    sequence), since a CPU verified 5 tokens at ~1.7x the cost of 1 and 8 at ~2.4x when
    these drafts were first trained (since the weight-first products, 5 and 8 tokens
    both cost ~1.2-1.5x: docs/BENCHMARKS.md, so a block of 7 would verify at a block of 4's
    cost).
    The draft heads, loss and optimiser are the reference's (lr 6e-4, 4% warmup, cosine,
    AdamW(0.9, 0.999), clip 1.0); checkpoints every 25 steps let a run continue across
    sessions.
    """
    return _cpu_config(arch, "smollm2_135m", batch_size=batch_size, num_epochs=num_epochs,
                       max_length=512, num_anchors=48,
                       # built by scripts/train_smollm2_drafts.sh features
                       feature_cache="data/smollm2/features", draft=draft)


def gemma3_270m_config(arch: str, *, batch_size: int, num_epochs: int,
                       **draft) -> ml_collections.ConfigDict:
    """A brief CPU run for Gemma-3-270M-it (scripts/train_gemma3_draft.sh), locked:
    :func:`smollm2_config`'s recipe with fewer draft rows. Gemma-3's 262,144-token
    vocabulary makes each draft row's vocab loss ~5x SmolLM2's (49,152), so sequences
    are 256 tokens with 16 anchors (64 draft rows, a third of SmolLM2's 192), which keeps
    a step of a few-hundred-sequence run to seconds on a shared 2-core CPU."""
    return _cpu_config(arch, "gemma3_270m", batch_size=batch_size, num_epochs=num_epochs,
                       max_length=256, num_anchors=16,
                       # built by scripts/train_gemma3_draft.sh features
                       feature_cache="data/gemma3/features", draft=draft)


def _cpu_config(arch: str, target: str, *, batch_size: int, num_epochs: int, max_length: int,
                num_anchors: int, feature_cache: str, draft: dict) -> ml_collections.ConfigDict:
    """The CPU recipe :func:`smollm2_config` documents, for ``target`` (configs/_targets.py)."""
    c = start(arch, target)
    ARCH_REFERENCE[arch](c)                      # heads and loss; sizes set below
    reference_optimiser(c)
    c.target.dtype = "float32"
    c.train.compute_dtype = "float32"
    c.draft.num_hidden_layers = 1
    if arch != "eagle3":
        c.draft.block_size = 4
        c.draft.num_anchors = num_anchors
    c.data.max_length = max_length
    c.data.feature_cache = feature_cache
    c.data.bucket_boundaries = (max_length // 2, max_length)
    c.train.max_steps = 0
    c.train.seed = 0
    c.train.log_every = 5
    c.train.checkpoint_every = 25
    c.train.keep_checkpoints = 3
    c.mesh.data = -1                             # all local devices (one on a plain CPU)
    c.train.global_batch_size = batch_size
    c.train.micro_batch_size = batch_size
    c.train.num_epochs = num_epochs
    for field, value in draft.items():
        if field not in c.draft:
            raise ConfigError(f"configs/_recipes.py {target} config: draft has no field "
                              f"{field!r}; use one of {sorted(c.draft)}.")
        c.draft[field] = value
    c.lock()
    return c
