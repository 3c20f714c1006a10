"""The live runtime: sources, the batching stage, the pipeline, publishing, WebRTC, HTTP, the API."""
