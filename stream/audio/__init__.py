"""Audio redaction: speech detection, muting and voice disguise."""
