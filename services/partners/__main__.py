"""``python -m services.partners``: serve every partner on the sandbox address."""

from services.partners.sandbox import main

main()
