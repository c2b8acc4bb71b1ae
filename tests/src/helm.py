"""Real Helm (v4, as a library: helm-python-sdk) and real schema checks for
the chart tests (tests/tests/helm_chart.rs, through tests/src/helm.rs).

Run with the stack's Python ($INGEST_STACK_DIR/venv/bin/python), where
dev/stack installed dev/aws/requirements.txt:

    helm.py lint CHART [-f VALUES]...              helm lint --strict: JSON report
    helm.py render CHART -r RELEASE -n NAMESPACE [-f VALUES]...
                                                   helm template: JSON {notes, objects}
    helm.py validate < RENDERED.json               every object against its schema

A Helm error (a value the schema refuses, a template that fails) is printed
on stderr as Helm says it, with exit status 3.
"""

import argparse
import json
import sys

import helm_python as helm
import kubernetes_validate
import yaml

# Kubernetes versions every object must be valid in: the oldest the chart
# supports (Chart.yaml kubeVersion) and the newest the validator knows.
KUBERNETES_VERSIONS = ["1.30", kubernetes_validate.utils.major_minor(kubernetes_validate.utils.latest_version())]
MONITORING_API = "monitoring.coreos.com/v1"


def merged_values(files):
    """The values files merged in order, later ones winning, as `helm -f a -f b` does."""
    values = {}
    for path in files or []:
        with open(path) as file:
            deep_merge(values, yaml.safe_load(file) or {})
    return values


def deep_merge(into, new):
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            deep_merge(into[key], value)
        else:
            into[key] = value


def lint(args):
    report = helm.lint(args.chart, merged_values(args.values), strict=True)
    print(json.dumps(report))


def render(args):
    values = merged_values(args.values)
    with helm.Chart.load(args.chart) as chart:
        try:
            manifests = chart.render(
                values, name=args.release, namespace=args.namespace, is_install=True
            )
        except helm.HelmError as error:
            print(str(error).strip(), file=sys.stderr)
            sys.exit(3)
    notes = ""
    objects = []
    for template, text in sorted(manifests.items()):
        if template.endswith("NOTES.txt"):
            notes = text
            continue
        for document in yaml.safe_load_all(text):
            if document is not None:
                objects.append({"template": template, "object": document})
    print(json.dumps({"notes": notes, "objects": objects}))


def validate(_args):
    rendered = json.load(sys.stdin)
    checked, errors = [], []
    for item in rendered["objects"]:
        obj = item["object"]
        name = f'{obj.get("kind")}/{obj.get("metadata", {}).get("name")} ({item["template"]})'
        try:
            if obj.get("apiVersion") == MONITORING_API:
                check_monitoring(obj)
                checked.append(f"{name}: prometheus-operator {MONITORING_API} model")
            else:
                for version in KUBERNETES_VERSIONS:
                    kubernetes_validate.validate(obj, version, strict=True)
                checked.append(f"{name}: Kubernetes {', '.join(KUBERNETES_VERSIONS)} (strict)")
        except kubernetes_validate.ValidationError as error:
            path = "/".join(str(p) for p in error.path)
            errors.append(f"{name}: Kubernetes {error.version}: at /{path}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            errors.append(f"{name}: {error.message}")
        except ValueError as error:
            errors.append(f"{name}: {error}")
    print(json.dumps({"checked": checked, "errors": errors}))


def check_monitoring(obj):
    """ServiceMonitor, PodMonitor or PrometheusRule against prometheus-operator's
    CRD models (generated from its CRDs). The models ignore unknown fields
    and coerce types, so the object must also come back unchanged from a
    round trip through its model: a typo'd or misplaced field, or a value of
    the wrong type, shows as a difference."""
    from cloudcoil.models.prometheus_operator import v1

    model = {"PodMonitor": v1.PodMonitor, "ServiceMonitor": v1.ServiceMonitor,
             "PrometheusRule": v1.PrometheusRule}.get(obj["kind"])
    if model is None:
        raise ValueError(f"no prometheus-operator model for kind {obj['kind']}")
    try:
        parsed = model.model_validate(obj)
    except Exception as error:  # pydantic's ValidationError, which says where
        raise ValueError(str(error).replace("\n", "; ")) from None
    back = parsed.model_dump(mode="json", by_alias=True, exclude_none=True)
    differences = diff(obj, back, "")
    if differences:
        raise ValueError("not as the CRD defines it: " + "; ".join(differences))


def diff(given, back, path):
    if isinstance(given, dict) and isinstance(back, dict):
        out = []
        for key, value in given.items():
            if key not in back:
                out.append(f"{path}/{key}: unknown field")
            else:
                out.extend(diff(value, back[key], f"{path}/{key}"))
        return out
    if isinstance(given, list) and isinstance(back, list) and len(given) == len(back):
        out = []
        for index, (a, b) in enumerate(zip(given, back)):
            out.extend(diff(a, b, f"{path}/{index}"))
        return out
    if given != back or type(given) is not type(back):
        return [f"{path}: {given!r} is not a valid value (read as {back!r})"]
    return []


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("lint", "render"):
        command = commands.add_parser(name)
        command.add_argument("chart")
        command.add_argument("-f", "--values", action="append")
        if name == "render":
            command.add_argument("-r", "--release", required=True)
            command.add_argument("-n", "--namespace", required=True)
    commands.add_parser("validate")
    args = parser.parse_args()
    {"lint": lint, "render": render, "validate": validate}[args.command](args)


if __name__ == "__main__":
    main()
