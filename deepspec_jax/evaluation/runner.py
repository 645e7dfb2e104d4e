"""Evaluate one draft against one target on one dataset and write its artifacts.

For each dataset: encode the prompts (chat template, first user turn, non-thinking),
run speculative decoding over them (collecting round statistics and, for DSpark at
threshold 0, confidence logits), then run plain autoregressive decoding of the same
target on the same prompts with the same max_new_tokens / temperature / per-sample seed
for the speed baseline. Sample i (in the drawn order) uses seed ``seed + i``, as the
reference does. With ``Settings.tree`` the prompts are also decoded with draft trees
and the row gets a ``tree`` block with the same metrics.

All prompts of a dataset are padded to one length bucket (the longest prompt rounded up
to 64; or one bucket for the whole run, ``Settings.prompt_bucket``) for both decoders,
so a dataset compiles each decoder once instead of once per prompt-length bucket;
padding is masked and only adds prefill work.

Timing excludes compilation: one warm-up call of each decoder runs before the first
timed call in the process, and any tracing/lowering/compilation that still happens
inside a timed call (a new prompt-length bucket) is measured through
``jax.monitoring`` and subtracted (reported as ``compile_seconds_excluded``).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from typing import Callable, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from deepspec_jax import sps
from deepspec_jax.drafts.registry import family_for_kind
from deepspec_jax.evaluation import calibration, datasets, metrics, plots, report, sts
from deepspec_jax.spec_decode import speculative_generate

PROMPT_BUCKET = 64
RESULTS_NAME = "results.json"
ACCEPTANCE_PNG = "acceptance_by_position.png"
RELIABILITY_PNG = "reliability_diagram.png"

_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
    "/jax/compilation_cache/cache_retrieval_time_sec",
)


class CompileClock:
    """Total seconds JAX has spent tracing/lowering/compiling in this process."""

    _lock = threading.Lock()
    _total = 0.0
    _installed = False

    @classmethod
    def install(cls) -> None:
        with cls._lock:
            if cls._installed:
                return
            def listener(event: str, duration_secs: float, **_):
                if event in _COMPILE_EVENTS:
                    with cls._lock:
                        cls._total += float(duration_secs)

            jax.monitoring.register_event_duration_secs_listener(listener)
            cls._installed = True

    @classmethod
    def total(cls) -> float:
        with cls._lock:
            return cls._total


@dataclasses.dataclass(frozen=True)
class Settings:
    """Decoding and output settings shared by every dataset of a run."""

    max_new_tokens: int = 2048
    temperature: float = 1.0
    confidence_threshold: float = 0.0
    seed: int = 980406
    batch_size: int = 1
    output_dir: str = "eval_results"
    max_samples: int | None = None       # None: the reference's per-dataset count
    run_autoregressive: bool = True
    prompt_bucket: int | None = None     # one padded prompt length for all datasets
                                         # (None: per dataset; see shared_prompt_bucket)
    tree: tuple[int, int] | None = None  # also decode with draft trees (topk, num_nodes)
    use_calibration: bool = True         # apply <draft>/calibration.json (STS) when present
    policy: str = "fixed"                # verification policy (spec_decode.POLICIES)


def max_proposal_tokens(draft) -> int:
    """gamma: DSpark/DFlash propose ``block_size`` tokens per round, Eagle3 ``ttt_length``."""
    return family_for_kind(draft.kind, draft.source).width(draft.config)


def has_confidence_head(draft) -> bool:
    return family_for_kind(draft.kind, draft.source).has_confidence(draft.config)


def load_calibration(draft) -> "sts.Calibration | None":
    """``<draft dir>/calibration.json`` (STS), validated against this draft; None when the
    draft has no confidence head or no calibration file."""
    if not has_confidence_head(draft) or not os.path.isdir(str(draft.source)):
        return None
    return sts.load(str(draft.source), max_proposal_tokens(draft))


def encode_prompts(target, prompts: Sequence[datasets.Prompt], dataset: str) -> list[list[int]]:
    """Prompt ids: ``prompt_ids`` rows verbatim, text rows through the chat template."""
    out = []
    for p in prompts:
        if p.prompt_ids is not None:
            out.append(list(p.prompt_ids))
        elif getattr(target, "tokenizer", None) is None:
            raise datasets.DatasetError(
                f"{dataset}: the target ({target.source}) has no tokenizer, so text prompts "
                "cannot be encoded; evaluate a .jsonl dataset whose rows carry 'prompt_ids'.")
        else:
            out.append(list(target.apply_chat_template(p.text, thinking=False)))
    return out


def _bucket(n: int) -> int:
    return PROMPT_BUCKET * -(-n // PROMPT_BUCKET)


def shared_prompt_bucket(names: Sequence[str], target, settings: Settings) -> int:
    """One prompt bucket covering every selected prompt of every dataset, so that a
    short run (the quick demo) compiles each decoder once rather than once per dataset."""
    longest = 1
    for name in names:
        prompts = datasets.load_prompts(name, settings.max_samples, settings.seed)
        ids = encode_prompts(target, prompts, datasets.dataset_label(name))
        longest = max([longest] + [len(p) for p in ids])
    return _bucket(longest)


def _batches(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


class Decoders:
    """The decoders under test (speculative chain and tree, plain autoregressive), each
    warmed up once per process before timing. ``spec_fn`` replaces
    ``speculative_generate`` (tests use a synthetic engine with its signature)."""

    def __init__(self, target, draft, settings: Settings,
                 spec_fn: Callable = speculative_generate):
        self.target, self.draft, self.settings, self.spec_fn = target, draft, settings, spec_fn
        self._warm = {"spec": False, "ar": False, "tree": False}
        self.calibration = load_calibration(draft) if settings.use_calibration else None
        CompileClock.install()

    def _conf_kwargs(self) -> dict:
        """The STS temperatures for the threshold, when the draft has a calibration."""
        if self.calibration is None:
            return {}
        return {"confidence_temperatures": self.calibration.temperatures}

    def _policy_kwargs(self) -> dict:
        """The chain's verification policy; the scheduler's SPS profile for this batch
        size (measured once per target and machine, then cached: ``deepspec_jax.sps``)."""
        s = self.settings
        if s.policy == "fixed":
            return {}
        uses_cost = s.policy in ("scheduler", "production")
        if uses_cost and self._sps is None:
            self._sps = sps.cached(self.target, s.batch_size,
                                   max_proposal_tokens(self.draft) + 1)
        return {"policy": s.policy, **({"sps": self._sps} if uses_cost else {})}

    _sps = None

    prompt_bucket: int = PROMPT_BUCKET   # set per dataset by ``timed``

    def spec(self, ids: list[list[int]], seed: int):
        s = self.settings
        return self.spec_fn(self.target, self.draft, ids, max_new_tokens=s.max_new_tokens,
                            temperature=s.temperature, seed=seed,
                            confidence_threshold=s.confidence_threshold,
                            prompt_bucket=self.prompt_bucket, **self._conf_kwargs(),
                            **self._policy_kwargs())

    def tree(self, ids: list[list[int]], seed: int):
        """Speculative decoding with draft trees (same settings as ``spec``)."""
        s = self.settings
        return self.spec_fn(self.target, self.draft, ids, max_new_tokens=s.max_new_tokens,
                            temperature=s.temperature, seed=seed,
                            confidence_threshold=s.confidence_threshold, tree=tuple(s.tree),
                            prompt_bucket=self.prompt_bucket, **self._conf_kwargs())

    def _fn(self, kind: str):
        return {"spec": self.spec, "ar": self.ar, "tree": self.tree}[kind]

    def ar(self, ids: list[list[int]], seed: int):
        s = self.settings
        return self.target.generate(ids, max_new_tokens=s.max_new_tokens,
                                    temperature=s.temperature, seed=seed,
                                    prompt_bucket=self.prompt_bucket)

    def warm_up(self, kind: str, ids: list[list[int]]) -> float:
        """Run ``kind`` once untimed (compilation); returns the seconds it took."""
        if self._warm[kind]:
            return 0.0
        t0 = time.perf_counter()
        self._fn(kind)(ids, self.settings.seed)
        self._warm[kind] = True
        return time.perf_counter() - t0

    def timed(self, kind: str, prompt_ids: list[list[int]], desc: str):
        """Decode every prompt in batches; returns (outputs, net seconds, compile seconds)."""
        s = self.settings
        self.prompt_bucket = s.prompt_bucket or _bucket(max(len(p) for p in prompt_ids))
        batches = _batches(len(prompt_ids), s.batch_size)
        self.warm_up(kind, [prompt_ids[i] for i in batches[0]])
        fn = self._fn(kind)
        outs: list = []
        elapsed = compile_s = 0.0
        with tqdm(total=len(prompt_ids), desc=desc, unit="sample", leave=False,
                  dynamic_ncols=True) as bar:
            for b in batches:
                c0, t0 = CompileClock.total(), time.perf_counter()
                res = fn([prompt_ids[i] for i in b], s.seed + b.start)
                elapsed += time.perf_counter() - t0
                compile_s += CompileClock.total() - c0
                if len(res) != len(b):
                    raise RuntimeError(f"{kind} decoding returned {len(res)} results for "
                                       f"{len(b)} prompts.")
                outs.extend(res)
                bar.update(len(b))
        return outs, max(elapsed - compile_s, 0.0), compile_s


def _tree_block(decoders: Decoders, prompt_ids, label: str, gamma: int, samples: list,
                chain_tps, ar_block) -> dict:
    """Decode the dataset again with draft trees; the same metrics as the chain row.

    Per round the engine reports the tree depth as the proposal length (what
    ``accept_rate@k`` conditions on) and the verified node count separately;
    ``verify_rate`` here is committed tokens per verified position (nodes + 1)."""
    topk, num_nodes = decoders.settings.tree
    out, secs, compile_s = decoders.timed("tree", prompt_ids, f"{label} tree {topk},{num_nodes}")
    stats = metrics.RoundStats(gamma)
    nodes = []
    for x, r in zip(samples, out):
        stats.add(r.accepted_lengths, r.proposal_lengths)
        nodes += list(r.tree_nodes or [])
        x["tree_output_tokens"] = len(r.tokens)
        x["tree_rounds"] = int(r.num_rounds)
    block = {"topk": int(topk), "num_nodes": int(num_nodes)}
    block.update(stats.summary())
    tokens = sum(len(r.tokens) for r in out)
    rounds = stats.num_rounds
    tps = metrics.throughput(tokens, secs)
    block.update({
        "tree_depth_per_proposal": block.pop("draft_tokens_per_proposal"),
        "draft_tokens_per_proposal": float(np.mean(nodes)) if nodes else None,
        "verify_rate": (float(sum(stats.lengths)) / (sum(nodes) + rounds)
                        if rounds and len(nodes) == rounds else None),
        "output_tokens": tokens, "elapsed_seconds": secs,
        "compile_seconds_excluded": compile_s, "output_tokens_per_second": tps,
        "verifications_per_second": metrics.throughput(rounds, secs),
        "speedup": (tps / ar_block["output_tokens_per_second"]
                    if ar_block and tps and ar_block["output_tokens_per_second"] else None),
        "speedup_vs_chain": tps / chain_tps if tps and chain_tps else None,
    })
    block["accept_rate"] = {f"@{k}": v for k, v in enumerate(block["accept_rates_by_position"])}
    return block


def evaluate_dataset(name: str, decoders: Decoders, *, target_name: str,
                     draft_name: str, config: dict | None = None) -> dict:
    """Run one dataset end to end; writes ``<output_dir>/<dataset>/results.json`` and
    PNGs, and returns the results dict (one row of the table)."""
    s, draft = decoders.settings, decoders.draft
    label = datasets.dataset_label(name)
    prompts = datasets.load_prompts(name, s.max_samples, s.seed)
    prompt_ids = encode_prompts(decoders.target, prompts, label)
    gamma = max_proposal_tokens(draft)

    spec_out, spec_s, spec_compile = decoders.timed("spec", prompt_ids, f"{label} speculative")
    stats = metrics.RoundStats(gamma)
    calib = (calibration.ConfidenceCalibration(gamma)
             if has_confidence_head(draft) and s.confidence_threshold == 0.0
             and s.policy in ("fixed", "threshold") else None)
    calib_sts = (calibration.ConfidenceCalibration(gamma, decoders.calibration.temperatures)
                 if calib is not None and decoders.calibration is not None else None)
    samples = []
    for prompt, ids, r in zip(prompts, prompt_ids, spec_out):
        drafts = [int(a) - 1 for a in r.accepted_lengths]
        stats.add(r.accepted_lengths, r.proposal_lengths, drafts)
        if calib is not None and r.confidences is not None:
            calib.add_sample(r.confidences, drafts, r.proposal_lengths)
            if calib_sts is not None:
                calib_sts.add_sample(r.confidences, drafts, r.proposal_lengths)
        samples.append({"row": prompt.index, "prompt_tokens": len(ids),
                        "output_tokens": len(r.tokens), "rounds": int(r.num_rounds)})
    out_tokens = sum(x["output_tokens"] for x in samples)
    rounds = sum(x["rounds"] for x in samples)

    ar_block = None
    if s.run_autoregressive:
        ar_out, ar_s, ar_compile = decoders.timed("ar", prompt_ids, f"{label} autoregressive")
        ar_tokens = sum(len(t) for t in ar_out)
        for x, t in zip(samples, ar_out):
            x["ar_output_tokens"] = len(t)
        ar_block = {"output_tokens": ar_tokens, "elapsed_seconds": ar_s,
                    "compile_seconds_excluded": ar_compile,
                    "output_tokens_per_second": metrics.throughput(ar_tokens, ar_s)}

    row = {"dataset": label, "target": target_name, "draft": draft_name,
           "draft_kind": draft.kind, "max_proposal_tokens": gamma,
           "num_samples": len(prompts)}
    row.update(stats.summary())
    spec_tps = metrics.throughput(out_tokens, spec_s)
    row.update({
        "output_tokens": out_tokens, "elapsed_seconds": spec_s,
        "compile_seconds_excluded": spec_compile,
        "output_tokens_per_second": spec_tps,
        "verifications_per_second": metrics.throughput(rounds, spec_s),
        "autoregressive": ar_block,
        "speedup": (spec_tps / ar_block["output_tokens_per_second"]
                    if ar_block and spec_tps and ar_block["output_tokens_per_second"] else None),
    })
    row["accept_rate"] = {f"@{k}": v for k, v in enumerate(row["accept_rates_by_position"])}
    # proposal lengths are what the target verified: the policy's verified length
    row["policy"] = s.policy
    row["verified_drafts_per_round"] = row["draft_tokens_per_proposal"]
    row["sts_temperatures"] = (None if decoders.calibration is None
                               else list(decoders.calibration.temperatures))
    if calib is not None:
        row["confidence"] = calib.summary()
        row["confidence_sts"] = None if calib_sts is None else calib_sts.summary()
    else:
        row["confidence"] = None
        row["confidence_note"] = (
            "no confidence head" if not has_confidence_head(draft)
            else "calibration is collected only at confidence_threshold 0 and a policy "
                 "that verifies whole blocks")
    if s.tree is not None:
        row["tree"] = _tree_block(decoders, prompt_ids, label, gamma, samples, spec_tps, ar_block)
    row["config"] = dict(config or {})
    row["samples"] = samples

    out_dir = os.path.join(s.output_dir, label)
    row["artifacts"] = {"acceptance_png": plots.plot_acceptance(
        os.path.join(out_dir, ACCEPTANCE_PNG), label, row)}
    if calib is not None:
        row["artifacts"]["reliability_png"] = plots.plot_reliability(
            os.path.join(out_dir, RELIABILITY_PNG), label, row["confidence"]["per_position"],
            None if calib_sts is None else row["confidence_sts"]["per_position"])
    report.write_json(os.path.join(out_dir, RESULTS_NAME), row)
    return row
