"""order-service: the orders behind payments (a leaf; it calls nobody)."""
