"""risk-service: fraud assessment of payments by amount, velocity and geography (geo-IP)."""
