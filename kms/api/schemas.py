"""ETSI GS QKD 014 data formats as pydantic models: Key request, Key container, Key IDs, Error; and
the Status document, defined once as a domain type (``kms.domain.delivery.Status``) and re-exported.

Requests ignore fields the standard does not name (real clients send extras); numbers are strict
integers so that ``"3"``, ``3.5`` or ``true`` are rejected rather than coerced. ``KeyRequest`` is the
wire format of a Get key body; the checked request the service works on is ``KeyOrder``.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from kms.domain.delivery import Status as Status

SAE_ID_MAX_LENGTH = 128


class Error(BaseModel):
    message: str
    details: list[dict[str, Any]] | None = None


Extension = dict[str, Any]


class KeyRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    number: StrictInt | None = None
    size: StrictInt | None = None
    additional_slave_SAE_IDs: (
        list[Annotated[StrictStr, Field(min_length=1, max_length=SAE_ID_MAX_LENGTH)]] | None
    ) = None
    extension_mandatory: list[Extension] | None = None
    extension_optional: list[Extension] | None = None


class KeyIdItem(BaseModel):
    model_config = ConfigDict(extra="ignore")

    key_ID: StrictStr
    key_ID_extension: dict[str, Any] | None = None


class KeyIds(BaseModel):
    model_config = ConfigDict(extra="ignore")

    key_IDs: list[KeyIdItem]
    key_IDs_extension: dict[str, Any] | None = None


class Key(BaseModel):
    key_ID: str
    key_ID_extension: dict[str, Any] | None = None
    key: str
    key_extension: dict[str, Any] | None = None


class KeyContainer(BaseModel):
    keys: list[Key]
    key_container_extension: dict[str, Any] | None = None
