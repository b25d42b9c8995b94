"""withdrawal-service: pays merchants out through the bank-transfer partner.

The ledger moves the money to the merchant's payout_in_transit account before the bank call,
so concurrent withdrawals can never pay out more than the balance holds, and on to
platform/bank_payouts only once the bank confirmed it.
"""
