"""Validate frames against docs/schema (JSON Schema draft 2020-12).

``validate_server_frame`` is meant to be called on every frame a test client
receives, so the whole suite checks the bridge against its published protocol.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "docs" / "schema"
SERVER_FRAME = SCHEMA_DIR / "server-frame.schema.json"
CLIENT_FRAME = SCHEMA_DIR / "client-frame.schema.json"

__all__ = ["ValidationError", "validate_client_frame", "validate_server_frame", "validator"]


@cache
def validator(path: Path) -> Draft202012Validator:
    schema = json.loads(path.read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def _validate(path: Path, frame: Any) -> None:
    error = best_match(validator(path).iter_errors(frame))
    if error is not None:
        # The frame itself in the message: a failing test shows what the bridge sent.
        raise ValidationError(f"{path.name}: {error.message} in {json.dumps(frame)[:500]}")


def validate_server_frame(frame: dict[str, Any]) -> None:
    """Raise ValidationError unless ``frame`` is a valid frame from the bridge."""
    _validate(SERVER_FRAME, frame)


def validate_client_frame(frame: Any) -> None:
    """Raise ValidationError unless ``frame`` is a well-formed control frame."""
    _validate(CLIENT_FRAME, frame)
