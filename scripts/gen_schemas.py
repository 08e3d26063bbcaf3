"""Write the JSON Schemas of the repository's files, generated from the pydantic models the
server validates them with, into docs/schemas/. tests/export/test_schemas.py checks that
regenerating changes nothing and that the bundled repository validates.

    .venv/bin/python scripts/gen_schemas.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.repository.config import EnsembleConfig, ModelConfig  # noqa: E402
from service.repository.manifest import VariantManifest  # noqa: E402

SCHEMAS = {
    "variant.schema.json": (VariantManifest, "variant.json", "The manifest `quorum export` writes next to every checkpoint."),
    "model.schema.json": (ModelConfig, "model.yaml", "Optional per-model configuration beside the version folders."),
    "ensemble.schema.json": (EnsembleConfig, "ensemble.yaml", "An ensemble: its members, voting policy and objective."),
}


def schemas() -> dict[str, str]:
    out = {}
    for filename, (model, file, description) in SCHEMAS.items():
        schema = model.model_json_schema()
        schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": file,
                  "description": description, **{k: v for k, v in schema.items() if k not in ("title", "description")}}
        out[filename] = json.dumps(schema, indent=2, sort_keys=False) + "\n"
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "schemas")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for filename, text in schemas().items():
        (args.out / filename).write_text(text)
        print(args.out / filename)
    return 0


if __name__ == "__main__":
    sys.exit(main())
