"""benchmarks: the measurement harness (backends, quality / latency / memory metrics, reports)."""
