"""Operations: the admin endpoint, Prometheus metrics, leak diagnostics."""
