"""The reward server on a real uvicorn (127.0.0.1, free port): RemoteReward == LocalReward, concurrency, and bad
requests that get their 4xx while the server keeps serving."""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from PIL import Image

from reward import RewardModel
from rlhf.rewards.reward_fn import LocalReward, RemoteReward, RemoteRewardError, builtin_scorer, encode_png_batch
from rlhf.rewards.server import BackgroundServer, create_app
from rlhf.toy import sample_toy_images
from tests.conftest import perturb_adapters

TOKEN = "s3cret-token"
MAX_BYTES = 64_000
WEIGHTING = {"perspectives": {"alignment": {"weight": 1.0, "normalize": "batch"}, "fidelity": 0.5}}


def quantised_toy_batch(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Toy images rounded to 8 bits, so PNG carries them exactly."""
    images, prompts = sample_toy_images(n, seed=seed)
    return (images * 255).round() / 255, prompts


@pytest.fixture(scope="module")
def tiny_reward_model(tiny_vlm_paths):
    model = RewardModel.from_backbone(tiny_vlm_paths["llava"], perspectives=["alignment", "fidelity"])
    perturb_adapters(model)
    return model


@pytest.fixture(scope="module")
def server(tiny_reward_model):
    app = create_app(LocalReward(tiny_reward_model, batch_size=16), model_name="tiny-llava", token=TOKEN,
                     max_batch_size=16, max_wait_ms=5, max_request_bytes=MAX_BYTES)
    with BackgroundServer(app) as running:
        yield running


def score_request(server, payload, token=TOKEN, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(f"{server.url}/score", json=payload, headers=headers, timeout=60, **kwargs)


def still_serving(server) -> None:
    assert httpx.get(f"{server.url}/health", timeout=10).json() == {"status": "ok"}
    images, prompts = quantised_toy_batch(1, seed=99)
    reply = score_request(server, {"images": encode_png_batch(images), "prompts": prompts})
    assert reply.status_code == 200 and len(reply.json()["rewards"]) == 1


def test_health_and_info(server):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    info = httpx.get(f"{server.url}/info", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert info["model"] == "tiny-llava" and info["perspectives"] == ["alignment", "fidelity"]
    assert info["weighting"]["perspectives"]["fidelity"]["weight"] == 1.0
    assert info["max_batch_size"] == 16 and info["max_request_bytes"] == MAX_BYTES
    assert set(info["routes"]) == {"POST /score", "GET /info", "GET /health"}


def test_remote_reward_equals_local_reward(server, tiny_reward_model):
    images, prompts = quantised_toy_batch(10, seed=5)
    local_rewards, local_info = LocalReward(tiny_reward_model, weighting=WEIGHTING)(images, prompts)
    remote = RemoteReward(server.url, token=TOKEN, weighting=WEIGHTING, batch_size=4)
    assert remote.perspectives == ["alignment", "fidelity"] and not remote.differentiable
    remote_rewards, remote_info = remote(images, prompts, None)
    torch.testing.assert_close(remote_rewards, local_rewards, atol=1e-4, rtol=0)
    for name in ("alignment", "fidelity"):
        torch.testing.assert_close(remote_info["raw"][name], local_info["raw"][name], atol=1e-4, rtol=0)
    # uint8 input takes the same path; the server's own weighting (uniform) is the default
    nhwc = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    plain = RemoteReward(server.url, token=TOKEN)(nhwc, prompts)[0]
    torch.testing.assert_close(plain, local_info["raw"]["alignment"] + local_info["raw"]["fidelity"], atol=1e-4, rtol=0)
    remote.close()


def test_sixteen_concurrent_clients_twenty_requests_each(server, tiny_reward_model):
    images, prompts = quantised_toy_batch(16, seed=11)
    expected, _ = LocalReward(tiny_reward_model)(images, prompts)
    batches_before = httpx.get(f"{server.url}/info", headers={"Authorization": f"Bearer {TOKEN}"}).json()["batches_scored"]

    def client(index: int) -> list[float]:
        remote = RemoteReward(server.url, token=TOKEN, retries=0)
        try:
            return [remote(images[index: index + 1], prompts[index: index + 1])[0].item() for _ in range(20)]
        finally:
            remote.close()

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(client, range(16)))
    for index, rewards in enumerate(results):
        assert len(rewards) == 20
        # each client gets its own image's score back, whatever batch-mates it was scored with
        torch.testing.assert_close(torch.tensor(rewards), expected[index].repeat(20), atol=1e-4, rtol=0)
    batches = httpx.get(f"{server.url}/info", headers={"Authorization": f"Bearer {TOKEN}"}).json()["batches_scored"]
    assert batches - batches_before < 320  # concurrent requests were batched together


def test_malformed_json_is_400(server):
    reply = httpx.post(f"{server.url}/score", content=b'{"images": [', timeout=10,
                       headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    assert reply.status_code == 400 and "malformed JSON" in reply.json()["detail"]
    still_serving(server)


def test_corrupt_image_is_422_naming_it(server):
    images, prompts = quantised_toy_batch(2, seed=1)
    encoded = encode_png_batch(images)
    encoded[1] = base64.b64encode(b"\x89PNG\r\n\x1a\n this is not a png").decode()
    reply = score_request(server, {"images": encoded, "prompts": prompts})
    assert reply.status_code == 422 and reply.json()["detail"].startswith("images[1]: cannot decode")
    reply = score_request(server, {"images": ["not base64!"], "prompts": prompts[:1]})
    assert reply.status_code == 422 and "images[0]: not valid base64" in reply.json()["detail"]
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="GIF")
    reply = score_request(server, {"images": [base64.b64encode(buffer.getvalue()).decode()], "prompts": ["a"]})
    assert reply.status_code == 422 and "expected PNG or JPEG, got GIF" in reply.json()["detail"]
    still_serving(server)


def test_bad_fields_are_422(server):
    images, prompts = quantised_toy_batch(2, seed=1)
    encoded = encode_png_batch(images)
    for payload, message in [
        ({"images": encoded, "prompts": prompts[:1]}, "got 1 prompts for 2 images"),
        ({"images": [], "prompts": []}, "images: expected a non-empty list"),
        ({"images": encoded, "prompts": [1, 2]}, "prompts: expected a list of strings"),
        ({"images": encoded, "prompts": prompts, "pickle": "x"}, "unknown field(s) ['pickle']"),
        ([1, 2], "expected a JSON object"),
    ]:
        reply = score_request(server, payload)
        assert reply.status_code == 422 and message in reply.json()["detail"]
    still_serving(server)


def test_wrong_or_missing_token_is_401(server):
    images, prompts = quantised_toy_batch(1, seed=1)
    payload = {"images": encode_png_batch(images), "prompts": prompts}
    for token in ("wrong", None):
        reply = score_request(server, payload, token=token)
        assert reply.status_code == 401 and reply.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{server.url}/info").status_code == 401
    with pytest.raises(RemoteRewardError, match="HTTP 401: missing or wrong bearer token"):
        RemoteReward(server.url, token="wrong")
    still_serving(server)


def test_unreachable_server_is_retried_then_a_clear_error():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(RemoteRewardError, match=r"unreachable .*\(after 2 tries\)"):
        RemoteReward(f"http://127.0.0.1:{port}", retries=1)


def test_oversized_body_is_413(server):
    images, prompts = quantised_toy_batch(1, seed=1)
    padding = "x" * MAX_BYTES
    reply = score_request(server, {"images": encode_png_batch(images), "prompts": [prompts[0] + padding]})
    assert reply.status_code == 413 and "exceeds the limit" in reply.json()["detail"]

    def chunked():  # no Content-Length: the limit is enforced while the body streams in
        for _ in range(10):
            yield b" " * (MAX_BYTES // 4)

    reply = httpx.post(f"{server.url}/score", content=chunked(), headers={"Authorization": f"Bearer {TOKEN}"})
    assert reply.status_code == 413
    still_serving(server)


def test_a_failing_request_does_not_fail_its_batch_mates():
    class FailsOnBoom:
        perspectives = ["brightness"]

        def score(self, images, prompts, perspectives=None):
            if "boom" in prompts:
                raise ValueError("prompts: 'boom' cannot be scored")
            return {"brightness": images.mean(dim=(1, 2, 3))}

    # a long wait makes the three concurrent requests share one batch
    app = create_app(LocalReward(FailsOnBoom()), model_name="fails-on-boom", max_batch_size=8, max_wait_ms=300)
    images, _ = quantised_toy_batch(3, seed=2)
    encoded = encode_png_batch(images)
    with BackgroundServer(app) as running:
        with ThreadPoolExecutor(3) as pool:
            replies = list(pool.map(
                lambda i: httpx.post(f"{running.url}/score", timeout=30,
                                     json={"images": [encoded[i]], "prompts": ["boom" if i == 1 else "fine"]}),
                range(3),
            ))
        info = httpx.get(f"{running.url}/info").json()
    assert [reply.status_code for reply in replies] == [200, 422, 200]
    assert "'boom' cannot be scored" in replies[1].json()["detail"]
    for i in (0, 2):
        assert replies[i].json()["rewards"][0] == pytest.approx(images[i].mean().item(), abs=1e-6)
    assert info["batches_scored"] == 1


def test_rlhf_serve_command_with_a_builtin(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("cli-token\n")
    with socket.socket() as probe:  # a free port for the command to bind
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "trainers.cli", "serve", "--model", "builtin:toy_oracles", "--port", str(port),
         "--token-file", str(token_file), "--max_batch_size", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, process.stdout.read().decode()
            assert time.monotonic() < deadline, "rlhf serve did not start"
            time.sleep(0.2)
        images, prompts = quantised_toy_batch(5, seed=4)
        remote = RemoteReward(url, token="cli-token")
        assert remote.perspectives == ["alignment", "fidelity", "safety"]
        expected, _ = LocalReward(builtin_scorer("toy_oracles"))(images, prompts)
        torch.testing.assert_close(remote(images, prompts)[0], expected, atol=1e-4, rtol=0)
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_rlhf_serve_option_errors_name_the_option(capsys):
    from trainers.cli import main as cli_main

    assert cli_main(["serve", "--model", "builtin:toy_oracles", "--max-batch-size", "0"]) == 2
    assert "max_batch_size: expected an integer >= 1" in capsys.readouterr().err
    assert cli_main(["serve", "--model", "builtin:toy_oracles", "--weighting", '{"perspectives": {"beauty": 1}}']) == 2
    assert "weighting.perspectives.beauty: unknown perspective" in capsys.readouterr().err
