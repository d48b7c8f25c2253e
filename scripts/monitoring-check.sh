#!/usr/bin/env bash
# The monitoring files' own checks (make test runs this once): promtool check and unit-test the
# alerting rules, and check the Grafana dashboard's structure against the exporter's queries.
# The end-to-end test of the exporter and Prometheus is tests/e2e/monitoring.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
promtool check rules monitoring/alerts.yml
(cd monitoring && promtool test rules alerts_test.yml)
PYTHONPATH="${OUTBOX_PYTHONPATH:-$HOME/.cache/outbox_ext/python}" python3 tests/monitoring/check_dashboard.py monitoring
# cargo's summary line, so that make test counts these three checks.
echo "test result: ok. 3 passed; 0 failed; (monitoring: promtool check rules, promtool test rules, dashboard)"
