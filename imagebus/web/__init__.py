"""The web role: an HTTP API (OpenAI-compatible too), a requester page, an operator
dashboard and Prometheus metrics, served by one ASGI app that speaks only NATS,
through imagebus's own Python client (never PostgreSQL). See docs/web.md."""
