"""Value types and the redaction itself: frames, detections, tracks, masks. Imports nothing else of stream."""
