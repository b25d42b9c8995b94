"""payment-gateway: the merchant-facing entry point that runs payments and refunds end to end.

It orchestrates merchant-auth, risk, order, channel-adapter, accounting, notification and
analytics; every step is persisted so a crash recovery pass can finish what a killed process left.
"""
