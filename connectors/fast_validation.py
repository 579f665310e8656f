"""The same ``fhir.resources`` validation with less Python per element (``install``/``strict``).

Validating a resource costs about 0.38 ms on this project's 2-core machine (issue 14), and
record assembly on loopback is bound by it. Much of that is not pydantic-core but two validators
``fhir_core`` (the base of ``fhir.resources`` 8) runs in Python for *every element* of a resource
(a Coding, a Reference, a Period...), each working out facts of the element's class again on
every call:

- ``FHIRAbstractModel.reject_null_complex_elements`` (before validation) walks every field of the
  class to find the lists of complex types, then looks for a ``null`` in them;
- ``validate_after_model_construction`` (after validation, run twice per element) asks the class
  for its required primitive elements (``_validate_required_primitive_elements``) and its
  choice-of-type groups (``_validate_one_of_many``, FHIR R4 formats §2.6.2.3 "choice") and reads
  their field metadata.

``install`` replaces the code of those two validators with versions that compute the per-class
facts once (cached by class) and, whenever a check might fail, call ``fhir_core``'s own function,
so every ``ValidationError`` (locations, messages, order) is the library's. A resource that
validates gets exactly the model it got before. The replacement is installed only when
``fhir_core``'s functions are the ones it was written against (their source hash, fhir_core
1.1.12); any other version keeps the library's code untouched (``installed()`` says which).

It changes the code objects of functions in ``fhir_core.fhirabstractmodel`` (not the model
classes, whose pydantic schemas hold those functions), so it takes effect for every model,
already built or not, in this process. ``strict()`` switches back for a block (tests and the
record-fetch benchmark compare the two that way).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import threading
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fhir_core import fhirabstractmodel

log = logging.getLogger(__name__)

_Model = fhirabstractmodel.FHIRAbstractModel
# The functions replaced (the first two) or mirrored (the others): name on FHIRAbstractModel ->
# sha256 of their source in fhir_core 1.1.12 (``inspect.getsource``). Another source means
# another behaviour to match.
_KNOWN_SOURCES = {
    "reject_null_complex_elements": "d0d0200524d20d337433d62ea06bc4f14c0b76c50555dcfaa0282bf5cdf85350",
    "validate_after_model_construction": "016ab95ff060a75a1c85d30dc016014fbbf62f83791ca20204f8d6daec265edb",
    "_validate_required_primitive_elements": "3120cbe77ecbe66accc2ddf393eefd80e2177d03959692fd8977dc2cfcb8cbd5",
    "_validate_one_of_many": "b2f9b73fb7cfd1c0dc431ea54223ec60a8f5d7f5a63f41fe57efb6c116308b72",
}
_lock = threading.Lock()


def _function(name: str) -> types.FunctionType:
    """The plain function behind ``FHIRAbstractModel.<name>`` (a classmethod's ``__func__``)."""
    attr = _Model.__dict__[name]
    func = getattr(attr, "__func__", attr)
    assert isinstance(func, types.FunctionType)
    return func


def _source_hash(func: types.FunctionType) -> str:
    return hashlib.sha256(inspect.getsource(func).encode()).hexdigest()


# The library's code, kept as separate functions with the same globals: ``strict()`` puts it back,
# and the fast versions call it whenever a check might fail.
_ORIGINAL_CODE = {
    name: _function(name).__code__
    for name in ("reject_null_complex_elements", "validate_after_model_construction")
}
_original_reject = types.FunctionType(
    _ORIGINAL_CODE["reject_null_complex_elements"],
    _function("reject_null_complex_elements").__globals__,
    "reject_null_complex_elements",
)
_original_after = types.FunctionType(
    _ORIGINAL_CODE["validate_after_model_construction"],
    _function("validate_after_model_construction").__globals__,
    "validate_after_model_construction",
)

# Per model class: the (field name, alias) of each list of a complex type (what
# ``reject_null_complex_elements`` inspects), and for the after checks the attribute of each
# required primitive element and each choice group with whether one of it is required (None: a
# class whose facts could not be worked out; the library's code then runs every time). The fast
# functions run as fhir_core's code, with its globals: every name they use besides builtins starts
# with ``_cs_`` and is put there by ``install`` too (``_SHARED``).
_cs_missing = object()
_cs_complex_lists: dict[type, tuple[tuple[str, str | None], ...]] = {}
_Facts = tuple[tuple[str, ...], tuple[tuple[tuple[str, ...], bool], ...]]
_cs_after_facts: dict[type, _Facts | None] = {}
_cs_original_reject = _original_reject
_cs_original_after = _original_after


def _cs_complex_fields(cls: Any) -> tuple[tuple[str, str | None], ...]:
    """The (name, alias) of each field of ``cls`` that ``reject_null_complex_elements`` checks,
    chosen as it chooses them (a list, not of a primitive type, not a ``__ext`` sibling)."""
    fields = tuple(
        (name, field.alias)
        for name, field in cls.model_fields.items()
        if fhirabstractmodel.is_list_type(field)
        and not fhirabstractmodel.is_primitive_type(field)
        and not name.endswith("__ext")
    )
    _cs_complex_lists[cls] = fields
    return fields


def _cs_facts(model: Any) -> _Facts | None:
    """The attributes of ``type(model)``'s required primitive elements and its choice groups
    (fields, one required), as ``_validate_required_primitive_elements`` and
    ``_validate_one_of_many`` read them; None when they cannot be had that way."""
    cls = type(model)
    facts: _Facts | None
    try:
        required = model.get_required_fields()
        aliases = cls.get_alias_mapping() if required else {}
        groups = []
        for prefix, fields in model.get_one_of_many_fields().items():
            extra = cls.model_fields[fields[0]].json_schema_extra
            if extra["one_of_many"] != prefix:
                raise ValueError(f"choice group {prefix} is not its own")
            groups.append((tuple(fields), extra["one_of_many_required"] is True))
        facts = (tuple(aliases[name] for name, _ in required), tuple(groups))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        log.debug("no fast after-validation for %s (%s)", cls.__name__, exc)
        facts = None
    _cs_after_facts[cls] = facts
    return facts


def reject_null_complex_elements(cls: Any, data: Any) -> Any:
    """``fhir_core``'s check that no list of a complex type holds a ``null``, with the class's
    complex-list fields computed once. Returns ``data``; where a list holds ``None``, the
    library's function runs and raises its ``ValidationError``."""
    if not isinstance(data, dict):
        return data
    fields = _cs_complex_lists.get(cls)
    if fields is None:
        fields = _cs_complex_fields(cls)
    for name, alias in fields:
        value = data.get(alias if alias and alias in data else name)
        # ``None in value`` is true whenever the library's ``item is None`` test is
        if isinstance(value, list) and None in value:
            return _cs_original_reject(cls, data)
    return data


def validate_after_model_construction(self: Any) -> Any:
    """``fhir_core``'s after-validation (required primitive elements present, at most one value
    per choice group and one where the group is required), with the class's facts computed
    once. Returns the model; where a check might fail, the library's function runs and raises
    its error."""
    cls = type(self)
    facts = _cs_after_facts[cls] if cls in _cs_after_facts else _cs_facts(self)
    if facts is None:
        return _cs_original_after(self)
    required, groups = facts
    for key in required:
        if getattr(self, key, _cs_missing) in (_cs_missing, None):
            return _cs_original_after(self)
    for fields, one_required in groups:
        found = 0
        for name in fields:
            if getattr(self, name, None) is not None:
                found += 1
        if found > 1 or (one_required and not found):
            return _cs_original_after(self)
    return self


_SHARED = {name: value for name, value in list(globals().items()) if name.startswith("_cs_")}
_FAST_CODE = {
    "reject_null_complex_elements": reject_null_complex_elements.__code__.replace(
        co_qualname="FHIRAbstractModel.reject_null_complex_elements"
    ),
    "validate_after_model_construction": validate_after_model_construction.__code__.replace(
        co_qualname="FHIRAbstractModel.validate_after_model_construction"
    ),
}


def _matches_library() -> bool:
    try:
        return all(
            _source_hash(_function(name)) == digest for name, digest in _KNOWN_SOURCES.items()
        )
    except (OSError, TypeError, KeyError, AssertionError):  # no source to read, or no such function
        return False


def installed() -> bool:
    """Whether the fast validators are in place (``install`` ran, and outside ``strict()``)."""
    return all(_function(n).__code__ is code for n, code in _FAST_CODE.items())


def install() -> bool:
    """Put the fast validators in place for every ``fhir.resources`` model of this process.

    Returns True when they are in place, False when ``fhir_core``'s functions are not the ones
    they match (another fhir_core version: validation stays the library's, and it is logged).
    Idempotent.
    """
    with _lock:
        if installed():
            return True
        if not _matches_library():
            log.info(
                "fhir_core's validators differ from those the fast path matches; "
                "validating with the library's code"
            )
            return False
        vars(fhirabstractmodel).update(_SHARED)
        for name, code in _FAST_CODE.items():
            _function(name).__code__ = code
        return True


@contextmanager
def strict() -> Iterator[None]:
    """Validate with ``fhir_core``'s own code inside the block (for comparisons: the process
    validates that way meanwhile, other threads included), then restore what was in place."""
    with _lock:
        was = {name: _function(name).__code__ for name in _ORIGINAL_CODE}
        for name, code in _ORIGINAL_CODE.items():
            _function(name).__code__ = code
    try:
        yield
    finally:
        with _lock:
            for name, code in was.items():
                _function(name).__code__ = code
