"""Detection, stream and incident events: schema, emitter, and the sinks that deliver them.

Importing this package is cheap; the Kafka client is imported only by the Kafka sink.
"""
