"""The lean API path (kms.api.hot_path) accepts a body only if FastAPI would accept it, and reads it
the same way: otherwise a request could succeed on one path and fail on the other."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, TypeAdapter, ValidationError

from kms.api.hot_path import _parse
from kms.api.schemas import KeyIds, KeyRequest

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
    st.sampled_from(["9b0e1d43-0a7e-4c7a-9f53-1f0f0e2b2d11", "256", "1e3", ""]),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
key_request = st.fixed_dictionaries(
    {},
    optional={
        "number": values,
        "size": values,
        "additional_slave_SAE_IDs": values,
        "extension_mandatory": values,
        "extension_optional": values,
        "other": values,
    },
)
key_ids = st.fixed_dictionaries(
    {},
    optional={
        "key_IDs": st.lists(st.fixed_dictionaries({}, optional={"key_ID": values, "x": values}), max_size=3)
        | values,
        "key_IDs_extension": values,
    },
)


def _framework(model: type[BaseModel], raw: bytes) -> BaseModel | None:
    try:
        return TypeAdapter(model).validate_python(json.loads(raw))
    except (ValidationError, ValueError):
        return None


def _agree(model: type[BaseModel], body: Any) -> None:
    raw = json.dumps(body).encode()
    lean = _parse(model, raw)
    if lean is not None:
        framework = _framework(model, raw)
        assert framework is not None, raw
        assert lean.model_dump() == framework.model_dump()


@settings(max_examples=400, deadline=None)
@given(key_request)
def test_key_request_bodies(body: dict[str, Any]) -> None:
    _agree(KeyRequest, body)


@settings(max_examples=400, deadline=None)
@given(key_ids)
def test_key_ids_bodies(body: dict[str, Any]) -> None:
    _agree(KeyIds, body)


@pytest.mark.parametrize(
    "raw",
    [b"", b"null", b"{", b'{"number": 1,}', b'{"number": 1.0}', b'{"number": "1"}', b"\xff", b"[]"],
)
def test_doubtful_bodies_are_left_to_the_framework(raw: bytes) -> None:
    assert _parse(KeyRequest, raw) is None
