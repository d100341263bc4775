"""Serving: an HTTP replica (FastAPI) over a continuous-batching engine (KV-cache slots) or a
dynamically batched predictor, Prometheus metrics, a results store, and Ray Serve replicas."""
