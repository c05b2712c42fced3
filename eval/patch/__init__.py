"""Patch-level probing: the six benchmarks of the paper (`tasks`, `converters`), the probes (`probes`), the
`exaonepath-probe` run (`linear_probe`) and the Table 1 report (`report`)."""
