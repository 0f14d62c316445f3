"""Offline validation of a Camtrap DP 1.0.2 package with the standard's own files, read in place.

``../shared/standards/camtrap-dp-1.0.2/`` holds the official profile (``camtrap-dp-profile.json``), the two
schemas it ``$ref``s (the Frictionless data-package profile and GeoJSON, served here from local copies by a
``referencing`` registry instead of the network) and the three official table schemas. This module:

* checks ``datapackage.json`` against the profile with ``jsonschema`` (draft-04, formats checked);
* checks the three CSV tables with ``frictionless`` against the official table schemas (types, constraints,
  the ``filePath`` pattern, ``missingValues``, primary and foreign keys across the tables).

``validate(pkg)`` returns ``(profile_errors, table_errors)``; a package is valid when both are empty.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

STANDARD = Path(__file__).resolve().parents[1].parent / "shared" / "standards" / "camtrap-dp-1.0.2"
TABLES = ("deployments", "media", "observations")
#: the URLs the profile $refs, mapped to the local copies of what they serve
REFS = {"https://specs.frictionlessdata.io/schemas/data-package.json": "frictionless-data-package-profile.json",
        "http://json.schemastore.org/geojson.json": "geojson-schema.json"}


def available() -> bool:
    return all((STANDARD / n).is_file() for n in ("camtrap-dp-profile.json", *REFS.values(),
                                                   *(f"{t}-table-schema.json" for t in TABLES)))


def _load(name: str) -> dict:
    return json.loads((STANDARD / name).read_text(encoding="utf-8"))


@cache
def _profile_validator():
    import jsonschema
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT4, DRAFT7

    pairs = []
    for url, name in REFS.items():
        contents = _load(name)
        spec = DRAFT7 if "draft-07" in str(contents.get("$schema", "")) else DRAFT4
        res = Resource.from_contents(contents, default_specification=spec)
        pairs.append((url, res))
        own = (contents.get("$id") or contents.get("id") or "").rstrip("#")
        if own:
            pairs.append((own, res))
    profile = _load("camtrap-dp-profile.json")
    cls = jsonschema.validators.validator_for(profile)
    return cls(profile, registry=Registry().with_resources(pairs), format_checker=cls.FORMAT_CHECKER)


def profile_errors(descriptor: dict) -> list[str]:
    """Every way ``descriptor`` breaks the Camtrap DP profile (``path: message``)."""
    return [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
            for e in sorted(_profile_validator().iter_errors(descriptor), key=lambda e: list(map(str, e.path)))]


def table_schema(table: str):
    import frictionless

    return frictionless.Schema.from_descriptor(_load(f"{table}-table-schema.json"))


def table_errors(pkg: Path) -> list[tuple]:
    """(table, row, field, error type, note) for every cell, row or key error in the package's tables."""
    import frictionless

    resources = [frictionless.Resource(path=f"{t}.csv", basepath=str(pkg), name=t, schema=table_schema(t))
                 for t in TABLES]
    report = frictionless.Package(resources=resources, basepath=str(pkg)).validate()
    out = [("package", None, None, e.type, e.note) for e in report.errors]
    for task in report.tasks:
        for e in task.errors:
            out.append((task.name, getattr(e, "row_number", None), getattr(e, "field_name", None), e.type, e.note))
    assert report.valid == (not out), "frictionless reported errors this collector missed"
    return out


def validate(pkg: Path) -> tuple[list[str], list[tuple]]:
    pkg = Path(pkg)
    descriptor = json.loads((pkg / "datapackage.json").read_text(encoding="utf-8"))
    return profile_errors(descriptor), table_errors(pkg)
