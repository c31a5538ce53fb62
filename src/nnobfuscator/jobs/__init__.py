"""Jobs the CLI runs: where models, data and tasks come from (``sources``), the training loop
(``training``) and a whole calibrate-and-write run (``run``)."""
