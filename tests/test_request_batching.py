"""Concurrent requests share a forward (``serving.RequestBatcher``), and each caller gets exactly its own rows.

The scoring server calls ``predict`` from a thread per request; these tests do the same with plain threads and
a forward that holds the network until the test lets it go, so which requests share a batch is decided by the
test, not by timing.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from blockdrop import serving


class HeldForward:
    """A forward that records each batch's size and, while ``hold`` is set, waits at its start until released.
    Its outputs are per-row functions of the input, so a caller handed another's rows would notice."""

    def __init__(self, hold: bool = True) -> None:
        self.sizes: list[int] = []
        self.started, self.release = threading.Event(), threading.Event()
        if not hold:
            self.release.set()

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.sizes.append(len(x))
        self.started.set()
        assert self.release.wait(10), "the test never released the forward"
        if (x < 0).any():
            raise RuntimeError("negative input")
        return x * 2, x.flatten(1).sum(1)


def call_in_threads(batcher: serving.RequestBatcher, inputs: list[torch.Tensor]) -> tuple[list, list[threading.Thread]]:
    """Start one thread per input calling ``batcher``; results[i] is the outputs or the error of input i."""
    results: list = [None] * len(inputs)

    def call(i: int) -> None:
        try:
            results[i] = batcher(inputs[i])
        except Exception as error:  # the test inspects it
            results[i] = error

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    return results, threads


def wait_queued(batcher: serving.RequestBatcher, n: int) -> None:
    deadline = time.monotonic() + 10
    while len(batcher._queue) < n:
        assert time.monotonic() < deadline, f"{len(batcher._queue)} requests queued, expected {n}"
        time.sleep(0.001)


def request(n: int, value: float) -> torch.Tensor:
    return torch.full((n, 1, 2, 2), value) + torch.arange(n).view(n, 1, 1, 1)


def test_requests_that_queue_during_a_forward_run_together_and_get_their_own_rows() -> None:
    forward = HeldForward()
    batcher = serving.RequestBatcher(forward, max_images=64)
    first, first_threads = call_in_threads(batcher, [request(2, 100.0)])
    assert forward.started.wait(10)
    inputs = [request(3, 10.0 * (i + 1)) for i in range(3)]
    results, threads = call_in_threads(batcher, inputs)
    wait_queued(batcher, 3)  # all three wait while the first request holds the network
    forward.release.set()
    for thread in first_threads + threads:
        thread.join(10)
    assert forward.sizes == [2, 9]  # the first alone (it found the network free), then the three as one batch
    for x, (doubled, sums) in zip([request(2, 100.0), *inputs], first + results, strict=True):
        assert torch.equal(doubled, x * 2) and torch.equal(sums, x.flatten(1).sum(1))


def test_a_batch_holds_at_most_max_images_and_every_request_is_answered() -> None:
    forward = HeldForward()
    batcher = serving.RequestBatcher(forward, max_images=7)
    _, first_threads = call_in_threads(batcher, [request(1, 0.0)])
    assert forward.started.wait(10)
    inputs = [request(3, float(i)) for i in range(5)]  # 15 images: batches of 3 + 3 (6 <= 7), 3 + 3, 3
    results, threads = call_in_threads(batcher, inputs)
    wait_queued(batcher, 5)
    forward.release.set()
    for thread in first_threads + threads:
        thread.join(10)
    assert forward.sizes == [1, 6, 6, 3]
    assert all(torch.equal(out[0], x * 2) for x, out in zip(inputs, results, strict=True))
    assert serving.RequestBatcher(HeldForward(hold=False), max_images=2)(request(5, 0.0))[0].shape[0] == 5  # alone


def test_an_error_reaches_every_caller_of_its_batch_and_the_next_batch_runs() -> None:
    forward = HeldForward()
    batcher = serving.RequestBatcher(forward, max_images=64)
    _, first_threads = call_in_threads(batcher, [request(1, 0.0)])
    assert forward.started.wait(10)
    bad, good = request(2, -50.0), request(2, 5.0)
    results, threads = call_in_threads(batcher, [bad, good])
    wait_queued(batcher, 2)
    forward.release.set()
    for thread in first_threads + threads:
        thread.join(10)
    assert forward.sizes == [1, 4]
    assert all(isinstance(r, RuntimeError) for r in results)  # the good request shared the bad one's batch
    assert torch.equal(batcher(good)[0], good * 2)  # and the batcher still works


def test_the_pyfunc_answers_concurrent_requests_as_it_answers_each_alone() -> None:
    from blockdrop.models import cifar_resnet, policy_resnet8

    torch.manual_seed(0)
    backbone, policy = cifar_resnet(8, 3, 1).eval(), policy_resnet8(3, 1).eval()
    with torch.no_grad():  # a policy that varies with the image: some images drop block 1, others keep it
        policy.fc.bias.copy_(torch.tensor([5.0, 0.0, 5.0]))
        policy.fc.weight[1] = 10 * torch.randn(policy.fc.in_features)
    spec = {"shape": [1, 28, 28], "classes": ["a", "b", "c"], "mean": [0.5], "std": [0.25],
            "flops": {"base": 100, "blocks": [10, 20, 40], "policy": 5}}
    model = serving.BlockDropClassifier().setup(spec, backbone, policy)
    pixels = np.random.default_rng(0).integers(0, 256, (24, 28, 28), dtype=np.uint8)
    requests = [pixels[i:i + 3] for i in range(0, 24, 3)]
    alone = [model.predict(None, r) for r in requests]

    held, sizes = threading.Event(), []

    def held_forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sizes.append(len(x))
        held.wait(10)
        return model.forward(x)

    model.batcher = serving.RequestBatcher(held_forward, serving.CHUNK)
    results: list = [None] * len(requests)
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, model.predict(None, requests[i])))
               for i in range(len(requests))]
    threads[0].start()
    deadline = time.monotonic() + 10
    while not sizes:  # the first request holds the network before the others arrive
        assert time.monotonic() < deadline, "the first request never reached the network"
        time.sleep(0.001)
    for thread in threads[1:]:
        thread.start()
    wait_queued(model.batcher, len(requests) - 1)  # the rest wait to share one batch
    held.set()
    for thread in threads:
        thread.join(10)
    assert sizes == [3, 21]
    for a, b in zip(alone, results, strict=True):
        assert a["policy"].tolist() == b["policy"].tolist() and a["class_index"].tolist() == b["class_index"].tolist()
        np.testing.assert_allclose(np.stack(a["probabilities"]), np.stack(b["probabilities"]), rtol=1e-5, atol=1e-6)
    assert len({p for a in alone for p in a["policy"]}) > 1, "every image got the same policy: a weak test"


def test_max_images_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_images"):
        serving.RequestBatcher(HeldForward(hold=False), max_images=0)


def test_the_max_batch_reaches_the_served_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """``make serve ARGS="--max-batch 5"`` puts it in the server's environment, where the model reads it."""
    import os

    from ops import serve

    captured = {}
    monkeypatch.setattr(serve.tracking, "get_alias_version", lambda name, alias: "3")
    monkeypatch.setattr(os, "execve", lambda path, argv, env: captured.update(argv=argv, env=env))
    serve.main(["--max-batch", "5", "--workers", "2"])
    assert captured["env"][serving.MAX_BATCH_ENV] == "5" and captured["argv"][captured["argv"].index("-w") + 1] == "2"
    with pytest.raises(SystemExit):
        serve.main(["--max-batch", "0"])

    from blockdrop.models import cifar_resnet, policy_resnet8

    spec = {"shape": [1, 28, 28], "classes": ["a", "b", "c"], "mean": [0.5], "std": [0.25],
            "flops": {"base": 100, "blocks": [10, 20, 40], "policy": 5}}
    networks = cifar_resnet(8, 3, 1).eval(), policy_resnet8(3, 1).eval()
    monkeypatch.setenv(serving.MAX_BATCH_ENV, captured["env"][serving.MAX_BATCH_ENV])
    assert serving.BlockDropClassifier().setup(spec, *networks).batcher.max_images == 5
    monkeypatch.delenv(serving.MAX_BATCH_ENV)
    assert serving.BlockDropClassifier().setup(spec, *networks).batcher.max_images == serving.CHUNK
    for bad in ("0", "eight", "-3"):
        monkeypatch.setenv(serving.MAX_BATCH_ENV, bad)
        with pytest.raises(ValueError, match=serving.MAX_BATCH_ENV):
            serving.BlockDropClassifier().setup(spec, *networks)
