import pytest
import torch

from rectiflow import __version__
from rectiflow.convert.bundle import SamplingDefaults
from rectiflow.sample import Pipeline, random_bundle
from rectiflow.web.app import create_app
from rectiflow.web.jobs import ImageStore, JobManager
from rectiflow.web.schemas import Limits

SIZE, STEPS = 32, 2


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread():
    """These tests run many tiny model calls, often from worker threads: on a shared 2-core machine one
    intra-op thread is far faster than several spinning ones (and results do not depend on it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """A bundle with random micro weights, 32x32 and 2 steps by default: fast enough for many jobs."""
    return random_bundle(tmp_path_factory.mktemp("web") / "tiny",
                         defaults=SamplingDefaults(steps=STEPS, width=SIZE, height=SIZE))


@pytest.fixture(scope="session")
def tiny_pipe(tiny_bundle):
    return Pipeline.from_bundle(tiny_bundle, device="cpu", dtype=torch.float32)


@pytest.fixture
def make_app(tiny_pipe):
    """make_app(**manager_kwargs) -> (app, manager) serving tiny_pipe as model "tiny"."""

    def make(store_bytes=10**8, limits=None, pipelines=None, **kw):
        manager = JobManager(pipelines or {"tiny": tiny_pipe}, ImageStore(store_bytes),
                             settings_extra={"rectiflow_version": __version__}, **kw)
        return create_app(manager, limits or Limits()), manager

    return make
