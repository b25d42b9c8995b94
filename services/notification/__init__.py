"""notification-service: merchant webhooks, one event per request id, delivered at least once."""
