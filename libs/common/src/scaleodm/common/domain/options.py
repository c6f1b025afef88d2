"""NodeODM's option catalog and option validation (nodeodm-api §3.2, §5, §10, §11 quirks 2-5).

- The catalog is the ``GET /options`` body (§3.2): an ordered list of objects with exactly the
  keys ``name``, ``type``, ``value``, ``domain``, ``help``. The packaged ``odm_options.json`` is
  the spec's verbatim NodeODM 2.2.4 test-mode catalog (80 options); a production service passes
  the catalog generated from the ODM image it runs (``parse_catalog``).
- ``validate_options`` is §5.1 steps 1-8 with the domain grammar of §5.2. The error value
  clients get is either a JSON-parse message or the JSON-encoded *string*
  ``[{"name":…,"error":…}]`` in catalog order (§5.1 step 7, quirk 2).
- Coercions follow JavaScript, as NodeODM and ClusterODM do (quirk 4): ``parseInt``/``parseFloat``
  read a leading numeric prefix of the value's JS string form, values in messages are printed as
  JS ``String(v)`` would print them.
- A validated number is held as the Python value that JSON-encodes like the JavaScript number
  NodeODM holds (``js_number``): a float option given ``7``, ``"7"`` or ``7.0`` is ``7`` (an
  ``int``), so task info shows ``7`` as NodeODM does, not ``7.0``; ``"7.5"`` is ``7.5``.
- ``add_post_processing_options`` is §5.4, ``to_engine_args`` the option part of §5.5.

Deliberate differences from NodeODM (supersets or crash avoidance):

- An array entry that is not an object (e.g. ``null``) is ignored like an entry without ``name``;
  NodeODM throws a TypeError there.
- An entry with no ``value`` key for an option that accepts any value (domain ``string``) is
  dropped: NodeODM keeps a value-less entry that no engine command line can represent.
- ``json`` domain: the value must be a *string* that JSON-parses, as §5.2 states (JavaScript's
  ``JSON.parse`` would also accept a number or boolean after coercing it to a string).

Deliberately stricter than NodeODM (security; no ODM option can use what they refuse). Every
accepted value is a scalar of the option's declared type, so what is stored, shown and handed to
the engine is plain data:

- An array or object value is refused for ``int``, ``float``, ``string`` and ``path`` options
  (``Invalid value <v> (arrays and objects are not accepted)``). NodeODM stores it verbatim for
  string options and ``parseInt``s ``[5]`` to 5; ``bool`` and ``enum`` options already refuse
  them with NodeODM's own messages.
- A ``string``/``path`` option's value is stored as the argument the engine gets (§5.5): a number
  as its JS ``String()`` form (``7`` -> ``"7"``), ``null``/``false`` dropped (no argument either
  way); ``true`` (a bare flag, which a string option cannot take) is refused.
- A string value containing ``{{`` is refused in every option: it is template syntax to the
  workflow engine runs are built with (Argo), and no ODM option value needs it.
- Values echoed in messages are cut after ``SHOWN_MAX_CHARS`` characters (``...`` appended), so an
  options error stays bounded whatever the input.

Pure logic: no I/O beyond reading the packaged catalog, no framework imports.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from importlib import resources
from typing import Final, Literal, cast

__all__ = [
    "CATALOG_KEYS",
    "POST_PROCESSING_OPTIONS",
    "OptionSpec",
    "OptionType",
    "OptionsError",
    "add_post_processing_options",
    "catalog_as_json",
    "js_number",
    "js_parse_float",
    "js_parse_int",
    "js_to_string",
    "load_catalog",
    "parse_catalog",
    "parse_options",
    "to_engine_args",
    "validate_options",
]

OptionType = Literal["int", "float", "bool", "string", "enum", "path"]

# §3.2: the five keys of every /options entry, in NodeODM's serialization order.
CATALOG_KEYS: Final = ("name", "type", "value", "domain", "help")
# §3.2: the validator knows "path" too, although /options never emits it.
_OPTION_TYPES: Final[frozenset[str]] = frozenset({"int", "float", "bool", "string", "enum", "path"})
# §5.4: appended in this order unless skipPostProcessing.
POST_PROCESSING_OPTIONS: Final = ("pc-ept", "cog", "gltf")
_MAX_CONCURRENCY: Final = "max-concurrency"
_CATALOG_PACKAGE: Final = "scaleodm.common.domain"
_CATALOG_RESOURCE: Final = "odm_options.json"


class _Undefined:
    """JavaScript ``undefined``: the value of an option entry without a ``value`` key."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "undefined"


_UNDEFINED: Final = _Undefined()


# --------------------------------------------------------------------------------------------
# Catalog (§3.2)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OptionSpec:
    """One ``/options`` entry. ``value`` is the default as a string; enum domains are tuples."""

    name: str
    type: OptionType
    value: str
    domain: str | tuple[str, ...]
    help: str

    def as_json(self) -> dict[str, object]:
        """The entry exactly as ``GET /options`` serves it (five keys, §3.2)."""
        domain: str | list[str] = (
            list(self.domain) if isinstance(self.domain, tuple) else self.domain
        )
        return {
            "name": self.name,
            "type": self.type,
            "value": self.value,
            "domain": domain,
            "help": self.help,
        }


def parse_catalog(entries: object) -> tuple[OptionSpec, ...]:
    """Build the catalog from an ``/options``-shaped JSON value; ``ValueError`` if malformed.

    §3.2: exactly five keys per entry, string values except an enum's array domain, and a type
    the validator knows (other types crash NodeODM's and ClusterODM's validators).
    """
    if not isinstance(entries, list):
        raise ValueError("option catalog must be a JSON array")
    specs: list[OptionSpec] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) != set(CATALOG_KEYS):
            raise ValueError(f"catalog entry {index} must have exactly the keys {CATALOG_KEYS}")
        name, type_, value, domain, help_ = (entry[key] for key in CATALOG_KEYS)
        if not all(isinstance(item, str) for item in (name, type_, value, help_)):
            raise ValueError(f"catalog entry {index}: name, type, value and help must be strings")
        if type_ not in _OPTION_TYPES:
            raise ValueError(f"catalog entry {index}: unknown option type {type_!r}")
        if isinstance(domain, list) and all(isinstance(choice, str) for choice in domain):
            domain = tuple(domain)
        elif not isinstance(domain, str):
            raise ValueError(f"catalog entry {index}: domain must be a string or string array")
        if name in seen:
            raise ValueError(f"catalog entry {index}: duplicate option name {name!r}")
        seen.add(name)
        specs.append(OptionSpec(name, cast(OptionType, type_), value, domain, help_))
    return tuple(specs)


@functools.cache
def load_catalog() -> tuple[OptionSpec, ...]:
    """The packaged NodeODM 2.2.4 test-mode catalog (the spec's ``odm-options.json``), cached."""
    text = resources.files(_CATALOG_PACKAGE).joinpath(_CATALOG_RESOURCE).read_text("utf-8")
    return parse_catalog(json.loads(text))


def catalog_as_json(catalog: Sequence[OptionSpec] | None = None) -> list[dict[str, object]]:
    """The ``GET /options`` body: catalog order, exactly five keys per entry (§3.2)."""
    return [spec.as_json() for spec in (load_catalog() if catalog is None else catalog)]


# --------------------------------------------------------------------------------------------
# JavaScript coercions (§5.1 step 4, quirk 4)
# --------------------------------------------------------------------------------------------

# ECMAScript StrWhiteSpaceChar (WhiteSpace + LineTerminator). Narrower than str.isspace(), which
# also accepts U+001C..U+001F and U+0085.
_JS_WHITESPACE: Final = (
    "\t\n\v\f\r \u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000\ufeff"
)
_DECIMAL_PREFIX: Final = re.compile(
    r"[+-]?(?:Infinity|(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)"
)
_DECIMAL_LITERAL: Final = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_RADIX_LITERAL: Final = re.compile(
    r"0(?:[xX](?P<x>[0-9a-fA-F]+)|[oO](?P<o>[0-7]+)|[bB](?P<b>[01]+))"
)
_DECIMAL_DIGITS: Final = re.compile(r"[0-9]+")
_HEX_DIGITS: Final = re.compile(r"[0-9a-fA-F]+")


def _is_number(value: object) -> bool:
    """A JS number: Python int or float, never bool (bool is an int subclass)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _to_float(value: int | float) -> float:
    """A JSON number as the IEEE double JavaScript holds (huge integers become ±Infinity)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _js_number_to_string(value: float) -> str:
    """ECMAScript Number::toString: ``2.0`` → ``2``, ``1e21`` → ``1e+21``, ``-0`` → ``0``."""
    if math.isnan(value):
        return "NaN"
    if value == 0:
        return "0"
    if value < 0:
        return "-" + _js_number_to_string(-value)
    if math.isinf(value):
        return "Infinity"
    # repr() is the shortest round-trip form, which is what ECMAScript prints too.
    _, digits, exponent = Decimal(repr(value)).as_tuple()
    text = "".join(map(str, digits)).rstrip("0")
    exponent = int(exponent) + len(digits) - len(text)
    k = len(text)
    n = k + exponent  # value = 0.<text> × 10^n
    if k <= n <= 21:
        return text + "0" * (n - k)
    if 0 < n <= 21:
        return text[:n] + "." + text[n:]
    if -6 < n <= 0:
        return "0." + "0" * -n + text
    e = n - 1
    mantissa = text if k == 1 else text[0] + "." + text[1:]
    return f"{mantissa}e{'+' if e >= 0 else '-'}{abs(e)}"


# ECMAScript Number::toString writes integral values below 1e21 out in full, larger ones with an
# exponent (``1e+21``).
_JS_FULL_DIGITS_BELOW: Final = 1e21


def js_number(value: float) -> int | float:
    """A JavaScript number as the Python value that JSON-encodes the way ``JSON.stringify``
    writes it: integral values below 1e21 become ``int`` (``7.0`` → ``7``, ``-0.0`` → ``0``,
    ``1.2345678901234567e19`` → ``12345678901234567000``), others stay ``float``.

    JavaScript has one number type: ``parseFloat("7")`` is the number 7 and NodeODM shows it as
    ``7``. A Python ``float`` would be shown as ``7.0``.
    """
    if not (math.isfinite(value) and value.is_integer() and abs(value) < _JS_FULL_DIGITS_BELOW):
        return value
    return int(_js_number_to_string(value))  # JS's digits, not the double's exact binary value


def js_to_string(value: object) -> str:
    """JavaScript ``String(value)`` for JSON values (used in messages and engine arguments).

    ``2.0`` → ``2``, ``True`` → ``true``, ``None`` → ``null``, dict → ``[object Object]``,
    list → elements joined by ``,`` (``null`` elements print as empty strings).
    """
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if value is _UNDEFINED:
        return "undefined"
    if isinstance(value, int | float):
        return _js_number_to_string(_to_float(value))
    if isinstance(value, list | tuple):
        return ",".join(
            "" if item is None or item is _UNDEFINED else js_to_string(item) for item in value
        )
    return "[object Object]"


def js_parse_int(value: object) -> int | float:
    """JavaScript ``parseInt(value)`` (no radix): an ``int``, or ``nan`` when nothing parses.

    The value's JS string form is read: leading JS whitespace skipped, optional sign, ``0x``
    prefix → hexadecimal, then the longest digit prefix (``"1.7"`` → 1, ``"12abc"`` → 12,
    ``1e21`` → 1 because ``String(1e21)`` is ``"1e+21"``).
    """
    text = js_to_string(value).lstrip(_JS_WHITESPACE)
    negative = text[:1] == "-"
    if text[:1] in ("-", "+"):
        text = text[1:]
    radix, pattern = 10, _DECIMAL_DIGITS
    if text[:2] in ("0x", "0X"):
        radix, pattern, text = 16, _HEX_DIGITS, text[2:]
    match = pattern.match(text)
    if match is None:
        return math.nan
    number = int(match.group(), radix)
    return -number if negative else number


def js_parse_float(value: object) -> float:
    """JavaScript ``parseFloat(value)``: longest decimal prefix (``"3.5x"`` → 3.5), else ``nan``.

    ``"Infinity"`` (case-sensitive, optionally signed) parses to ±inf as in JavaScript.
    """
    match = _DECIMAL_PREFIX.match(js_to_string(value).lstrip(_JS_WHITESPACE))
    return math.nan if match is None else float(match.group())


def _js_to_number(value: object) -> float:
    """JavaScript ``ToNumber`` as relational operators apply it (``"5" >= 0`` is true)."""
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        return _to_float(value)
    if value is None:
        return 0.0
    if value is _UNDEFINED:
        return math.nan
    text = js_to_string(value).strip(_JS_WHITESPACE)
    if text == "":
        return 0.0
    if text in ("Infinity", "+Infinity"):
        return math.inf
    if text == "-Infinity":
        return -math.inf
    if _DECIMAL_LITERAL.fullmatch(text):
        return float(text)
    radix = _RADIX_LITERAL.fullmatch(text)
    if radix is not None:
        base, digits = next((b, d) for b, d in radix.groupdict().items() if d is not None)
        return _to_float(int(digits, {"x": 16, "o": 8, "b": 2}[base]))
    return math.nan


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def _js_json_parse(text: str) -> object:
    """``JSON.parse``: like ``json.loads`` but without Python's NaN/Infinity extensions."""
    return json.loads(text, parse_constant=_reject_constant)


def _js_json_stringify(value: object) -> str:
    """``JSON.stringify`` for plain data: compact, non-ASCII kept, lone surrogates escaped."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return re.sub(r"[\ud800-\udfff]", lambda m: f"\\u{ord(m.group()):04x}", text)


# --------------------------------------------------------------------------------------------
# Validation (§5.1, §5.2)
# --------------------------------------------------------------------------------------------


class OptionsError(Exception):
    """Options rejected; ``error`` is the exact ``{"error": ...}`` value NodeODM clients get.

    ``error`` is either a JSON-parse message (§5.1 step 1) or the JSON-encoded string of
    ``[{"name", "error"}]`` in catalog order (§5.1 step 7); ``option_errors`` holds the latter
    as data and is empty for parse failures.
    """

    def __init__(self, error: str, option_errors: Sequence[Mapping[str, str]] = ()) -> None:
        super().__init__(error)
        self.error = error
        self.option_errors: tuple[dict[str, str], ...] = tuple(dict(e) for e in option_errors)


class _OptionValueError(Exception):
    """A per-option failure; its message is the ``error`` of one ``{"name", "error"}`` entry."""


def parse_options(raw: object) -> list[object]:
    """§5.1 steps 1-2: a string is JSON-parsed; any non-array result (or input) becomes ``[]``.

    Malformed JSON raises ``OptionsError`` (the text is runtime-specific, quirk 5). An empty
    string is malformed JSON too; callers that treat ``""`` as "no options" (restart, §3.11)
    must check for it first.
    """
    value: object = raw
    if isinstance(raw, str):
        try:
            value = _js_json_parse(raw)
        except (ValueError, RecursionError) as exc:
            raise OptionsError(f"Invalid options: {exc}") from None
    # §5.1 step 2: a non-array result is treated as [] - no error.
    return cast("list[object]", value) if isinstance(value, list) else []


def _to_bool(raw: object) -> bool:
    # §5.1 step 4: only JSON booleans and the strings "true"/"false"/"1"/"0".
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw in ("true", "1"):
        return True
    if isinstance(raw, str) and raw in ("false", "0"):
        return False
    raise _OptionValueError(f"Cannot convert {_shown(raw)} to boolean")


SHOWN_MAX_CHARS: Final = 200
TEMPLATE_MARKER: Final = "{{"


def _shown(value: object) -> str:
    """``String(value)`` as an options error shows it: at most ``SHOWN_MAX_CHARS`` characters.
    Not ``text.shown``: these errors travel JSON-encoded (NodeODM's format), which already
    escapes control characters the way NodeODM's answers show them."""
    text = js_to_string(value)
    return text if len(text) <= SHOWN_MAX_CHARS else text[:SHOWN_MAX_CHARS] + "..."


def _not_scalar(value: object) -> _OptionValueError:
    return _OptionValueError(f"Invalid value {_shown(value)} (arrays and objects are not accepted)")


def _convert(spec: OptionSpec, raw: object) -> object:
    """§5.1 step 4: type conversion with JS semantics (arrays and objects refused, see above)."""
    if isinstance(raw, list | dict) and spec.type in ("int", "float"):
        raise _not_scalar(raw)  # before parseInt/parseFloat would make [5] a 5
    if spec.type == "int":
        return js_parse_int(raw)
    if spec.type == "float":
        return js_number(js_parse_float(raw))  # "7", 7 and 7.0 are all the JS number 7
    if spec.type == "bool":
        return _to_bool(raw)
    return raw  # string, enum, path: unchanged


def _parse_bound(kind: str, text: str) -> float:
    # §5.2: bounds are read with parseFloat for "float", parseInt for "integer".
    return _to_float(js_parse_float(text) if kind == "float" else js_parse_int(text))


def _check_signed(match: re.Match[str], value: object) -> bool:
    prefix, kind = match.group(1), match.group(2)
    # §5.2 / quirk 4: "positive" means >= 0, "negative" <= 0; neither checks integer-ness.
    if prefix == "positive ":
        return _js_to_number(value) >= 0
    if prefix == "negative ":
        return _js_to_number(value) <= 0
    if not _is_number(value):  # Number.isInteger / Number.isFinite never coerce
        return False
    number = _to_float(cast("int | float", value))
    if kind == "integer":
        return math.isfinite(number) and number == math.floor(number)
    return math.isfinite(number)


def _check_percent(_match: re.Match[str], value: object) -> bool:
    number = _js_to_number(value)
    return 0 <= number <= 100


def _check_range(match: re.Match[str], value: object) -> bool:
    kind, lower, upper = match.group(1, 2, 3)
    number = _js_to_number(value)
    return _parse_bound(kind, lower) <= number <= _parse_bound(kind, upper)


def _check_comparison(match: re.Match[str], value: object) -> bool:
    kind, operator, bound_text = match.group(1, 2, 3)
    number, bound = _js_to_number(value), _parse_bound(kind, bound_text)
    if operator == ">=":
        return number >= bound
    if operator == ">":
        return number > bound
    if operator == "<=":
        return number <= bound
    return number < bound


def _check_json(_match: re.Match[str], value: object) -> bool:
    # §5.2: the value must be a string that JSON-parses; an object value or "" is rejected.
    if not isinstance(value, str):
        return False
    try:
        _js_json_parse(value)
    except (ValueError, RecursionError):
        return False
    return True


def _check_anything(_match: re.Match[str], _value: object) -> bool:
    return True


# §5.2 domain grammar, first matching rule applies (patterns match the whole domain, ASCII only).
_DOMAIN_RULES: Final = (
    (re.compile(r"(positive |negative )?(integer|float)", re.ASCII), _check_signed),
    (re.compile(r"percent", re.ASCII), _check_percent),
    (re.compile(r"(float|integer): ([-+.0-9]+) <= x <= ([-+.0-9]+)", re.ASCII), _check_range),
    (re.compile(r"(float|integer) (>=|>|<|<=) ([-+.0-9]+)", re.ASCII), _check_comparison),
    (re.compile(r"json", re.ASCII), _check_json),
    (re.compile(r"string|path", re.ASCII), _check_anything),
)


def _check_domain(domain: str | tuple[str, ...], value: object) -> None:
    """§5.2; raises ``_OptionValueError`` with the NodeODM message."""
    if isinstance(domain, tuple):
        # Enum: strictly one of the strings.
        if not (isinstance(value, str) and value in domain):
            raise _OptionValueError(f"Invalid value {_shown(value)} (not in enum)")
        return
    for pattern, check in _DOMAIN_RULES:
        match = pattern.fullmatch(domain)
        if match is not None:
            if not check(match, value):
                # NaN lands here for every numeric domain: "Invalid value NaN (out of range)".
                raise _OptionValueError(f"Invalid value {_shown(value)} (out of range)")
            return
    raise _OptionValueError(f"Domain value cannot be handled: '{domain}' : '{_shown(value)}'")


def _as_declared(spec: OptionSpec, value: object) -> object:
    """A domain-checked value as a scalar of the declared type (stricter rules, see above);
    ``_UNDEFINED`` when the engine would get no argument from it. After the domain check, so
    that what NodeODM refuses is refused with NodeODM's message."""
    if spec.type in ("string", "path"):
        if isinstance(value, list | dict):
            raise _not_scalar(value)
        if value is None or value is False:
            return _UNDEFINED  # §5.5: no argument either way
        if value is True:
            raise _OptionValueError("Invalid value true (not a string)")
        if _is_number(value):
            value = js_to_string(value)  # §5.5: the engine gets String(value)
    if isinstance(value, str) and TEMPLATE_MARKER in value:
        raise _OptionValueError(
            f"Invalid value {_shown(value)} ({TEMPLATE_MARKER} is not accepted)"
        )
    return value


def _cap(value: object, cap: int) -> object:
    # §5.1 step 6: Math.min(value, cap); NaN stays NaN (it has failed the domain anyway).
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value if math.isnan(value) else min(value, cap)
    return value


def validate_options(
    raw: object,
    catalog: Sequence[OptionSpec] | None = None,
    *,
    max_concurrency: int | None = None,
) -> list[dict[str, object]]:
    """§5.1: validate user options against the catalog; typed ``{"name", "value"}`` list.

    ``raw`` is the ``options`` field as received: a JSON string, an already-parsed array (JSON
    request body), or anything else (treated as ``[]``). ``max_concurrency`` is the node-level
    cap (``--max_concurrency``); ``None`` or 0 means no cap. Raises ``OptionsError``.
    Non-finite floats can be accepted (``"Infinity"`` passes ``positive float`` as in NodeODM);
    serializers must handle them.
    """
    entries = parse_options(raw)
    specs = load_catalog() if catalog is None else catalog
    result: list[dict[str, object]] = []
    errors: list[dict[str, str]] = []
    has_max_concurrency = False
    max_concurrency_given = False

    # §5.1 step 3: walk the catalog in its order, so the result and the errors follow /options
    # order, not user order; unknown names are never looked at, hence silently ignored.
    for spec in specs:
        if spec.name == _MAX_CONCURRENCY:
            has_max_concurrency = True
        # §5.1 step 3: first entry wins; entries without a name (or not objects) are ignored.
        entry = next(
            (e for e in entries if isinstance(e, dict) and e.get("name") == spec.name), None
        )
        if entry is None:
            continue
        raw_value: object = entry.get("value", _UNDEFINED)
        try:
            value = _convert(spec, raw_value)  # §5.1 step 4
            if isinstance(spec.domain, tuple) or spec.domain:  # §5.1 step 5: non-empty domain
                _check_domain(spec.domain, value)
            if value is not _UNDEFINED:
                value = _as_declared(spec, value)
        except _OptionValueError as exc:
            errors.append({"name": spec.name, "error": str(exc)})
            continue
        if value is _UNDEFINED:
            continue  # no value to pass to the engine (see module docstring)
        if spec.name == _MAX_CONCURRENCY:
            max_concurrency_given = True
            if max_concurrency:
                value = _cap(value, max_concurrency)  # §5.1 step 6: min(value, cap)
        result.append({"name": spec.name, "value": value})

    # §5.1 step 6: the cap is appended when the option exists and the user did not give it.
    if has_max_concurrency and not max_concurrency_given and max_concurrency:
        result.append({"name": _MAX_CONCURRENCY, "value": max_concurrency})

    if errors:
        # §5.1 step 7 / quirk 2: the error is a JSON *string*, compact like JSON.stringify.
        raise OptionsError(_js_json_stringify(errors), errors)
    return result  # §5.1 step 8


# --------------------------------------------------------------------------------------------
# Auto-added options (§5.4) and engine arguments (§5.5)
# --------------------------------------------------------------------------------------------


def add_post_processing_options(
    options: Sequence[Mapping[str, object]],
    catalog: Sequence[OptionSpec] | None = None,
    *,
    skip_post_processing: bool,
) -> list[dict[str, object]]:
    """§5.4: append ``pc-ept``, ``cog``, ``gltf`` = true when the catalog has them and the
    options do not already name them (a user ``pc-ept: false`` stays false). Returns a new list.

    ``skip_post_processing`` must be true only when the field was exactly ``"true"`` (§3.4).
    """
    result = [dict(option) for option in options]
    if skip_post_processing:
        return result
    known = {spec.name for spec in (load_catalog() if catalog is None else catalog)}
    named = {option.get("name") for option in result}
    for name in POST_PROCESSING_OPTIONS:
        if name in known and name not in named:
            result.append({"name": name, "value": True})
    return result


def to_engine_args(options: Iterable[Mapping[str, object]]) -> list[str]:
    """§5.5: ``true`` → ``--name``; ``false`` → omitted; others → ``--name``, ``String(value)``.

    Values are separate argv items (never shell-interpreted) formatted JS-style (``3.0`` →
    ``"3"``, ``2.5`` → ``"2.5"``). A ``null`` value has nothing to pass and is omitted.
    """
    args: list[str] = []
    for option in options:
        name, value = option["name"], option.get("value")
        if value is False or value is None:
            continue
        args.append(f"--{js_to_string(name)}")
        if value is not True:
            args.append(js_to_string(value))
    return args
