"""notification-service: merchant webhooks, each event delivered at most once per request id."""
