"""``python -m benchmarks``: the benchmark report (see ``benchmarks.report``)."""

from benchmarks.report import main

raise SystemExit(main())
