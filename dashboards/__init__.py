"""Grafana dashboards of llm-energy-sidecar, written with grafana-foundation-sdk.

Each dashboard module (``overview``, ``requests``, ``fleet``) holds a pure function returning
a ``Dashboard`` builder; ``python -m dashboards.generate`` writes them to ``dashboards/json/``.
``dashboards.generate.iter_queries`` and ``dashboards.common.substitute`` let tests run every
panel query against a real Prometheus.
"""
