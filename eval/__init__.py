"""Evaluation of pathology encoders: linear probing on the EXAONEPath paper's six benchmarks and slide-level
feature collapse.

- `tasks`: registry of PCAM, MHIST, CRC-100K, TIL, MSI-CRC, MSI-STAD (pinned labels, seeded splits)
  and local imagefolders; `converters`: original archives -> imagefolder with metadata.csv.
- `backbones`: EXAONEPath, any `AutoModel` image encoder or timm model, and the explicit preprocessing.
- `features`: extraction once per (model, dataset revision, split, preprocessing), cached, resumable,
  distributed with `accelerate launch`.
- `probes`: the paper's SGD protocol, an eva-style AdamW preset, L-BFGS logistic regression.
- `metrics/pathology_metrics.py`: the `evaluate` metric module (top-1, balanced accuracy, macro-F1, AUROC).
- `report`: run records and the Table 1 report.
- `linear_probe` (`run_linear_probe`) and `feature_collapse` (`run_feature_collapse`, `assess_collapse`): the
  two evaluations as library functions taking typed settings.
- Command lines: `exaonepath-probe`, `exaonepath-collapse`, `exaonepath-report`, `exaonepath-convert-dataset`
  (or `python -m exaonepath_hf.eval.<module>`; `accelerate launch -m exaonepath_hf.eval.linear_probe`).

This package imports the core model, the helpers (`atomic_io`, `images`), `convert` and `tiling`; never
`exaonepath_hf.train` or the demo.
"""
