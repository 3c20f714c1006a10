"""Loopback RTSP cameras and a publish/play relay for tests, benchmarks and load tests."""
