"""channel-adapter: charges at the payment channel and exchange rates from the rate partner."""
