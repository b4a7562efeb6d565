"""The studies of scripts/compare.py: definitions (``definitions``), running (``running``),
statistics (``stats``) and reports (``report``, ``paper_report``)."""
