"""What every evaluation shares: encoders (`encoders`), feature extraction and its cache (`features`), data
conventions (`data`), run records (`records`) and the metric module (`metrics`). It imports nothing of
`patch`, `robustness` or `slide`."""
