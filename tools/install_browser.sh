#!/usr/bin/env bash
# Headless Chromium for the report page's tests (tests/test_html_report.py): Debian's package,
# installed when absent (root and apt-get needed; otherwise say what to install).
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
else
  echo "chromium is missing: install it (Debian: apt-get install -y chromium)" >&2
  exit 1
fi
