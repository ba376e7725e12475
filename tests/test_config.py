"""MustafarConfig's stored-value dtypes (k_value_dtype / v_value_dtype); the other fields are tested with
the cache (tests/cache/test_cache.py)."""

from __future__ import annotations

import pytest
import torch

from mustafar import MustafarConfig


def test_value_dtypes_default_to_the_model_dtype():
    cfg = MustafarConfig()
    assert (cfg.k_value_dtype, cfg.v_value_dtype) == ("model", "model")
    assert cfg.value_dtype("k") is None and cfg.value_dtype("v") is None


@pytest.mark.parametrize("mode", ["compressed", "simulate"])
def test_fp8_value_dtype_in_both_modes(mode):
    cfg = MustafarConfig(mode=mode, k_value_dtype="fp8_e4m3")
    assert cfg.value_dtype("k") == torch.float8_e4m3fn and cfg.value_dtype("v") is None
    cfg = MustafarConfig(mode=mode, k_value_dtype="fp8_e4m3", v_value_dtype="fp8_e4m3")
    assert cfg.value_dtype("v") == torch.float8_e4m3fn


@pytest.mark.parametrize("field", ["k_value_dtype", "v_value_dtype"])
@pytest.mark.parametrize("bad", ["fp8", "float16", "", None, torch.float8_e4m3fn])
def test_bad_value_dtype_raises_naming_it(field, bad):
    with pytest.raises(ValueError, match=field):
        MustafarConfig(**{field: bad})


def test_value_dtype_which():
    with pytest.raises(ValueError, match="which='q'"):
        MustafarConfig().value_dtype("q")
