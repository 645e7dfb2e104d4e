"""Tree speculative decoding: draft-tree construction (``build``), lossless
verification (``verify``) and KV-cache compaction to the accepted path (``compact``).
The engine wires them together in ``deepspec_jax.spec_decode`` (``tree=(topk, nodes)``).
"""

from deepspec_jax.tree.build import (DraftTree, build_tree, candidate_count, draft_log_probs,
                                     draw_children, tree_size)
from deepspec_jax.tree.compact import compact_kv_cache, gather_path, path_slots
from deepspec_jax.tree.verify import (TREE_RULES, TreeVerdict, child_table, verify_tree,
                                      verify_tree_greedy)

__all__ = ["DraftTree", "build_tree", "candidate_count", "draft_log_probs", "draw_children",
           "tree_size", "compact_kv_cache", "gather_path", "path_slots", "TREE_RULES",
           "TreeVerdict", "child_table", "verify_tree", "verify_tree_greedy"]
