"""The conformance suite's fixtures.

* ``substrate`` runs a test once per usable backend and memory it serves (by capability:
  ``substrate.Substrate``); device memories carry the ``gpu`` mark. Backends that do not
  open here (the CuPy backend without a GPU) are not parametrized at all.
* ``backend`` is overridden with the substrate's backend, so the shared ``make_runtime``
  opens runtimes of the backend under test.
"""

from __future__ import annotations

from typing import Any

import pytest

from ..conftest import BACKENDS
from .substrate import Substrate, memories


def _substrates() -> list[Any]:
    out = []
    for name in BACKENDS:
        for memory in memories(name):
            sub = Substrate.of(name, memory)
            out.append(pytest.param(sub, id=sub.id, marks=[pytest.mark.gpu] if sub.on_device else []))
    return out


@pytest.fixture(params=_substrates())
def substrate(request: pytest.FixtureRequest) -> Substrate:
    """A usable backend and the memory its test arrays live in (NumPy/CPU torch or CuPy/CUDA torch)."""
    return request.param


@pytest.fixture
def backend(substrate: Substrate) -> str:
    """The backend under test (overrides the root conftest's host-memory backends)."""
    return substrate.backend
