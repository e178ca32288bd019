"""Mean reward vs denoiser evaluations (NFEs) for best-of-N, zero-order search and FK steering.

    python bench/search.py [--steps 10] [--seeds 2] [--output_dir runs/bench_search]

Runs on the committed toy generator with the soft toy colour reward, on every colour's prompt; prints a table
and writes `search_scaling.png` and `search_scaling.json` into the output directory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from rlhf.generators.ddpo_pipeline import DDPOStableDiffusionPipeline  # noqa: E402
from rlhf.search import best_of_n, fk_steering, zero_order_search  # noqa: E402
from rlhf.toy.generators import toy_generator_path  # noqa: E402
from rlhf.toy import EVAL_PROMPTS, colour_score  # noqa: E402


def reward(images, prompts, metadata):
    return colour_score(images, prompts), {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--output_dir", default="runs/bench_search")
    args = parser.parse_args()
    pipeline = DDPOStableDiffusionPipeline.from_pretrained(toy_generator_path(), use_lora=False)
    pipeline.set_progress_bar_config(disable=True)
    prompts = EVAL_PROMPTS[::3]
    common = dict(num_inference_steps=args.steps)
    settings = {
        "best_of_n": [(f"N={n}", lambda p, s, n=n: best_of_n(pipeline, p, reward, n, seed=s, **common))
                      for n in (1, 2, 4, 8)],
        "zero_order": [(f"N=2,K={k}", lambda p, s, k=k: zero_order_search(pipeline, p, reward, 2, k, 0.9, seed=s,
                                                                          **common)) for k in (0, 1, 2, 3)],
        "fk_steering": [(f"k={k}", lambda p, s, k=k: fk_steering(pipeline, p, reward, k, lam=10.0, resample_every=2,
                                                                 seed=s, **common)) for k in (1, 2, 4, 8)],
    }
    table = {}
    print(f"{'method':12s} {'setting':10s} {'NFE':>6s} {'reward calls':>12s} {'mean reward':>12s}")
    for method, runs in settings.items():
        table[method] = []
        for label, run in runs:
            results = [run(prompt, seed) for seed in range(args.seeds) for prompt in prompts]
            row = {"setting": label, "nfe": results[0].nfe, "reward_calls": results[0].reward_calls,
                   "mean_reward": sum(r.reward for r in results) / len(results)}
            table[method].append(row)
            print(f"{method:12s} {label:10s} {row['nfe']:6d} {row['reward_calls']:12d} {row['mean_reward']:12.4f}")
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "search_scaling.json").write_text(json.dumps(table, indent=2))
    figure, axis = plt.subplots(figsize=(5, 3.5))
    for method, rows in table.items():
        axis.plot([r["nfe"] for r in rows], [r["mean_reward"] for r in rows], marker="o", label=method)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("denoiser evaluations (NFE) per prompt")
    axis.set_ylabel("mean chosen reward (toy colour)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(output / "search_scaling.png", dpi=120)
    print(f"wrote {output / 'search_scaling.png'}")


if __name__ == "__main__":
    main()
