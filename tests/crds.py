"""Validate custom resources against their operator's CRD, as the API server would.

`CRD.errors(obj)` checks an object against the CRD's `openAPIV3Schema` (jsonschema, with
unknown fields refused as `kubectl apply`'s strict field validation refuses them) and
evaluates the schema's CEL rules (`x-kubernetes-validations`, cel-python) except the
transition rules that compare with `oldSelf` (they need a previous object). The CRDs are
copies in tests/data/crds/ (see its README).
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml

CRD_DIR = Path(__file__).resolve().parent / "data" / "crds"


def _strict(schema: Any) -> Any:
    """The schema with `additionalProperties: false` wherever an object lists its properties
    and does not keep unknown fields: the API server's strict field validation."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        if out.get("nullable") and "type" in out:  # OpenAPI's nullable, in JSON Schema terms
            out["type"] = [out["type"], "null"]
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def _program(rule: str) -> celpy.Runner:
    env = celpy.Environment()
    return env.program(env.compile(rule))


class CRD:
    def __init__(self, filename: str, version: str | None = None) -> None:
        text = (CRD_DIR / filename).read_text()
        crd = next(d for d in yaml.load_all(text, Loader=yaml.CSafeLoader) if d)
        assert crd["kind"] == "CustomResourceDefinition", filename
        versions = {v["name"]: v for v in crd["spec"]["versions"]}
        served = version or next(n for n, v in versions.items() if v.get("storage"))
        self.group, self.version = crd["spec"]["group"], served
        self.kind = crd["spec"]["names"]["kind"]
        self.schema = versions[served]["schema"]["openAPIV3Schema"]
        self._validator = jsonschema.Draft7Validator(_strict(copy.deepcopy(self.schema)))

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"

    def errors(self, obj: dict) -> list[str]:
        """What the API server would refuse in `obj` on create (empty: accepted)."""
        out = []
        if (obj.get("apiVersion"), obj.get("kind")) != (self.api_version, self.kind):
            out.append(f"not a {self.kind} of {self.api_version}: {obj.get('apiVersion')}")
        for e in sorted(self._validator.iter_errors(obj), key=lambda e: list(e.path)):
            out.append(f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}")
        _check_rules(self.schema, obj, "", out)
        return out


def _check_rules(schema: dict, value: Any, path: str, out: list[str]) -> None:
    for rule in schema.get("x-kubernetes-validations", []):
        if "oldSelf" in rule["rule"]:
            continue  # a transition rule: only checked on update
        try:
            ok = _program(rule["rule"]).evaluate({"self": celpy.json_to_cel(value)})
        except Exception as e:  # the API server refuses what a rule cannot evaluate
            ok = e
        if ok is not True and not (isinstance(ok, celpy.celtypes.BoolType) and bool(ok)):
            out.append(f"{path or '<root>'}: {rule.get('message', rule['rule'])} ({ok!r})")
    if isinstance(value, dict):
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            sub = schema.get("properties", {}).get(key, extra if isinstance(extra, dict) else None)
            if sub is not None:
                _check_rules(sub, item, f"{path}.{key}" if path else key, out)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            _check_rules(schema["items"], item, f"{path}[{i}]", out)
