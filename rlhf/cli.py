"""The `rlhf` command: one entry point that dispatches to each sub-command's `main(argv)`."""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

# sub-command words -> "module:function"; each function takes the remaining argv and returns an exit code.
COMMANDS: dict[tuple[str, ...], str] = {
    ("score",): "rlhf.scoring:main",
    ("serve",): "rlhf.server:main",
    ("toy", "data"): "rlhf.toy:data_main",
    ("toy", "pretrain"): "rlhf.toy_pretrain:main",
    ("train", "reward"): "trainers.reward_model:main",
    ("eval", "reward"): "trainers.reward_model:eval_main",
    ("train", "ddpo"): "trainers.ddpo:main",
    ("search",): "rlhf.search:main",
    ("demo",): "rlhf.demo:main",
    ("train", "dpo"): "trainers.dpo:main",
    ("train", "alignprop"): "trainers.alignprop:main",
}


def _usage() -> str:
    lines = ["usage: rlhf COMMAND [--config FILE.yaml] [--field value ...]", "", "commands:"]
    lines += [f"  rlhf {' '.join(words)}" for words in COMMANDS]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for words, target in sorted(COMMANDS.items(), key=lambda item: -len(item[0])):
        if tuple(argv[: len(words)]) == words:
            module_name, function_name = target.split(":")
            command = getattr(importlib.import_module(module_name), function_name)
            try:
                return int(command(argv[len(words):]) or 0)
            except (ValueError, TypeError, FileNotFoundError) as exc:
                # errors a user controls (bad config, bad path, bad input) are told, not traced back
                print(f"rlhf {' '.join(words)}: error: {exc}", file=sys.stderr)
                return 2
    print(_usage(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
    return 0 if argv and argv[0] in ("-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main())
