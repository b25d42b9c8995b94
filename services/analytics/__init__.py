"""analytics-service: payment events recorded once each, and merchant statistics (a leaf)."""
