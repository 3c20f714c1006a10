"""stream-redact: real-time face and licence-plate redaction for live video."""

__version__ = "0.1.0"
