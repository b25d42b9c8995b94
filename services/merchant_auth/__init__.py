"""merchant-auth-service: merchant API keys, stored only as salted scrypt hashes."""
