"""Schemathesis hooks for the Convo run (loaded through SCHEMATHESIS_HOOKS by run.py).

- `matrix_error_body`: every 4xx/5xx answer is a Matrix error: a JSON object with a
  string `errcode` and a string `error`.
- `ConvoAuth`: the access token of the fuzzing user on every operation that the spec
  marks as authenticated, except `logout` and `logout/all`, which get a fresh session
  of a second user for each case (they would otherwise end the fuzzing user's session,
  and every later request would only test the 401 path).
- `before_call`: `/sync` long-polls are capped at 1 s (one case could otherwise hold a
  worker for Convo's 300 s maximum); and while the server still panics on a login body
  without `type` (the ruma panic of issue 10, which run.py probes for), such bodies get a
  `type` so that the run tests the rest.
- `before_load_schema`: one fix to the spec's schema (see there).
"""

import json
import os

import requests
import schemathesis
from schemathesis.core import NotSet

URL = os.environ["CONVO_FUZZ_URL"]
TOKEN = os.environ["CONVO_FUZZ_TOKEN"]
LOGOUT_USER = os.environ["CONVO_FUZZ_LOGOUT_USER"]
PASSWORD = os.environ["CONVO_FUZZ_PASSWORD"]
LOGIN_PANICS = os.environ.get("CONVO_FUZZ_LOGIN_WITHOUT_TYPE_PANICS") == "1"

SESSION_ENDING = {"logout", "logout_all"}
SYNC_TIMEOUT_MS = 1000


@schemathesis.check
def matrix_error_body(ctx, response, case):
    """Every error response carries a string `errcode` and a string `error`."""
    if response.status_code < 400:
        return None
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError(f"{response.status_code} with a body that is not JSON: {response.content[:200]!r}")
    if not isinstance(body, dict):
        raise AssertionError(f"{response.status_code} with a JSON body that is not an object: {body!r}"[:300])
    if response.status_code == 401 and isinstance(body.get("flows"), list):
        # A user-interactive auth step: `errcode` only once a stage has failed.
        return None
    missing = [key for key in ("errcode", "error") if not isinstance(body.get(key), str)]
    if missing:
        missing = " and ".join(missing)
        raise AssertionError(f"{response.status_code} error body without a string {missing}: {body!r}"[:300])
    return None


def _is_authenticated(operation) -> bool:
    security = operation.definition.raw.get("security")
    return bool(security)


@schemathesis.auth(refresh_interval=None, retry_on=[])
class ConvoAuth:
    def get(self, case, context):
        operation = context.operation
        if not _is_authenticated(operation):
            return None
        if operation.definition.raw.get("operationId") in SESSION_ENDING:
            response = requests.post(
                f"{URL}/_matrix/client/v3/login",
                json={"type": "m.login.password", "identifier": {"type": "m.id.user", "user": LOGOUT_USER},
                      "password": PASSWORD},
                timeout=30,
            )
            response.raise_for_status()
            return response.json()["access_token"]
        return TOKEN

    def set(self, case, data, context):
        case.headers = case.headers or {}
        case.headers["Authorization"] = f"Bearer {data}"


@schemathesis.hook
def before_call(context, case, kwargs):
    operation_id = case.operation.definition.raw.get("operationId")
    if operation_id == "sync":
        # A long-poll waits up to `timeout` ms (Convo caps it at 300 s): keep each case short.
        timeout = (case.query or {}).get("timeout")
        if isinstance(timeout, int) and timeout > SYNC_TIMEOUT_MS:
            case.query["timeout"] = SYNC_TIMEOUT_MS
    if operation_id == "login" and LOGIN_PANICS:
        # Both a JSON object without `type` and no body at all (read as `{}`) panic.
        if isinstance(case.body, dict) and "type" not in case.body:
            case.body = {**case.body, "type": "m.login.password"}
        elif isinstance(case.body, NotSet):
            case.body = {"type": "m.login.password"}
            case.media_type = "application/json"


@schemathesis.hook
def before_load_schema(context, raw_schema):
    """`GET /rooms/{roomId}/state/{eventType}/{stateKey}` answers the content or, with
    `?format=event`, the whole event: the spec writes this as `oneOf: [{type: object},
    ClientEvent]`, which every event fails (it is both an object and a ClientEvent).
    `anyOf` is what the spec means."""
    operation = raw_schema["paths"]["/_matrix/client/v3/rooms/{roomId}/state/{eventType}/{stateKey}"]["get"]
    schema = operation["responses"]["200"]["content"]["application/json"]["schema"]
    if "oneOf" in schema:
        schema["anyOf"] = schema.pop("oneOf")
