"""A training command's run directory: one run per directory (a rerun resumes or overwrites, never mixes), and a
Ctrl-C that ends with the command that resumes."""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

from rlhf.config import ConfigError, current_command

# what a training run writes into its output directory; caches it may also hold there (the tiny pipeline, toy data)
# do not make it a run, and survive --overwrite_output_dir
RUN_OUTPUTS = ("config.yaml", "history.jsonl", "metrics.json", "timings.json", "training_curves.png", "eval_before.png",
               "eval_after.png", "eval_before_after.png", "eval_before_samples.safetensors",
               "eval_after_samples.safetensors", "checkpoints", "samples", "lora", "pairs", "logs", "model")
OVERWRITE_FLAG = "--overwrite_output_dir"


class RunInterrupted(Exception):
    """A training run stopped by Ctrl-C; the message says how to resume it."""


def previous_run_outputs(output_dir: str | Path) -> list[str]:
    """The entries of `output_dir` a training run wrote (empty when there is no earlier run)."""
    directory = Path(output_dir)
    return [name for name in RUN_OUTPUTS if (directory / name).exists()]


def claim_output_dir(output_dir: str | Path, *, resuming: bool, overwrite: bool, resume_flag: str) -> None:
    """Make `output_dir` this run's: an earlier run there is an error unless this run resumes it, or `overwrite`
    says to replace it (its outputs are deleted first, so history, checkpoints and curves never mix two runs)."""
    found = previous_run_outputs(output_dir)
    if not found or resuming:
        return
    if not overwrite:
        raise ConfigError(f"output_dir: {output_dir} already holds a run ({', '.join(found)}); resume it with "
                          f"{resume_flag}, replace it with {OVERWRITE_FLAG}, or choose another --output_dir")
    for name in found:
        path = Path(output_dir) / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def resume_command(argv: Sequence[str], resume_args: Sequence[str]) -> str:
    """The running command with `argv`, minus any earlier resume/overwrite flags, plus `resume_args`."""
    kept, skip = [], False
    flags = {resume_args[0], OVERWRITE_FLAG}
    for index, item in enumerate(argv):
        if skip:
            skip = False
            continue
        name = item.split("=")[0]
        if name in flags:
            # a flag's value follows unless it is given with "=" or the next item is another flag
            skip = "=" not in item and index + 1 < len(argv) and not argv[index + 1].startswith("--")
            continue
        kept.append(item)
    return " ".join([current_command(), *kept, *resume_args])


@contextmanager
def resumable(argv: Sequence[str], resume_args: Sequence[str], has_checkpoint: Callable[[], bool]) -> Iterator[None]:
    """Turn a Ctrl-C inside the block into `RunInterrupted` naming the command that resumes (`resume_args` added to
    this command's `argv`), or, before the first checkpoint, saying there is nothing to resume."""
    try:
        yield
    except KeyboardInterrupt:
        if has_checkpoint():
            message = f"interrupted; resume from the last checkpoint with:\n  {resume_command(argv, resume_args)}"
        else:
            message = (f"interrupted before the first checkpoint, nothing to resume; start again with:\n  "
                       f"{resume_command(argv, [OVERWRITE_FLAG])}")
        raise RunInterrupted(message) from None
