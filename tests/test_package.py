"""The public surface a new user touches first."""

from __future__ import annotations

import subprocess
import sys


def test_submodules_reachable_without_import():
    """``mustafar.capture.capture_qkv`` and ``mustafar.list_models()`` work right after ``import mustafar``."""
    code = ("import mustafar; assert callable(mustafar.capture.capture_qkv); "
            "assert 'tiny-llama' in mustafar.list_models(); assert mustafar.format.kept_count(128, 0.7) == 38")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_model_error_points_at_list_models():
    import pytest

    import mustafar

    with pytest.raises(ValueError, match="tiny-llama"):
        mustafar.load_model("no-such-model-name")


def test_local_gguf_directory_is_dequantized_once(tmp_path, monkeypatch):
    """A local directory holding a *.gguf is converted on the first load only; later loads read the cached copy."""
    import transformers

    import mustafar
    from mustafar import models

    monkeypatch.setenv("MUSTAFAR_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "model"
    src.mkdir()
    (src / "tiny.gguf").write_bytes(b"not really a gguf")
    tiny, _ = mustafar.load_model("tiny-llama")
    calls = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def fake(path, *a, **kw):
        calls.append(kw.get("gguf_file"))
        if kw.get("gguf_file"):  # stands in for the slow dequantization
            return type(tiny)(tiny.config).eval()
        return real(path, *a, **kw)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    m1, _ = models.load_model(str(src))
    m2, _ = models.load_model(str(src))
    assert calls == ["tiny.gguf", None]  # converted once, then loaded from the cache
    assert models._gguf_cache_dir(src / "tiny.gguf").is_dir()
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert a.equal(b)
