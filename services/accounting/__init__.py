"""accounting-service: the double-entry ledger (a leaf; it calls nobody)."""
