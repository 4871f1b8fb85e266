"""Micro-batching across requests and shape bucketing: same numbers, fewer runs, few shapes."""

from __future__ import annotations

import asyncio
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient

from inference import Classifier, ClassifyOptions, read_repository
from inference import classifier as classifier_module
from inference.backends.onnxruntime import OnnxRuntimeBackend
from inference.batching import MicroBatcher, padded_batch_sizes
from inference.protocol import dense_batch, rescaled_size
from server.main import create_app
from server.settings import Settings
from testkit.images import png, smooth_image
from testkit.processes import run_server_command
from testkit.tolerances import largest_score, posterior_bound, score_bound


class Recording:
    """Forwards to a real backend and records the batch size of every run."""

    def __init__(self, backend) -> None:
        self.backend, self.name, self.sizes = backend, backend.name, []

    async def infer(self, model, images, outputs=("probs",)):
        self.sizes.append(len(images))
        return await self.backend.infer(model, images, outputs)

    async def ready(self):
        return True

    async def close(self):
        await self.backend.close()


@pytest.fixture(scope="module")
def served(two_model_repository):
    repo, _ = two_model_repository
    return read_repository(repo)


@pytest.fixture(scope="module")
def torch_models(two_model_repository):
    _, models = two_model_repository
    return list(models.values())


def largest_served_score(served, views) -> float:
    """The largest class score any of the served models gives any of the view batches."""
    return largest_score([entry.onnx_path for entry in served.values()], views)


# The same graph run on batches of other sizes may sum in other orders: results agree within the
# fp32 rounding bounds of testkit.tolerances, not bit for bit.


def test_concurrent_same_shape_views_run_as_one_batch_with_the_same_numbers(served, torch_models):
    images = [smooth_image(96, 72, seed) for seed in range(5)]
    views = [dense_batch(image, 64) for image in images]

    async def run():
        plain = OnnxRuntimeBackend(served)
        alone = [(await plain.infer("m16", v, ("probs", "scores"))) for v in views]
        recording = Recording(plain)
        batcher = MicroBatcher(recording, max_delay=0.05, max_batch=64)
        # gather starts the five calls in one turn of the event loop, before it looks at any
        # timer: they join whatever the delay and however loaded the machine is.
        together = await asyncio.gather(
            *(batcher.infer("m16", v, ("scores", "probs")) for v in views)
        )
        await batcher.close()
        return alone, together, recording.sizes

    alone, together, sizes = asyncio.run(run())
    assert sizes == [10]  # five requests x (image, flip) in one run
    largest = max(float(np.abs(a["scores"]).max()) for a in alone)
    for a, b in zip(alone, together, strict=True):
        assert set(b) == {"probs", "scores"}
        bound = posterior_bound(torch_models, largest)
        np.testing.assert_allclose(b["probs"], a["probs"], rtol=0, atol=bound)
        bound = score_bound(torch_models) * largest
        np.testing.assert_allclose(b["scores"], a["scores"], rtol=0, atol=bound)


def test_shapes_models_and_max_batch_are_never_mixed(served, torch_models):
    wide, tall = dense_batch(smooth_image(96, 72, 0), 64), dense_batch(smooth_image(72, 96, 1), 64)

    async def run():
        recording = Recording(OnnxRuntimeBackend(served))
        batcher = MicroBatcher(recording, max_delay=0.05, max_batch=4)
        calls = [batcher.infer("m16", wide) for _ in range(3)]  # 6 views > max_batch 4
        calls += [batcher.infer("m16", tall), batcher.infer("m19", wide)]
        results = await asyncio.gather(*calls)
        await batcher.close()
        return recording.sizes, results

    sizes, results = asyncio.run(run())
    assert sorted(sizes) == [2, 2, 2, 4]  # wide m16: 4 + 2; tall m16: 2; wide m19: 2
    assert all(r["probs"].shape == (2, 10) for r in results)
    bound = posterior_bound(torch_models, largest_served_score(served, [wide]))
    np.testing.assert_allclose(results[0]["probs"], results[2]["probs"], rtol=0, atol=bound)
    difference = np.abs(results[0]["probs"] - results[4]["probs"]).max()
    assert difference > 100 * bound  # m16 vs m19


@pytest.mark.parametrize(
    "max_batch, sizes",
    [
        (None, (1, 2, 25, 50)),  # no micro-batching: one request's views, its multi-crop batches
        (32, (1, 2, 4, 8, 16, 25, 32, 50)),
        (48, (1, 2, 4, 8, 16, 25, 32, 48, 50)),
        (64, (1, 2, 4, 8, 16, 25, 32, 50, 64)),
    ],
)
def test_padded_batch_sizes_hold_every_run_the_server_makes(max_batch, sizes):
    assert padded_batch_sizes(max_batch) == sizes
    # Every joined run up to max_batch fits one of them with less than half of it padding.
    for views in range(1, (max_batch or 2) + 1):
        padded = min(size for size in sizes if size >= views)
        assert padded < 2 * views


class Echo:
    """A backend that answers each view's first pixel as its "probs" and keeps what it ran."""

    name = "echo"

    def __init__(self) -> None:
        self.batches = []

    async def infer(self, model, images, outputs=("probs",)):
        self.batches.append(images)
        return {"probs": images[:, :1, 0, 0].astype(np.float32)}

    async def ready(self):
        return True

    async def close(self):
        pass


@pytest.mark.parametrize("side, off_the_loop", [(512, True), (64, False)])
def test_large_batches_are_joined_off_the_event_loop(monkeypatch, side, off_the_loop):
    # Two requests of 2 views at side x side: 3 MiB at 512 (above the 1 MiB threshold), 48 KiB at
    # 64 (below it: joined in place, cheaper than a thread hop).
    views = [np.full((2, 3, side, side), seed, dtype=np.uint8) for seed in (7, 9)]
    joined_in = []
    concatenate = np.concatenate

    def recording_concatenate(arrays, *args, **kwargs):
        joined_in.append(threading.get_ident())
        return concatenate(arrays, *args, **kwargs)

    monkeypatch.setattr(np, "concatenate", recording_concatenate)

    async def run():
        echo = Echo()
        batcher = MicroBatcher(echo, max_delay=0.05, max_batch=8)
        results = await asyncio.gather(*(batcher.infer("m", v) for v in views))
        await batcher.close()
        return threading.get_ident(), echo.batches, results

    loop_thread, batches, results = asyncio.run(run())
    assert len(joined_in) == 1 and (joined_in[0] != loop_thread) == off_the_loop
    assert len(batches) == 1 and np.array_equal(batches[0], np.concatenate(views))
    assert [r["probs"][:, 0].tolist() for r in results] == [[7, 7], [9, 9]]


def test_a_failed_batch_fails_every_caller_and_the_next_batch_works(served):
    view = dense_batch(smooth_image(96, 72, 0), 64)

    async def run():
        batcher = MicroBatcher(OnnxRuntimeBackend(served), max_delay=0.02)
        wrong = view[:, :, :, :10]  # 10 pixels wide: smaller than the net's 32-pixel minimum
        failed = await asyncio.gather(
            batcher.infer("m16", wrong), batcher.infer("m16", wrong), return_exceptions=True
        )
        ok = await batcher.infer("m16", view)
        await batcher.close()
        return failed, ok

    failed, ok = asyncio.run(run())
    assert len(failed) == 2 and all(isinstance(f, Exception) for f in failed)
    assert ok["probs"].shape == (2, 10)


def test_classifier_on_a_micro_batcher_equals_the_plain_classifier(served, torch_models):
    images = [smooth_image(100 + 7 * i, 80, i) for i in range(3)] * 2  # repeated shapes join

    async def run(wrap):
        backend = OnnxRuntimeBackend(served)
        classifier = Classifier(wrap(backend), served, default_scales=(64, 96))
        results = await asyncio.gather(
            *(classifier.classify(image, ClassifyOptions()) for image in images)
        )
        await classifier.backend.close()
        return [r.probabilities for r in results]

    plain = asyncio.run(run(lambda b: b))
    batched = asyncio.run(run(lambda b: MicroBatcher(b, max_delay=0.02)))
    views = [dense_batch(image, q) for image in images[:3] for q in (64, 96)]
    bound = posterior_bound(torch_models, largest_served_score(served, views))
    for a, b in zip(plain, batched, strict=True):
        np.testing.assert_allclose(b, a, rtol=0, atol=bound)


@pytest.mark.parametrize(
    ("size", "q", "multiple", "expected"),
    [
        ((640, 480), 256, None, (341, 256)),
        ((640, 480), 256, 32, (352, 256)),  # 341 -> 11 x 32
        ((480, 640), 256, 32, (256, 352)),
        ((500, 480), 256, 32, (256, 256)),  # 267 -> 8 x 32
        ((1000, 990), 40, 32, (40, 40)),  # 32 would be below Q: never shorter than Q
        ((1000, 480), 384, 64, (832, 384)),  # 800 = 12.5 x 64: halves round up
        ((300, 300), 256, 32, (256, 256)),
        ((1000, 999), 100, 64, (128, 100)),  # nearest multiple of 64 to 100
    ],
)
def test_shape_multiple_rounds_the_longer_side_to_the_nearest_multiple(size, q, multiple, expected):
    assert rescaled_size(*size, q, multiple) == expected
    if multiple:
        exact = max(rescaled_size(*size, q))
        assert abs(max(expected) - exact) <= multiple / 2 or max(expected) == q


def test_shape_multiple_makes_few_shapes_from_many_aspect_ratios(served):
    rng = np.random.default_rng(0)
    sizes = [(int(w), int(h)) for w, h in rng.integers(300, 1200, (200, 2))]
    exact = {rescaled_size(w, h, 256) for w, h in sizes}
    bucketed = {rescaled_size(w, h, 256, 32) for w, h in sizes}
    assert len(exact) > 100 and len(bucketed) <= 2 * (1200 // 300 * 256 // 32 + 1)

    async def shapes(multiple):
        recording = Recording(OnnxRuntimeBackend(served))
        classifier = Classifier(recording, served, default_scales=(64,), shape_multiple=multiple)
        seen = []

        async def infer(model, images, outputs=("probs",)):
            seen.append(images.shape[2:])
            return await recording.backend.infer(model, images, outputs)

        recording.infer = infer
        for w, h in [(97, 64), (101, 64), (64, 110), (64, 90)]:
            await classifier.classify(smooth_image(w, h, 0), ClassifyOptions(models=("m16",)))
        return seen

    assert asyncio.run(shapes(32)) == [(64, 96), (64, 96), (96, 64), (96, 64)]
    assert asyncio.run(shapes(None)) == [(64, 97), (64, 101), (110, 64), (90, 64)]


def test_server_with_batching_and_buckets_answers_like_the_library(
    two_model_repository, torch_models, monkeypatch
):
    repo, _ = two_model_repository
    # Four sizes, four exact shapes at each Q, one shape each once the longer side is rounded to
    # a multiple of 32: 96 x 64 at Q = 64 and 128 x 96 at Q = 96.
    images = [smooth_image(90 + 3 * i, 70, seed=i) for i in range(4)]
    for q, bucket in ((64, (96, 64)), (96, (128, 96))):
        assert len({rescaled_size(*image.size, q) for image in images}) == 4
        assert {rescaled_size(*image.size, q, 32) for image in images} == {bucket}
    uploads = [png(image) for image in images]

    async def reference():
        served = read_repository(repo)
        classifier = Classifier(
            OnnxRuntimeBackend(served), served, default_scales=(64, 96), shape_multiple=32
        )
        return [(await classifier.classify(i, ClassifyOptions())).probabilities for i in images]

    expected = asyncio.run(reference())

    # Each request's views are made in a worker thread; hold them there until all four requests
    # have theirs, so the batcher sees every request however the machine schedules the uploads.
    # A batch runs when it is full (4 requests x 2 views = max_batch): the 1 s delay only bounds
    # a hang.
    arrived = threading.Barrier(len(images), timeout=120)
    make_batch = classifier_module.dense_batch

    def dense_batch_when_all_arrived(image, q, *args, **kwargs):
        views = make_batch(image, q, *args, **kwargs)
        if q == 96:  # the last scale a request prepares
            arrived.wait()
        return views

    monkeypatch.setattr(classifier_module, "dense_batch", dense_batch_when_all_arrived)
    settings = Settings(
        repository=repo,
        scales=(64, 96),
        shape_multiple=32,
        batch_delay_ms=1000,
        max_batch=2 * len(images),
        jpeg_draft=True,
    )
    with TestClient(create_app(settings)) as client:

        def post(data: bytes):
            return client.post("/v1/classify", params={"top_k": 10}, files={"file": data})

        with ThreadPoolExecutor(len(uploads)) as pool:  # all four in flight together
            responses = list(pool.map(post, uploads))
        listing = client.get("/v1/models").json()
        metrics = client.get("/metrics").text
    assert listing["shape_multiple"] == 32
    # 4 requests x 2 models x 2 scales, each 2 views; every view counted once, in one run per
    # (model, Q).
    views = float(re.search(r"^vggserve_batch_views_sum (\S+)$", metrics, re.M).group(1))
    runs = float(re.search(r"^vggserve_batch_views_count (\S+)$", metrics, re.M).group(1))
    assert (views, runs) == (4 * 2 * 2 * 2, 2 * 2)
    batches = [dense_batch(image, q, True, 32) for image in images for q in (64, 96)]
    bound = posterior_bound(torch_models, largest_served_score(read_repository(repo), batches))
    for response, probs in zip(responses, expected, strict=True):
        assert response.status_code == 200, response.text
        got = {p["index"]: p["probability"] for p in response.json()["predictions"]}
        np.testing.assert_allclose([got[i] for i in range(10)], probs, rtol=0, atol=bound)


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        (("--batch-delay-ms", "5000"), "--batch-delay-ms must be between 0 and 1000"),
        (("--shape-multiple", "0"), "must be positive"),
        (("--max-batch", "-1"), "must be positive"),
    ],
)
def test_bad_batching_flags_are_refused_with_a_message(flag, message):
    result = run_server_command(*flag)
    assert result.returncode == 2
    assert message in result.stderr
