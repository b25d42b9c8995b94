"""The payment platform's services, their shared bootstrap, topology and client factory."""
