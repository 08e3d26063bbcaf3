"""The repository's JSON Schemas (docs/schemas/) are what scripts/gen_schemas.py generates from
the pydantic models, and the bundled repository validates against them with jsonschema."""

from __future__ import annotations

import json
import subprocess
import sys

import jsonschema
import pytest
import yaml

from tests.helpers import MODELS, ROOT

SCHEMAS = ROOT / "docs" / "schemas"


def _schema(name: str) -> dict:
    schema = json.loads((SCHEMAS / name).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def test_regenerating_the_schemas_changes_nothing(tmp_path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_schemas.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True, cwd=ROOT)
    generated = sorted(p.name for p in tmp_path.iterdir())
    assert generated == sorted(p.name for p in SCHEMAS.glob("*.json"))
    for name in generated:
        assert (tmp_path / name).read_text() == (SCHEMAS / name).read_text(), f"docs/schemas/{name} is stale"


def test_the_bundled_manifests_validate() -> None:
    validator = jsonschema.Draft202012Validator(_schema("variant.schema.json"))
    manifests = sorted(MODELS.glob("*/*/variant.json"))
    assert len(manifests) == 5
    for path in manifests:
        validator.validate(json.loads(path.read_text()))


def test_the_bundled_ensembles_validate() -> None:
    validator = jsonschema.Draft202012Validator(_schema("ensemble.schema.json"))
    configs = sorted(MODELS.glob("*/ensemble.yaml"))
    assert [p.parent.name for p in configs] == ["digits", "digits_slo"]
    for path in configs:
        validator.validate(yaml.safe_load(path.read_text()))


def test_model_yaml_schema_takes_what_the_docs_show_and_refuses_typos() -> None:
    validator = jsonschema.Draft202012Validator(_schema("model.schema.json"))
    good = yaml.safe_load("version_policy:\n  latest:\n    num_versions: 2\nversion_labels:\n  stable: 1\n"
                          "device: cpu\nbatching:\n  max_batch_size: 32\n  max_queue_delay_us: 500\n")
    validator.validate(good)
    with pytest.raises(jsonschema.ValidationError, match="max_batch"):
        validator.validate({"batching": {"max_batch": 32}})
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(_schema("ensemble.schema.json")).validate({"members": ["a"], "policy": "vote"})


def _fields(schema: dict) -> set[str]:
    names = set(schema.get("properties", {}))
    for definition in schema.get("$defs", {}).values():
        names |= set(definition.get("properties", {}))
    return names


@pytest.mark.parametrize("name", ["variant.schema.json", "model.schema.json", "ensemble.schema.json"])
def test_docs_repository_explains_every_field(name) -> None:
    page = (ROOT / "docs" / "repository.md").read_text()
    missing = sorted(f for f in _fields(_schema(name)) if f"`{f}`" not in page)
    assert missing == [], f"docs/repository.md does not explain {missing}"
