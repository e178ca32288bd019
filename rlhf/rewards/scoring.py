"""`rlhf score`: score image/prompt rows with a saved RewardModel and write one column per perspective."""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from reward import RewardModel
from reward.inputs import load_images
from rlhf.config import parse_config

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass
class ScoreConfig:
    """Arguments of `rlhf score`: score images against prompts, `--data` rows or `--images` with one `--prompt`."""

    model: str = field(default="", metadata={"help": "A saved RewardModel directory (required)."})
    data: str = field(default="", metadata={"help": "A JSONL file of rows {\"image\": path, \"prompt\": str}, paths "
                                                   "relative to the file (not with --images)."})
    images: str = field(default="", metadata={"help": "A directory of images, all scored against --prompt (not with "
                                                       "--data)."})
    prompt: str = field(default="", metadata={"help": "The prompt for every image of --images."})
    output: str = field(default="", metadata={"help": "Where to write the scores: .csv writes CSV, anything else "
                                                       "JSONL ('' = stdout as JSONL)."})
    perspectives: list[str] = field(default_factory=list,
                                    metadata={"help": "Perspectives to score (default: all the model has)."})
    batch_size: int = field(default=16, metadata={"help": "Images per score call."})
    device: str = field(default="cpu", metadata={"help": "Torch device for the model."})


def read_rows(config: ScoreConfig) -> tuple[list[dict], list[str]]:
    """Rows to score ({"line", "image", "prompt"}) and the problems of the rows that were skipped."""
    rows, problems = [], []
    if config.data and (config.images or config.prompt):
        # a JSONL row carries its own prompt: --images/--prompt would be silently ignored
        raise ValueError("data and images/prompt: give either --data FILE.jsonl or --images DIR --prompt TEXT, not both")
    if config.data:
        path = Path(config.data)
        if not path.is_file():
            raise ValueError(f"data: no such file {path}")
        for line_number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"{path}:{line_number}: not valid JSON ({exc.msg})")
                continue
            if not isinstance(row, dict) or not isinstance(row.get("image"), str) \
                    or not isinstance(row.get("prompt"), str):
                problems.append(f"{path}:{line_number}: expected {{\"image\": str, \"prompt\": str}}")
                continue
            rows.append({"line": line_number, "image": str(path.parent / row["image"]), "prompt": row["prompt"]})
    elif config.images:
        folder = Path(config.images)
        if not folder.is_dir():
            raise ValueError(f"images: no such directory {folder}")
        if not config.prompt:
            raise ValueError("prompt: required with --images (the prompt every image is scored against)")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        rows = [{"line": i + 1, "image": str(p), "prompt": config.prompt} for i, p in enumerate(files)]
    else:
        raise ValueError("data or images: give --data FILE.jsonl or --images DIR --prompt TEXT")
    return rows, problems


def main(argv: list[str]) -> int:
    (config,) = parse_config(ScoreConfig, argv)
    if not config.model:
        raise ValueError("model: required, a saved RewardModel directory")
    if config.batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {config.batch_size}")
    rows, problems = read_rows(config)
    model = RewardModel.from_pretrained(config.model, device=config.device,
                                        perspectives=config.perspectives or None)
    loaded = []
    for row in rows:  # an unreadable image costs its own row only
        try:
            loaded.append((row, load_images([row["image"]])[0]))
        except (ValueError, TypeError) as exc:
            problems.append(f"{config.data or config.images}:{row['line']}: {exc}")
    for problem in problems:
        print(f"skipped {problem}", file=sys.stderr)
    results = []
    for start in tqdm(range(0, len(loaded), config.batch_size), desc="scoring", unit="batch"):
        batch = loaded[start: start + config.batch_size]
        scores = model.score([image for _, image in batch], [row["prompt"] for row, _ in batch])
        for j, (row, _) in enumerate(batch):
            results.append({"image": row["image"], "prompt": row["prompt"],
                            **{name: float(values[j]) for name, values in scores.items()}})
    _write(results, model.perspectives, config.output)
    print(f"scored {len(results)} rows, skipped {len(problems)}", file=sys.stderr)
    return 0 if results or not problems else 1


def _write(results: list[dict], perspectives: list[str], output: str) -> None:
    if output.endswith(".csv"):
        with open(output, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["image", "prompt", *perspectives])
            writer.writeheader()
            writer.writerows(results)
        return
    text = "".join(json.dumps(r) + "\n" for r in results)
    if output:
        Path(output).write_text(text)
    else:
        sys.stdout.write(text)
