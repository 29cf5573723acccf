"""``broker serve``: the whole manager (routing, failover, budgets, long work) behind one HTTP job API.

Parts: ``db`` (one async SQL seam over SQLite and PostgreSQL), ``jobs`` (the job table), ``tenants`` (API keys,
hashed at rest, with rate limits), ``queues`` (in-process on SQLite; procrastinate on PostgreSQL, so
any replica can accept or run a job), ``runner`` (one job through the manager), ``outputs`` (a directory or an
S3-compatible bucket), ``webhooks`` (HMAC-signed, retried), ``metrics`` (Prometheus text), ``api`` (FastAPI),
``static/`` (the dashboard, no build step).
"""
