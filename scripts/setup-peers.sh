#!/usr/bin/env bash
# Installs the real peer servers the test suite starts on 127.0.0.1 (see tests/peers/servers.py):
#   SEKMET (FHIR R4, PyPI) in .peers/sekmet, Medplum's FHIR router (npm) in tests/peers/medplum,
#   Orthanc with DICOMweb and GDCM (Debian), chromium and chromedriver (Debian) for the browser
#   tests, and the loopback/stack-size preload shim for Orthanc.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .peers

if [ ! -x .peers/sekmet/bin/sekmet ]; then
  python3 -m venv .peers/sekmet
  .peers/sekmet/bin/pip install -q sekmet-fhir==0.1.1
fi

if [ ! -d tests/peers/medplum/node_modules/@medplum/fhir-router ]; then
  (cd tests/peers/medplum && npm install --silent --no-audit --no-fund --no-package-lock)
fi

if [ ! -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || [ ! -e /usr/share/orthanc/plugins/libOrthancGdcm.so ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  # The package's own service is not wanted (it would listen on all interfaces): forbid starting it.
  made_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    made_policy=1
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    orthanc orthanc-dicomweb orthanc-gdcm >/dev/null
  if [ -n "$made_policy" ]; then $SUDO rm -f /usr/sbin/policy-rc.d; fi
  # Stop the packaged service if it started anyway; the tests run their own instances.
  if pgrep -x Orthanc >/dev/null && command -v service >/dev/null; then $SUDO service orthanc stop || true; fi
fi

# Debian's chromium and its driver: the real browser the SMART app page is tested in
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    chromium chromium-driver >/dev/null
fi

# PostgreSQL's server binaries: the tests start their own throwaway server (tests/peers/postgres.py)
if ! command -v initdb >/dev/null && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  made_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then  # not the packaged cluster's service
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    made_policy=1
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends postgresql >/dev/null
  if [ -n "$made_policy" ]; then $SUDO rm -f /usr/sbin/policy-rc.d; fi
fi

if [ ! -e .peers/loopback.so ] || [ tests/peers/loopback.c -nt .peers/loopback.so ]; then
  gcc -shared -fPIC -O2 -o .peers/loopback.so tests/peers/loopback.c -ldl
fi
echo "peers ready"
