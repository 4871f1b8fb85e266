"""TritonBackend against the real tritonserver: parity, batching, outages, recovery."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from inference import Classifier, ClassifyOptions, read_repository
from inference.backends.base import BackendUnavailable
from inference.backends.onnxruntime import OnnxRuntimeBackend
from inference.backends.triton import TritonBackend, TritonTimeout
from inference.protocol import dense_batch, multicrop_batch
from testkit.images import smooth_image
from testkit.ports import free_ports
from testkit.processes import start_triton
from testkit.tolerances import largest_score, posterior_bound, score_bound

SCALES = (64, 96, 128)


@pytest.fixture(scope="module")
def models(two_model_repository):
    repository, _ = two_model_repository
    return read_repository(repository)


@pytest.fixture(scope="module")
def reference(models):
    backend = OnnxRuntimeBackend(models, threads=1)
    yield backend
    asyncio.run(backend.close())


@pytest.fixture(scope="module")
def torch_models(two_model_repository):
    _, models = two_model_repository
    return list(models.values())


# Triton runs the same graphs with ONNX Runtime, on batches its dynamic batcher may have merged
# with others: the sums may run in other orders, so results agree within the fp32 bounds of
# testkit.tolerances (scaled by the largest class score of the views compared), not bit for bit.


def posterior_tolerance(models, torch_models, batches) -> float:
    """How far two fp32 runs of the served graphs on ``batches`` may differ in a posterior."""
    graphs = [entry.onnx_path for entry in models.values()]
    return posterior_bound(torch_models, largest_score(graphs, batches))


def image_views(image, scales, mode="dense") -> list[np.ndarray]:
    """The view batches a request for ``image`` at ``scales`` makes (with flips)."""
    views = [dense_batch(image, q) for q in scales]
    if mode != "dense":
        views += [multicrop_batch(image, q, 64) for q in scales]
    return views


def assert_same_classification(actual, expected, tolerance: float) -> None:
    assert actual.models == expected.models and actual.scales == expected.scales
    np.testing.assert_allclose(actual.probabilities, expected.probabilities, rtol=0, atol=tolerance)
    for name in expected.per_model_probabilities:
        np.testing.assert_allclose(
            actual.per_model_probabilities[name],
            expected.per_model_probabilities[name],
            rtol=0,
            atol=tolerance,
        )
    assert [p.index for p in actual.predictions] == [p.index for p in expected.predictions]
    assert [p.label for p in actual.predictions] == [p.label for p in expected.predictions]


@pytest.mark.parametrize(
    "size, options",
    [
        ((120, 90), ClassifyOptions(scales=SCALES, heatmap=True)),
        ((77, 141), ClassifyOptions(scales=(64, 100), mode="both", top_k=10)),
        ((100, 100), ClassifyOptions(scales=(96,), flip=False, models=("m19",))),
    ],
)
def test_results_equal_the_in_process_backend(
    triton_server, models, reference, torch_models, size, options
):
    image = smooth_image(*size, seed=sum(size))

    async def both():
        triton = TritonBackend(triton_server.grpc_url, models)
        try:
            via_triton = await Classifier(triton, models).classify(image, options)
        finally:
            await triton.close()
        in_process = await Classifier(reference, models).classify(image, options)
        return via_triton, in_process

    via_triton, in_process = asyncio.run(both())
    views = image_views(image, options.scales, options.mode)
    tolerance = posterior_tolerance(models, torch_models, views)
    assert_same_classification(via_triton, in_process, tolerance)
    # The posteriors are spread far wider than the tolerance, so the comparison means something.
    assert np.ptp(in_process.probabilities) > 100 * tolerance
    if options.heatmap:
        graphs = [entry.onnx_path for entry in models.values()]
        bound = score_bound(torch_models) * largest_score(graphs, views)
        np.testing.assert_allclose(
            via_triton.heatmap.scores, in_process.heatmap.scores, rtol=0, atol=bound
        )


def test_only_requested_outputs_come_back(triton_server, models, reference, torch_models):
    images = np.asarray(smooth_image(100, 80, seed=3))[None].transpose(0, 3, 1, 2).copy()

    async def run():
        backend = TritonBackend(triton_server.grpc_url, models)
        try:
            probs = await backend.infer("m16", images, ("probs",))
            both = await backend.infer("m16", images, ("probs", "scores"))
        finally:
            await backend.close()
        return probs, both

    probs, both = asyncio.run(run())
    assert set(probs) == {"probs"} and set(both) == {"probs", "scores"}
    expected = reference.run("m16", images, ("probs", "scores"))
    largest = float(np.abs(expected["scores"]).max())
    bound = posterior_bound(torch_models, largest)
    np.testing.assert_allclose(probs["probs"], expected["probs"], rtol=0, atol=bound)
    bound = score_bound(torch_models) * largest
    np.testing.assert_allclose(both["scores"], expected["scores"], rtol=0, atol=bound)


def _executions(url: str, model: str) -> tuple[int, int, dict[int, int]]:
    """(inference requests' images, executions, {batch size: executions}) of ``model``."""
    (stats,) = grpcclient.InferenceServerClient(url).get_inference_statistics(model).model_stats
    sizes = {b.batch_size: b.compute_infer.count for b in stats.batch_stats}
    return stats.inference_count, stats.execution_count, sizes


def test_concurrent_equal_shapes_are_batched_and_stay_correct(
    triton_server, models, reference, torch_models
):
    rng = np.random.default_rng(7)
    batches = [rng.integers(0, 256, (2, 3, 224, 256), dtype=np.uint8) for _ in range(12)]
    before = _executions(triton_server.grpc_url, "m19")

    async def run():
        backend = TritonBackend(triton_server.grpc_url, models)
        try:
            return await asyncio.gather(*(backend.infer("m19", b, ("probs",)) for b in batches))
        finally:
            await backend.close()

    results = asyncio.run(run())
    # Triton updates its statistics after it has sent the responses: wait until all 24 images
    # are counted (the deadline only bounds a hang).
    deadline = time.monotonic() + 120
    while (counted := _executions(triton_server.grpc_url, "m19"))[0] - before[0] < 24:
        assert time.monotonic() < deadline, f"Triton counted {counted[0] - before[0]} of 24"
        time.sleep(0.05)
    images, executions, sizes = counted
    assert images - before[0] == 24
    # Twelve requests of two images, far fewer executions: the dynamic batcher merged them (and
    # the model split each merged batch into runs of at most 4 requests, see triton_server).
    assert executions - before[1] < 12
    assert max(sizes) > 2
    for batch, result in zip(batches, results, strict=True):
        expected = reference.run("m19", batch, ("probs", "scores"))
        bound = posterior_bound(torch_models, float(np.abs(expected["scores"]).max()))
        np.testing.assert_allclose(result["probs"], expected["probs"], rtol=0, atol=bound)


def test_triton_down_raises_backend_unavailable(models):
    (port,) = free_ports(1)  # nothing listens there
    backend = TritonBackend(f"127.0.0.1:{port}", models)
    image = smooth_image(90, 90, seed=1)

    async def run():
        try:
            assert not await backend.ready()
            with pytest.raises(BackendUnavailable) as down:
                await Classifier(backend, models).classify(image, ClassifyOptions(scales=(64,)))
            with pytest.raises(BackendUnavailable):
                await backend.check()
            return str(down.value)
        finally:
            await backend.close()

    message = asyncio.run(run())
    assert f"Triton at 127.0.0.1:{port} is unreachable" in message
    assert "make triton" in message


def test_a_model_triton_does_not_serve_is_unavailable(triton_server, models):
    ghost = {**models, "ghost": dataclasses.replace(models["m16"], name="ghost")}
    backend = TritonBackend(triton_server.grpc_url, ghost)
    images = np.zeros((1, 3, 64, 64), np.uint8)

    async def run():
        try:
            with pytest.raises(BackendUnavailable, match="ghost is not loaded"):
                await backend.infer("ghost", images)
            with pytest.raises(BackendUnavailable, match="has not loaded ghost"):
                await backend.check()
            assert not await backend.ready()
            await backend.infer("m16", images)  # the others still work
        finally:
            await backend.close()

    asyncio.run(run())


def test_timeout_is_a_clear_unavailable(triton_server, models):
    backend = TritonBackend(triton_server.grpc_url, models, timeout_s=0.001)
    images = np.zeros((2, 3, 512, 512), np.uint8)

    async def run():
        try:
            with pytest.raises(TritonTimeout, match="did not answer m19 within 0.001 s"):
                await backend.infer("m19", images)
        finally:
            await backend.close()

    asyncio.run(run())


# Waits below are for an event (a failure, a recovery); their deadlines only bound a hang.
RECOVERY_DEADLINE_S = 120


@pytest.mark.parametrize("shared_memory", [False, True], ids=["grpc", "shm"])
def test_kill_and_restart_same_backend_recovers(
    two_model_repository, models, reference, torch_models, shared_memory
):
    repository, _ = two_model_repository
    server = start_triton(repository)
    backend = TritonBackend(server.grpc_url, models, shared_memory=shared_memory)
    image = smooth_image(110, 95, seed=11)
    options = ClassifyOptions(scales=(64, 96))
    tolerance = posterior_tolerance(models, torch_models, image_views(image, options.scales))

    async def run():
        classifier = Classifier(backend, models)
        expected = await Classifier(reference, models).classify(image, options)
        assert_same_classification(await classifier.classify(image, options), expected, tolerance)
        assert await backend.ready()

        server.kill()
        for _ in range(3):  # every call during the outage fails, and clearly
            started = time.monotonic()
            # "unreachable": the connection was refused; a call left waiting for its deadline
            # would say it timed out instead (TritonTimeout).
            with pytest.raises(BackendUnavailable, match="unreachable"):
                await classifier.classify(image, options)
            assert time.monotonic() - started < backend.timeout_s
        assert not await backend.ready()

        await asyncio.to_thread(server.start)
        deadline = time.monotonic() + RECOVERY_DEADLINE_S
        while True:  # the same backend reconnects by itself
            try:
                recovered = await classifier.classify(image, options)
                break
            except BackendUnavailable:
                assert time.monotonic() < deadline, "no recovery after Triton came back"
                await asyncio.sleep(0.2)
        assert_same_classification(recovered, expected, tolerance)
        assert await backend.ready()

    try:
        asyncio.run(run())
    finally:
        asyncio.run(backend.close())
        server.kill()
        server.close()


def test_shared_memory_is_registered_again_after_an_unseen_restart(
    two_model_repository, models, reference, torch_models
):
    repository, _ = two_model_repository
    server = start_triton(repository)
    backend = TritonBackend(server.grpc_url, models, shared_memory=True)
    images = np.asarray(smooth_image(96, 72, seed=5))[None].transpose(0, 3, 1, 2).copy()
    expected = reference.run("m16", images, ("probs", "scores"))
    bound = posterior_bound(torch_models, float(np.abs(expected["scores"]).max()))
    expected = expected["probs"]

    async def run():
        np.testing.assert_allclose(
            (await backend.infer("m16", images))["probs"], expected, rtol=0, atol=bound
        )
        # Triton restarts between two calls: the channel never saw an error, but the new server
        # knows none of our regions.
        server.kill()
        await asyncio.to_thread(server.start)
        np.testing.assert_allclose(
            (await backend.infer("m16", images))["probs"], expected, rtol=0, atol=bound
        )
        status = await backend._channel().get_system_shared_memory_status()
        assert len(status.regions) == 1

    try:
        asyncio.run(run())
    finally:
        asyncio.run(backend.close())
        server.kill()
        server.close()


def test_concurrent_calls_during_an_outage_all_fail_cleanly(
    two_model_repository, models, torch_models
):
    """Many requests at once while Triton is down: each gets BackendUnavailable.

    One call's failure replaces the channel; the others still on the old one must fail on their
    own, not be cancelled (a CancelledError would escape the HTTP layer's 503 and kill a batch
    job).
    """
    repository, _ = two_model_repository
    server = start_triton(repository)
    backend = TritonBackend(server.grpc_url, models)
    classifier = Classifier(backend, models)
    image = smooth_image(120, 90, seed=8)
    options = ClassifyOptions(scales=(64, 96))
    tolerance = posterior_tolerance(models, torch_models, image_views(image, options.scales))

    async def run():
        expected = await classifier.classify(image, options)
        server.kill()
        outcomes = []
        for _ in range(10):  # 10 rounds of 8 requests, each of 4 calls in flight together
            requests = (classifier.classify(image, options) for _ in range(8))
            outcomes += await asyncio.gather(*requests, return_exceptions=True)
        kinds = {type(o).__name__ for o in outcomes}
        assert kinds == {"BackendUnavailable"}, kinds
        await asyncio.to_thread(server.start)
        deadline = time.monotonic() + RECOVERY_DEADLINE_S
        while True:
            try:
                recovered = await classifier.classify(image, options)
                break
            except BackendUnavailable:
                assert time.monotonic() < deadline, "no recovery after Triton came back"
                await asyncio.sleep(0.2)
        assert_same_classification(recovered, expected, tolerance)

    try:
        asyncio.run(run())
    finally:
        asyncio.run(backend.close())
        server.kill()
        server.close()
