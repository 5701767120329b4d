#!/usr/bin/env bash
# Install the Prometheus server (Debian package `prometheus`, with promtool) that
# tests/test_observability.py runs against a real vLLM server; without it those tests skip.
# Installs system-wide with apt-get, so it needs root. Opt-in: `make prometheus` (CI runs it).
set -euo pipefail
if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
  echo "prometheus: already installed ($(command -v prometheus))"
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "prometheus: needs root and apt-get: run 'sudo make prometheus', or install Prometheus yourself" >&2
  exit 1
fi
echo "prometheus: installing the Debian package prometheus system-wide (apt-get update, apt-get install)"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
echo "prometheus: installed $(command -v prometheus)"
