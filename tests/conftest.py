"""Shared test settings: deterministic, small, CPU."""

import locale
import warnings

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _keep_locale(request):
    """Some C libraries reset LC_CTYPE to "C" (then Python decodes subprocess output as ASCII); undo and report it."""
    before = locale.setlocale(locale.LC_CTYPE)
    yield
    after = locale.setlocale(locale.LC_CTYPE)
    if after != before:
        locale.setlocale(locale.LC_CTYPE, before)
        warnings.warn(f"{request.node.nodeid} changed LC_CTYPE from {before!r} to {after!r}; restored.")


@pytest.fixture
def fresh_dynamo():
    """Clear torch.compile's caches around a test: compiled code lives on the function's code object for the whole
    process, and after 8 recompilations of one function dynamo silently falls back to eager."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
