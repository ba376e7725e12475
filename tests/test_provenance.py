"""Provenance records: what every results file carries."""

from mustafar.provenance import collect, commit_of


def test_collect_has_the_fields_results_files_need():
    prov = collect(command="python -m something --flag")
    for key in ("device", "python", "torch", "transformers", "git", "date", "command"):
        assert key in prov, key
    assert prov["command"] == "python -m something --flag"
    assert prov["git"]["commit"] != "HEAD"  # a real hash or None, never the literal ref name


def test_commit_env_override_and_both_layouts(monkeypatch):
    monkeypatch.setenv("MUSTAFAR_GIT_COMMIT", "0123abc")
    prov = collect()
    assert commit_of(prov) == "0123abc"
    assert commit_of({"git_commit": "feed42"}) == "feed42"
    assert commit_of({"device": "cpu"}) is None
