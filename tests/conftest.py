import os

# Triton's interpreter must be chosen before any @triton.jit decorator runs (docs/design.md §7).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_precision():
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    config.addinivalue_line("markers", "vllm: needs vLLM (skipped without it)")
    # a deprecated call from our code fails the suite under the pinned stack, before a release removes it: any
    # FutureWarning / DeprecationWarning attributed to a mem1_fast frame (third-party modules deprecating their own
    # internals, e.g. torch's on vLLM's import, are not ours; the engine tests also record every warning of a
    # rollout, whatever frame it is attributed to). Tests only: the benchmarks time third-party baselines.
    config.addinivalue_line("filterwarnings", "error::FutureWarning:mem1_fast")
    config.addinivalue_line("filterwarnings", "error::DeprecationWarning:mem1_fast")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is visible")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
