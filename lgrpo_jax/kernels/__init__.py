"""Hand-written Pallas kernels for the few places XLA's fusions leave latency on the table."""
