"""Families of small code tasks, crossed from parts: more humaneval-style stubs.

``code_prompts.TASKS`` are ~150 tasks written one by one; a draft needs many more
function stubs with doctests to learn how the target writes such code. Here a task is a
predicate (even numbers, vowels, ...) crossed with an operation (keep, count, sum, the
first index, ...), each part with its own words, name and reference implementation, plus
families over words, pairs of lists and running windows. The tasks are ``Task`` rows like
the hand-written ones, so they are phrased (stub / request / explanation) and checked
(doctests true, no name or eight-word run shared with a code eval set) the same way.

    python -m deepspec_jax.data.code_families --output=data/smollm2/s25/code_families.jsonl
"""

from __future__ import annotations

import math
import string
import sys
from collections import Counter
from typing import Any, Callable

from absl import flags

from deepspec_jax import cli
from deepspec_jax.data.code_prompts import Task, prompts, task
from deepspec_jax.data.jsonl import write_user_prompts

# ---- integer lists: predicate x operation --------------------------------------------

# (name part, "the ___ numbers" words, test, extra parameter or None)
_INT_PREDICATES: tuple[tuple[str, str, Callable[..., bool], str | None], ...] = (
    ("even", "even numbers", lambda x: x % 2 == 0, None),
    ("odd", "odd numbers", lambda x: x % 2 != 0, None),
    ("positive", "positive numbers", lambda x: x > 0, None),
    ("negative", "negative numbers", lambda x: x < 0, None),
    ("prime", "prime numbers", lambda x: x > 1 and all(x % d for d in range(2, math.isqrt(x) + 1)),
     None),
    ("square", "perfect squares", lambda x: x >= 0 and math.isqrt(x) ** 2 == x, None),
    ("single_digit", "numbers between -9 and 9", lambda x: -9 <= x <= 9, None),
    ("multiple", "multiples of k", lambda x, k: x % k == 0, "k: int"),
    ("above", "numbers greater than limit", lambda x, t: x > t, "limit: int"),
    ("below", "numbers smaller than limit", lambda x, t: x < t, "limit: int"),
)

# (name template, return type, "a function that ___" words, implementation over the kept
# values and the whole list)
_INT_OPS: tuple[tuple[str, str, str, Callable[[list, list, Callable], Any]], ...] = (
    ("only_{p}", "list[int]", "returns the {w} of xs in their original order",
     lambda kept, xs, f: kept),
    ("without_{p}", "list[int]", "returns xs with every one of its {w} taken out",
     lambda kept, xs, f: [x for x in xs if not f(x)]),
    ("how_many_{p}", "int", "counts the {w} in xs", lambda kept, xs, f: len(kept)),
    ("total_of_{p}", "int", "adds up the {w} in xs (0 when there are none)",
     lambda kept, xs, f: sum(kept)),
    ("biggest_of_{p}", "int | None", "returns the largest of the {w} in xs, or None if xs "
     "holds none", lambda kept, xs, f: max(kept) if kept else None),
    ("smallest_of_{p}", "int | None", "returns the smallest of the {w} in xs, or None if xs "
     "holds none", lambda kept, xs, f: min(kept) if kept else None),
    ("where_first_{p}", "int", "returns the position of the first of the {w} in xs, or -1",
     lambda kept, xs, f: next((i for i, x in enumerate(xs) if f(x)), -1)),
    ("every_one_{p}", "bool", "tells whether xs holds only {w} (True for an empty list)",
     lambda kept, xs, f: all(f(x) for x in xs)),
    ("holds_some_{p}", "bool", "tells whether xs holds at least one of the {w}",
     lambda kept, xs, f: bool(kept)),
    ("squared_{p}", "list[int]", "returns the square of each of the {w} in xs, in order",
     lambda kept, xs, f: [x * x for x in kept]),
)

_INT_EXAMPLES = ([3, 8, -4, 11, 0, 25, 6], [-7, 2, 9, 16, 13], [], [5, 5, 10, -3, 4])
_EXTRA_VALUES = {"k: int": (3, 2, 4, 5), "limit: int": (5, 0, 3, 9)}


def _int_task(pred, op) -> Task:
    pname, words, test, extra = pred
    oname, returns, does, impl = op
    params = "xs: list[int]" + (f", {extra}" if extra else "")
    if extra is None:
        fn = lambda xs: impl([x for x in xs if test(x)], xs, test)            # noqa: E731
        examples = tuple((list(xs),) for xs in _INT_EXAMPLES)
    else:
        def fn(xs, v, _impl=impl, _test=test):
            f = lambda x: _test(x, v)                                          # noqa: E731
            return _impl([x for x in xs if f(x)], xs, f)
        examples = tuple((list(xs), v) for xs, v in zip(_INT_EXAMPLES, _EXTRA_VALUES[extra]))
    return Task(oname.format(p=pname), params, returns, does.format(w=words), fn, examples)


# ---- strings: character class x operation --------------------------------------------

_CHAR_CLASSES: tuple[tuple[str, str, Callable[[str], bool]], ...] = (
    ("vowel", "vowels (a, e, i, o, u in either case)", lambda c: c.lower() in "aeiou"),
    ("consonant", "consonants (letters that are not vowels)",
     lambda c: c.isalpha() and c.isascii() and c.lower() not in "aeiou"),
    ("digit", "digits", lambda c: c.isdigit()),
    ("upper", "upper-case letters", lambda c: c.isupper()),
    ("lower", "lower-case letters", lambda c: c.islower()),
    ("space", "whitespace characters", lambda c: c.isspace()),
    ("punct", "punctuation marks", lambda c: c in string.punctuation),
    ("letter", "letters", lambda c: c.isalpha()),
)

_CHAR_OPS: tuple[tuple[str, str, str, Callable[[str, Callable], Any]], ...] = (
    ("tally_{c}s", "int", "counts the {w} in text", lambda s, f: sum(map(f, s))),
    ("strip_{c}s", "str", "returns text with all of its {w} removed",
     lambda s, f: "".join(c for c in s if not f(c))),
    ("just_{c}s", "str", "returns only the {w} of text, in order",
     lambda s, f: "".join(c for c in s if f(c))),
    ("mask_{c}s", "str", "returns text with each of its {w} replaced by '*'",
     lambda s, f: "".join("*" if f(c) else c for c in s)),
    ("first_{c}_at", "int", "returns the index of the first of the {w} in text, or -1",
     lambda s, f: next((i for i, c in enumerate(s) if f(c)), -1)),
    ("has_any_{c}", "bool", "tells whether text contains any of the {w}",
     lambda s, f: any(map(f, s))),
    ("made_of_{c}s", "bool", "tells whether text is non-empty and consists of {w} only",
     lambda s, f: bool(s) and all(map(f, s))),
)

_TEXT_EXAMPLES = ("Hello, World 42!", "abc", "", "Room 7B: OPEN at 9am.")


def _char_task(cls, op) -> Task:
    cname, words, test = cls
    oname, returns, does, impl = op
    fn = lambda text: impl(text, test)                                         # noqa: E731
    return Task(oname.format(c=cname), "text: str", returns, does.format(w=words), fn,
                tuple((t,) for t in _TEXT_EXAMPLES))


# ---- words, pairs of lists, windows and mappings: written one by one -----------------

_S1, _S2 = "the quick brown fox jumps over the lazy dog", "Python is fun and Python is fast"


def _most_frequent_word(s):
    words = s.lower().split()
    if not words:
        return ""
    counts = Counter(words)
    return max(words, key=lambda w: (counts[w], -words.index(w)))


def _moving_average(xs, k):
    return [round(sum(xs[i:i + k]) / k, 2) for i in range(len(xs) - k + 1)]


def _chunk(xs, k):
    return [xs[i:i + k] for i in range(0, len(xs), k)]


def _rotate(xs, k):
    return xs[k % len(xs):] + xs[:k % len(xs)] if xs else []


def _second_biggest(xs):
    distinct = sorted(set(xs))
    return distinct[-2] if len(distinct) > 1 else None


_WRITTEN: tuple[Task, ...] = (
    task("longest_word_in", "sentence: str", "str", "returns the longest word of sentence, the "
       "first one on a tie, or '' for an empty sentence",
       lambda s: max(s.split(), key=len, default=""), (_S1,), ("a bb cc d",), ("",)),
    task("shortest_word_in", "sentence: str", "str", "returns the shortest word of sentence, the "
       "first one on a tie, or '' for an empty sentence",
       lambda s: min(s.split(), key=len, default=""), (_S1,), ("aa b cc d",), ("",)),
    task("capitalise_each_word", "sentence: str", "str", "returns sentence with the first letter "
       "of every word in upper case and single spaces between words",
       lambda s: " ".join(w[:1].upper() + w[1:] for w in s.split()), (_S1,), ("  hi   there ",)),
    task("mirror_each_word", "sentence: str", "str", "reverses the letters of every word but "
       "keeps the words in their order", lambda s: " ".join(w[::-1] for w in s.split()),
       (_S1,), ("ab cd",), ("",)),
    task("words_backwards", "sentence: str", "str", "returns the words of sentence in reverse "
       "order, joined by single spaces", lambda s: " ".join(s.split()[::-1]), (_S2,), ("one",)),
    task("count_long_words", "sentence: str, n: int", "int", "counts the words of sentence that "
       "have more than n letters", lambda s, n: sum(len(w) > n for w in s.split()),
       (_S1, 4), (_S2, 3), ("", 1)),
    task("words_beginning_with", "sentence: str, letter: str", "list[str]", "returns the words "
       "of sentence that begin with letter, ignoring case",
       lambda s, c: [w for w in s.split() if w[:1].lower() == c.lower()],
       (_S2, "p"), (_S1, "t"), (_S1, "z")),
    task("initials_of", "phrase: str", "str", "returns the upper-case first letters of the words "
       "of phrase", lambda s: "".join(w[0].upper() for w in s.split()),
       ("portable network graphics",), ("as soon as possible",), ("",)),
    task("words_by_length", "sentence: str", "list[str]", "returns the words of sentence sorted "
       "from shortest to longest, keeping the original order among equal lengths",
       lambda s: sorted(s.split(), key=len), (_S1,), ("ccc a bb",)),
    task("distinct_words_in_order", "sentence: str", "list[str]", "returns each word of sentence "
       "once, ignoring case, in the order it first appears (lower-cased)",
       lambda s: list(dict.fromkeys(w.lower() for w in s.split())), (_S2,), ("A a B b a",)),
    task("most_frequent_word", "sentence: str", "str", "returns the word that occurs most often "
       "in sentence, ignoring case (the earliest on a tie), or '' for an empty sentence",
       _most_frequent_word, (_S2,), (_S1,), ("",)),
    task("add_pairwise", "a: list[int], b: list[int]", "list[int]", "returns the sums of the "
       "numbers at the same positions of a and b, as far as the shorter list goes",
       lambda a, b: [x + y for x, y in zip(a, b)], ([1, 2, 3], [10, 20, 30]), ([5, 1], [2])),
    task("dot_of", "a: list[int], b: list[int]", "int", "returns the sum of the products of the "
       "numbers at the same positions of a and b", lambda a, b: sum(x * y for x, y in zip(a, b)),
       ([1, 2, 3], [4, 5, 6]), ([], [])),
    task("alternate_items", "a: list, b: list", "list", "takes items from a and b in turn, then "
       "appends what is left of the longer list",
       lambda a, b: [x for p in zip(a, b) for x in p] + a[len(b):] + b[len(a):],
       ([1, 2, 3], ["x", "y"]), ([], [7])),
    task("pair_up_as_dict", "keys: list[str], values: list[int]", "dict[str, int]", "maps each "
       "key to the value at the same position, ignoring extra values",
       lambda k, v: dict(zip(k, v)), (["a", "b"], [1, 2, 3]), ([], [])),
    task("in_both", "a: list[int], b: list[int]", "list[int]", "returns the numbers found in both "
       "lists, each once, sorted ascending", lambda a, b: sorted(set(a) & set(b)),
       ([4, 1, 3, 1], [3, 4, 5]), ([1], [2])),
    task("only_in_first", "a: list[int], b: list[int]", "list[int]", "returns the numbers of a "
       "that b does not contain, in a's order", lambda a, b: [x for x in a if x not in set(b)],
       ([4, 1, 3, 1], [3, 4, 5]), ([], [1])),
    task("steps_between", "xs: list[int]", "list[int]", "returns the difference between each "
       "number and the one before it", lambda xs: [b - a for a, b in zip(xs, xs[1:])],
       ([1, 4, 9, 16],), ([5],)),
    task("running_totals", "xs: list[int]", "list[int]", "returns the cumulative sums of xs",
       lambda xs: [sum(xs[:i + 1]) for i in range(len(xs))], ([3, 1, 4, 1, 5],), ([],)),
    task("running_maximum", "xs: list[int]", "list[int]", "returns, for each position, the "
       "largest number seen so far", lambda xs: [max(xs[:i + 1]) for i in range(len(xs))],
       ([3, 1, 4, 1, 5, 2],), ([],)),
    task("window_means", "xs: list[float], k: int", "list[float]", "returns the mean of every run "
       "of k consecutive numbers, rounded to two decimals", _moving_average,
       ([1, 2, 3, 4, 5], 2), ([10, 0, 5], 3), ([1], 2)),
    task("cut_into_pieces", "xs: list, k: int", "list[list]", "splits xs into consecutive "
       "pieces of k items, the last piece possibly shorter", _chunk,
       ([1, 2, 3, 4, 5], 2), ([], 3)),
    task("shift_left", "xs: list, k: int", "list", "rotates xs k places to the left",
       _rotate, ([1, 2, 3, 4, 5], 2), ([1, 2], 5), ([], 1)),
    task("drop_repeats", "xs: list", "list", "removes repeated items, keeping the first "
       "occurrence of each in order", lambda xs: list(dict.fromkeys(xs)),
       ([3, 1, 3, 2, 1],), (["a", "b", "a"],)),
    task("runner_up", "xs: list[int]", "int | None", "returns the second largest distinct number "
       "of xs, or None if there is no such number", _second_biggest,
       ([4, 9, 2, 9],), ([7, 7],), ([],)),
    task("tally_items", "xs: list[str]", "dict[str, int]", "counts how often each item occurs",
       lambda xs: dict(Counter(xs)), (["a", "b", "a"],), ([],)),
    task("swap_keys_and_values", "d: dict[str, int]", "dict[int, str]", "returns a dict that maps "
       "each value of d back to its key (a later key wins on a repeated value)",
       lambda d: {v: k for k, v in d.items()}, ({"a": 1, "b": 2},), ({"x": 1, "y": 1},)),
    task("keys_of_largest", "d: dict[str, int]", "list[str]", "returns the keys holding the "
       "largest value, sorted, or [] for an empty dict",
       lambda d: sorted(k for k, v in d.items() if v == max(d.values())) if d else [],
       ({"a": 3, "b": 7, "c": 7},), ({},)),
    task("keep_entries_above", "d: dict[str, int], limit: int", "dict[str, int]", "keeps the "
       "entries of d whose value is above limit", lambda d, t: {k: v for k, v in d.items()
                                                                   if v > t},
       ({"a": 3, "b": 7, "c": 5}, 4), ({}, 0)),
    task("keys_sorted_by_value", "d: dict[str, int]", "list[str]", "returns the keys of d "
       "ordered by their values, smallest first, ties by key",
       lambda d: sorted(d, key=lambda k: (d[k], k)), ({"b": 2, "a": 2, "c": 1},), ({},)),
)


def family_tasks() -> tuple[Task, ...]:
    """Every crossed task, then the written ones: 100 + 56 + len(_WRITTEN)."""
    tasks = [_int_task(p, o) for o in _INT_OPS for p in _INT_PREDICATES]
    tasks += [_char_task(c, o) for o in _CHAR_OPS for c in _CHAR_CLASSES]
    return tuple(tasks) + _WRITTEN


def write(path: str) -> int:
    """Writes every family task in the three phrasings (stub with doctests, request,
    explanation) as a prompt JSONL, atomically; returns the number of prompts."""
    return write_user_prompts(path, prompts(family_tasks(), described=()))


def main(argv=None) -> int:
    fv = flags.FlagValues()
    flags.DEFINE_string("output", None, "Prompt JSONL to write.", flag_values=fv, required=True)
    args = cli.parse(fv, argv, __doc__)
    n = write(args.output)
    print(f"wrote {n} prompts ({len(family_tasks())} tasks x 3 phrasings) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
