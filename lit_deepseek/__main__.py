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
    "generate": "sample text from a checkpoint or a Hugging Face directory (greedy, temperature, top-k/p)",
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
    if args[0] in TOOLS:
        try:
            return TOOLS[args[0]](args[1:]) or 0
        except ConfigError as exc:
            print(f"lit-deepseek: error: {_one_line(exc)}", file=sys.stderr)
            return 2
    return _train(None if argv is None else args)


def _train(args: Optional[list[str]]) -> int:
    """fit / validate / test; every expected failure ends in one line and a non-zero status."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from lit_deepseek.training.module import TrainingStopped

    try:
        from lit_deepseek.cli import LitDeepSeekCLI

        LitDeepSeekCLI(args=args)
    except ConfigError as exc:
        print(f"lit-deepseek: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except SIGTERMException as exc:
        path = getattr(exc, "checkpoint", None)
        saved = f"checkpoint saved to {path}; resume with --ckpt_path last" if path else "no checkpoint was saved"
        print(f"lit-deepseek: stopped by SIGTERM; {saved}", file=sys.stderr)
        return 143
    except TrainingStopped as exc:
        print(f"lit-deepseek: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    return 0


def _one_line(exc: BaseException) -> str:
    """The message of an error, also when a DataLoader worker wrapped it with its traceback."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text

if __name__ == "__main__":
    sys.exit(main())
