"""Calibration: landing each tier on its target (``calibrator``), the search for each tier's
cheapest compute setting (``compute_search``), the runners that evaluate settings
(``runner``) and the report (``report``)."""
