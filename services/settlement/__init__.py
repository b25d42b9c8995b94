"""settlement-service: moves a merchant's available balance into settlement and pays it out.

The ledger posting checks the balance atomically; the payout is a withdrawal-service call, and
the merchant hears of the outcome at its webhook.
"""
