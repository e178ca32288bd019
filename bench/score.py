"""Reward-model throughput: our batched mixed-perspective `score` vs the official one-image, one-perspective way.

    python bench/score.py [--family phi3_v|llava] [--size bench|tiny|phi35] [--batch 16] [--perspectives 4]

Prints images x perspectives per second for both, measured in this one run, and their ratio. The "official
way" follows sjz5202/LLaVA-Reward's inference: the model is loaded with one perspective's LoRA, images are
scored one per forward, and this is repeated per perspective; its rate is given with and without the loads.
`--family phi3_v` is the paper's main backbone (HD crops, `num_crops` 4); `llava` a LLaVA-1.5 with
Phi-3.5-vision's proportions. Images are square, one crop's side (Phi: a 2x2 crop grid).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from reward import RewardModel
from reward.testing import build_tiny_vlm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="phi3_v", choices=["phi3_v", "llava"])
    parser.add_argument("--size", default="bench", choices=["tiny", "bench", "phi35"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--perspectives", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    names = ["alignment", "fidelity", "safety", "overall", "style", "extra"][: args.perspectives]
    with tempfile.TemporaryDirectory() as tmp:
        base = build_tiny_vlm(Path(tmp) / "vlm", args.family, size=args.size)
        model = RewardModel.from_backbone(base, names, dtype=args.dtype, device=args.device,
                                          max_batch_size=args.batch)
        model.save_pretrained(Path(tmp) / "rm")
        processor = model.backbone.image_processor
        side = 2 * processor.crop_size if args.family == "phi3_v" else processor.crop_size["height"]
        images = torch.rand(args.batch, 3, side, side)
        prompts = [f"a photo of object number {i} on a plain background" for i in range(args.batch)]
        model.score(images[:2], prompts[:2])  # warm-up

        def sync() -> None:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()

        sync()
        start = time.perf_counter()
        for _ in range(args.repeats):
            with torch.no_grad():
                model.score(images, prompts)
        sync()
        ours = args.repeats * args.batch * len(names) / (time.perf_counter() - start)
        del model

        load_seconds, forward_seconds = 0.0, 0.0
        for name in names:
            sync()
            start = time.perf_counter()
            single = RewardModel.from_pretrained(Path(tmp) / "rm", device=args.device, perspectives=[name])
            single.score(images[:1], prompts[:1])
            sync()
            load_seconds += time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(args.repeats):
                for i in range(args.batch):
                    with torch.no_grad():
                        single.score(images[i: i + 1], prompts[i: i + 1])
            sync()
            forward_seconds += time.perf_counter() - start
            del single
        scored = args.repeats * args.batch * len(names)
        official = scored / forward_seconds
        official_with_loads = scored / (forward_seconds + load_seconds)
    print(f"family={args.family} size={args.size} batch={args.batch} perspectives={len(names)} device={args.device} dtype={args.dtype}")
    print(f"ours (batched, mixed-perspective):           {ours:8.2f} images x perspectives / s")
    print(f"official way (1 image/forward, 1 persp/load): {official:8.2f} images x perspectives / s "
          f"({official_with_loads:.2f} counting {len(names)} model loads)")
    print(f"ratio ours / official: {ours / official:.2f}x ({ours / official_with_loads:.2f}x counting loads)")


if __name__ == "__main__":
    main()
