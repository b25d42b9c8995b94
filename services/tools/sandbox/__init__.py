"""The local sandbox of the external HTTP partners that ``make run`` serves on the loopback."""
