"""Code training prompts, written for this project (none taken from an eval set).

The prompt files under ``../shared/train_prompts`` hold math (gsm8k-train) and chat
(self-instruct); a draft trained on their answers accepts little on code (humaneval tau
~1.1 for the shipped draft). This module writes a code prompt set in the regenerate
format (``{"conversations": [{"role": "user", "content": ...}]}`` per line) from the small
Python tasks below, each in three phrasings that code benchmarks and users use: a stub
with a docstring and doctests, a one-line request, and a request for an explained
solution. Every doctest's expected value is computed by running the task's reference
implementation, so no example in a prompt is wrong. ``tests/test_code_prompts.py``
checks that no task shares a function name or a sentence with the eval sets.

The tasks are a few hundred; ``--word_problems`` turns a prompt file of math word problems
(gsm8k-train) into as many code prompts as it has lines: "write ``solution()`` that
computes the answer", as a stub to complete or as a request, alternately.

    python -m deepspec_jax.data.code_prompts --output=data/smollm2/code_prompts.jsonl
    python -m deepspec_jax.data.code_prompts --output=data/smollm2/word_problem_code.jsonl \
        --word_problems=../shared/train_prompts/gsm8k_train.jsonl
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import textwrap
from collections import Counter
from typing import Any, Callable, Sequence

from absl import flags

from deepspec_jax import cli
from deepspec_jax.data.jsonl import read_conversations, write_user_prompts


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    params: str          # the signature's parameters, with annotations
    returns: str         # the return annotation
    does: str            # "returns ..." / "counts ..." (completes "a function that ...")
    impl: Callable[..., Any]
    examples: tuple      # argument tuples for the doctests


def task(name, params, returns, does, impl, *examples) -> Task:
    """A :class:`Task`, its doctest examples given as trailing arguments (one table row a call)."""
    return Task(name, params, returns, does, impl, tuple(examples))


def _run_lengths(s):
    out, i = [], 0
    while i < len(s):
        j = i
        while j < len(s) and s[j] == s[i]:
            j += 1
        out.append((s[i], j - i))
        i = j
    return out


def _is_prime(n):
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


def _collatz_steps(n):
    steps = 0
    while n != 1:
        n = n // 2 if n % 2 == 0 else 3 * n + 1
        steps += 1
    return steps


def _merge_intervals(iv):
    out = []
    for a, b in sorted(iv):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _balanced(s):
    pairs, stack = {")": "(", "]": "[", "}": "{"}, []
    for ch in s:
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs:
            if not stack or stack.pop() != pairs[ch]:
                return False
    return not stack


def _longest_increasing_run(xs):
    best = cur = 1 if xs else 0
    for a, b in zip(xs, xs[1:]):
        cur = cur + 1 if b > a else 1
        best = max(best, cur)
    return best


def _spiral(m):
    out, m = [], [list(r) for r in m]
    while m:
        out += m.pop(0)
        m = [list(r) for r in zip(*m)][::-1]
    return out


def _caesar(s, k):
    def sh(c):
        if c.isalpha():
            base = ord("a") if c.islower() else ord("A")
            return chr((ord(c) - base + k) % 26 + base)
        return c
    return "".join(sh(c) for c in s)


def _to_roman(n):
    vals = [(1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"),
            (50, "L"), (40, "XL"), (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I")]
    out = ""
    for v, r in vals:
        while n >= v:
            out, n = out + r, n - v
    return out


def _binary_search(xs, x):
    lo, hi = 0, len(xs)
    while lo < hi:
        mid = (lo + hi) // 2
        if xs[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo if lo < len(xs) and xs[lo] == x else -1


def _max_subarray(xs):
    best = cur = xs[0]
    for x in xs[1:]:
        cur = max(x, cur + x)
        best = max(best, cur)
    return best


def _edit_distance(a, b):
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _lcs_len(a, b):
    prev = [0] * (len(b) + 1)
    for ca in a:
        cur = [0]
        for j, cb in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if ca == cb else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def _coin_ways(coins, total):
    ways = [1] + [0] * total
    for c in coins:
        for t in range(c, total + 1):
            ways[t] += ways[t - c]
    return ways[total]


def _min_coins(coins, total):
    inf = total + 1
    best = [0] + [inf] * total
    for t in range(1, total + 1):
        for c in coins:
            if c <= t:
                best[t] = min(best[t], best[t - c] + 1)
    return -1 if best[total] == inf else best[total]


def _grid_paths(rows, cols):
    return math.comb(rows + cols - 2, rows - 1)


def _flatten(xs):
    out = []
    for x in xs:
        out += _flatten(x) if isinstance(x, list) else [x]
    return out


def _group_anagrams(words):
    groups = {}
    for w in words:
        groups.setdefault("".join(sorted(w)), []).append(w)
    return sorted(sorted(g) for g in groups.values())


def _top_k_words(text, k):
    counts = Counter(text.lower().split())
    return [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]


def _rotate_matrix(m):
    return [list(r) for r in zip(*m[::-1])]


def _pascal_row(n):
    return [math.comb(n, k) for k in range(n + 1)]


def _digital_root(n):
    while n >= 10:
        n = sum(int(d) for d in str(n))
    return n


def _compress(s):
    return "".join(f"{c}{k}" for c, k in _run_lengths(s))


def _decompress(pairs):
    return "".join(c * k for c, k in pairs)


def _kth_smallest_pair_sum(a, b, k):
    return sorted(x + y for x in a for y in b)[k - 1]


def _word_wrap(text, width):
    lines, cur = [], ""
    for w in text.split():
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}" if cur else w
    return lines + ([cur] if cur else [])


def _topo_order(n, edges):
    indeg, adj = [0] * n, [[] for _ in range(n)]
    for a, b in edges:
        adj[a].append(b)
        indeg[b] += 1
    ready = sorted(i for i in range(n) if indeg[i] == 0)
    out = []
    while ready:
        v = ready.pop(0)
        out.append(v)
        for w in adj[v]:
            indeg[w] -= 1
            if indeg[w] == 0:
                ready.append(w)
        ready.sort()
    return out if len(out) == n else []


def _islands(grid):
    seen, count = set(), 0
    for r in range(len(grid)):
        for c in range(len(grid[0])):
            if grid[r][c] == 1 and (r, c) not in seen:
                count += 1
                stack = [(r, c)]
                while stack:
                    y, x = stack.pop()
                    if (y, x) in seen or not (0 <= y < len(grid) and 0 <= x < len(grid[0])):
                        continue
                    if grid[y][x] != 1:
                        continue
                    seen.add((y, x))
                    stack += [(y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)]
    return count


def _fibonacci_upto(limit):
    out, a, b = [], 0, 1
    while a <= limit:
        out.append(a)
        a, b = b, a + b
    return out


def _prime_factors(n):
    out, d = [], 2
    while n > 1:
        while n % d == 0:
            out.append(d)
            n //= d
        d += 1
    return out


def _nested_get(d, path, default=None):
    cur = d
    for key in path.split("."):
        if not isinstance(cur, dict) or key not in cur:
            return default
        cur = cur[key]
    return cur


def _human_bytes(n):
    x = float(n)
    for unit in ("B", "KiB", "MiB"):
        if x < 1024:
            return f"{x:.1f} {unit}"
        x /= 1024
    return f"{x:.1f} GiB"


def _shortest_path_len(n, edges, src, dst):
    adj = {i: [] for i in range(n)}
    for a, b in edges:
        adj[a].append(b)
        adj[b].append(a)
    dist, frontier = {src: 0}, [src]
    while frontier:
        nxt = []
        for v in frontier:
            for w in adj[v]:
                if w not in dist:
                    dist[w] = dist[v] + 1
                    nxt.append(w)
        frontier = nxt
    return dist.get(dst, -1)


TASKS: tuple[Task, ...] = (
    # ---- numbers ----
    task("sum_of_multiples", "limit: int, a: int, b: int", "int",
       "returns the sum of all positive integers below limit that are divisible by a or by b",
       lambda limit, a, b: sum(i for i in range(1, limit) if i % a == 0 or i % b == 0),
       (10, 3, 5), (20, 4, 6)),
    task("count_primes_below", "n: int", "int", "counts the prime numbers smaller than n",
       lambda n: sum(_is_prime(i) for i in range(n)), (10,), (30,)),
    task("nth_prime", "n: int", "int", "returns the n-th prime number (the first is 2)",
       lambda n: [p for p in range(2, 200) if _is_prime(p)][n - 1], (1,), (6,)),
    task("collatz_steps", "n: int", "int",
       "returns how many steps of the Collatz rule (halve even numbers, map odd n to 3n + 1) "
       "take n to 1", _collatz_steps, (6,), (1,)),
    task("digital_root", "n: int", "int",
       "repeatedly sums the decimal digits of n until a single digit is left and returns it",
       _digital_root, (9875,), (7,)),
    task("is_perfect_number", "n: int", "bool",
       "checks whether n equals the sum of its proper divisors",
       lambda n: n > 1 and sum(d for d in range(1, n) if n % d == 0) == n, (28,), (12,)),
    task("gcd_of_list", "nums: list[int]", "int",
       "returns the greatest common divisor of all numbers in a non-empty list",
       lambda nums: math.gcd(*nums), ([12, 18, 30],), ([7, 13],)),
    task("lcm_up_to", "n: int", "int",
       "returns the smallest positive number divisible by every integer from 1 to n",
       lambda n: math.lcm(*range(1, n + 1)), (5,), (10,)),
    task("to_binary_string", "n: int", "str",
       "returns the binary representation of a non-negative integer without a prefix",
       lambda n: format(n, "b"), (10,), (0,)),
    task("from_base", "digits: str, base: int", "int",
       "converts a string of digits in the given base (2 to 10) to an integer",
       lambda digits, base: int(digits, base), ("1011", 2), ("212", 3)),
    task("to_roman", "n: int", "str", "converts an integer between 1 and 3999 to a Roman numeral",
       _to_roman, (14,), (1994,)),
    task("reverse_integer", "n: int", "int",
       "reverses the decimal digits of an integer, keeping its sign",
       lambda n: (-1 if n < 0 else 1) * int(str(abs(n))[::-1]), (123,), (-450,)),
    task("is_armstrong", "n: int", "bool",
       "checks whether n equals the sum of its digits each raised to the number of digits",
       lambda n: n == sum(int(d) ** len(str(n)) for d in str(n)), (153,), (154,)),
    task("sum_of_squares_diff", "n: int", "int",
       "returns the square of the sum of 1..n minus the sum of the squares of 1..n",
       lambda n: sum(range(1, n + 1)) ** 2 - sum(i * i for i in range(1, n + 1)), (3,), (10,)),
    task("fibonacci_upto", "limit: int", "list[int]",
       "returns the Fibonacci numbers (starting 0, 1) that are not larger than limit",
       _fibonacci_upto, (10,), (1,)),
    task("pascal_row", "n: int", "list[int]", "returns row n of Pascal's triangle (row 0 is [1])",
       _pascal_row, (4,), (0,)),
    task("grid_paths", "rows: int, cols: int", "int",
       "counts the paths from the top-left to the bottom-right cell of a grid moving only "
       "right or down", _grid_paths, (2, 3), (3, 3)),
    task("prime_factors", "n: int", "list[int]",
       "returns the prime factors of n > 1 in ascending order, with repetition",
       _prime_factors, (12,), (97,)),
    task("count_divisors", "n: int", "int", "counts the positive divisors of n",
       lambda n: sum(n % d == 0 for d in range(1, n + 1)), (12,), (13,)),
    task("celsius_table", "start: int, stop: int, step: int", "list[tuple[int, float]]",
       "returns (celsius, fahrenheit) pairs for celsius from start up to stop inclusive",
       lambda start, stop, step: [(c, c * 9 / 5 + 32) for c in range(start, stop + 1, step)],
       (0, 20, 10), (-10, 0, 5)),
    task("compound_interest", "principal: float, rate: float, years: int", "float",
       "returns the balance after compounding the yearly rate (0.05 = 5%) for the given "
       "years, rounded to 2 decimals",
       lambda principal, rate, years: round(principal * (1 + rate) ** years, 2),
       (1000.0, 0.05, 2), (500.0, 0.1, 3)),
    task("median_value", "nums: list[float]", "float",
       "returns the middle value of a non-empty list (the mean of the two middle values for "
       "an even length)",
       lambda nums: (sorted(nums)[len(nums) // 2] if len(nums) % 2 else
                     (sorted(nums)[len(nums) // 2 - 1] + sorted(nums)[len(nums) // 2]) / 2),
       ([3, 1, 2],), ([4, 1, 3, 2],)),
    task("mode", "nums: list[int]", "int",
       "returns the most frequent value of a non-empty list (the smallest one on a tie)",
       lambda nums: min(Counter(nums).items(), key=lambda kv: (-kv[1], kv[0]))[0],
       ([1, 2, 2, 3, 3],), ([5],)),
    task("running_average", "nums: list[float]", "list[float]",
       "returns the average of the first i + 1 numbers for every position i",
       lambda nums: [sum(nums[:i + 1]) / (i + 1) for i in range(len(nums))],
       ([2, 4, 6],), ([1, 1, 4],)),
    # ---- lists ----
    task("second_largest", "nums: list[int]", "int | None",
       "returns the second largest distinct value, or None if there is none",
       lambda nums: sorted(set(nums))[-2] if len(set(nums)) > 1 else None,
       ([4, 1, 4, 3],), ([2, 2],)),
    task("rotate_left", "items: list, k: int", "list",
       "rotates a list k positions to the left (k may exceed the length)",
       lambda items, k: items[k % len(items):] + items[:k % len(items)] if items else [],
       ([1, 2, 3, 4, 5], 2), ([1, 2, 3], 4)),
    task("split_into_chunks", "items: list, size: int", "list[list]",
       "splits a list into consecutive pieces of the given size (the last may be shorter)",
       lambda items, size: [items[i:i + size] for i in range(0, len(items), size)],
       ([1, 2, 3, 4, 5], 2), ([], 3)),
    task("flatten", "nested: list", "list", "flattens arbitrarily nested lists into one list",
       _flatten, ([1, [2, [3, 4]], 5],), ([[], [[]]],)),
    task("dedupe_keep_order", "items: list", "list",
       "removes repeated elements, keeping the first occurrence of each",
       lambda items: list(dict.fromkeys(items)), ([3, 1, 3, 2, 1],), (["a", "a"],)),
    task("pairwise_differences", "nums: list[int]", "list[int]",
       "returns the differences between consecutive elements",
       lambda nums: [b - a for a, b in zip(nums, nums[1:])], ([1, 4, 9, 16],), ([5],)),
    task("interleave", "a: list, b: list", "list",
       "interleaves two lists element by element and appends what is left of the longer one",
       lambda a, b: [x for pair in zip(a, b) for x in pair] + a[len(b):] + b[len(a):],
       ([1, 3, 5], [2, 4]), ([], [7])),
    task("max_subarray_sum", "nums: list[int]", "int",
       "returns the largest sum of a non-empty contiguous sub-list", _max_subarray,
       ([-2, 1, -3, 4, -1, 2, 1, -5, 4],), ([-3, -1, -2],)),
    task("longest_increasing_run", "nums: list[int]", "int",
       "returns the length of the longest strictly increasing run of adjacent elements",
       _longest_increasing_run, ([1, 2, 2, 3, 4, 1],), ([],)),
    task("two_sum_indices", "nums: list[int], target: int", "tuple[int, int] | None",
       "returns the indices (i, j), i < j, of the first pair summing to target, or None",
       lambda nums, target: next(((i, j) for j in range(len(nums)) for i in range(j)
                                  if nums[i] + nums[j] == target), None),
       ([2, 7, 11, 15], 9), ([1, 2], 5)),
    task("binary_search", "sorted_nums: list[int], x: int", "int",
       "returns the index of x in a sorted list, or -1 when it is absent", _binary_search,
       ([1, 3, 5, 7, 9], 7), ([1, 3, 5], 4)),
    task("merge_sorted", "a: list[int], b: list[int]", "list[int]",
       "merges two sorted lists into one sorted list without calling sort",
       lambda a, b: sorted(a + b), ([1, 4, 6], [2, 3, 7]), ([], [1])),
    task("kth_smallest_pair_sum", "a: list[int], b: list[int], k: int", "int",
       "returns the k-th smallest sum x + y with x from a and y from b (k starts at 1)",
       _kth_smallest_pair_sum, ([1, 7], [3, 4], 3), ([1, 2], [1, 2], 1)),
    task("move_zeros_to_end", "nums: list[int]", "list[int]",
       "moves every zero to the end, keeping the order of the other elements",
       lambda nums: [x for x in nums if x] + [0] * nums.count(0), ([0, 1, 0, 3, 12],), ([0],)),
    task("majority_element", "nums: list[int]", "int | None",
       "returns the element occurring more than half the time, or None",
       lambda nums: next((x for x, c in Counter(nums).items() if 2 * c > len(nums)), None),
       ([3, 3, 4, 3],), ([1, 2],)),
    task("cumulative_max", "nums: list[int]", "list[int]",
       "returns for every position the maximum of the elements up to it",
       lambda nums: [max(nums[:i + 1]) for i in range(len(nums))], ([1, 3, 2, 5, 4],), ([],)),
    task("count_inversions", "nums: list[int]", "int",
       "counts the pairs i < j with nums[i] > nums[j]",
       lambda nums: sum(nums[i] > nums[j] for j in range(len(nums)) for i in range(j)),
       ([2, 4, 1, 3, 5],), ([1, 2, 3],)),
    task("merge_intervals", "intervals: list[tuple[int, int]]", "list[tuple[int, int]]",
       "merges overlapping closed intervals and returns them sorted by start",
       _merge_intervals, ([(1, 3), (2, 6), (8, 10)],), ([(5, 6), (1, 2)],)),
    task("min_coins", "coins: list[int], total: int", "int",
       "returns the fewest coins adding up to total, or -1 if total cannot be made",
       _min_coins, ([1, 2, 5], 11), ([2], 3)),
    task("coin_change_ways", "coins: list[int], total: int", "int",
       "counts the ways to make total from unlimited coins of the given values",
       _coin_ways, ([1, 2, 5], 5), ([2], 3)),
    task("sliding_window_max", "nums: list[int], k: int", "list[int]",
       "returns the maximum of every window of k consecutive elements",
       lambda nums, k: [max(nums[i:i + k]) for i in range(len(nums) - k + 1)],
       ([1, 3, -1, -3, 5, 3], 3), ([4, 2], 1)),
    task("product_except_self", "nums: list[int]", "list[int]",
       "returns, for each position, the product of all the other elements",
       lambda nums: [math.prod(nums[:i] + nums[i + 1:]) for i in range(len(nums))],
       ([1, 2, 3, 4],), ([2, 0, 5],)),
    task("partition_even_odd", "nums: list[int]", "tuple[list[int], list[int]]",
       "splits a list into its even and its odd numbers, each in the original order",
       lambda nums: ([x for x in nums if x % 2 == 0], [x for x in nums if x % 2]),
       ([1, 2, 3, 4, 6],), ([],)),
    # ---- strings ----
    task("is_palindrome_sentence", "text: str", "bool",
       "checks whether a sentence reads the same backwards, ignoring case, spaces and "
       "punctuation",
       lambda text: (lambda s: s == s[::-1])([c.lower() for c in text if c.isalnum()]),
       ("Never odd or even.",), ("Python",)),
    task("count_vowels", "text: str", "int", "counts the vowels a, e, i, o, u in any case",
       lambda text: sum(c in "aeiouAEIOU" for c in text), ("Programming",), ("sky",)),
    task("title_case", "text: str", "str",
       "capitalises the first letter of every word and lower-cases the rest",
       lambda text: " ".join(w[:1].upper() + w[1:].lower() for w in text.split(" ")),
       ("hello wORLD",), ("a b",)),
    task("snake_to_camel", "name: str", "str", "converts snake_case to camelCase",
       lambda name: (lambda p: p[0] + "".join(w.title() for w in p[1:]))(name.split("_")),
       ("max_batch_size",), ("x",)),
    task("camel_to_snake", "name: str", "str", "converts camelCase to snake_case",
       lambda name: "".join("_" + c.lower() if c.isupper() else c for c in name),
       ("maxBatchSize",), ("value",)),
    task("run_length_encode", "text: str", "str",
       "encodes runs of equal characters as the character followed by the run's length",
       _compress, ("aaabccdddd",), ("x",)),
    task("run_length_decode", "pairs: list[tuple[str, int]]", "str",
       "expands (character, count) pairs back into a string", _decompress,
       ([("a", 3), ("b", 1)],), ([],)),
    task("caesar_shift", "text: str, k: int", "str",
       "shifts every letter k places in the alphabet, wrapping around and keeping case",
       _caesar, ("Hello, World!", 3), ("xyz", 2)),
    task("are_anagrams", "a: str, b: str", "bool",
       "checks whether two words use the same letters the same number of times, ignoring case",
       lambda a, b: sorted(a.lower()) == sorted(b.lower()), ("Listen", "Silent"), ("abc", "abd")),
    task("group_anagrams", "words: list[str]", "list[list[str]]",
       "groups words that are anagrams of each other; each group sorted, groups sorted",
       _group_anagrams, (["eat", "tea", "tan", "ate", "nat", "bat"],), ([],)),
    task("first_unique_char", "text: str", "int",
       "returns the index of the first character that occurs once, or -1",
       lambda text: next((i for i, c in enumerate(text) if text.count(c) == 1), -1),
       ("swiss",), ("aabb",)),
    task("longest_common_prefix", "words: list[str]", "str",
       "returns the longest prefix shared by all words",
       lambda words: os.path.commonprefix(words), (["flower", "flow", "flight"],), (["a", "b"],)),
    task("edit_distance", "a: str, b: str", "int",
       "returns the minimum number of single-character insertions, deletions and "
       "substitutions turning a into b", _edit_distance, ("kitten", "sitting"), ("", "abc")),
    task("lcs_length", "a: str, b: str", "int",
       "returns how many characters the longest sequence that both strings contain in order "
       "(not necessarily adjacent) has", _lcs_len,
       ("abcde", "ace"), ("abc", "def")),
    task("balanced_brackets", "text: str", "bool",
       "checks whether the brackets (), [] and {} in a string are balanced and properly "
       "nested", _balanced, ("{[()()]}",), ("([)]",)),
    task("word_frequencies", "text: str", "dict[str, int]",
       "counts how often each lower-cased word of a text occurs",
       lambda text: dict(Counter(text.lower().split())), ("the cat and the hat",), ("",)),
    task("top_k_words", "text: str, k: int", "list[str]",
       "returns the k most frequent lower-cased words, ties broken alphabetically",
       _top_k_words, ("b a b c a b", 2), ("one", 3)),
    task("word_wrap", "text: str, width: int", "list[str]",
       "breaks a text into lines of at most width characters without splitting words",
       _word_wrap, ("the quick brown fox jumps", 10), ("hi", 5)),
    task("reverse_words", "sentence: str", "str",
       "reverses the order of the words in a sentence",
       lambda sentence: " ".join(sentence.split()[::-1]), ("speculative decoding is fast",),
       ("one",)),
    task("is_rotation", "a: str, b: str", "bool",
       "checks whether b is a rotation of a (same length, b a substring of a + a)",
       lambda a, b: len(a) == len(b) and b in a + a, ("waterbottle", "erbottlewat"),
       ("abc", "acb")),
    task("mask_email", "email: str", "str",
       "keeps the first character of the part before @ and replaces the rest of it with *",
       lambda email: (lambda u, d: u[:1] + "*" * (len(u) - 1) + "@" + d)(*email.split("@", 1)),
       ("alice@example.com",), ("b@x.org",)),
    task("count_substring", "text: str, sub: str", "int",
       "counts the possibly overlapping occurrences of sub in text",
       lambda text, sub: sum(text.startswith(sub, i) for i in range(len(text))),
       ("aaaa", "aa"), ("abc", "d")),
    task("strip_comments", "line: str", "str",
       "removes everything from the first # of a line on and trailing spaces",
       lambda line: line.split("#", 1)[0].rstrip(), ("x = 1  # set x",), ("# only",)),
    task("parse_key_values", "text: str", "dict[str, str]",
       "parses 'key=value' pairs separated by semicolons, ignoring surrounding spaces",
       lambda text: {k.strip(): v.strip() for k, v in
                     (p.split("=", 1) for p in text.split(";") if p.strip())},
       ("a=1; b = two;",), ("",)),
    task("acronym", "phrase: str", "str",
       "returns the upper-case first letters of the words of a phrase",
       lambda phrase: "".join(w[0].upper() for w in phrase.replace("-", " ").split()),
       ("portable network graphics",), ("key-value store",)),
    task("is_valid_ipv4", "address: str", "bool",
       "checks whether a string is four dot-separated decimal numbers 0-255 without leading "
       "zeros",
       lambda address: (lambda p: len(p) == 4 and all(
           x.isdigit() and str(int(x)) == x and int(x) <= 255 for x in p))(address.split(".")),
       ("192.168.0.1",), ("256.1.1.01",)),
    task("char_histogram", "text: str", "list[tuple[str, int]]",
       "returns (letter, count) for the letters of a text, sorted by letter",
       lambda text: sorted(Counter(c for c in text.lower() if c.isalpha()).items()),
       ("Banana",), ("42",)),
    # ---- dictionaries, records ----
    task("invert_dict", "d: dict", "dict",
       "swaps keys and values; when values repeat, the last key wins",
       lambda d: {v: k for k, v in d.items()}, ({"a": 1, "b": 2},), ({"x": 1, "y": 1},)),
    task("merge_counts", "a: dict[str, int], b: dict[str, int]", "dict[str, int]",
       "adds up the counts of two dictionaries key by key",
       lambda a, b: dict(Counter(a) + Counter(b)), ({"x": 1, "y": 2}, {"y": 3, "z": 1}),
       ({}, {"q": 2})),
    task("group_by_length", "words: list[str]", "dict[int, list[str]]",
       "groups words by their length, keeping their order within each group",
       lambda words: {n: [w for w in words if len(w) == n]
                      for n in sorted({len(w) for w in words})},
       (["hi", "yes", "no", "cat"],), ([],)),
    task("oldest_person", "people: list[dict]", "str",
       "returns the name of the person with the largest 'age' (the first one on a tie)",
       lambda people: max(people, key=lambda p: p["age"])["name"],
       ([{"name": "Ann", "age": 31}, {"name": "Bo", "age": 45}],),
       ([{"name": "Cy", "age": 20}],)),
    task("average_by_key", "rows: list[tuple[str, float]]", "dict[str, float]",
       "returns the average value of every key of (key, value) rows",
       lambda rows: {k: sum(v for kk, v in rows if kk == k) / sum(kk == k for kk, _ in rows)
                     for k in dict.fromkeys(k for k, _ in rows)},
       ([("a", 2.0), ("b", 5.0), ("a", 4.0)],), ([],)),
    task("nested_get", "d: dict, path: str, default=None", "object",
       "follows a dotted path like 'a.b.c' through nested dictionaries and returns default "
       "when a key is missing",
       _nested_get,
       ({"a": {"b": {"c": 1}}}, "a.b.c"), ({"a": {}}, "a.x", 0)),
    task("diff_dicts", "old: dict, new: dict", "dict[str, list]",
       "returns the sorted keys that were 'added', 'removed' and 'changed' between two dicts",
       lambda old, new: {"added": sorted(new.keys() - old.keys()),
                         "removed": sorted(old.keys() - new.keys()),
                         "changed": sorted(k for k in old.keys() & new.keys()
                                           if old[k] != new[k])},
       ({"a": 1, "b": 2}, {"b": 3, "c": 4}), ({}, {})),
    # ---- matrices, grids, graphs ----
    task("transpose", "matrix: list[list[int]]", "list[list[int]]",
       "returns the transpose of a rectangular matrix",
       lambda matrix: [list(r) for r in zip(*matrix)], ([[1, 2, 3], [4, 5, 6]],), ([[7]],)),
    task("rotate_clockwise", "matrix: list[list[int]]", "list[list[int]]",
       "rotates a square matrix by 90 degrees clockwise", _rotate_matrix,
       ([[1, 2], [3, 4]],), ([[1, 2, 3], [4, 5, 6], [7, 8, 9]],)),
    task("spiral_order", "matrix: list[list[int]]", "list[int]",
       "returns the elements of a matrix in clockwise spiral order from the top-left",
       _spiral, ([[1, 2, 3], [4, 5, 6], [7, 8, 9]],), ([[1, 2]],)),
    task("matrix_multiply", "a: list[list[int]], b: list[list[int]]", "list[list[int]]",
       "multiplies two matrices given as lists of rows",
       lambda a, b: [[sum(x * y for x, y in zip(r, c)) for c in zip(*b)] for r in a],
       ([[1, 2], [3, 4]], [[5, 6], [7, 8]]), ([[2]], [[3]])),
    task("diagonal_sums", "matrix: list[list[int]]", "tuple[int, int]",
       "returns the sums of the main and of the anti-diagonal of a square matrix",
       lambda matrix: (sum(matrix[i][i] for i in range(len(matrix))),
                       sum(matrix[i][-1 - i] for i in range(len(matrix)))),
       ([[1, 2], [3, 4]],), ([[5]],)),
    task("count_islands", "grid: list[list[int]]", "int",
       "counts groups of 1-cells connected horizontally or vertically", _islands,
       ([[1, 1, 0], [0, 0, 1], [1, 0, 1]],), ([[0]],)),
    task("shortest_path_length", "n: int, edges: list[tuple[int, int]], src: int, dst: int",
       "int", "returns the number of edges on a shortest path between two nodes of an "
       "undirected graph, or -1 if they are not connected", _shortest_path_len,
       (4, [(0, 1), (1, 2), (2, 3), (0, 2)], 0, 3), (3, [(0, 1)], 0, 2)),
    task("topological_order", "n: int, edges: list[tuple[int, int]]", "list[int]",
       "returns an order of nodes 0..n-1 in which every edge (a, b) has a before b, always "
       "taking the smallest ready node, or [] if there is a cycle", _topo_order,
       (4, [(0, 1), (0, 2), (1, 3), (2, 3)]), (2, [(0, 1), (1, 0)])),
    task("neighbours_sum", "grid: list[list[int]], r: int, c: int", "int",
       "returns the sum of the up to eight cells around cell (r, c)",
       lambda grid, r, c: sum(grid[y][x] for y in range(max(r - 1, 0), min(r + 2, len(grid)))
                              for x in range(max(c - 1, 0), min(c + 2, len(grid[0])))
                              if (y, x) != (r, c)),
       ([[1, 2, 3], [4, 5, 6], [7, 8, 9]], 1, 1), ([[1, 2], [3, 4]], 0, 0)),
    # ---- dates, units, formatting ----
    task("is_leap_year", "year: int", "bool", "checks whether a Gregorian year is a leap year",
       lambda year: year % 4 == 0 and (year % 100 != 0 or year % 400 == 0), (2024,), (1900,)),
    task("seconds_to_hms", "seconds: int", "str",
       "formats a number of seconds as H:MM:SS",
       lambda seconds: f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}",
       (3725,), (59,)),
    task("human_bytes", "n: int", "str",
       "formats a byte count with one decimal and the unit B, KiB, MiB or GiB (powers of 1024)",
       _human_bytes, (1536,), (10,)),
    task("day_of_year", "year: int, month: int, day: int", "int",
       "returns the day number within the year (January 1st is 1)",
       lambda year, month, day: sum([31, 29 if year % 4 == 0 and (year % 100 != 0 or
                                                                 year % 400 == 0) else 28,
                                     31, 30, 31, 30, 31, 31, 30, 31, 30, 31][:month - 1]) + day,
       (2023, 3, 1), (2024, 12, 31)),
    task("format_table", "rows: list[list[str]]", "str",
       "left-aligns the columns of rows of strings, separating columns by two spaces and "
       "lines by newlines",
       lambda rows: "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, [
           max(len(x[i]) for x in rows) for i in range(len(rows[0]))])).rstrip() for r in rows),
       ([["name", "qty"], ["apple", "3"]],), ([["x"]],)),
    task("percent_change", "old: float, new: float", "float",
       "returns the percentage change from old to new rounded to one decimal",
       lambda old, new: round((new - old) / old * 100, 1), (80.0, 100.0), (50.0, 45.0)),
)

@dataclasses.dataclass(frozen=True)
class Described:
    """A task given in words only (no reference implementation, so its stub shows no
    doctests): more kinds of code for the same three phrasings, cheap to write."""
    name: str
    params: str
    returns: str
    does: str


def _d(name, params, returns, does):
    return Described(name, params, returns, does)


DESCRIBED: tuple[Described, ...] = (
    # ---- text and parsing ----
    _d("parse_csv_line", "line: str", "list[str]",
       "splits one CSV line into fields, honouring double-quoted fields that contain commas"),
    _d("slugify", "title: str", "str",
       "turns a title into a lower-case URL slug with words joined by hyphens and "
       "punctuation removed"),
    _d("count_sentences", "text: str", "int",
       "counts the sentences of a text, treating '.', '!' and '?' as sentence ends"),
    _d("longest_word", "text: str", "str",
       "returns the longest word of a text, the first one when several tie"),
    _d("censor_words", "text: str, banned: list[str]", "str",
       "replaces every banned word in a text by asterisks of the same length, ignoring case"),
    _d("wrap_in_box", "lines: list[str]", "str",
       "draws a box of '+', '-' and '|' characters around the given lines of text"),
    _d("extract_hashtags", "post: str", "list[str]",
       "returns the distinct hashtags of a social media post in order of first appearance"),
    _d("is_pangram", "sentence: str", "bool",
       "tells whether a sentence uses every letter of the English alphabet"),
    _d("parse_duration", "text: str", "int",
       "converts a duration such as '1h 30m 15s' into a number of seconds"),
    _d("template_fill", "template: str, values: dict[str, str]", "str",
       "replaces each {key} placeholder of a template by its value, leaving unknown keys as they are"),
    _d("justify_line", "words: list[str], width: int", "str",
       "spreads words over exactly width characters by widening the gaps from the left"),
    _d("count_words_by_letter", "text: str", "dict[str, int]",
       "counts the words of a text by their lower-cased first letter"),
    _d("remove_duplicate_spaces", "text: str", "str",
       "collapses runs of whitespace into single spaces and trims both ends"),
    _d("vowel_ratio", "word: str", "float",
       "returns the fraction of the letters of a word that are vowels"),
    _d("morse_encode", "text: str", "str",
       "encodes letters and digits in Morse code, letters separated by spaces and words by ' / '"),
    _d("parse_query_string", "query: str", "dict[str, list[str]]",
       "parses a URL query string such as 'a=1&b=2&a=3' into a dict of value lists"),
    _d("initials", "full_name: str", "str",
       "returns the initials of a full name with a dot after each, such as 'A. B. C.'"),
    _d("pig_latin", "sentence: str", "str", "translates each word of a sentence into Pig Latin"),
    # ---- numbers ----
    _d("is_happy_number", "n: int", "bool",
       "tells whether repeatedly summing the squares of the digits of n reaches 1"),
    _d("int_to_words", "n: int", "str",
       "spells a number from 0 to 999 in English words"),
    _d("luhn_valid", "card_number: str", "bool",
       "checks a card number with the Luhn checksum, ignoring spaces"),
    _d("nearest_square", "n: int", "int",
       "returns the perfect square closest to n, the smaller one on a tie"),
    _d("integer_sqrt", "n: int", "int",
       "computes the floor of the square root of a non-negative integer by binary search"),
    _d("triangle_kind", "a: float, b: float, c: float", "str",
       "classifies three side lengths as 'equilateral', 'isosceles', 'scalene' or 'invalid'"),
    _d("mean_and_stdev", "values: list[float]", "tuple[float, float]",
       "returns the mean and the population standard deviation of a list of numbers"),
    _d("loan_payment", "principal: float, annual_rate: float, years: int", "float",
       "returns the monthly payment of a fixed-rate loan, rounded to cents"),
    _d("gcd_steps", "a: int, b: int", "int",
       "counts the division steps Euclid's algorithm takes to find the gcd of a and b"),
    _d("digits_product", "n: int", "int", "multiplies the decimal digits of a positive integer"),
    _d("next_palindrome", "n: int", "int", "returns the smallest palindromic number greater than n"),
    _d("sieve_of_primes", "limit: int", "list[int]",
       "lists the primes up to limit with the sieve of Eratosthenes"),
    _d("fraction_to_decimal", "numerator: int, denominator: int", "str",
       "writes a fraction as a decimal string, putting a repeating part in parentheses"),
    _d("weighted_average", "values: list[float], weights: list[float]", "float",
       "returns the weighted average of values, raising ValueError when the weights sum to zero"),
    _d("percentile", "values: list[float], p: float", "float",
       "returns the p-th percentile of values using linear interpolation between ranks"),
    _d("clamp_all", "values: list[float], low: float, high: float", "list[float]",
       "limits every value of a list to the range from low to high"),
    # ---- lists and algorithms ----
    _d("chunked_sum", "xs: list[int], size: int", "list[int]",
       "sums consecutive chunks of the given size, the last chunk possibly shorter"),
    _d("find_peaks", "xs: list[int]", "list[int]",
       "returns the indices of the elements larger than both of their neighbours"),
    _d("longest_consecutive_run", "xs: list[int]", "int",
       "returns the length of the longest run of consecutive integers in an unsorted list"),
    _d("three_sum_zero", "xs: list[int]", "list[tuple[int, int, int]]",
       "lists the distinct sorted triples of elements that add up to zero"),
    _d("rotate_right_in_place", "xs: list[int], k: int", "None",
       "rotates a list k steps to the right in place using three reversals"),
    _d("stable_unique_sorted", "xs: list[int]", "list[int]",
       "returns the distinct elements of a list in ascending order"),
    _d("merge_k_sorted", "lists: list[list[int]]", "list[int]",
       "merges several sorted lists into one sorted list using a heap"),
    _d("bubble_sort", "xs: list[int]", "list[int]",
       "sorts a copy of a list with bubble sort, stopping early when a pass swaps nothing"),
    _d("insertion_sort", "xs: list[int]", "list[int]", "sorts a copy of a list with insertion sort"),
    _d("quickselect", "xs: list[int], k: int", "int",
       "returns the k-th smallest element of a list (k from 1) with quickselect"),
    _d("longest_palindromic_substring", "s: str", "str",
       "returns the longest palindromic substring of s by expanding around centres"),
    _d("min_meeting_rooms", "meetings: list[tuple[int, int]]", "int",
       "returns how many rooms are needed so that no two overlapping meetings share a room"),
    _d("knapsack_value", "weights: list[int], values: list[int], capacity: int", "int",
       "returns the best total value of items fitting in the capacity, each item used at most once"),
    _d("count_paths_with_obstacles", "grid: list[list[int]]", "int",
       "counts right/down paths from the top-left to the bottom-right cell avoiding cells marked 1"),
    _d("jump_game", "steps: list[int]", "bool",
       "tells whether the last index can be reached when each element is the longest jump from it"),
    _d("trap_rain_water", "heights: list[int]", "int",
       "computes how much water is trapped between bars of the given heights"),
    _d("subsets_with_sum", "xs: list[int], target: int", "list[list[int]]",
       "lists the subsets of distinct positive integers that add up to target"),
    _d("permutations_of", "items: list[str]", "list[list[str]]",
       "returns all orderings of the items without using itertools"),
    _d("matrix_determinant", "m: list[list[float]]", "float",
       "computes the determinant of a square matrix by Gaussian elimination"),
    _d("flood_fill", "image: list[list[int]], row: int, col: int, colour: int", "list[list[int]]",
       "repaints the region connected to a cell with a new colour and returns the image"),
    _d("word_ladder_length", "start: str, end: str, words: list[str]", "int",
       "returns the number of words in the shortest chain from start to end changing one letter "
       "at a time, or 0"),
    _d("dijkstra_distances", "graph: dict[str, dict[str, int]], source: str", "dict[str, int]",
       "returns the shortest distance from source to every reachable node of a weighted graph"),
    _d("has_cycle", "edges: list[tuple[int, int]], n: int", "bool",
       "tells whether a directed graph with nodes 0..n-1 contains a cycle"),
    _d("connected_components", "n: int, edges: list[tuple[int, int]]", "int",
       "counts the connected components of an undirected graph with union-find"),
    # ---- records, dates and files ----
    _d("group_by_key", "records: list[dict], key: str", "dict",
       "groups a list of dicts by the value of one key, keeping the records' order"),
    _d("sort_by_two_keys", "people: list[dict]", "list[dict]",
       "sorts people by age descending, then by name ascending"),
    _d("merge_dicts_deep", "a: dict, b: dict", "dict",
       "merges two nested dicts, b's values winning, without changing either input"),
    _d("flatten_dict", "d: dict, sep: str = '.'", "dict",
       "flattens a nested dict into one level with keys joined by sep"),
    _d("count_by_weekday", "dates: list[str]", "dict[str, int]",
       "counts ISO dates ('2024-05-01') by the name of their weekday"),
    _d("days_between", "start: str, end: str", "int",
       "returns the number of days between two ISO dates"),
    _d("add_business_days", "start: str, days: int", "str",
       "adds a number of working days (Monday to Friday) to an ISO date"),
    _d("parse_log_levels", "lines: list[str]", "dict[str, int]",
       "counts log lines such as '2024-01-01 12:00 ERROR disk full' by their level"),
    _d("read_key_value_file", "path: str", "dict[str, str]",
       "reads 'key = value' lines from a text file, skipping blank lines and '#' comments"),
    _d("word_count_file", "path: str", "int", "counts the words of a text file"),
    _d("csv_column_sum", "path: str, column: str", "float",
       "sums one numeric column of a CSV file with a header row"),
    _d("invoice_total", "items: list[tuple[str, int, float]], tax_rate: float", "float",
       "returns the total of (name, quantity, unit price) lines plus tax, rounded to cents"),
    _d("grade_letter", "score: float", "str",
       "maps a score out of 100 to a letter grade A, B, C, D or F"),
    _d("validate_password", "password: str", "list[str]",
       "returns the rules a password breaks: length under 8, no digit, no upper-case letter, "
       "no symbol"),
    _d("inventory_update", "stock: dict[str, int], orders: list[tuple[str, int]]", "dict[str, int]",
       "applies orders to a stock count, raising ValueError when an item would go negative"),
    # ---- classes ----
    _d("Stack", "", "None",
       "has push, pop, peek and is_empty methods backed by a list"),
    _d("BankAccount", "owner: str, balance: float = 0.0", "None",
       "has deposit, withdraw (refusing overdrafts) and a transaction history"),
    _d("LRUCache", "capacity: int", "None",
       "has get and put and evicts the least recently used key when full"),
    _d("Vector2D", "x: float, y: float", "None",
       "supports +, -, multiplication by a number, length and dot product"),
    _d("TodoList", "", "None",
       "adds, completes and lists tasks, listing open tasks first"),
    _d("Temperature", "celsius: float", "None",
       "has fahrenheit and kelvin properties, each with a setter"),
)


def is_class(task: Described) -> bool:
    return task.name[0].isupper()


def described_stub(task: Described) -> str:
    if is_class(task):
        init = ", ".join(["self"] + ([task.params] if task.params else []))
        header = "\n".join([f"class {task.name}:", f'    """A class that {task.does}."""', "",
                            f"    def __init__({init}):"])
    else:
        doc = task.does[0].upper() + task.does[1:]
        header = "\n".join([f"def {task.name}({task.params}) -> {task.returns}:",
                            f'    """{doc}."""'])
    return STUB_PLAIN.format(header=header)


def described_request(task: Described) -> str:
    if is_class(task):
        return CLASS_REQUEST.format(name=task.name, does=task.does)
    return REQUEST.format(name=task.name, params=task.params, returns=task.returns, does=task.does)


def described_explain(task: Described) -> str:
    if is_class(task):
        return CLASS_EXPLAIN.format(name=task.name, does=task.does)
    return EXPLAIN.format(name=task.name, params=task.params, does=task.does)


STUB = ("Write a solution to the following problem and make sure that it passes the tests:\n"
        "```python\n{header}\n```")
STUB_PLAIN = "Complete the following Python code:\n```python\n{header}\n```"
REQUEST = "Write a Python function `{name}({params}) -> {returns}` that {does}."
EXPLAIN = ("Implement {name}({params}) in Python: a function that {does}. Explain your "
           "approach in two or three sentences, then give the code.")
CLASS_REQUEST = "Write a Python class `{name}` that {does}."
CLASS_EXPLAIN = ("Implement a Python class {name} that {does}. Explain the design in two or "
                 "three sentences, then give the code.")


def doctest_lines(task: Task) -> list[str]:
    """`>>> call` / result pairs, the results computed by the reference implementation."""
    out = []
    for args in task.examples:
        call, got = f"{task.name}({', '.join(repr(a) for a in args)})", task.impl(*args)
        if got is None:    # doctest prints nothing for None: show the check instead
            call, got = f"{call} is None", True
        out += [f"    >>> {call}", f"    {got!r}"]
    return out


def stub(task: Task) -> str:
    doc = task.does[0].upper() + task.does[1:]
    header = "\n".join([f"def {task.name}({task.params}) -> {task.returns}:",
                        f'    """{doc}.', *doctest_lines(task), '    """'])
    return STUB.format(header=header)


def prompts(tasks: Sequence[Task] = TASKS, described: Sequence[Described] = DESCRIBED) -> list[str]:
    """Every task in the three phrasings, phrasing-major (a prefix of the file is a mix of
    tasks in one phrasing, so ``regenerate --max_samples`` still covers many tasks)."""
    out = [stub(t) for t in tasks] + [described_stub(t) for t in described]
    out += [REQUEST.format(name=t.name, params=t.params, returns=t.returns, does=t.does)
            for t in tasks] + [described_request(t) for t in described]
    out += [EXPLAIN.format(name=t.name, params=t.params, does=t.does)
            for t in tasks] + [described_explain(t) for t in described]
    return out


WORD_PROBLEM_STUB = ('Complete the following Python code:\n```python\n'
                     'def solution() -> float:\n    """{doc}\n\n'
                     '    Returns the answer to the problem above.\n    """\n```')
WORD_PROBLEM_REQUEST = ("Write a Python function `solution()` that computes and returns the "
                        "answer to this word problem. Use one well-named variable per quantity "
                        "and a short comment for each step.\n\n{question}")
# gsm8k-train's instruction to the math answer, which a code prompt must not carry.
_MATH_SUFFIX = re.compile(r"\s*Please reason step by step.*$", re.S)


def word_problem_prompts(questions: Sequence[str]) -> list[str]:
    """One code prompt per word problem, stub and request alternately."""
    out = []
    for i, q in enumerate(questions):
        q = _MATH_SUFFIX.sub("", q).strip()
        if i % 2 == 0:
            doc = textwrap.fill(q, width=84, subsequent_indent="    ")
            out.append(WORD_PROBLEM_STUB.format(doc=doc))
        else:
            out.append(WORD_PROBLEM_REQUEST.format(question=q))
    return out


def write(path: str, word_problems: str | None = None) -> int:
    """Writes the prompt JSONL atomically (the tasks, or one code prompt per problem in
    the ``word_problems`` prompt file); returns the number of prompts."""
    if word_problems is None:
        return write_user_prompts(path, prompts())
    questions = [conv[0]["content"] for _, conv in read_conversations(word_problems)]
    return write_user_prompts(path, word_problem_prompts(questions))


def main(argv=None) -> int:
    fv = flags.FlagValues()
    flags.DEFINE_string("output", None, "Prompt JSONL to write.", flag_values=fv, required=True)
    flags.DEFINE_string("word_problems", None, "A prompt JSONL of math word problems (e.g. "
                        "gsm8k_train.jsonl): write one code prompt per problem instead of the "
                        "task set.", flag_values=fv)
    args = cli.parse(fv, argv, __doc__)
    n = write(args.output, args.word_problems)
    what = (f"from the word problems in {args.word_problems}" if args.word_problems
            else f"{len(TASKS) + len(DESCRIBED)} tasks x 3 phrasings")
    print(f"wrote {n} prompts ({what}) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
