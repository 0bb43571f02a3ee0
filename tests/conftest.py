"""Shared fixtures: the backends to parametrise over, and the gpu marker's skip rule.

``BACKENDS`` is ["numpy"] plus "cupy" when a GPU answers. Tests that take the ``backend``
fixture run on numpy always and on cupy under the ``gpu`` marker (skipped, with the reason,
when there is no GPU), so one test body covers both backends.
"""
from __future__ import annotations

import pytest

from refmtp.backends import BackendUnavailable, get_backend


def _cupy_reason():
    try:
        get_backend("cupy")
        return None
    except BackendUnavailable as exc:
        return str(exc)


CUPY_SKIP_REASON = _cupy_reason()
HAS_GPU = CUPY_SKIP_REASON is None

BACKEND_PARAMS = [
    pytest.param("numpy", id="numpy"),
    pytest.param(
        "cupy", id="cupy",
        marks=[pytest.mark.gpu,
               pytest.mark.skipif(not HAS_GPU, reason=f"needs a GPU: {CUPY_SKIP_REASON}")],
    ),
]


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request):
    """The backend object, parametrised over numpy and (under the gpu marker) cupy."""
    return get_backend(request.param)


def pytest_collection_modifyitems(config, items):
    # A test marked gpu without the backend fixture still skips with a reason on CPU machines.
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason=f"needs a GPU: {CUPY_SKIP_REASON}")
    for item in items:
        if "gpu" in item.keywords and not any(m.name == "skipif" for m in item.iter_markers()):
            item.add_marker(skip)
