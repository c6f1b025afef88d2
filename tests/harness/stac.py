"""STAC validation with no network: pystac's validator with every schema an Item here names.

pystac ships the core STAC 1.1 and GeoJSON schemas and fetches an extension's schema from its
URI, which cannot work here (no internet, in CI neither). The projection extension's schema is
therefore written below from the extension's field list (v2.0.0: ``proj:code``, ``proj:wkt2``,
``proj:projjson``, ``proj:geometry``, ``proj:bbox``, ``proj:centroid``, ``proj:shape``,
``proj:transform``; allowed in Item properties and in assets; the Item must declare the
extension), and put in the validator's cache under the extension's URI, so ``validate`` checks
the core schemas and the extension's fields and fails on anything else unknown to it.
"""

from __future__ import annotations

from typing import Any

import pystac.validation
from pystac.extensions.projection import ProjectionExtension
from pystac.validation.stac_validator import JsonSchemaSTACValidator

PROJECTION_URI = ProjectionExtension.get_schema_uri()

_NUMBERS = {"type": "array", "items": {"type": "number"}}
_FIELDS: dict[str, Any] = {
    "proj:code": {"type": ["string", "null"]},
    "proj:wkt2": {"type": ["string", "null"], "minLength": 1},
    "proj:projjson": {"type": ["object", "null"]},
    "proj:geometry": {"$ref": "https://geojson.org/schema/Geometry.json"},
    "proj:bbox": {"anyOf": [{**_NUMBERS, "minItems": 4, "maxItems": 4},
                            {**_NUMBERS, "minItems": 6, "maxItems": 6}]},
    "proj:centroid": {
        "type": "object", "required": ["lat", "lon"],
        "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90},
                       "lon": {"type": "number", "minimum": -180, "maximum": 180}},
    },
    "proj:shape": {"type": "array", "minItems": 2, "maxItems": 2,
                   "items": {"type": "integer"}},
    "proj:transform": {"anyOf": [{**_NUMBERS, "minItems": 6, "maxItems": 6},
                                 {**_NUMBERS, "minItems": 9, "maxItems": 9}]},
}
_ANY_FIELD = {"patternProperties": {"^(?!proj:)": {}}, "additionalProperties": False}
PROJECTION_SCHEMA: dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "$id": PROJECTION_URI,
    "type": "object",
    "required": ["stac_extensions"],
    "properties": {
        "stac_extensions": {"type": "array", "contains": {"const": PROJECTION_URI}},
        "properties": {"type": "object", "properties": _FIELDS, **_ANY_FIELD},
        "assets": {"type": "object", "additionalProperties": {
            "type": "object", "properties": _FIELDS, **_ANY_FIELD,
        }},
    },
}


def validator() -> JsonSchemaSTACValidator:
    checker = JsonSchemaSTACValidator()
    checker.schema_cache[PROJECTION_URI] = PROJECTION_SCHEMA
    return checker


def validate(item: dict[str, Any]) -> None:
    """Raise pystac's ``STACValidationError`` unless ``item`` is a valid Item (core + projection);
    an extension other than projection fails (its schema is not here)."""
    pystac.validation.validate_dict(item, validator=validator())
