"""``python -m services`` (``make run``): the whole mesh on this machine."""

import sys

from services.launcher import main

sys.exit(main())
