"""Where live frames come from: RTSP cameras and files played as cameras (WHIP joins later)."""
