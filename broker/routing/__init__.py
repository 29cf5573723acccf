"""Routing: the manager (itself a Provider), one provider's turn at a job, policies, health, retries, output checks."""
