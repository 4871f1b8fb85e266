"""Fixtures shared by several test modules: small models built here (nothing is downloaded) and
one real tritonserver for the session. Helpers that are not fixtures live in ``testkit``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inference import read_repository
from testkit.logs import recorded_logs
from testkit.models import peaked_small_model, write_small_repository
from testkit.processes import start_triton


@pytest.fixture(scope="session")
def small_state_dict_path(tmp_path_factory) -> Path:
    """A torchvision-format state dict of a small VGG-16 with seeded peaked weights (posteriors
    far from uniform, so comparing them means something)."""
    model = peaked_small_model("vgg16", seed=0)
    path = tmp_path_factory.mktemp("weights") / "small16.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def two_model_repository(tmp_path_factory):
    """A repository with small VGG-16 ("m16") and VGG-19 ("m19") exports, and their torch models.

    Returns (repository path, {name: training-form torch model}); each model's weights are
    beside the repository as ``NAME.pth``.
    """
    root = tmp_path_factory.mktemp("two-models")
    repository = root / "repo"
    # Served at the paper's scales by default: the tests check the protocol there.
    models = write_small_repository(repository, scales=(256, 384, 512), weights_dir=root)
    return repository, models


@pytest.fixture(scope="session")
def entries(two_model_repository):
    """The two-model repository's entries, as the server reads them."""
    repo, _ = two_model_repository
    return read_repository(repo)


@pytest.fixture(scope="session")
def torch_models(two_model_repository):
    """The two-model repository's training-form torch models by name."""
    _, models = two_model_repository
    return models


@pytest.fixture(scope="module")
def app_log():
    """What apps running in this process log during the module (records that reach the root
    logger: the app's "server" logger and the frameworks'), tracebacks included."""
    with recorded_logs() as recorded:
        yield recorded


@pytest.fixture(scope="session")
def triton_server(two_model_repository):
    """One real tritonserver for the session, serving the twin of the two small models.

    Tests that kill Triton start their own (``testkit.processes.start_triton``).
    """
    repository, _ = two_model_repository
    # Runs of at most 4 requests of 2 x 224 x 256: the batching test then also exercises the
    # model's splitting of a large batch into several ONNX Runtime runs.
    limit = {"VGGSERVE_TRITON_MAX_RUN_PIXELS": str(4 * 2 * 224 * 256)}
    server = start_triton(repository, environment=limit)
    yield server
    server.close()
