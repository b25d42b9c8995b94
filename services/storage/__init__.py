"""Storage every service stands on.

The store base, idempotent operations and the resumable step driver.
"""
