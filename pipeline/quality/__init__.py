"""Quality of masklets: signals computed behind the model (signals), flags and review priority from the
stored signal columns (flags). Pure functions over numpy arrays and Arrow tables; the worker, config and CLI
wire them in."""
