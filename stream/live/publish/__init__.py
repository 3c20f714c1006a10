"""Where redacted frames go: an RTSP push to a media server, a recording file (WHEP joins later)."""
