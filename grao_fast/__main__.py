"""``python -m grao_fast`` runs the ``grao-fast`` command."""

from grao_fast.cli import main

raise SystemExit(main())
