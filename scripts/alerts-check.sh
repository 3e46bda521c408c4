#!/usr/bin/env bash
# The Prometheus alerting rules in deploy/alerts.yml: valid (`promtool check rules`) and
# firing when they should (`promtool test rules deploy/alerts_test.yml`). promtool comes with
# Debian's prometheus package.
set -euo pipefail
cd "$(dirname "$0")/../deploy"
promtool check rules alerts.yml
promtool test rules alerts_test.yml
