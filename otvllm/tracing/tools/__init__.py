"""Tools over trace files: the Jaeger JSON reader and `otvllm trace summary`."""
