"""The `rlhf` command: one entry point that dispatches to each sub-command's `main(argv)`, and plugs the toy world
into the commands that know nothing of it (`rlhf search`'s generator names, `rlhf train reward`'s toy data)."""

from __future__ import annotations

import difflib
import importlib
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from rlhf.config import ConfigError, running_command
from rlhf.runs import RunInterrupted

# sub-command words -> ("module:function", one-line description); each function takes the remaining argv and
# returns an exit code. A new command is one entry here.
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("score",): ("rlhf.rewards.scoring:main", "score images against prompts with a saved reward model"),
    ("serve",): ("rlhf.rewards.server:main", "serve a reward model over HTTP (POST /score)"),
    ("search",): ("rlhf.search:main", "inference-time search guided by a reward (best-of-N, zero-order, FK)"),
    ("demo",): ("trainers.demo:main", "the toy world end to end: reward model, DDPO and DPO, judged by oracles"),
    ("toy", "data"): ("rlhf.toy:data_main", "write toy-world preference data (JSONL + PNG)"),
    ("toy", "pretrain"): ("rlhf.toy.pretrain:main", "pre-train the toy generator on toy-world images"),
    ("train", "reward"): ("trainers.reward_model:main", "train LLaVA-Reward perspectives on preference data"),
    ("eval", "reward"): ("trainers.reward_model:eval_main", "evaluate a reward model's accuracy on preference data"),
    ("convert", "official"): ("rlhf.rewards.convert:main", "a released LLaVA-Reward checkpoint into a reward model directory"),
    ("train", "ddpo"): ("trainers.ddpo:main", "fine-tune a diffusion model with DDPO (PPO on DDIM log-probs)"),
    ("train", "grpo"): ("trainers.grpo:main", "fine-tune any generator family (SD, SD3, FLUX) with GRPO (group advantages)"),
    ("train", "dpo"): ("trainers.dpo:main", "fine-tune a diffusion model with Diffusion-DPO (offline or online)"),
    ("train", "alignprop"): ("trainers.alignprop:main", "fine-tune by reward back-propagation (AlignProp, DRaFT)"),
}
HELP = ("-h", "--help")
INTERRUPTED = 130  # the shell's code for a process ended by SIGINT


# generator names a command's `pretrained_model` may give (`rlhf search`, `rlhf train *`) -> the `rlhf.toy.generators`
# function giving the path (the committed toy generators, which the library does not know of); named, not imported,
# since that module loads diffusers, which `rlhf --help` should not wait for
GENERATOR_NAMES = {"toy": "toy_generator_path", "toy-flow": "toy_flow_generator_path"}


def generator_path(name: str) -> str:
    """The path a `GENERATOR_NAMES` name stands for; any other name is a path or hub id already."""
    if name not in GENERATOR_NAMES:
        return name
    from rlhf.toy import generators as toy_generators

    return str(getattr(toy_generators, GENERATOR_NAMES[name])())


@dataclass
class ToyDataConfig:
    """The toy world's preference data, the default data of `rlhf train reward` (configs/reward/toy.yaml)."""

    toy_data_dir: str = field(default="", metadata={"help": "Toy datasets directory, written if absent; "
                                                            "<dir>/<perspective>/train.jsonl and test.jsonl are the "
                                                            "data of a perspective naming none ('' = none)."})
    toy_data_n: int = field(default=512, metadata={"help": "Toy train rows per perspective."})
    toy_data_n_test: int = field(default=128, metadata={"help": "Toy test rows per perspective."})
    toy_data_seed: int = field(default=0, metadata={"help": "Toy data seed."})

    def default_data(self, perspective: str) -> tuple[str, str] | None:
        if not self.toy_data_dir:
            return None
        root = Path(self.toy_data_dir) / perspective
        return str(root / "train.jsonl"), str(root / "test.jsonl")

    def prepare(self) -> None:
        """Toy data of this size and seed in `toy_data_dir`: written when absent, rewritten when a manifest says it
        was written with other sizes; data of other sizes without a manifest (not known to be ours) is refused.
        Training silently on other data than the config's (512 rows for 4096) overfits and misreports."""
        if not self.toy_data_dir:
            return
        from rlhf.toy import PERSPECTIVES, toy_data_size, write_toy_datasets

        root = Path(self.toy_data_dir)
        wanted = {"n": self.toy_data_n, "n_test": self.toy_data_n_test, "seed": self.toy_data_seed}
        found = toy_data_size(root)
        if found is not None and all(found[key] in (wanted[key], None) for key in wanted):
            return
        if found is not None and found["seed"] is None:
            raise ConfigError(f"toy_data_dir: {root} holds {found['n']} train / {found['n_test']} test rows per "
                              f"perspective, the config asks for {wanted['n']} / {wanted['n_test']}; delete it, "
                              f"rewrite it (rlhf toy data --out {root} --n {wanted['n']} --n_test {wanted['n_test']} "
                              f"--seed {wanted['seed']}) or set toy_data_n / toy_data_n_test to match")
        if found is not None:
            print(f"{root} holds toy data written with {found}; the config asks for {wanted}: rewriting it")
            for name in PERSPECTIVES:
                shutil.rmtree(root / name, ignore_errors=True)
        else:
            print(f"writing the toy datasets into {root}")
        write_toy_datasets(root, **wanted)


# what the toy world plugs into a command's `main(argv, **plug_ins)`
PLUG_INS: dict[tuple[str, ...], dict[str, Any]] = {
    ("search",): {"model_path": generator_path},
    ("train", "reward"): {"data_source": ToyDataConfig},
}


def usage(prefix: Sequence[str] = ()) -> str:
    """The command list (those starting with `prefix`), one line each with its description."""
    matching = {words: summary for words, (_, summary) in COMMANDS.items() if words[: len(prefix)] == tuple(prefix)}
    width = max(len(" ".join(words)) for words in matching)
    lines = [f"usage: rlhf {' '.join(prefix) or 'COMMAND'} ... [--config FILE.yaml] [--field value ...]", "",
             "commands:"]
    lines += [f"  rlhf {' '.join(words):<{width}}  {summary}" for words, summary in matching.items()]
    lines += ["", "`rlhf COMMAND --help` lists a command's fields."]
    return "\n".join(lines)


def _find(argv: Sequence[str]) -> tuple[str, ...] | None:
    for words in sorted(COMMANDS, key=len, reverse=True):
        if tuple(argv[: len(words)]) == words:
            return words
    return None


def _unknown(argv: Sequence[str]) -> str:
    """Usage for words that name no command, with the closest command; a known group ("rlhf train") lists its own."""
    typed = " ".join(word for word in argv if not word.startswith("-")).split()[:2]
    group = tuple(typed[:1]) if any(words[:1] == tuple(typed[:1]) for words in COMMANDS) else ()
    if typed == list(group):  # just a group name: its commands are the answer
        return usage(group)
    close = difflib.get_close_matches(" ".join(typed), [" ".join(words) for words in COMMANDS], n=1, cutoff=0.5)
    hint = f"unknown command 'rlhf {' '.join(typed)}'" + (f"; did you mean 'rlhf {close[0]}'?" if close else "")
    return f"{hint}\n\n{usage(group)}"


def _first_sentence(exc: BaseException) -> str:
    """The gist of a library's long error: its text up to the first parenthesis or line break."""
    return str(exc).split("\n")[0].split(" (")[0][:300]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in HELP:
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    words = _find(argv)
    if words is None:
        print(_unknown(argv), file=sys.stderr)
        return 2
    target, summary = COMMANDS[words]
    name = f"rlhf {' '.join(words)}"
    module_name, function_name = target.split(":")
    try:
        with running_command(name, summary):
            command = getattr(importlib.import_module(module_name), function_name)
            return int(command(argv[len(words):], **PLUG_INS.get(words, {})) or 0)
    except SystemExit as exc:  # --help, from the command's parser
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    except (ValueError, TypeError, FileNotFoundError) as exc:
        # errors a user controls (bad config, bad path, bad input) are told, not traced back
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # a model id neither on disk nor in the Hugging Face cache: diffusers/transformers say so under ~30 frames
        print(f"{name}: error: {_first_sentence(exc)}\n  not found locally: download it where there is network "
              "(`hf download MODEL_ID`, into the Hugging Face cache) or pass a local directory", file=sys.stderr)
        return 2
    except RunInterrupted as exc:
        print(f"\n{name}: {exc}", file=sys.stderr)
        return INTERRUPTED
    except KeyboardInterrupt:
        print(f"\n{name}: interrupted", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
