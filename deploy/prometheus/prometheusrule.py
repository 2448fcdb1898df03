#!/usr/bin/env python3
"""Prints rules.yaml wrapped in a prometheus-operator PrometheusRule, the content of
deploy/kubernetes/monitoring/prometheusrule.yaml. rules.yaml is the one source; CI checks that
the Kubernetes file is what this prints:

    python3 deploy/prometheus/prometheusrule.py > deploy/kubernetes/monitoring/prometheusrule.yaml
"""
import pathlib
import sys

import yaml

HEADER = """\
# GENERATED from deploy/prometheus/rules.yaml by deploy/prometheus/prometheusrule.py: edit
# rules.yaml, then run that script (CI checks that the two agree). For a Prometheus run by the
# prometheus-operator; the `release` label is what its ruleSelector commonly matches: set it to
# yours. Alert meanings: docs/runbooks.md.
"""


def block_style(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
    """Multi-line strings (the longer expressions) as `|` blocks, as in rules.yaml."""
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


def main() -> None:
    yaml.SafeDumper.add_representer(str, block_style)
    rules = yaml.safe_load((pathlib.Path(__file__).parent / "rules.yaml").read_text())
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "tokenbroker",
            "labels": {"app.kubernetes.io/name": "tokenbroker", "release": "prometheus"},
        },
        "spec": {"groups": rules["groups"]},
    }
    sys.stdout.write(HEADER + yaml.safe_dump(doc, sort_keys=False, width=100))


if __name__ == "__main__":
    main()
