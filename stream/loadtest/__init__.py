"""Load-test harness (`stream-redact bench`): synthetic cameras with ground truth, measured end to end.

Why a package of its own: operators size a deployment before it carries real cameras, and the
numbers must come from the product's real path (RTSP in, detection, redaction, RTSP out), with
known faces and plates in every frame so that a leak can be counted, not guessed.
"""
