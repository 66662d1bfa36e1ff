"""docs/PARAMS.md is generated from the params.yaml schema and must not go stale."""

from __future__ import annotations

import yaml

from pipeline import params_doc


def _leaves(node: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in node.items():
        if isinstance(value, dict):
            out += _leaves(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}")
    return out


def test_committed_reference_matches_the_schema(repo_root):
    committed = (repo_root / "docs" / "PARAMS.md").read_text()
    assert committed == params_doc.render(), "docs/PARAMS.md is stale: run python -m pipeline.params_doc"


def test_every_params_yaml_key_is_documented_with_a_description(repo_root):
    text = params_doc.render()
    rows = {line.split("|")[1].strip().strip("`"): line for line in text.splitlines() if line.startswith("| `")}
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    missing = [key for key in _leaves(params) if key not in rows]
    assert not missing, missing
    undescribed = [key for key, line in rows.items() if line.rstrip().endswith("|  |")]
    assert not undescribed, f"no description (add a comment or Field(description=...) in the schema): {undescribed}"


def test_check_flag_reports_a_stale_file(tmp_path, capsys):
    stale = tmp_path / "PARAMS.md"
    stale.write_text("# old\n")
    assert params_doc.main(["--out", str(stale), "--check"]) == 1
    assert "stale" in capsys.readouterr().err
    assert params_doc.main(["--out", str(stale)]) == 0
    assert params_doc.main(["--out", str(stale), "--check"]) == 0
