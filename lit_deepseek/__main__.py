"""Console entry point `lit-deepseek`.

Training subcommands (fit, validate, test) go through LitDeepSeekCLI; tool subcommands
(summary, prepare-data, convert, generate) are plain functions with their own flags.
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


def _generate(argv: list[str]) -> int:
    from lit_deepseek.generate import generate_main

    return generate_main(argv)


TOOLS: dict[str, Callable[[list[str]], int]] = {
    "summary": _summary,
    "plan": _plan,
    "prepare-data": _prepare_data,
    "convert": _convert,
    "generate": _generate,
}


SUBCOMMANDS: dict[str, str] = {
    "fit": "train a model (config sections model, parallel, training, data, checkpoint, logging, trainer)",
    "validate": "validation loss and perplexity of a checkpoint on data.val_shards",
    "test": "test loss and perplexity of a checkpoint on data.test_shards",
    "summary": "parameters, parallel layout and estimated memory per GPU of a config",
    "plan": "the parallel layouts that fit N GPUs of a given memory, fastest estimated step first",
    "prepare-data": "turn text, JSONL or Parquet files into tokenized webdataset shards with a manifest",
    "convert": "convert a checkpoint between the Hugging Face and the native layout, shard by shard",
}


def usage() -> str:
    """Top-level help: every subcommand with one line."""
    names = list(SUBCOMMANDS) + [name for name in TOOLS if name not in SUBCOMMANDS]
    width = max(len(n) for n in names) + 2
    lines = ["usage: lit-deepseek SUBCOMMAND [options]   (lit-deepseek SUBCOMMAND --help for its options)", "",
             "Train DeepSeek-V3-style models (MLA, DeepSeekMoE, MTP) with PyTorch Lightning.", "", "subcommands:"]
    for name in names:
        doc = SUBCOMMANDS.get(name) or next(iter((TOOLS[name].__doc__ or "").strip().splitlines()), "")
        lines.append(f"  {name:<{width}}{doc}")
    lines += ["", "example: lit-deepseek fit --config configs/cpu_demo.yaml"]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0
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
