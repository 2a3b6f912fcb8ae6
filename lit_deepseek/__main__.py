"""Console entry point `lit-deepseek`.

Training subcommands (fit, validate, test) go through LitDeepSeekCLI; tool subcommands
(summary, prepare-data, convert) are plain functions with their own flags.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Optional

from lit_deepseek.config import ConfigError


def _summary(argv: list[str]) -> int:
    from lit_deepseek.cli import summary_main

    return summary_main(argv)


def _prepare_data(argv: list[str]) -> int:
    from lit_deepseek.data.prepare import prepare_data_cli

    return prepare_data_cli(argv)


def _plan(argv: list[str]) -> int:
    from lit_deepseek.planner import plan_main

    return plan_main(argv)


def _convert(argv: list[str]) -> int:
    from lit_deepseek.cli import convert_main

    return convert_main(argv)


TOOLS: dict[str, Callable[[list[str]], int]] = {
    "summary": _summary,
    "plan": _plan,
    "prepare-data": _prepare_data,
    "convert": _convert,
}


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        if args and args[0] in TOOLS:
            return TOOLS[args[0]](args[1:]) or 0
        from lit_deepseek.cli import LitDeepSeekCLI

        LitDeepSeekCLI(args=None if argv is None else args)
    except ConfigError as exc:
        print(f"lit-deepseek: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
