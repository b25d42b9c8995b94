"""withdrawal-service: pays merchants out through the bank-transfer partner.

The ledger reservation comes before the bank call, so concurrent withdrawals can never
pay out more than the balance holds.
"""
