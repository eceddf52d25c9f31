"""Helper of `api_fuzz.rs`, run with the schemathesis venv's Python.

1. Loaded by schemathesis as its hooks module (`SCHEMATHESIS_HOOKS`): steers the generated
   requests to the two fixture VMs the test deployed, keeps off them what must not run, and
   logs every call (`HVNODE_FUZZ_LOG`, one JSON line each) for the test's own count.
2. `python api_fuzz.py validate OPENAPI ANSWERS`: checks real answers (a JSON list of
   `{method, route, path, status, content_type, body}`) against the response schemas of the
   agent's OpenAPI document; prints one line each, exits 1 when one does not match.

Steering happens in `before_call`, the last moment before a request leaves: schemathesis
revalidates a case a hook changed there, so a request steered to a fixture is judged as
what it is. Only components generated as valid are steered (a fixture id is valid), so no
negative case is turned into a positive one; path parameters generated invalid stay as
generated. Decisions hash the generated request, so a seed gives the same steering.

The two fixtures have roles (ids from the environment):

- PAUSED (`HVNODE_FUZZ_PAUSED`) stays suspended throughout: it gets every per-VM operation
  except those that would resume, stop, boot or reboot it. So start and reset on it are
  real refusals (409, a suspended VM is resumed, not started), suspend a real no-op.
- POWER (`HVNODE_FUZZ_POWER`) also gets the power actions (resume, stop, restart, rollback,
  resize with `restart`), so their 200s are real too; a stop or restart that would wait
  for the guest's ACPI shutdown is steered there only with `force` or `timeout_s <= 10`
  (the fuzzer picks timeouts up to an hour; such a request would outlast the run).

Neither gets (and a fixture id that schemathesis reuses from a response on its own is
swapped for an unknown one, in `_keep_off` below):

- `DELETE /v1/vms/{id}`: the fixture would be gone and every later per-VM request would
  stop at 404 again, which is what this run exists to get past.
- `POST /v1/vms/{id}/reinstall`, and a resize that shrinks the disk with the confirmation
  (re-cloned from the template): the guest boots from scratch through cloud-init, minutes
  of both cores under TCG, far beyond the run's budget.
- `POST /v1/private-networks/{id}/attach`: a paused guest cannot let go of a NIC, so the
  detach the fuzzer may then send waits `network.unplug_timeout_s` and answers the
  contract's 500 `NETWORK_FAILED`, which `not_a_server_error` cannot tell from a bug.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import uuid
import zlib

PAUSED = os.environ.get("HVNODE_FUZZ_PAUSED", "")
POWER = os.environ.get("HVNODE_FUZZ_POWER", "")
FIXTURES = {PAUSED: "paused", POWER: "power"} if PAUSED and POWER else {}
TASKS = [t for t in os.environ.get("HVNODE_FUZZ_TASKS", "").split(",") if t]
ADDRESSES = [a for a in os.environ.get("HVNODE_FUZZ_ADDRESSES", "").split(",") if a]
SNAPSHOTS = [s for s in os.environ.get("HVNODE_FUZZ_SNAPSHOTS", "").split(",") if s]
LOG = os.environ.get("HVNODE_FUZZ_LOG")

VM = "/v1/vms/{id}"
# Never on a fixture (see the module's doc).
KEEP_OFF = {("DELETE", VM), ("POST", VM + "/reinstall")}
# Not on the paused fixture: they resume, stop or boot it.
NOT_PAUSED = {
    ("POST", VM + "/resume"),
    ("POST", VM + "/stop"),
    ("POST", VM + "/restart"),
    ("POST", VM + "/snapshots/{name}/rollback"),
}
WAITS_FOR_GUEST = {("POST", VM + "/stop"), ("POST", VM + "/restart")}

_lock = threading.Lock()


def _plain(value):
    return value if isinstance(value, (dict, list, str, int, float, bool, type(None))) else type(value).__name__


def _pick(case, salt: str, n: int) -> int:
    """A number in 0..n from the request as generated (stable for a seed)."""
    key = "|".join(
        [
            salt,
            str(case.method).upper(),
            case.path,
            repr(sorted((case.path_parameters or {}).items())),
            repr(sorted((case.query or {}).items(), key=lambda kv: kv[0])),
            repr(_plain(case.body)),
        ]
    )
    return zlib.crc32(key.encode()) % n


def _valid(case, location: str) -> bool:
    """Whether schemathesis generated this component as valid (absent meta: unknown, no)."""
    meta = case._meta
    if meta is None:
        return False
    for loc, info in meta.components.items():
        if str(getattr(loc, "value", loc)) == location:
            return str(getattr(info.mode, "value", info.mode)) == "positive"
    # A component the operation does not have is not negative.
    return True


def _truthy(v) -> bool:
    return v is True or (isinstance(v, str) and v.lower() == "true")


def _small(v, limit: int) -> bool:
    try:
        return 0 <= int(v) <= limit
    except (TypeError, ValueError):
        return False


def _allowed(role: str, case) -> bool:
    op = (str(case.method).upper(), case.path)
    if op in KEEP_OFF:
        return False
    body = case.body if isinstance(case.body, dict) else {}
    if op == ("POST", VM + "/resize"):
        if _truthy(body.get("confirm_data_loss")) and body.get("erase_confirmation") == "ERASE":
            return False
        return role == "power" or not _truthy(body.get("restart"))
    if role == "paused":
        return op not in NOT_PAUSED
    if op in WAITS_FOR_GUEST:
        q = case.query or {}
        return _truthy(q.get("force")) or _small(q.get("timeout_s"), 10)
    return True


def _stranger(value: str) -> str:
    """An id no VPS has, in place of a fixture's."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "hvnode-fuzz-stranger/" + value))


def _steer(case) -> None:
    path = case.path
    params = case.path_parameters
    if params and "id" in params and path.startswith(VM) and _valid(case, "path"):
        current = str(params["id"])
        if current not in FIXTURES:
            roles = [r for r in ("paused", "power") if _allowed(r, case)]
            n = _pick(case, "vm", 3)
            if n < len(roles):
                chosen = PAUSED if roles[n] == "paused" else POWER
                params["id"] = chosen
                if "address" in params and ADDRESSES and _pick(case, "address", 3):
                    params["address"] = ADDRESSES[_pick(case, "which-address", len(ADDRESSES))]
                if "name" in params and SNAPSHOTS and _pick(case, "snapshot", 3):
                    params["name"] = SNAPSHOTS[_pick(case, "which-name", len(SNAPSHOTS))]
                case.path_parameters = params
    elif params and "id" in params and path == "/v1/tasks/{id}" and TASKS and _valid(case, "path"):
        if _pick(case, "task", 2):
            params["id"] = TASKS[_pick(case, "which", len(TASKS))]
            case.path_parameters = params
    if path == "/v1/tasks" and case.query is not None and _valid(case, "query") and _pick(case, "q", 2):
        q = dict(case.query)
        q["vps_id"] = [PAUSED, POWER][_pick(case, "which", 2)]
        case.query = q
    if isinstance(case.body, dict) and _valid(case, "body"):
        op = (str(case.method).upper(), path)
        body = dict(case.body)
        before = dict(body)
        if op == ("POST", "/v1/vms") and isinstance(body.get("id"), str) and _pick(case, "body", 3) == 0:
            # The same id with another body: 409 VPS_EXISTS from a real VM's record.
            body["id"] = [PAUSED, POWER][_pick(case, "which", 2)]
        elif op == ("POST", VM + "/ips/{address}/move") and "target_vps_id" in body and _pick(case, "body", 3):
            # Mostly to the other fixture, sometimes to the VM itself.
            own = str((case.path_parameters or {}).get("id"))
            if own in FIXTURES:
                other = POWER if own == PAUSED else PAUSED
                body["target_vps_id"] = other if _pick(case, "self", 4) else own
            else:
                body["target_vps_id"] = [PAUSED, POWER][_pick(case, "which", 2)]
        if body != before:
            case.body = body


def _keep_off(case) -> None:
    """Whatever put a fixture id there (steering or schemathesis's own reuse of ids it saw
    in responses), an operation that must not reach that fixture gets a stranger's id."""
    params = case.path_parameters
    if params and "id" in params and str(params["id"]) in FIXTURES and case.path.startswith(VM):
        role = FIXTURES[str(params["id"])]
        if not _allowed(role, case):
            params["id"] = _stranger(str(params["id"]))
            case.path_parameters = params
    if (
        case.path == "/v1/private-networks/{id}/attach"
        and isinstance(case.body, dict)
        and str(case.body.get("vps_id")) in FIXTURES
    ):
        body = dict(case.body)
        body["vps_id"] = _stranger(str(body["vps_id"]))
        case.body = body


if FIXTURES:
    import schemathesis

    @schemathesis.hook
    def before_call(context, case, kwargs):
        _steer(case)
        _keep_off(case)

    @schemathesis.hook
    def after_call(context, case, response):
        if not LOG:
            return
        vm = None
        params = case.path_parameters or {}
        if case.path.startswith(VM) and "id" in params:
            vm = FIXTURES.get(str(params["id"]))
        code = None
        if response.status_code >= 400:
            try:
                code = response.json().get("error_code")
            except Exception:
                pass
        line = json.dumps(
            {
                "method": str(case.method).upper(),
                "route": case.path,
                "params": {k: str(v) for k, v in params.items()},
                "status": response.status_code,
                "error_code": code,
                "vm": vm,
            }
        )
        with _lock, open(LOG, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def _response_schema(doc: dict, route: str, method: str, status: int, content_type: str):
    op = doc["paths"][route][method.lower()]
    responses = op["responses"]
    response = responses.get(str(status)) or responses.get("default")
    if response is None:
        raise KeyError(f"{method} {route} documents no {status}")
    while "$ref" in response:
        name = response["$ref"].rsplit("/", 1)[1]
        response = doc["components"]["responses"][name]
    media = content_type.split(";")[0].strip()
    content = response.get("content", {})
    if media not in content:
        raise KeyError(f"{method} {route} {status}: no {media} in {sorted(content)}")
    schema = dict(content[media].get("schema", {}))
    # `$ref`s point into the document's components.
    schema["components"] = doc.get("components", {})
    return schema


def validate(doc_path: str, answers_path: str) -> int:
    import jsonschema_rs

    with open(doc_path, encoding="utf-8") as f:
        doc = json.load(f)
    with open(answers_path, encoding="utf-8") as f:
        answers = json.load(f)
    bad = 0
    for a in answers:
        label = f"{a['method']} {a['path']} ({a['route']}) {a['status']}"
        try:
            schema = _response_schema(doc, a["route"], a["method"], a["status"], a["content_type"])
            validator = jsonschema_rs.validator_for(schema, validate_formats=True)
            errors = [f"{'/'.join(map(str, e.instance_path))}: {e.message}" for e in validator.iter_errors(a["body"])]
        except Exception as e:  # a route or status the document lacks is a mismatch too
            errors = [f"{type(e).__name__}: {e}"]
        if errors:
            bad += 1
            print(f"FAIL {label}")
            for e in errors[:10]:
                print(f"     {e}")
        else:
            print(f"ok   {label}")
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "validate":
        sys.exit("usage: api_fuzz.py validate OPENAPI.json ANSWERS.json")
    sys.exit(validate(sys.argv[2], sys.argv[3]))

