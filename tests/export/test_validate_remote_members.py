"""`quorum validate` on an ensemble with members served elsewhere (issue 39): what only their
endpoint knows is left to the server; a member with a local manifest (a foreign server's) is
checked against the others by the ensemble contract, as the server will."""

from __future__ import annotations

import json
import shutil

import yaml

from service.export.repository_check import check_repository
from tests.helpers import MODELS


def _repo(root, members: list) -> dict:
    shutil.copytree(MODELS / "digits_mlp_a", root / "digits_mlp_a")
    (root / "split").mkdir()
    (root / "split" / "ensemble.yaml").write_text(yaml.safe_dump({"members": members}))
    return {r.name: r for r in check_repository(root)}


def test_members_known_only_to_their_endpoint_are_left_to_the_server(tmp_path):
    reports = _repo(tmp_path, ["digits_mlp_a", {"name": "digits_cnn_a", "endpoint": "10.0.0.5:8500"},
                               {"name": "digits_logreg", "endpoint": "10.0.0.6:8500"}])
    split = reports["split"]
    assert split.refused == [] and split.degraded == []
    assert split.served == ["3 members (digits_mlp_a, digits_cnn_a, digits_logreg), policy confidence, 10 labels; "
                            "digits_cnn_a, digits_logreg served elsewhere, checked when the server reaches them"]


def test_a_local_manifest_of_another_label_set_is_refused(tmp_path):
    manifest = json.loads((MODELS / "digits_logreg" / "1" / "variant.json").read_text())
    manifest["labels"] = [f"class {label}" for label in manifest["labels"]]
    (tmp_path / "foreign.json").write_text(json.dumps(manifest))
    members = ["digits_mlp_a", {"name": "digits_logreg", "endpoint": "triton:8001", "manifest": "../foreign.json"}]
    split = _repo(tmp_path, members)["split"]
    assert any("digits_logreg" in line and "label" in line for line in split.refused), split.refused
