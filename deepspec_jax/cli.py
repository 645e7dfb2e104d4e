"""Flag parsing shared by the package's data and conversion tools (absl flags).

Each tool defines its flags on its own ``flags.FlagValues`` rather than the global
``flags.FLAGS``, so tools can be imported together (tests, benchmarks, the trainer use
their library functions) without flag-name clashes, and ``main(argv)`` can be called
repeatedly: every parse starts from the defaults. A bad flag is one ``error:`` line on
stderr and exit code 2; ``--help`` prints the tool's docstring and flags.
``--flag=value`` and ``--flag value`` are both accepted.
"""

from __future__ import annotations

import sys
from typing import NoReturn, Sequence

from absl import flags

HELP = ("-h", "--help", "-help", "--helpfull")


def usage_error(msg: str) -> NoReturn:
    """One line on stderr, exit code 2 (a flag value is unusable)."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def parse(fv: flags.FlagValues, argv: Sequence[str] | None, doc: str) -> flags.FlagValues:
    """Parse ``argv`` (without the program name; None: ``sys.argv[1:]``) into ``fv``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in HELP for a in argv):
        print(f"{doc.strip()}\n\nflags:\n{fv.get_help(include_special_flags=False)}")
        raise SystemExit(0)
    fv.unparse_flags()
    try:
        rest = fv(["prog", *argv])
    except flags.Error as e:
        usage_error(str(e))
    if len(rest) > 1:
        usage_error(f"unexpected positional arguments {rest[1:]}; every option is a --flag "
                    "(see --help).")
    return fv
