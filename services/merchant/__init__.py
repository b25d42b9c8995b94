"""merchant-service: merchant profiles and the dashboard aggregated from five downstreams."""
