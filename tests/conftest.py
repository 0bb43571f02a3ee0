"""Shared fixtures: the backends to parametrise over, and the cupy lane's collection rule.

``BACKEND_PARAMS`` is ["numpy"] plus "cupy" (marked ``gpu``) only when ``get_backend("cupy")``
works, i.e. cupy imports and a CUDA device answers. Tests that take the ``backend`` fixture run
on numpy always and on cupy when there is a GPU, so one test body covers both backends.

Without a GPU nothing of the cupy lane is collected: no cupy parametrisation, and no item for
any other test function marked ``gpu`` (``pytest_pycollect_makeitem`` below). What is left is ONE placeholder,
``tests/test_backends.py::test_cupy_lane_unavailable``, skipped with the reason (the
BackendUnavailable message) and the number of tests left out, so ``-ra`` prints one line for
the whole lane. ``pytest -m gpu --co`` on a GPU machine collects every GPU test.
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
PLACEHOLDER = "test_cupy_lane_unavailable"

BACKEND_PARAMS = [pytest.param("numpy", id="numpy")]
if HAS_GPU:
    BACKEND_PARAMS.append(pytest.param("cupy", id="cupy", marks=[pytest.mark.gpu]))


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request):
    """The backend object, parametrised over numpy and (with a GPU, marked gpu) cupy."""
    return get_backend(request.param)


_NOT_COLLECTED: list[str] = []  # gpu test functions not collected (no GPU)


def _marks(obj) -> list:
    m = getattr(obj, "pytestmark", [])
    return list(m) if isinstance(m, (list, tuple)) else [m]


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector, name, obj):
    """Without a GPU, a test function marked gpu (or in a gpu-marked module/class) yields no item."""
    if HAS_GPU or name == PLACEHOLDER or not callable(obj) or not collector.funcnamefilter(name):
        return None
    if any(m.name == "gpu" for m in _marks(obj) + _marks(collector.obj)):
        _NOT_COLLECTED.append(f"{collector.nodeid}::{name}")
        return []
    return None


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:  # the whole lane runs; the placeholder has nothing to say
        gone = [it for it in items if it.name == PLACEHOLDER]
        if gone:
            config.hook.pytest_deselected(items=gone)
            items[:] = [it for it in items if it.name != PLACEHOLDER]
        return
    # each numpy variant of the backend fixture stands for one cupy variant not generated
    twins = sum(1 for it in items
                if getattr(it, "callspec", None) and it.callspec.params.get("backend") == "numpy")
    reason = (f"cupy lane not collected ({twins} cupy variants of backend-parametrised tests, "
              f"{len(_NOT_COLLECTED)} gpu test functions): {CUPY_SKIP_REASON}")
    for it in items:
        if it.name == PLACEHOLDER:
            it.add_marker(pytest.mark.skip(reason=reason))
