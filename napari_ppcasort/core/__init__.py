"""The engine: pure NumPy/SciPy, no Qt. Data flows files -> images -> coefficients -> model -> scores."""
