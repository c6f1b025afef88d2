"""NodeODM option catalog and validation (scaleodm.common.domain.options; nodeodm-api §3.2, §5).

Covered:
- the packaged catalog: 80 entries, exactly five keys each, string defaults, type counts, the
  ``/options`` body equal to the packaged JSON, caching, ``parse_catalog`` rejections;
- every options example of the spec (§5.1 step 7, §3.11, §13 capture and lenient cases) with the
  exact ``error`` strings, and WebODM's restart test (mesh-size 12345 + ``invalid``);
- JS ``parseInt``/``parseFloat``/``String()`` semantics, bool conversion rules; numbers held as
  the Python value that JSON-encodes like the JS number (a float option's ``3`` stays ``3``);
- every distinct domain of the catalog (one accepting and one rejecting value each, where a
  rejecting value exists) plus the §5.2 grammar forms the catalog does not use, via small
  synthetic catalogs; the ``json`` domain rules;
- first-wins duplicates, unknown/nameless/non-object entries, non-array input → ``[]``, malformed
  JSON → ``OptionsError``, the max-concurrency cap, auto-added post-processing options, engine args;
- the deliberate stricter rules: every accepted value a scalar of its declared type (arrays and
  objects refused, string options stored as the engine's argument), ``{{`` refused in any value,
  long values cut in messages.

Left out: the JSON-parse message text (runtime-specific, §11 quirk 5: only its presence is
checked); HTTP transport of the errors (gateway tests); generating a catalog from an ODM image.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from importlib import resources
from typing import Any

import pytest

from scaleodm.common.domain.options import (
    CATALOG_KEYS,
    OptionsError,
    OptionSpec,
    OptionType,
    add_post_processing_options,
    catalog_as_json,
    js_number,
    js_parse_float,
    js_parse_int,
    js_to_string,
    load_catalog,
    parse_catalog,
    parse_options,
    to_engine_args,
    validate_options,
)

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _errors(*pairs: tuple[str, str]) -> str:
    """The NodeODM error string for per-option failures, in the given (catalog) order."""
    items = [{"name": n, "error": e} for n, e in pairs]
    return json.dumps(items, separators=(",", ":"), ensure_ascii=False)


def _one(name: str, value: Any) -> list[dict[str, Any]]:
    return [{"name": name, "value": value}]


def _spec(name: str, type_: OptionType, domain: str | tuple[str, ...]) -> OptionSpec:
    return OptionSpec(name=name, type=type_, value="", domain=domain, help="")


def _rejection(raw: Any, catalog: list[OptionSpec] | None = None) -> str:
    with pytest.raises(OptionsError) as info:
        validate_options(raw, catalog)
    return info.value.error


def _same(a: object, b: object) -> bool:
    """Equality that also treats NaN as equal to NaN and keeps int/float/bool apart."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


# --------------------------------------------------------------------------------------------
# catalog (§3.2)
# --------------------------------------------------------------------------------------------


def test_catalog_has_80_entries_with_exactly_five_string_keys() -> None:
    body = catalog_as_json()
    assert len(body) == 80
    for entry in body:
        assert list(entry) == ["name", "type", "value", "domain", "help"]
        assert isinstance(entry["value"], str)
        assert isinstance(entry["name"], str) and isinstance(entry["help"], str)
        domain = entry["domain"]
        if entry["type"] == "enum":
            assert isinstance(domain, list) and all(isinstance(d, str) for d in domain)
        else:
            assert isinstance(domain, str)
        if entry["type"] == "bool":
            assert domain == "" and entry["value"] in ("true", "false")


def test_catalog_type_counts_match_spec() -> None:
    counts = Counter(spec.type for spec in load_catalog())
    assert counts == {"bool": 42, "float": 13, "enum": 11, "int": 10, "string": 4}


def test_catalog_body_equals_packaged_json_in_order() -> None:
    text = resources.files("scaleodm.common.domain").joinpath("odm_options.json").read_text()
    assert catalog_as_json() == json.loads(text)


@pytest.mark.parametrize(
    ("name", "key", "expected"),
    [
        pytest.param("end-with", "value", "odm_postprocess", id="first-entry"),
        pytest.param("rerun-from", "domain", ["", "dataset"], id="enum-default-prepended"),
        pytest.param("smrf-window", "value", "18", id="float-default-js-formatted"),
        pytest.param("sm-cluster", "value", "None", id="string-default-None"),
        pytest.param("3d-tiles", "type", "bool", id="digit-leading-name"),
        pytest.param("max-concurrency", "help", "%(default)s", id="help-unsubstituted"),
    ],
)
def test_catalog_entry_details(name: str, key: str, expected: object) -> None:
    entry = next(e for e in catalog_as_json() if e["name"] == name)
    actual = entry[key]
    if isinstance(actual, list) and isinstance(expected, list):
        assert actual[: len(expected)] == expected
    elif key == "help":
        assert isinstance(actual, str) and isinstance(expected, str) and expected in actual
    else:
        assert actual == expected


def test_catalog_is_cached_and_frozen() -> None:
    assert load_catalog() is load_catalog()
    with pytest.raises(dataclasses.FrozenInstanceError):
        load_catalog()[0].name = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    "entries",
    [
        pytest.param({"name": "x"}, id="not-an-array"),
        pytest.param([{"name": "x", "type": "int", "value": "1", "domain": ""}], id="key-missing"),
        pytest.param(
            [{"name": "x", "type": "int", "value": "1", "domain": "", "help": "", "extra": 1}],
            id="extra-key",
        ),
        pytest.param(
            [{"name": "x", "type": "integer", "value": "1", "domain": "", "help": ""}],
            id="unknown-type",
        ),
        pytest.param(
            [{"name": "x", "type": "int", "value": 1, "domain": "", "help": ""}],
            id="non-string-value",
        ),
        pytest.param(
            [{"name": "x", "type": "enum", "value": "a", "domain": ["a", 1], "help": ""}],
            id="non-string-choice",
        ),
        pytest.param(
            [{"name": "x", "type": "bool", "value": "true", "domain": "", "help": ""}] * 2,
            id="duplicate-name",
        ),
    ],
)
def test_parse_catalog_rejects_malformed(entries: object) -> None:
    with pytest.raises(ValueError):
        parse_catalog(entries)


def test_catalog_keys_constant() -> None:
    assert CATALOG_KEYS == ("name", "type", "value", "domain", "help")


# --------------------------------------------------------------------------------------------
# spec examples (§5.1, §3.11, §13)
# --------------------------------------------------------------------------------------------

CAPTURE_RAW = (
    '[{"name":"orthophoto-resolution","value":"-5"},'
    '{"name":"feature-quality","value":"super"},'
    '{"name":"fast-orthophoto","value":"maybe"}]'
)
CAPTURE_ERROR = (
    '[{"name":"feature-quality","error":"Invalid value super (not in enum)"},'
    '{"name":"fast-orthophoto","error":"Cannot convert maybe to boolean"},'
    '{"name":"orthophoto-resolution","error":"Invalid value -5 (out of range)"}]'
)
# The §13 response body, verbatim.
CAPTURE_BODY = (
    r'{"error":"[{\"name\":\"feature-quality\",\"error\":\"Invalid value super (not in enum)\"},'
    r"{\"name\":\"fast-orthophoto\",\"error\":\"Cannot convert maybe to boolean\"},"
    r'{\"name\":\"orthophoto-resolution\",\"error\":\"Invalid value -5 (out of range)\"}]"}'
)


@pytest.mark.parametrize(
    ("raw", "expected_error"),
    [
        pytest.param(CAPTURE_RAW, CAPTURE_ERROR, id="s13-three-errors-catalog-order"),
        pytest.param(
            json.loads(CAPTURE_RAW), CAPTURE_ERROR, id="s13-three-errors-from-parsed-array"
        ),
        pytest.param(
            [{"name": "boundary", "value": "{bad"}, {"name": "crop", "value": -1}],
            '[{"name":"crop","error":"Invalid value -1 (out of range)"},'
            '{"name":"boundary","error":"Invalid value {bad (out of range)"}]',
            id="s5.1-step7-crop-boundary",
        ),
        pytest.param(
            '[{"name":"feature-quality","value":"super"}]',
            '[{"name":"feature-quality","error":"Invalid value super (not in enum)"}]',
            id="s13-restart-and-init-feature-quality",
        ),
    ],
)
def test_spec_error_examples(raw: Any, expected_error: str) -> None:
    assert _rejection(raw) == expected_error


def test_s13_error_as_wire_body() -> None:
    body = json.dumps({"error": _rejection(CAPTURE_RAW)}, separators=(",", ":"))
    assert body == CAPTURE_BODY


def test_options_error_carries_structured_errors() -> None:
    with pytest.raises(OptionsError) as info:
        validate_options('[{"name":"feature-quality","value":"super"}]')
    assert str(info.value) == info.value.error
    assert info.value.option_errors == (
        {"name": "feature-quality", "error": "Invalid value super (not in enum)"},
    )


@pytest.mark.parametrize(
    ("raw", "skip", "expected"),
    [
        pytest.param(
            '[{"name":"fast-orthophoto","value":true},'
            '{"name":"orthophoto-resolution","value":"2.5"}]',
            False,
            [
                {"name": "fast-orthophoto", "value": True},
                {"name": "orthophoto-resolution", "value": 2.5},
                {"name": "pc-ept", "value": True},
                {"name": "cog", "value": True},
                {"name": "gltf", "value": True},
            ],
            id="s13-create-test-task-1",
        ),
        pytest.param(
            '{"name":"fast-orthophoto","value":true}',
            False,
            [
                {"name": "pc-ept", "value": True},
                {"name": "cog", "value": True},
                {"name": "gltf", "value": True},
            ],
            id="s13-lenient-object-not-array",
        ),
        pytest.param(
            '[{"name":"no-such-option","value":true}]',
            False,
            [
                {"name": "pc-ept", "value": True},
                {"name": "cog", "value": True},
                {"name": "gltf", "value": True},
            ],
            id="s13-lenient-unknown-option",
        ),
        pytest.param(
            '[{"name":"dsm","value":"true"},{"name":"max-concurrency","value":"4"}]',
            False,
            [
                {"name": "max-concurrency", "value": 4},
                {"name": "dsm", "value": True},
                {"name": "pc-ept", "value": True},
                {"name": "cog", "value": True},
                {"name": "gltf", "value": True},
            ],
            id="s13-lenient-reordered-typed",
        ),
        pytest.param(
            '[{"name":"dsm","value":true}]',
            True,
            [{"name": "dsm", "value": True}],
            id="s13-chunked-skip-post-processing",
        ),
        pytest.param(
            [{"name": "mesh-size", "value": 12345}, {"name": "invalid", "value": True}],
            False,
            [
                {"name": "mesh-size", "value": 12345},
                {"name": "pc-ept", "value": True},
                {"name": "cog", "value": True},
                {"name": "gltf", "value": True},
            ],
            id="s3.11-webodm-restart",
        ),
        pytest.param(
            json.dumps({"mesh-size": 12345}),
            False,
            [
                {"name": "pc-ept", "value": True},
                {"name": "cog", "value": True},
                {"name": "gltf", "value": True},
            ],
            id="dict-form-is-not-an-array",
        ),
    ],
)
def test_spec_accepted_examples(raw: Any, skip: bool, expected: list[dict[str, Any]]) -> None:
    options = add_post_processing_options(validate_options(raw), skip_post_processing=skip)
    assert options == expected
    assert all(_same(o["value"], e["value"]) for o, e in zip(options, expected, strict=True))


def test_webodm_restart_without_post_processing_is_exactly_mesh_size() -> None:
    result = validate_options(
        json.dumps([{"name": "mesh-size", "value": 12345}, {"name": "invalid", "value": True}])
    )
    assert result == [{"name": "mesh-size", "value": 12345}]
    assert type(result[0]["value"]) is int


# --------------------------------------------------------------------------------------------
# JavaScript coercions (§5.1 step 4, quirk 4)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("12", 12, id="plain"),
        pytest.param("1.7", 1, id="decimal-truncated"),
        pytest.param("12abc", 12, id="trailing-garbage"),
        pytest.param("abc", math.nan, id="no-digits"),
        pytest.param("", math.nan, id="empty"),
        pytest.param("-", math.nan, id="sign-only"),
        pytest.param("-12", -12, id="negative"),
        pytest.param("+12", 12, id="plus"),
        pytest.param("  12", 12, id="leading-spaces"),
        pytest.param("\t\n\v\f\r12", 12, id="leading-ascii-whitespace"),
        pytest.param("\u00a0\u2003\u3000\ufeff12", 12, id="leading-unicode-whitespace"),
        pytest.param("\x1c12", math.nan, id="python-only-whitespace-not-skipped"),
        pytest.param("1 2", 1, id="inner-space"),
        pytest.param("- 12", math.nan, id="space-after-sign"),
        pytest.param("0x1f", 31, id="hex-prefix"),
        pytest.param("-0X1F", -31, id="negative-hex"),
        pytest.param("0x", math.nan, id="hex-prefix-only"),
        pytest.param("0b11", 0, id="no-binary-prefix"),
        pytest.param("1e5", 1, id="exponent-ignored"),
        pytest.param("Infinity", math.nan, id="infinity-string"),
        pytest.param("007", 7, id="leading-zeros"),
        pytest.param(12, 12, id="number"),
        pytest.param(1.7, 1, id="float-truncated"),
        pytest.param(-1.7, -1, id="negative-float-truncated"),
        pytest.param(12.0, 12, id="integral-float"),
        pytest.param(1e21, 1, id="float-printed-with-exponent"),
        pytest.param(1e-7, 1, id="tiny-float-printed-with-exponent"),
        pytest.param(True, math.nan, id="bool"),
        pytest.param(None, math.nan, id="null"),
        pytest.param([12, 3], 12, id="array-joined"),
        pytest.param([], math.nan, id="empty-array"),
        pytest.param({"a": 1}, math.nan, id="object"),
    ],
)
def test_js_parse_int(value: object, expected: float) -> None:
    assert _same(js_parse_int(value), expected)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("3.5", 3.5, id="plain"),
        pytest.param("3.5x", 3.5, id="trailing-garbage"),
        pytest.param("abc", math.nan, id="no-digits"),
        pytest.param("", math.nan, id="empty"),
        pytest.param(".5", 0.5, id="leading-dot"),
        pytest.param("5.", 5.0, id="trailing-dot"),
        pytest.param(".", math.nan, id="dot-only"),
        pytest.param("-.5e-3x", -0.0005, id="signed-exponent"),
        pytest.param("1e", 1.0, id="dangling-exponent"),
        pytest.param("1e+", 1.0, id="dangling-exponent-sign"),
        pytest.param("2E3", 2000.0, id="upper-exponent"),
        pytest.param("1e999", math.inf, id="overflow"),
        pytest.param("Infinity", math.inf, id="infinity"),
        pytest.param("-Infinityx", -math.inf, id="negative-infinity-prefix"),
        pytest.param("+Infinity", math.inf, id="plus-infinity"),
        pytest.param("infinity", math.nan, id="infinity-is-case-sensitive"),
        pytest.param("inf", math.nan, id="python-inf-rejected"),
        pytest.param("nan", math.nan, id="python-nan-rejected"),
        pytest.param("1_000", 1.0, id="no-underscore-grouping"),
        pytest.param("0x10", 0.0, id="no-hex"),
        pytest.param(" \n 2.5", 2.5, id="leading-whitespace"),
        pytest.param("\u20282.5", 2.5, id="line-separator-whitespace"),
        pytest.param(2.5, 2.5, id="number"),
        pytest.param(7, 7.0, id="int-number"),
        pytest.param(True, math.nan, id="bool"),
        pytest.param(None, math.nan, id="null"),
        pytest.param(["2.5", 1], 2.5, id="array-joined"),
    ],
)
def test_js_parse_float(value: object, expected: float) -> None:
    result = js_parse_float(value)
    assert isinstance(result, float)
    assert _same(result, float(expected))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("abc", "abc", id="string"),
        pytest.param(2.0, "2", id="integral-float"),
        pytest.param(2.5, "2.5", id="float"),
        pytest.param(-0.0, "0", id="negative-zero"),
        pytest.param(0.1, "0.1", id="shortest-round-trip"),
        pytest.param(1e21, "1e+21", id="exponent-from-1e21"),
        pytest.param(123456789012345680000.0, "123456789012345680000", id="below-1e21"),
        pytest.param(1e-7, "1e-7", id="small-exponent"),
        pytest.param(1.5e-7, "1.5e-7", id="small-exponent-fraction"),
        pytest.param(0.000001, "0.000001", id="1e-6-fixed"),
        pytest.param(-2.5e-8, "-2.5e-8", id="negative-small"),
        pytest.param(12345, "12345", id="int"),
        pytest.param(2**60, "1152921504606847000", id="int-beyond-double-precision"),
        pytest.param(10**400, "Infinity", id="int-beyond-double-range"),
        pytest.param(math.nan, "NaN", id="nan"),
        pytest.param(-math.inf, "-Infinity", id="negative-infinity"),
        pytest.param(True, "true", id="true"),
        pytest.param(False, "false", id="false"),
        pytest.param(None, "null", id="null"),
        pytest.param({"a": 1}, "[object Object]", id="object"),
        pytest.param([1, None, [2.0, "x"], True], "1,,2,x,true", id="array"),
        pytest.param([], "", id="empty-array"),
        pytest.param([{}], "[object Object]", id="array-of-object"),
    ],
)
def test_js_to_string(value: object, expected: str) -> None:
    assert js_to_string(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(7.0, 7, id="integral"),
        pytest.param(7.5, 7.5, id="fraction"),
        pytest.param(-0.0, 0, id="negative-zero"),
        pytest.param(-3.0, -3, id="negative"),
        pytest.param(1e20, 100000000000000000000, id="beyond-int64-in-full"),
        pytest.param(1.2345678901234567e19, 12345678901234567000, id="js-digits-not-binary"),
        pytest.param(1e21, 1e21, id="exponent-form-stays-float"),
        pytest.param(math.inf, math.inf, id="infinity"),
        pytest.param(math.nan, math.nan, id="nan"),
    ],
)
def test_js_number_json_encodes_like_json_stringify(value: float, expected: float) -> None:
    result = js_number(value)
    assert _same(result, expected)
    if math.isfinite(value):
        assert json.dumps(result) == js_to_string(value)  # JSON.stringify's text


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        pytest.param("mesh-size", "1.7", 1, id="int-decimal-string"),
        pytest.param("mesh-size", "12abc", 12, id="int-garbage-suffix"),
        pytest.param("mesh-size", 12345.9, 12345, id="int-number-truncated"),
        pytest.param("mesh-size", " 300", 300, id="int-leading-space"),
        pytest.param("mesh-size", "0x10", 16, id="int-hex"),
        pytest.param("min-num-features", "-5", -5, id="int-unprefixed-allows-negative"),
        pytest.param("crop", "3.5x", 3.5, id="float-garbage-suffix"),
        # JS numbers: an integral float option value is held as an int, shown 3 (not 3.0)
        pytest.param("crop", 3, 3, id="float-from-int-is-js-number"),
        pytest.param("crop", "3", 3, id="float-from-integral-string-is-js-number"),
        pytest.param("crop", 3.0, 3, id="float-from-integral-float-is-js-number"),
        pytest.param("crop", "1e3", 1000, id="float-from-exponent-string-is-js-number"),
        pytest.param("crop", "3.5", 3.5, id="float-fraction-stays-float"),
        pytest.param("crop", "Infinity", math.inf, id="float-infinity-positive-domain"),
        pytest.param("orthophoto-resolution", "Infinity", math.inf, id="float-infinity-gt-0"),
        pytest.param("split-overlap", 2.5, 2.5, id="positive-integer-on-float-keeps-fraction"),
        pytest.param("crop", "0", 0, id="positive-includes-zero"),
        pytest.param("crop", "-0", 0, id="negative-zero-is-positive-and-shown-0"),
    ],
)
def test_numeric_conversion_through_validation(name: str, value: Any, expected: float) -> None:
    result = validate_options(_one(name, value))
    assert len(result) == 1 and result[0]["name"] == name
    assert _same(result[0]["value"], expected)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        pytest.param("mesh-size", "abc", "Invalid value NaN (out of range)", id="int-nan"),
        pytest.param("mesh-size", "Infinity", "Invalid value NaN (out of range)", id="int-inf"),
        pytest.param("mesh-size", True, "Invalid value NaN (out of range)", id="int-bool"),
        pytest.param("mesh-size", None, "Invalid value NaN (out of range)", id="int-null"),
        pytest.param("mesh-size", "-1", "Invalid value -1 (out of range)", id="int-negative"),
        pytest.param("crop", "x3", "Invalid value NaN (out of range)", id="float-nan"),
        pytest.param("crop", -0.5, "Invalid value -0.5 (out of range)", id="float-negative"),
        pytest.param(
            "dem-resolution",
            "Infinity",
            "Invalid value Infinity (out of range)",
            id="float-infinity-unprefixed-float-domain",
        ),
        pytest.param(
            "mesh-octree-depth", 15.0, "Invalid value 15 (out of range)", id="int-message-js-form"
        ),
    ],
)
def test_numeric_rejections(name: str, value: Any, message: str) -> None:
    assert _rejection(_one(name, value)) == _errors((name, message))


def test_missing_value_on_numeric_option_is_nan() -> None:
    assert _rejection([{"name": "mesh-size"}]) == _errors(
        ("mesh-size", "Invalid value NaN (out of range)")
    )


# --------------------------------------------------------------------------------------------
# bool (§5.1 step 4)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(True, True, id="json-true"),
        pytest.param(False, False, id="json-false"),
        pytest.param("true", True, id="string-true"),
        pytest.param("false", False, id="string-false"),
        pytest.param("1", True, id="string-1"),
        pytest.param("0", False, id="string-0"),
    ],
)
def test_bool_accepted(value: Any, expected: bool) -> None:
    assert validate_options(_one("dsm", value)) == [{"name": "dsm", "value": expected}]


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        pytest.param(1, "1", id="number-1"),
        pytest.param(0, "0", id="number-0"),
        pytest.param(1.0, "1", id="float-1"),
        pytest.param("True", "True", id="capitalised"),
        pytest.param("yes", "yes", id="yes"),
        pytest.param(" true", " true", id="padded"),
        pytest.param("", "", id="empty-string"),
        pytest.param("maybe", "maybe", id="maybe"),
        pytest.param(None, "null", id="null"),
        pytest.param({"a": 1}, "[object Object]", id="object"),
        pytest.param([True], "true", id="array-of-true"),
        pytest.param(["1", "0"], "1,0", id="array"),
    ],
)
def test_bool_rejected(value: Any, shown: str) -> None:
    assert _rejection(_one("dsm", value)) == _errors(("dsm", f"Cannot convert {shown} to boolean"))


def test_bool_without_value_is_undefined() -> None:
    assert _rejection([{"name": "dsm"}]) == _errors(("dsm", "Cannot convert undefined to boolean"))


# --------------------------------------------------------------------------------------------
# domain grammar (§5.2): every distinct domain of the catalog
# --------------------------------------------------------------------------------------------

# domain → (option of the catalog with that domain, accepted value, typed result, rejected value
# or None when the domain accepts everything, expected message)
_CATALOG_DOMAINS: dict[str, tuple[str, Any, Any, Any, str]] = {
    "": ("dsm", "1", True, "2", "Cannot convert 2 to boolean"),
    "integer": ("min-num-features", "-3", -3, "x", "Invalid value NaN (out of range)"),
    "positive integer": ("mesh-size", "0", 0, "-1", "Invalid value -1 (out of range)"),
    "integer: 1 <= x <= 14": ("mesh-octree-depth", "14", 14, "0", "Invalid value 0 (out of range)"),
    "float": ("dem-resolution", "-2.5", -2.5, "-", "Invalid value NaN (out of range)"),
    "positive float": ("crop", 0, 0, "-0.1", "Invalid value -0.1 (out of range)"),
    "float > 0.0": ("orthophoto-resolution", "0.01", 0.01, "0", "Invalid value 0 (out of range)"),
    "json": ("cameras", "{}", "{}", "", "Invalid value  (out of range)"),
    "string": ("sm-cluster", "http://host:3000", "http://host:3000", None, ""),
}


def _enum_domains() -> list[tuple[str, tuple[str, ...]]]:
    seen: dict[tuple[str, ...], str] = {}
    for spec in load_catalog():
        if isinstance(spec.domain, tuple):
            seen.setdefault(spec.domain, spec.name)
    return [(name, domain) for domain, name in seen.items()]


def test_domain_table_covers_every_catalog_domain() -> None:
    string_domains = {spec.domain for spec in load_catalog() if isinstance(spec.domain, str)}
    assert string_domains == set(_CATALOG_DOMAINS)
    assert len(_enum_domains()) == 10  # feature-quality and pc-quality share their choices


@pytest.mark.parametrize("domain", [pytest.param(d, id=d or "empty") for d in _CATALOG_DOMAINS])
def test_catalog_domain_accepts_and_rejects(domain: str) -> None:
    name, good, typed, bad, message = _CATALOG_DOMAINS[domain]
    spec = next(s for s in load_catalog() if s.name == name)
    assert spec.domain == domain
    result = validate_options(_one(name, good))
    assert result == [{"name": name, "value": typed}]
    assert _same(result[0]["value"], typed)
    if bad is None:  # "string": no scalar is out of range (objects are refused, see below)
        assert validate_options(_one(name, "any")) == _one(name, "any")
    else:
        assert _rejection(_one(name, bad)) == _errors((name, message))


@pytest.mark.parametrize(("name", "domain"), [pytest.param(n, d, id=n) for n, d in _enum_domains()])
def test_catalog_enum_domain_accepts_and_rejects(name: str, domain: tuple[str, ...]) -> None:
    for choice in domain:
        assert validate_options(_one(name, choice)) == _one(name, choice)
    bad = next(c for c in domain if c).upper() + "x"
    assert _rejection(_one(name, bad)) == _errors((name, f"Invalid value {bad} (not in enum)"))


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        pytest.param("HIGH", "HIGH", id="case-sensitive"),
        pytest.param(" high", " high", id="padded"),
        pytest.param(2.0, "2", id="number-js-form"),
        pytest.param(True, "true", id="bool"),
        pytest.param(None, "null", id="null"),
        pytest.param(["high"], "high", id="array-with-choice"),
        pytest.param({"v": "high"}, "[object Object]", id="object"),
    ],
)
def test_enum_rejects_non_choices(value: Any, shown: str) -> None:
    assert _rejection(_one("feature-quality", value)) == _errors(
        ("feature-quality", f"Invalid value {shown} (not in enum)")
    )


def test_enum_without_value_is_undefined() -> None:
    assert _rejection([{"name": "feature-quality"}]) == _errors(
        ("feature-quality", "Invalid value undefined (not in enum)")
    )


def test_enum_empty_default_choice_is_valid() -> None:
    assert validate_options(_one("rerun-from", "")) == _one("rerun-from", "")


# Grammar forms not used by the packaged catalog (a production catalog may use them; ClusterODM
# validates with the same grammar). Each case: type, domain, value, typed result or error text.
@pytest.mark.parametrize(
    ("type_", "domain", "value", "expected"),
    [
        pytest.param("int", "negative integer", "-3", -3, id="negative-integer-ok"),
        pytest.param("int", "negative integer", "0", 0, id="negative-includes-zero"),
        pytest.param(
            "int", "negative integer", "1", "Invalid value 1 (out of range)", id="negative-bad"
        ),
        pytest.param("float", "negative float", "-0.5", -0.5, id="negative-float-ok"),
        pytest.param("float", "integer", "2", 2, id="integer-domain-integral-float"),
        pytest.param(
            "float", "integer", "2.5", "Invalid value 2.5 (out of range)", id="integer-domain-frac"
        ),
        pytest.param("float", "percent", "100", 100, id="percent-upper-inclusive"),
        pytest.param("float", "percent", "0", 0, id="percent-lower-inclusive"),
        pytest.param(
            "float", "percent", "100.5", "Invalid value 100.5 (out of range)", id="percent-over"
        ),
        pytest.param(
            "float", "percent", "-1", "Invalid value -1 (out of range)", id="percent-under"
        ),
        pytest.param("float", "float: 0.5 <= x <= 1.5", "1.5", 1.5, id="float-range-inclusive"),
        pytest.param(
            "float",
            "float: 0.5 <= x <= 1.5",
            "1.51",
            "Invalid value 1.51 (out of range)",
            id="float-range-above",
        ),
        pytest.param(
            "float",
            "integer: 1 <= x <= 14",
            "14.5",
            "Invalid value 14.5 (out of range)",
            id="integer-range-no-rounding",
        ),
        pytest.param(
            "float", "integer: 1.9 <= x <= 3", "1.5", 1.5, id="integer-range-bound-parseint"
        ),
        pytest.param("int", "integer >= 2", "2", 2, id="ge-ok"),
        pytest.param("int", "integer >= 2", "1", "Invalid value 1 (out of range)", id="ge-bad"),
        pytest.param("int", "integer > 2", "2", "Invalid value 2 (out of range)", id="gt-bad"),
        pytest.param("int", "integer < 2", "1", 1, id="lt-ok"),
        pytest.param("int", "integer < 2", "2", "Invalid value 2 (out of range)", id="lt-bad"),
        pytest.param("float", "float <= -1.5", "-1.5", -1.5, id="le-ok"),
        pytest.param(
            "float", "float <= -1.5", "-1", "Invalid value -1 (out of range)", id="le-bad"
        ),
        pytest.param("float", "float > 0.0", "nan", "Invalid value NaN (out of range)", id="nan"),
        pytest.param("string", "path", "/data/x", "/data/x", id="path-anything"),
        pytest.param("path", "path", "../x", "../x", id="path-type"),
        pytest.param("string", "positive integer", "5", "5", id="string-type-js-coercion"),
        pytest.param(
            "string",
            "positive integer",
            "five",
            "Invalid value five (out of range)",
            id="string-type-nan",
        ),
        pytest.param("string", "positive integer", "0x10", "0x10", id="string-type-hex-tonumber"),
        pytest.param("string", "percent", " ", " ", id="string-type-blank-is-zero"),
        pytest.param(
            "string",
            "positive integer",
            "-0x10",
            "Invalid value -0x10 (out of range)",
            id="string-type-signed-hex-nan",
        ),
        pytest.param(
            "int",
            "integer between 1 and 5",
            "3",
            "Domain value cannot be handled: 'integer between 1 and 5' : '3'",
            id="unknown-domain",
        ),
        pytest.param(
            "float",
            "Float",
            2.0,
            "Domain value cannot be handled: 'Float' : '2'",
            id="domain-case-sensitive",
        ),
        pytest.param(
            "int",
            "integer\n",
            "3",
            "Domain value cannot be handled: 'integer\n' : '3'",
            id="domain-trailing-newline",
        ),
        pytest.param(
            "string",
            "JSON",
            "{}",
            "Domain value cannot be handled: 'JSON' : '{}'",
            id="domain-json-case-sensitive",
        ),
        pytest.param("enum", ("a", "b"), "b", "b", id="enum-tuple"),
        pytest.param("enum", (), "a", "Invalid value a (not in enum)", id="empty-enum-rejects"),
        pytest.param("int", "", "x", math.nan, id="empty-domain-no-check"),
    ],
)
def test_domain_grammar_forms(
    type_: OptionType, domain: str | tuple[str, ...], value: Any, expected: Any
) -> None:
    catalog = [_spec("opt", type_, domain)]
    if isinstance(expected, str) and (
        expected.startswith("Invalid value") or expected.startswith("Domain value")
    ):
        assert _rejection(_one("opt", value), catalog) == _errors(("opt", expected))
    else:
        result = validate_options(_one("opt", value), catalog)
        assert len(result) == 1
        assert _same(result[0]["value"], expected)


# --------------------------------------------------------------------------------------------
# json domain (§5.2)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        pytest.param('{"type": "FeatureCollection", "features": []}', id="object-text"),
        pytest.param("[]", id="array-text"),
        pytest.param(" 5 ", id="number-text-with-whitespace"),
        pytest.param('"x"', id="string-text"),
        pytest.param("null", id="null-text"),
        pytest.param('{"\\u00e9": "\u00e9"}', id="unicode"),
    ],
)
def test_json_domain_accepts(value: str) -> None:
    assert validate_options(_one("boundary", value)) == _one("boundary", value)


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        pytest.param("", "", id="empty-string"),
        pytest.param("{bad", "{bad", id="malformed"),
        pytest.param("{'a': 1}", "{'a': 1}", id="single-quotes"),
        pytest.param("NaN", "NaN", id="python-nan-extension"),
        pytest.param("[Infinity]", "[Infinity]", id="python-infinity-extension"),
        pytest.param("\ufeff{}", "\ufeff{}", id="bom"),
        pytest.param("{} x", "{} x", id="trailing-data"),
        pytest.param({"type": "Polygon"}, "[object Object]", id="object-value"),
        pytest.param([1, 2], "1,2", id="array-value"),
        pytest.param(5, "5", id="number-value"),
        pytest.param(None, "null", id="null-value"),
    ],
)
def test_json_domain_rejects(value: Any, shown: str) -> None:
    assert _rejection(_one("cameras", value)) == _errors(
        ("cameras", f"Invalid value {shown} (out of range)")
    )


def test_json_domain_without_value_is_undefined() -> None:
    assert _rejection([{"name": "boundary"}]) == _errors(
        ("boundary", "Invalid value undefined (out of range)")
    )


# --------------------------------------------------------------------------------------------
# entry selection, ordering, input shapes (§5.1 steps 1-3)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(
            [{"name": "dsm", "value": True}, {"name": "dsm", "value": False}],
            [{"name": "dsm", "value": True}],
            id="first-wins",
        ),
        pytest.param(
            [{"name": "dsm", "value": True}, {"name": "dsm", "value": "bad"}],
            [{"name": "dsm", "value": True}],
            id="later-invalid-duplicate-ignored",
        ),
        pytest.param(
            [{"value": True}, {"name": None, "value": 1}, {"name": "dsm", "value": "0"}],
            [{"name": "dsm", "value": False}],
            id="nameless-entries-ignored",
        ),
        pytest.param(
            [None, 5, "dsm", ["dsm", True], {"name": "dtm", "value": True}],
            [{"name": "dtm", "value": True}],
            id="non-object-entries-ignored",
        ),
        pytest.param(
            [{"name": "--dsm", "value": True}, {"name": "DSM", "value": True}],
            [],
            id="names-match-exactly",
        ),
        pytest.param(
            [
                {"name": "gltf", "value": True},
                {"name": "force-ccd", "value": 6.16},
                {"name": "end-with", "value": "odm_dem"},
                {"name": "crop", "value": "0"},
            ],
            [
                {"name": "end-with", "value": "odm_dem"},
                {"name": "crop", "value": 0.0},
                {"name": "gltf", "value": True},
            ],
            id="catalog-order-unknown-dropped",
        ),
        pytest.param(
            [{"name": "dsm", "value": True, "extra": "ignored"}],
            [{"name": "dsm", "value": True}],
            id="extra-keys-ignored",
        ),
        # Deliberately stricter: a string option stores the argument the engine gets (§5.5).
        pytest.param([{"name": "sm-cluster", "value": None}], [], id="null-string-value-dropped"),
        pytest.param([{"name": "sm-cluster", "value": False}], [],
                     id="false-string-value-dropped"),
        pytest.param([{"name": "sm-cluster"}], [], id="valueless-string-option-dropped"),
        pytest.param(
            [{"name": "primary-band", "value": 7}],
            [{"name": "primary-band", "value": "7"}],
            id="string-type-number-as-js-string",
        ),
        pytest.param(
            [{"name": "primary-band", "value": 2.50}],
            [{"name": "primary-band", "value": "2.5"}],
            id="string-type-float-as-js-string",
        ),
    ],
)
def test_entry_selection(raw: list[Any], expected: list[dict[str, Any]]) -> None:
    assert validate_options(raw) == expected
    assert validate_options(json.dumps(raw)) == expected


def test_errors_follow_catalog_order_not_user_order() -> None:
    raw = [
        {"name": "gltf", "value": "no"},
        {"name": "mesh-size", "value": "-1"},
        {"name": "end-with", "value": "nowhere"},
        {"name": "dsm", "value": True},
    ]
    assert _rejection(raw) == _errors(
        ("end-with", "Invalid value nowhere (not in enum)"),
        ("mesh-size", "Invalid value -1 (out of range)"),
        ("gltf", "Cannot convert no to boolean"),
    )


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(None, id="none"),
        pytest.param("null", id="json-null"),
        pytest.param("5", id="json-number"),
        pytest.param('"[]"', id="json-string"),
        pytest.param("true", id="json-bool"),
        pytest.param('{"name":"dsm","value":true}', id="json-object"),
        pytest.param({"name": "dsm", "value": True}, id="dict"),
        pytest.param(({"name": "dsm", "value": True},), id="tuple"),
        pytest.param(42, id="int"),
        pytest.param("[]", id="empty-array"),
        pytest.param(" [ ] ", id="whitespace-around"),
    ],
)
def test_non_array_is_empty(raw: Any) -> None:
    assert parse_options(raw) == []
    assert validate_options(raw) == []


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param('[{"name":"fast-orthophoto",', id="s13-truncated"),
        pytest.param("[{", id="s13-restart-truncated"),
        pytest.param("", id="empty-string"),
        pytest.param("   ", id="whitespace-only"),
        pytest.param("[NaN]", id="nan-literal"),
        pytest.param("[-Infinity]", id="infinity-literal"),
        pytest.param("[{'name':'dsm'}]", id="single-quotes"),
        pytest.param("[1,]", id="trailing-comma"),
        pytest.param("[] []", id="trailing-data"),
        pytest.param("[" * 100_000, id="deep-nesting"),
    ],
)
def test_malformed_json_raises(raw: str) -> None:
    # §11 quirk 5: the message text is runtime-specific; only its presence is asserted.
    with pytest.raises(OptionsError) as info:
        parse_options(raw)
    assert info.value.error and info.value.option_errors == ()
    with pytest.raises(OptionsError):
        validate_options(raw)


def test_parse_options_returns_array_unchanged() -> None:
    raw = [{"name": "x"}, 5]
    assert parse_options(raw) is raw
    assert parse_options(json.dumps(raw)) == raw


def test_error_string_is_compact_and_keeps_non_ascii() -> None:
    error = _rejection(_one("feature-quality", "h\u00f6her\u2028"))
    assert error == (
        '[{"name":"feature-quality","error":"Invalid value h\u00f6her\u2028 (not in enum)"}]'
    )
    assert json.loads(error) == [
        {"name": "feature-quality", "error": "Invalid value h\u00f6her\u2028 (not in enum)"}
    ]


def test_error_string_escapes_quotes_controls_and_lone_surrogates() -> None:
    error = _rejection(json.loads('[{"name":"feature-quality","value":"a\\"b\\n\\ud800"}]'))
    assert error == (
        '[{"name":"feature-quality","error":"Invalid value a\\"b\\n\\ud800 (not in enum)"}]'
    )
    error.encode("utf-8")  # no lone surrogate left in the text


# --------------------------------------------------------------------------------------------
# max-concurrency cap (§5.1 step 6)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "cap", "expected"),
    [
        pytest.param(_one("max-concurrency", "16"), 8, _one("max-concurrency", 8), id="capped"),
        pytest.param(_one("max-concurrency", 2), 8, _one("max-concurrency", 2), id="below-cap"),
        pytest.param(_one("max-concurrency", "16"), None, _one("max-concurrency", 16), id="no-cap"),
        pytest.param(_one("max-concurrency", "16"), 0, _one("max-concurrency", 16), id="cap-zero"),
        pytest.param(
            [{"name": "dsm", "value": True}, {"name": "end-with", "value": "odm_dem"}],
            4,
            [
                {"name": "end-with", "value": "odm_dem"},
                {"name": "dsm", "value": True},
                {"name": "max-concurrency", "value": 4},
            ],
            id="appended-last-when-absent",
        ),
        pytest.param("not json array", None, "error", id="parse-error-still-raised"),
        pytest.param([], 3, _one("max-concurrency", 3), id="appended-to-empty"),
        pytest.param(None, None, [], id="nothing"),
    ],
)
def test_max_concurrency_cap(raw: Any, cap: int | None, expected: Any) -> None:
    if expected == "error":
        with pytest.raises(OptionsError):
            validate_options(raw, max_concurrency=cap)
        return
    assert validate_options(raw, max_concurrency=cap) == expected


def test_max_concurrency_invalid_value_is_an_error_even_with_cap() -> None:
    with pytest.raises(OptionsError) as info:
        validate_options(_one("max-concurrency", "-2"), max_concurrency=4)
    assert info.value.error == _errors(("max-concurrency", "Invalid value -2 (out of range)"))


def test_max_concurrency_not_appended_when_not_in_catalog() -> None:
    catalog = [_spec("dsm", "bool", "")]
    assert validate_options([], catalog, max_concurrency=4) == []


def test_max_concurrency_then_post_processing_order() -> None:
    options = add_post_processing_options(
        validate_options(_one("dsm", True), max_concurrency=2), skip_post_processing=False
    )
    assert [o["name"] for o in options] == ["dsm", "max-concurrency", "pc-ept", "cog", "gltf"]


# --------------------------------------------------------------------------------------------
# auto-added post-processing options (§5.4)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "catalog_names", "skip", "expected"),
    [
        pytest.param(
            [],
            None,
            False,
            [("pc-ept", True), ("cog", True), ("gltf", True)],
            id="defaults",
        ),
        pytest.param([], None, True, [], id="skip"),
        pytest.param(
            [{"name": "pc-ept", "value": False}],
            None,
            False,
            [("pc-ept", False), ("cog", True), ("gltf", True)],
            id="user-false-stays-false",
        ),
        pytest.param(
            [{"name": "gltf", "value": True}, {"name": "dsm", "value": True}],
            None,
            False,
            [("gltf", True), ("dsm", True), ("pc-ept", True), ("cog", True)],
            id="already-named-not-duplicated",
        ),
        pytest.param(
            [{"name": "dsm", "value": True}],
            ["dsm", "gltf", "pc-ept"],
            False,
            [("dsm", True), ("pc-ept", True), ("gltf", True)],
            id="only-options-in-catalog",
        ),
        pytest.param(
            [{"name": "cog", "value": False}],
            None,
            True,
            [("cog", False)],
            id="skip-keeps-user-options",
        ),
    ],
)
def test_add_post_processing_options(
    options: list[dict[str, Any]],
    catalog_names: list[str] | None,
    skip: bool,
    expected: list[tuple[str, bool]],
) -> None:
    catalog = None if catalog_names is None else [_spec(n, "bool", "") for n in catalog_names]
    snapshot = json.dumps(options)
    result = add_post_processing_options(options, catalog, skip_post_processing=skip)
    assert result == [{"name": n, "value": v} for n, v in expected]
    assert json.dumps(options) == snapshot  # input not mutated
    assert result is not options


# --------------------------------------------------------------------------------------------
# engine command line (§5.5)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        pytest.param(_one("dsm", True), ["--dsm"], id="true-bare-flag"),
        pytest.param(_one("dsm", False), [], id="false-omitted"),
        pytest.param(
            _one("orthophoto-resolution", 2.5), ["--orthophoto-resolution", "2.5"], id="float"
        ),
        pytest.param(_one("crop", 3.0), ["--crop", "3"], id="integral-float-js-form"),
        pytest.param(_one("mesh-size", 12345), ["--mesh-size", "12345"], id="int"),
        pytest.param(_one("mesh-size", 0), ["--mesh-size", "0"], id="int-zero-not-false"),
        pytest.param(
            _one("min-num-features", 1), ["--min-num-features", "1"], id="int-one-not-true"
        ),
        pytest.param(_one("smrf-slope", 1e-7), ["--smrf-slope", "1e-7"], id="small-float"),
        pytest.param(_one("crop", math.inf), ["--crop", "Infinity"], id="infinity"),
        pytest.param(_one("feature-quality", "ultra"), ["--feature-quality", "ultra"], id="enum"),
        pytest.param(_one("rerun-from", ""), ["--rerun-from", ""], id="empty-string-kept"),
        pytest.param(
            _one("boundary", '{"type": "Polygon"}'),
            ["--boundary", '{"type": "Polygon"}'],
            id="json-text-single-item",
        ),
        pytest.param(
            _one("sm-cluster", "http://a b; rm -rf /"),
            ["--sm-cluster", "http://a b; rm -rf /"],
            id="shell-metacharacters-are-data",
        ),
        pytest.param(_one("sm-cluster", None), [], id="null-omitted"),
        pytest.param(_one("primary-band", 7), ["--primary-band", "7"], id="non-string-on-string"),
        pytest.param(
            [
                {"name": "fast-orthophoto", "value": True},
                {"name": "orthophoto-resolution", "value": 2.5},
                {"name": "dtm", "value": False},
                {"name": "pc-ept", "value": True},
            ],
            ["--fast-orthophoto", "--orthophoto-resolution", "2.5", "--pc-ept"],
            id="sequence-keeps-order",
        ),
        pytest.param([], [], id="empty"),
    ],
)
def test_to_engine_args(options: list[dict[str, Any]], expected: list[str]) -> None:
    assert to_engine_args(options) == expected


def test_engine_args_from_validated_capture() -> None:
    options = add_post_processing_options(
        validate_options(
            '[{"name":"orthophoto-resolution","value":"2"},{"name":"dsm","value":"0"},'
            '{"name":"max-concurrency","value":"8"}]',
            max_concurrency=4,
        ),
        skip_post_processing=False,
    )
    assert to_engine_args(options) == [
        "--max-concurrency",
        "4",
        "--orthophoto-resolution",
        "2",
        "--pc-ept",
        "--cog",
        "--gltf",
    ]


# --------------------------------------------------------------------------------------------
# Deliberately stricter than NodeODM (module docstring of scaleodm.common.domain.options)
# --------------------------------------------------------------------------------------------

NOT_SCALAR = "arrays and objects are not accepted"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        pytest.param("sm-cluster", {"$where": "1"}, f"Invalid value [object Object] ({NOT_SCALAR})",
                     id="string-object-with-dollar-key"),
        pytest.param("primary-band", {"a.b": 1}, f"Invalid value [object Object] ({NOT_SCALAR})",
                     id="string-object-with-dotted-key"),
        pytest.param("sm-cluster", ["http://a", "b"], f"Invalid value http://a,b ({NOT_SCALAR})",
                     id="string-array"),
        pytest.param("mesh-size", [5], f"Invalid value 5 ({NOT_SCALAR})", id="int-array"),
        pytest.param("crop", {"v": 1}, f"Invalid value [object Object] ({NOT_SCALAR})",
                     id="float-object"),
        pytest.param("sm-cluster", True, "Invalid value true (not a string)", id="string-true"),
        # NodeODM's own refusals keep NodeODM's messages
        pytest.param("dsm", {}, "Cannot convert [object Object] to boolean", id="bool-object"),
        pytest.param("feature-quality", ["high"], "Invalid value high (not in enum)",
                     id="enum-array"),
        pytest.param("cameras", {"a": 1}, "Invalid value [object Object] (out of range)",
                     id="json-object"),
    ],
)
def test_non_scalar_values_are_refused(name: str, value: Any, message: str) -> None:
    assert _rejection(_one(name, value)) == _errors((name, message))


@pytest.mark.parametrize(
    ("name", "value"),
    [
        pytest.param("sm-cluster", "{{workflow.name}}", id="string"),
        pytest.param("primary-band", "a{{b", id="string-inside"),
        pytest.param("cameras", '{"x": "{{inputs.parameters.p}}"}', id="json-domain"),
    ],
)
def test_template_syntax_is_refused(name: str, value: str) -> None:
    assert _rejection(_one(name, value)) == _errors(
        (name, f"Invalid value {value} ({{{{ is not accepted)")
    )


def test_dollar_paren_is_not_refused() -> None:
    # $(...) is made inert by the workflow builder's escaping; it is a legal ODM value.
    assert validate_options(_one("sm-cluster", "$(x)")) == _one("sm-cluster", "$(x)")


def test_long_values_are_cut_in_messages() -> None:
    assert _rejection(_one("feature-quality", "x" * 10_000)) == _errors(
        ("feature-quality", f"Invalid value {'x' * 200}... (not in enum)")
    )
