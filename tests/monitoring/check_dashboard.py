"""Checks monitoring/grafana-dashboard.json against monitoring/postgres_exporter.yml.

- the file is valid JSON and a Grafana 10+ dashboard (schemaVersion >= 36, panels with a
  type, a grid position and targets);
- every query uses only metrics the exporter file defines (a HISTOGRAM column `x` of
  namespace `n` defines `n_x_bucket`, `n_x_sum` and `n_x_count`), and only their labels;
- every panel, target and query variable takes its datasource from the `datasource`
  variable, and there is a `database` variable that every query filters on.

Exit status 1 with what is wrong; prints what it checked otherwise.
"""
import json
import re
import sys

import yaml

root = sys.argv[1] if len(sys.argv) > 1 else "monitoring"
problems = []

exporter = yaml.safe_load(open(f"{root}/postgres_exporter.yml"))
metrics, labels = set(), set()
for namespace, spec in exporter.items():
    for column in spec["metrics"]:
        (name, meta), = column.items()
        if meta["usage"] == "LABEL":
            labels.add(name)
        elif meta["usage"] == "HISTOGRAM":
            metrics.update(f"{namespace}_{name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
            labels.add("le")
        else:
            metrics.add(f"{namespace}_{name}")

try:
    dashboard = json.load(open(f"{root}/grafana-dashboard.json"))
except ValueError as e:
    sys.exit(f"grafana-dashboard.json is not valid JSON: {e}")

if dashboard.get("schemaVersion", 0) < 36:
    problems.append(f"schemaVersion {dashboard.get('schemaVersion')} is older than Grafana 9/10's (36+)")

variables = {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}
if variables.get("datasource", {}).get("type") != "datasource" or variables["datasource"].get("query") != "prometheus":
    problems.append("no datasource variable of type prometheus named 'datasource'")
if "database" not in variables:
    problems.append("no 'database' variable")

VARIABLE_DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "by", "without", "rate", "increase", "irate", "deriv",
    "histogram_quantile", "label_values", "and", "or", "unless", "on", "ignoring", "group_left",
    "group_right", "bool", "offset", "clamp_min", "topk", "last_over_time",
}


def identifiers(expr):
    """Metric and label names of a PromQL expression: strings, matchers' values and range
    durations removed."""
    expr = re.sub(r'"[^"]*"', '""', expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    inside = re.findall(r"\{([^}]*)\}", expr)
    matcher_labels = [m for block in inside for m in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", block)]
    outside = re.sub(r"\{[^}]*\}", " ", expr)
    names = re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", outside)
    return names, matcher_labels


def check_expr(where, expr, must_filter=True):
    names, matcher_labels = identifiers(expr)
    used = [n for n in names if n not in PROMQL_WORDS and n not in labels]
    for n in used:
        if n not in metrics:
            problems.append(f"{where}: '{n}' is not a metric of postgres_exporter.yml ({expr})")
    for l in matcher_labels:
        if l not in labels:
            problems.append(f"{where}: label '{l}' is not one the exporter sets ({expr})")
    if must_filter and 'database=~"$database"' not in expr:
        problems.append(f"{where}: does not filter on $database ({expr})")
    return [n for n in used if n in metrics]


query = variables.get("database", {}).get("query", {})
check_expr("variable database", query.get("query", "") if isinstance(query, dict) else query, must_filter=False)
if variables.get("database", {}).get("datasource") != VARIABLE_DATASOURCE:
    problems.append("variable database: datasource is not ${datasource}")

seen = set()
panels = dashboard.get("panels", [])
if not panels:
    problems.append("no panels")
for p in panels:
    where = f"panel {p.get('id')} '{p.get('title')}'"
    for key in ("type", "gridPos", "targets"):
        if key not in p:
            problems.append(f"{where}: no {key}")
    if p.get("datasource") != VARIABLE_DATASOURCE:
        problems.append(f"{where}: datasource {p.get('datasource')} is not the variable")
    for t in p.get("targets", []):
        if t.get("datasource") != VARIABLE_DATASOURCE:
            problems.append(f"{where} target {t.get('refId')}: datasource is not the variable")
        seen.update(check_expr(f"{where} target {t.get('refId')}", t.get("expr", "")))

if problems:
    print("\n".join(problems))
    sys.exit(1)
print(f"grafana-dashboard.json: {len(panels)} panels, queries use {len(seen)} of the exporter's {len(metrics)} metrics: {sorted(seen)}")
