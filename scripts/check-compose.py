#!/usr/bin/env python3
"""Validate compose.yaml without a Docker engine.

Checks it against the Compose Specification's JSON schema, then what the
schema cannot: every depends_on target exists, every `service_healthy`
dependency has a healthcheck, every service that is only `image:` has a
service that builds that image. Exit 1 with the problems listed.
"""
import json
import pathlib
import sys

import jsonschema
import yaml

root = pathlib.Path(__file__).resolve().parent.parent
# A copy of the compose-spec project's schema/compose-spec.json (Apache-2.0).
schema_path = root / "scripts/compose-spec.json"
compose_path = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else root / "compose.yaml"
compose = yaml.safe_load(compose_path.read_text())
schema = json.loads(schema_path.read_text())

problems = [f"schema: {'/'.join(map(str, e.path))}: {e.message}"
            for e in jsonschema.Draft7Validator(schema).iter_errors(compose)]

services = compose.get("services", {})
built = {s.get("image") for s in services.values() if "build" in s}
for name, svc in services.items():
    deps = svc.get("depends_on", {})
    if isinstance(deps, list):
        deps = {d: {"condition": "service_started"} for d in deps}
    for dep, spec in deps.items():
        if dep not in services:
            problems.append(f"{name}: depends_on unknown service {dep!r}")
            continue
        cond = (spec or {}).get("condition", "service_started")
        if cond == "service_healthy" and "healthcheck" not in services[dep]:
            problems.append(f"{name}: waits for {dep} to be healthy, but {dep} has no healthcheck")
    image = svc.get("image", "")
    if "build" not in svc and image.startswith("inferq") and image not in built:
        problems.append(f"{name}: image {image!r} is built by no service")

if problems:
    print("compose.yaml is invalid:")
    for p in problems:
        print("  -", p)
    sys.exit(1)
print(f"compose.yaml is valid ({len(services)} services, schema {schema_path.name})")
