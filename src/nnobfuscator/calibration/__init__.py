"""Calibration: landing each tier on its target (``calibrator``) along one strength knob per
tier (``strength``), optionally against what its users extract (``extractable``), the search for
each tier's cheapest compute setting (``compute_search``), the runners that evaluate settings
(``runner``) and the report (``report``)."""
