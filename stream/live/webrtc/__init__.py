"""WebRTC in and out: WHIP ingest (RFC 9725) and WHEP playback of redacted frames, on aiortc."""
