"""Jobs the CLI runs: where models, data and tasks come from (``sources``) and a whole
calibrate-and-write run (``run``)."""
