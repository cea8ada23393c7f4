"""``python -m gateway`` is the same as the ``medgw`` command."""

from gateway.cli import main

raise SystemExit(main())
