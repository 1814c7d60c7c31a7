"""The API's contract: an OpenAPI 3.1 document of every route, body and answer, served at
`GET /openapi.json`.

The schemas of bodies and answers come from the typed models of `api.contract` (with the rules
across fields, which no field can say alone, added here); the paths, answers and descriptions
are written here to say what the code does. The document is built when the app is, from its live
`Settings`, so every limit it states is the one in force. `tests/test_openapi.py` checks that it
is valid, that it names exactly the app's routes, and fuzzes a real `timerd api` against it.
"""

from __future__ import annotations

import copy
from collections.abc import Awaitable, Callable
from typing import Any, cast

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from api import contract
from api.console import PAGE, load_assets
from api.stats import RECENT
from api.validation import (
    DEFAULT_PAGE,
    FORBIDDEN_HEADER_NAMES,
    MAX_BODY_BYTES,
    MAX_HEADERS,
    MAX_PAGE,
    MAX_PAYLOAD_DEPTH,
    MAX_URL_CHARS,
    URL_SCAN,
)
from timerd import __version__
from timerd.models import State
from timerd.settings import Settings, default

MAX_REQUEST_HEAD_BYTES: int = default("max_request_head_bytes")

Schema = dict[str, Any]

TIMER_ID_PATTERN = "^[0-9a-fA-F]{24}$"
HEADER_NAME_PATTERN = f"^{contract.HEADER_NAME_PATTERN}$"
HEADER_VALUE_PATTERN = f"^{contract.HEADER_VALUE_PATTERN}$"
IDEMPOTENCY_KEY_PATTERN = f"^{contract.IDEMPOTENCY_KEY_PATTERN}$"


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: Schema) -> Schema:
    return {"oneOf": [schema, {"type": "null"}]}


DATE_TIME: Schema = {"type": "string", "format": "date-time"}


def payload_description(settings: Settings) -> str:
    return (
        f"Any JSON value, at most {settings.max_payload_bytes} bytes as compact JSON and "
        f"{MAX_PAYLOAD_DEPTH} levels of arrays and objects deep; delivered inside the webhook "
        "body."
    )


# Names and values are held to the rules below by the server (422), not by the schema, so
# that a fuzzer generating from this document sends any names and any strings.
def headers_description(settings: Settings) -> str:
    return (
        f"Extra request headers for the webhook: at most {MAX_HEADERS}, "
        f"{settings.max_headers_bytes} bytes of names and values in all; names match "
        f"`{HEADER_NAME_PATTERN}`, values `{HEADER_VALUE_PATTERN}` (printable ASCII). Names are "
        "case-insensitive (lower-cased; the same name twice is refused). Hop-by-hop and framing "
        f"headers ({', '.join(f'`{name}`' for name in FORBIDDEN_HEADER_NAMES)}) and every "
        "`webhook-*` header are refused."
    )


# What the body models (`api.contract`) cannot say field by field: the rules across fields.
DURATION_FIELDS = ("hours", "minutes", "seconds")
ANY_DURATION_FIELD: list[Schema] = [{"required": [name]} for name in DURATION_FIELDS]
# JSON Schema for "not both `fire_at` and a duration field".
NOT_BOTH: Schema = {"not": {"required": ["fire_at"], "anyOf": ANY_DURATION_FIELD}}
ANY_SCHEDULE: list[Schema] = [{"required": ["every"]}, {"required": ["cron"]}]
CREATE_RULES: Schema = {
    "description": "A webhook `url` and when to call it: either a duration "
    "(`hours`, `minutes`, `seconds`, each optional, added up) or an absolute `fire_at`, never "
    "both. The due time must be at least 1 ms and at most `TIMERD_MAX_DELAY_S` (365 days by "
    "default) from now, and before the year 10000. Or a series: `every` or `cron` (never with "
    "a duration or `fire_at`), with `start_at`, `timezone`, `until`, `max_occurrences`, "
    "`catch_up`; a schedule without a future occurrence answers 422 naming the field. Each "
    "occurrence is delivered like a one-off timer, its body carrying `occurrence`, "
    "`scheduled_at_ms` and `missed`, its `webhook-id` `<id>_<occurrence>`. Unknown fields are "
    "refused (422 `unknown_field`).",
    "anyOf": [
        {"required": ["fire_at"]},
        {"required": ["fire_at_local"]},
        *ANY_DURATION_FIELD,
        *ANY_SCHEDULE,
    ],
    **NOT_BOTH,
    "examples": [{"hours": 4, "minutes": 0, "seconds": 1, "url": "https://example.com/hooks"}],
}
BODY_RULES: dict[str, Schema] = {
    "CreateTimer": CREATE_RULES,
    "BatchItem": {
        **CREATE_RULES,
        "description": "A `CreateTimer` with an optional `idempotency_key`, which stands for "
        "the `Idempotency-Key` header of a single create.",
    },
    "ChangeTimer": {
        "description": "What to change on a pending timer, at least one field: a new due time "
        "(a duration from now, or `fire_at`, never both; the same limits as on create), `url`, "
        "`payload`, `headers` (which replace the old ones) or `on_failure_url`. On a pending "
        "or paused series, the schedule fields instead of a due time: `every` or `cron` "
        "replaces the kind of schedule, the others change only themselves, and the series "
        "carries on at the new schedule's next occurrence. Unknown fields (`max_attempts` "
        "included) are refused (422 `unknown_field`); an empty object answers 422 "
        "`invalid_body`.",
        "minProperties": 1,
        **NOT_BOTH,
        "examples": [{"minutes": 30}],
    },
}


def _counts(description: str) -> Schema:
    return {"type": "integer", "minimum": 0, "description": description}


STATS: Schema = {
    "type": "object",
    "description": "The caller's tenant at a glance. Counts and the backlog cover all of the "
    f"tenant's timers; the recent figures come from its newest {RECENT} fired and {RECENT} "
    "failed timers. Each replica reads them at most once a second.",
    "properties": {
        "now": {**DATE_TIME, "description": "The store's time the figures were read at."},
        "counts": {
            "type": "object",
            "properties": {state.value: _counts(f"Timers {state.value}.") for state in State},
            "required": [state.value for state in State],
            "additionalProperties": False,
        },
        "counts_limit": {
            "type": "integer",
            "minimum": 1,
            "description": "Each count stops here: a count equal to it means at least that many.",
        },
        "backlog": {
            "type": "object",
            "properties": {
                "pending": _counts("Pending timers."),
                "next": _nullable(
                    {
                        "type": "object",
                        "description": "The earliest pending timer; null when none is pending.",
                        "properties": {
                            "id": {"type": "string", "pattern": TIMER_ID_PATTERN},
                            "fire_at": DATE_TIME,
                            "overdue_ms": _counts("How long it has been due; 0 if not yet."),
                        },
                        "required": ["id", "fire_at", "overdue_ms"],
                        "additionalProperties": False,
                    }
                ),
            },
            "required": ["pending", "next"],
            "additionalProperties": False,
        },
        "recent": {
            "type": "object",
            "properties": {
                "window_s": _counts("How far back `fired`, `failed` and `lateness_ms` look."),
                "sample": _counts("How many of the newest fired (and failed) timers are read."),
                "fired": _counts("Timers delivered within the window."),
                "fired_per_s": {
                    "type": "number",
                    "minimum": 0,
                    "description": "Timers delivered per second over the last minute.",
                },
                "failed": _counts("Timers that ended failed (dead letters) within the window."),
                "failed_attempts": _counts("Attempts without a 2xx answer within the window."),
                "lateness_ms": _nullable(
                    {
                        "type": "object",
                        "description": "Fired minus due, of the timers delivered within the "
                        "window; null when none was.",
                        "properties": {
                            "p50": {"type": "number"},
                            "p99": {"type": "number"},
                            "max": {"type": "number"},
                        },
                        "required": ["p50", "p99", "max"],
                        "additionalProperties": False,
                    }
                ),
            },
            "required": [
                "window_s",
                "sample",
                "fired",
                "fired_per_s",
                "failed",
                "failed_attempts",
                "lateness_ms",
            ],
            "additionalProperties": False,
        },
        "firing": {
            "type": "object",
            "description": "Who fires: the live daemons and the partitions each holds.",
            "properties": {
                "partitions": {"type": "integer", "minimum": 1},
                "held": {"type": "integer", "minimum": 0},
                "daemons": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "holder": {"type": "string"},
                            "partitions": {"type": "integer", "minimum": 0},
                        },
                        "required": ["holder", "partitions"],
                        "additionalProperties": False,
                    },
                },
            },
            "required": ["partitions", "held", "daemons"],
            "additionalProperties": False,
        },
    },
    "required": ["now", "counts", "counts_limit", "backlog", "recent", "firing"],
    "additionalProperties": False,
}

STATUS: Schema = {
    "type": "object",
    "properties": {"status": {"type": "string"}},
    "required": ["status"],
    "additionalProperties": False,
}


def _header(description: str, schema: Schema | None = None) -> Schema:
    return {"description": description, "required": True, "schema": schema or {"type": "string"}}


RETRY_AFTER = _header("Seconds to wait before retrying.", {"type": "string", "pattern": "^[0-9]+$"})


def _json(schema: Schema) -> Schema:
    return {"application/json": {"schema": schema}}


def _error(description: str, *codes: str, headers: Schema | None = None) -> Schema:
    """An error answer whose `error.code` is one of `codes`."""
    body = {
        "allOf": [
            _ref("Error"),
            {"properties": {"error": {"properties": {"code": {"enum": list(codes)}}}}},
        ]
    }
    answer: Schema = {"description": description, "content": _json(body)}
    if headers:
        answer["headers"] = headers
    return answer


def _ok(description: str, schema: Schema) -> Schema:
    return {"description": description, "content": _json(schema)}


NOT_FOUND = _error(
    "No such timer: an unknown or malformed id, or another tenant's timer.", "not_found"
)
BAD_JSON = ("invalid_json", "invalid_body")
TOO_LARGE = _error(f"The body is over {MAX_BODY_BYTES} bytes.", "body_too_large")


def _conflict(action: str) -> Schema:
    return _error(
        f"The timer's state does not allow {action}; `state` says which it is.", "state_conflict"
    )


def _answers(answers: dict[str, Schema], *, too_many_pending: bool = False) -> dict[str, Schema]:
    """`answers` and those every `/timers` route can give, whatever it does."""
    limited = "`rate_limited`: too many requests for this API key (with `TIMERD_RATE_LIMIT_PER_S`)."
    limited_codes = ["rate_limited"]
    if too_many_pending:
        limited = f"`too_many_pending`: `TIMERD_MAX_PENDING_PER_TENANT` reached. {limited}"
        limited_codes.insert(0, "too_many_pending")
    common = {
        "401": _error(
            "A valid API key is required (only when keys are configured); the same answer for "
            "a missing, malformed, unknown or revoked key.",
            "unauthorized",
            headers={"WWW-Authenticate": _header("`Bearer`.")},
        ),
        "429": _error(limited, *limited_codes, headers={"Retry-After": RETRY_AFTER}),
        "431": _error(
            "The request line and headers are over `TIMERD_MAX_REQUEST_HEAD_BYTES` "
            f"({MAX_REQUEST_HEAD_BYTES} bytes) in all.",
            "headers_too_large",
        ),
        "500": _error("An unexpected failure; `request_id` also appears in the logs.", "internal"),
        "503": _error(
            "The store cannot be reached or stayed locked; retry after `Retry-After`.",
            "store_unavailable",
            headers={"Retry-After": RETRY_AFTER},
        ),
    }
    return dict(sorted({**answers, **common}.items()))


TIMER_ID_PARAM: Schema = {
    "name": "timer_id",
    "in": "path",
    "required": True,
    "description": "A timer id (24 hex digits); any other text answers 404.",
    "schema": {"type": "string", "pattern": TIMER_ID_PATTERN},
}
CONSOLE_FILES = sorted(name for name in load_assets() if name != PAGE)
CONSOLE_HEADERS: dict[str, Schema] = {
    "Content-Security-Policy": _header("Only this origin's own scripts, styles and connections."),
    "X-Content-Type-Options": _header("`nosniff`."),
    "ETag": _header("Revalidate with `If-None-Match` (`Cache-Control: no-cache`)."),
}
TIMERS_SECURITY: list[Schema] = [{"apiKey": []}, {}]  # {}: no key, when none is configured
TIMER_OK = _ok("The timer as it now is.", _ref("Timer"))

_TEMPLATE: Schema = {
    "openapi": "3.1.0",
    "info": {
        "title": "timerd",
        "version": __version__,
        "description": "Timers that fire webhooks: `POST /timers` with a duration or a time and "
        "a URL; when due, timerd sends `POST <url>/<id>`. Every error is JSON: "
        '`{"error": {"code": "...", "message": "...", ...}}`. A wrong method answers 405 '
        "`method_not_allowed`, an unknown path 404 `not_found`.",
        "license": {"name": "MIT", "identifier": "MIT"},
    },
    "security": TIMERS_SECURITY,
    "paths": {
        "/timers": {
            "post": {
                "operationId": "createTimer",
                "summary": "Create a timer",
                "parameters": [
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": False,
                        "description": "Makes the create idempotent for this tenant (kept as "
                        "long as the timer is): the same key with the same body answers the "
                        "original timer (201, `Idempotent-Replayed: true`); with a different "
                        "body, 422 `idempotency_conflict`.",
                        "schema": {"type": "string", "pattern": IDEMPOTENCY_KEY_PATTERN},
                    }
                ],
                "requestBody": {"required": True, "content": _json(_ref("CreateTimer"))},
                "responses": _answers(
                    {
                        "201": {
                            "description": "Created (or, with a known `Idempotency-Key` and the "
                            "same body, the original timer).",
                            "headers": {
                                "Location": _header("`/timers/<id>`."),
                                "Idempotent-Replayed": {
                                    "description": "`true` when this is the original timer of "
                                    "a repeated `Idempotency-Key`.",
                                    "schema": {"type": "string", "enum": ["true"]},
                                },
                            },
                            "content": _json(_ref("Timer")),
                        },
                        "400": _error(
                            "The body is not JSON (or holds `NaN`, `Infinity` or an integer of "
                            "more than 30 digits), is not a JSON object, or `Idempotency-Key` "
                            "is not 1 to 255 visible ASCII characters.",
                            *BAD_JSON,
                            "invalid_idempotency_key",
                        ),
                        "413": TOO_LARGE,
                        "422": _error(
                            "A field is missing, of the wrong type or out of range (`field` "
                            "names it); an unknown field (`fields` lists them); or the "
                            "`Idempotency-Key` was used with a different body.",
                            "invalid_field",
                            "unknown_field",
                            "idempotency_conflict",
                        ),
                    },
                    too_many_pending=True,
                ),
            },
            "get": {
                "operationId": "listTimers",
                "summary": "List timers, newest first",
                "description": "Unknown query parameters answer 422 `unknown_field`.",
                "parameters": [
                    {
                        "name": "state",
                        "in": "query",
                        "description": "Only timers in this state (`failed`: the dead letters).",
                        "schema": _ref("State"),
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "description": "Page size.",
                        "schema": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": MAX_PAGE,
                            "default": DEFAULT_PAGE,
                        },
                    },
                    {
                        "name": "cursor",
                        "in": "query",
                        "description": "The `next_cursor` of the previous page.",
                        "schema": {"type": "string", "pattern": TIMER_ID_PATTERN},
                    },
                    {
                        "name": "recurring",
                        "in": "query",
                        "description": "`true`: series only; `false`: one-off timers only.",
                        "schema": {"type": "string", "enum": ["true", "false"]},
                    },
                    {
                        "name": "url_prefix",
                        "in": "query",
                        "description": "Only timers whose `url` starts with this text "
                        "(`https://api.example.com/` for one host). Each page then looks at no "
                        f"more than the {URL_SCAN} next timers, so a page may hold fewer than "
                        "`limit` timers, or none, and still have a `next_cursor`.",
                        "schema": {
                            "type": "string",
                            "minLength": 1,
                            "maxLength": MAX_URL_CHARS,
                            "pattern": "^[^\\x00-\\x1f\\x7f]*$",
                        },
                    },
                ],
                "responses": _answers(
                    {
                        "200": _ok("One page of timers.", _ref("TimerPage")),
                        "422": _error(
                            "A parameter is out of range (`field` names it) or unknown.",
                            "invalid_field",
                            "unknown_field",
                        ),
                    }
                ),
            },
        },
        "/timers/{timer_id}": {
            "parameters": [TIMER_ID_PARAM],
            "get": {
                "operationId": "getTimer",
                "summary": "Read a timer",
                "responses": _answers({"200": TIMER_OK, "404": NOT_FOUND}),
            },
            "patch": {
                "operationId": "changeTimer",
                "summary": "Reschedule or edit a pending timer",
                "description": "Atomic with respect to the daemon: once the timer is claimed "
                "(or finished, or cancelled) this answers 409 and changes nothing.",
                "requestBody": {"required": True, "content": _json(_ref("ChangeTimer"))},
                "responses": _answers(
                    {
                        "200": TIMER_OK,
                        "400": _error("The body is not JSON or not a JSON object.", *BAD_JSON),
                        "404": NOT_FOUND,
                        "409": _conflict("a change: it is not pending"),
                        "413": TOO_LARGE,
                        "422": _error(
                            "A field is of the wrong type or out of range (`field` names it), "
                            "an unknown field (`fields` lists them), or no field at all.",
                            "invalid_field",
                            "unknown_field",
                            "invalid_body",
                        ),
                    }
                ),
            },
            "delete": {
                "operationId": "cancelTimer",
                "summary": "Cancel a pending timer",
                "responses": _answers(
                    {
                        "200": _ok("The timer, now `cancelled`.", _ref("Timer")),
                        "404": NOT_FOUND,
                        "409": _conflict("cancelling: it is not pending"),
                    }
                ),
            },
        },
        "/timers/{timer_id}/replay": {
            "parameters": [TIMER_ID_PARAM],
            "post": {
                "operationId": "replayTimer",
                "summary": "Fire a failed or fired timer again",
                "description": "Puts the timer back to `pending`, due now, with the same id and "
                "a fresh retry budget; its history is kept.",
                "responses": _answers(
                    {
                        "200": _ok("The timer, now `pending`.", _ref("Timer")),
                        "404": NOT_FOUND,
                        "409": _conflict("a replay: it is pending, firing or cancelled"),
                    }
                ),
            },
        },
        "/timers/{timer_id}/pause": {
            "parameters": [TIMER_ID_PARAM],
            "post": {
                "operationId": "pauseTimer",
                "summary": "Pause a series",
                "description": "A pending series becomes `paused`: nothing fires until resumed. "
                "A one-off timer's id answers 404.",
                "responses": _answers(
                    {
                        "200": _ok("The series, now `paused`.", _ref("Timer")),
                        "404": NOT_FOUND,
                        "409": _conflict("a pause: it is not pending"),
                    }
                ),
            },
        },
        "/timers/{timer_id}/resume": {
            "parameters": [TIMER_ID_PARAM],
            "post": {
                "operationId": "resumeTimer",
                "summary": "Resume a paused series",
                "description": "The series carries on at its next occurrence from now; those "
                "it missed while paused are not fired.",
                "responses": _answers(
                    {
                        "200": _ok("The series, now `pending`.", _ref("Timer")),
                        "404": NOT_FOUND,
                        "409": _conflict("a resume: it is not paused"),
                        "422": _error(
                            "The schedule has no occurrence left (`field` names the bound).",
                            "invalid_field",
                        ),
                    }
                ),
            },
        },
        "/stats": {
            "get": {
                "operationId": "stats",
                "summary": "The caller's timers at a glance",
                "description": "What the web console's overview shows: counts by state, the "
                "backlog and its earliest timer, recent deliveries, failures and lateness, and "
                "who fires.",
                "responses": _answers({"200": _ok("The figures.", _ref("Stats"))}),
            }
        },
        "/ui": {
            "get": {
                "operationId": "console",
                "summary": "The web console",
                "description": "An HTML page that uses this API from the browser (it asks for "
                "an API key when one is needed). Served with a strict Content-Security-Policy.",
                "security": [],
                "responses": {
                    "200": {
                        "description": "The console's page.",
                        "headers": CONSOLE_HEADERS,
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/ui/static/{name}": {
            "get": {
                "operationId": "consoleAsset",
                "summary": "A file of the web console (script, stylesheet, icon)",
                "security": [],
                "parameters": [
                    {
                        "name": "name",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "enum": CONSOLE_FILES},
                    }
                ],
                "responses": {
                    "200": {
                        "description": "The file.",
                        "headers": CONSOLE_HEADERS,
                        "content": {
                            media: {"schema": {"type": "string"}}
                            for media in ("text/javascript", "text/css", "image/svg+xml")
                        },
                    },
                    "404": _error("No such file.", "not_found"),
                },
            }
        },
        "/healthz": {
            "get": {
                "operationId": "healthz",
                "summary": "Liveness",
                "security": [],
                "responses": {"200": _ok("The process runs.", STATUS)},
            }
        },
        "/readyz": {
            "get": {
                "operationId": "readyz",
                "summary": "Readiness",
                "security": [],
                "responses": {
                    "200": _ok("The store answers (`ready`).", STATUS),
                    "503": _ok("The store does not answer (`store unavailable`).", STATUS),
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics of this process",
                "security": [],
                "responses": {
                    "200": {
                        "description": "The Prometheus text exposition format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "security": [],
                "responses": {"200": _ok("The OpenAPI document.", {"type": "object"})},
            }
        },
    },
    "components": {
        "securitySchemes": {
            "apiKey": {
                "type": "http",
                "scheme": "bearer",
                "description": "`Authorization: Bearer <key>` with a key from `timerd keys "
                "create`. Required only when keys are configured: with `TIMERD_AUTH=auto` (the "
                "default) once any key exists or whenever the API listens off loopback; always "
                "with `TIMERD_AUTH=keys`; never with `TIMERD_AUTH=none`. Without keys every "
                "request belongs to one anonymous tenant.",
            }
        },
        "schemas": {
            "Stats": STATS,
            "State": {"type": "string", "enum": [state.value for state in State]},
        },
    },
}


# the document of one app: the template, the models' components, the limits in force

MODELS = (
    contract.CreateTimer,
    contract.ChangeTimer,
    contract.TimerView,
    contract.TimerPage,
    contract.ErrorBody,
    contract.BatchItem,
    contract.BatchAnswer,
)
# Components named as the document has always named them, rather than by class name.
COMPONENT_NAMES = {"TimerView": "Timer", "AttemptView": "Attempt", "ErrorBody": "Error"}
REF = "#/components/schemas/"


def model_components() -> dict[str, Schema]:
    """The JSON Schema of every body and answer model, from msgspec, with the bodies' rules
    across fields."""
    _, components = msgspec.json.schema_components(MODELS, ref_template=REF + "{name}")
    for name, rules in BODY_RULES.items():
        components[name] = {**components[name], **rules}
    renamed = {COMPONENT_NAMES.get(name, name): schema for name, schema in components.items()}
    return cast(dict[str, Schema], _rename_refs(renamed))


def _rename_refs(value: Any) -> Any:
    if isinstance(value, dict):
        ref = value.get("$ref")
        if isinstance(ref, str) and ref.startswith(REF):
            name = ref.removeprefix(REF)
            return {**value, "$ref": REF + COMPONENT_NAMES.get(name, name)}
        return {key: _rename_refs(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_rename_refs(item) for item in value]
    return value


def batch_path(settings: Settings) -> Schema:
    """`POST /timers/batch`."""
    limit = settings.max_body_bytes * contract.BATCH_MAX
    return {
        "post": {
            "operationId": "createTimers",
            "summary": "Create up to 1000 timers at once",
            "description": "A JSON array of 1 to 1000 create bodies (`BatchItem`: a "
            "`CreateTimer` with an optional `idempotency_key`, which stands for the "
            "`Idempotency-Key` header of a single create; the header itself is refused here). "
            "Each item is checked exactly as `POST /timers` checks one; the valid ones are "
            "stored durably in one transaction, under the tenant's pending cap (items past it "
            "get 429 `too_many_pending`). The answer holds one result per item, in order: "
            "`status` 201 and `timer` (`replayed` for a known key with the same body), or the "
            "status and `error` a single create would have answered.",
            "requestBody": {
                "required": True,
                "content": _json(
                    {
                        "type": "array",
                        "minItems": 1,
                        "maxItems": contract.BATCH_MAX,
                        "items": _ref("BatchItem"),
                    }
                ),
            },
            "responses": _answers(
                {
                    "200": _ok("One result per item, in order.", _ref("BatchAnswer")),
                    "400": _error(
                        "The body is not JSON (or holds `NaN`, `Infinity` or an integer of "
                        "more than 30 digits) or not an array, or an `Idempotency-Key` header "
                        "was sent.",
                        *BAD_JSON,
                        "invalid_idempotency_key",
                    ),
                    "413": _error(
                        f"More than {contract.BATCH_MAX} items, or a body over {limit} bytes.",
                        "too_many_timers",
                        "body_too_large",
                    ),
                    "422": _error("An empty array.", "invalid_body"),
                }
            ),
        }
    }


def build_openapi(settings: Settings) -> Schema:
    """The OpenAPI document of an app run with `settings`: every limit it states is the one in
    force. Built once, when the app is."""
    document = copy.deepcopy(_TEMPLATE)
    paths = document["paths"]
    paths["/timers/batch"] = batch_path(settings)
    schemas = document["components"]["schemas"]
    schemas.update(model_components())
    for name in ("CreateTimer", "ChangeTimer", "BatchItem"):
        _set_body_limits(schemas[name]["properties"], settings)
    too_large = f"The body is over {settings.max_body_bytes} bytes."
    for path in ("/timers", "/timers/{timer_id}"):
        for operation in _operations(paths[path]):
            if "413" in operation.get("responses", {}):
                operation["responses"]["413"]["description"] = too_large
    head = (
        "The request line and headers are over `TIMERD_MAX_REQUEST_HEAD_BYTES` "
        f"({settings.max_request_head_bytes} bytes) in all."
    )
    for item in paths.values():
        for operation in _operations(item):
            if "431" in operation.get("responses", {}):
                operation["responses"]["431"]["description"] = head
    return document


def _operations(path_item: Schema) -> list[Schema]:
    return [value for value in path_item.values() if isinstance(value, dict)]


def _set_body_limits(properties: dict[str, Schema], settings: Settings) -> None:
    """The limits of `settings` on a body's url, payload and headers."""
    for name in ("url", "on_failure_url"):
        properties[name]["maxLength"] = settings.max_url_chars
    properties["payload"] = {"description": payload_description(settings)}
    properties["headers"] = {**properties["headers"], "description": headers_description(settings)}


OPENAPI = build_openapi(Settings())  # the document of an app run with the default settings


def openapi_route(settings: Settings) -> Callable[[Request], Awaitable[Response]]:
    """`GET /openapi.json` of an app run with `settings`: its document, encoded once."""
    body = contract.encode(build_openapi(settings))

    async def openapi_json(_: Request) -> Response:
        """The document, without authentication."""
        return Response(body, media_type="application/json")

    return openapi_json
