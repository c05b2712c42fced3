"""Evaluation of pathology encoders: linear probing on the EXAONEPath paper's six benchmarks and slide-level
feature collapse.

- `eval.tasks`: registry of PCAM, MHIST, CRC-100K, TIL, MSI-CRC, MSI-STAD (pinned labels, seeded splits)
  and local imagefolders; `eval.converters`: original archives -> imagefolder with metadata.csv.
- `eval.backbones`: EXAONEPath, any `AutoModel` image encoder or timm model, and the explicit preprocessing.
- `eval.features`: extraction once per (model, dataset revision, split, preprocessing), cached, resumable,
  distributed with `accelerate launch`.
- `eval.probes`: the paper's SGD protocol, an eva-style AdamW preset, L-BFGS logistic regression.
- `eval/metrics/pathology_metrics.py`: the `evaluate` metric module (top-1, balanced accuracy, macro-F1, AUROC).
- `eval.report`: run records and the Table 1 report.
- Command lines: `python -m eval.linear_probe`, `python -m eval.feature_collapse`, `python -m eval.report`,
  `python -m eval.converters`.
"""
