"""``python -m services.tools.sandbox``: serve every partner on the sandbox address."""

from services.tools.sandbox.app import main

main()
