"""Evaluation of pathology encoders: linear probing on the EXAONEPath paper's six benchmarks and robustness to
the site (does the encoder follow the tissue or the slide, lab, scanner?).

- `tasks`: registry of PCAM, MHIST, CRC-100K, TIL, MSI-CRC, MSI-STAD (pinned labels, seeded splits)
  and local imagefolders, and the robustness tasks (PathoROB camelyon, PLISM); `converters`: original
  archives -> imagefolder with metadata.csv.
- `backbones`: EXAONEPath, any `AutoModel` image encoder or timm model, and the explicit preprocessing.
- `features`: extraction once per (model, dataset revision, split, preprocessing), cached, resumable,
  distributed with `accelerate launch`.
- `slide_features`: per-slide feature bags (HDF5, TRIDENT's layout: `features` [N, D], level-0 `coords`) from
  slides or `exaonepath-tile` output, resumable, split across processes; `load_slide_features` reads them.
- `slide_data` (a labels CSV joined to the bags, patient-level splits), `mil` (mean-pooling and gated
  attention MIL heads) and `slide_probe` (`run_slide_probe`, `exaonepath-slide-probe`: heads trained with
  Accelerate over seeds, run record, report, attention heatmaps with top patches).
- `probes`: the paper's SGD protocol, an eva-style AdamW preset, L-BFGS logistic regression.
- `metrics/pathology_metrics.py`: the `evaluate` metric module (top-1, balanced accuracy, macro-F1, AUROC).
- `report`: run records and the Table 1 report.
- `linear_probe` (`run_linear_probe`) and `robustness` (`run_robustness`, `assess_robustness`; data layouts in
  `grouped_images`): the two evaluations as library functions taking typed settings.
- Command lines: `exaonepath-probe`, `exaonepath-robustness`, `exaonepath-report`, `exaonepath-convert-dataset`
  (or `python -m exaonepath_hf.eval.<module>`; `accelerate launch -m exaonepath_hf.eval.patch.linear_probe`).

This package imports the core model, the helpers (`atomic_io`, `images`), `convert` and `tiling`; never
`exaonepath_hf.train` or the demo.
"""
