"""``python -m tadsr.cli``: the ``tadsr`` command."""

from tadsr.cli import main

raise SystemExit(main())
