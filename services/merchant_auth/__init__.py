"""merchant-auth-service: merchant API keys, stored only as peppered HMAC-SHA256 digests."""
