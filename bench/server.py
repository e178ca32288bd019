"""Reward-server throughput: dynamic batching vs one image per forward, at 16 concurrent clients.

    python bench/server.py [--size tiny|bench|phi35] [--clients 16] [--requests 20] [--max-batch-size 16]
                           [--max-wait-ms 5] [--rounds 3] [--device cpu] [--output results.json]

Serves a random LLaVA RewardModel (`reward.testing.build_tiny_vlm`, two perspectives) with `rlhf.rewards.server` on a real
uvicorn bound to 127.0.0.1, then runs `--clients` threads, each sending `--requests` requests of one toy image
through `RemoteReward`. Once with dynamic batching (`--max-batch-size`, `--max-wait-ms`), once with max batch
size 1; the configurations alternate for `--rounds` rounds and the median images/s of each is reported, with the
ratio and the mean images per forward. Clients and server share this machine's CPUs (and Python's GIL).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
import torch.nn.functional as F

from reward import RewardModel
from reward.testing import build_tiny_vlm
from rlhf.rewards.reward_fn import LocalReward, RemoteReward
from rlhf.rewards.server import BackgroundServer, create_app
from rlhf.toy import sample_toy_images


def run_clients(url: str, images: torch.Tensor, prompts: list[str], clients: int, requests: int) -> float:
    """Wall seconds for `clients` threads to each send `requests` one-image requests."""

    def client(index: int) -> None:
        remote = RemoteReward(url, retries=0)
        try:
            for _ in range(requests):
                remote(images[index: index + 1], prompts[index: index + 1])
        finally:
            remote.close()

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return time.perf_counter() - start


def measure(model: RewardModel, images: torch.Tensor, prompts: list[str], max_batch_size: int, max_wait_ms: float,
            clients: int, requests: int) -> tuple[float, float]:
    """(images/s, mean images per forward) for one server configuration."""
    app = create_app(LocalReward(model, batch_size=max_batch_size), model_name="bench", max_batch_size=max_batch_size,
                     max_wait_ms=max_wait_ms)
    with BackgroundServer(app) as server:
        run_clients(server.url, images, prompts, clients, 2)  # warm-up: connections, allocator, first batches
        before = httpx.get(f"{server.url}/info").json()["batches_scored"]
        seconds = run_clients(server.url, images, prompts, clients, requests)
        batches = httpx.get(f"{server.url}/info").json()["batches_scored"] - before
    return clients * requests / seconds, clients * requests / batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", choices=["tiny", "bench", "phi35"])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        base = build_tiny_vlm(Path(tmp) / "vlm", "llava", size=args.size)
        model = RewardModel.from_backbone(base, ["alignment", "fidelity"], device=args.device,
                                          max_batch_size=args.max_batch_size)
    side = model.backbone.image_processor.crop_size["height"]
    toy_images, prompts = sample_toy_images(args.clients, seed=0)
    # toy scenes at the model's input size, rounded to 8 bits as PNG carries them
    images = (F.interpolate(toy_images, size=(side, side), mode="bilinear") * 255).round().clamp(0, 255) / 255
    rates: dict[str, list[float]] = {"dynamic": [], "batch1": []}
    per_forward: dict[str, list[float]] = {"dynamic": [], "batch1": []}
    for round_index in range(args.rounds):
        for name, max_batch_size in (("dynamic", args.max_batch_size), ("batch1", 1)):
            rate, mean_batch = measure(model, images, prompts, max_batch_size, args.max_wait_ms, args.clients,
                                       args.requests)
            rates[name].append(rate)
            per_forward[name].append(mean_batch)
            print(f"round {round_index + 1}/{args.rounds} {name:8s} {rate:8.1f} images/s  "
                  f"{mean_batch:5.2f} images per forward", flush=True)
    result = {
        "model": f"random LLaVA RewardModel, size {args.size!r}, 2 perspectives, {side}x{side} images",
        "device": args.device,
        "clients": args.clients,
        "requests_per_client": args.requests,
        "max_batch_size": args.max_batch_size,
        "max_wait_ms": args.max_wait_ms,
        "dynamic_images_per_s": statistics.median(rates["dynamic"]),
        "batch1_images_per_s": statistics.median(rates["batch1"]),
        "dynamic_images_per_forward": statistics.median(per_forward["dynamic"]),
    }
    result["ratio"] = result["dynamic_images_per_s"] / result["batch1_images_per_s"]
    print(f"\n{result['model']} on {args.device}, {args.clients} concurrent clients x {args.requests} requests")
    print(f"dynamic batching (max {args.max_batch_size}, wait {args.max_wait_ms} ms): "
          f"{result['dynamic_images_per_s']:.1f} images/s ({result['dynamic_images_per_forward']:.1f} per forward)")
    print(f"max batch size 1: {result['batch1_images_per_s']:.1f} images/s")
    print(f"ratio: {result['ratio']:.2f}x")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
