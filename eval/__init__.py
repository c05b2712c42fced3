"""Evaluation of pathology encoders, in four rooms: what every evaluation shares, and three concerns built on it.

- `common`: encoders (`encoders`: EXAONEPath, any `AutoModel` image encoder or timm model, and the explicit
  preprocessing), feature extraction once per (model, dataset revision, split, preprocessing), cached,
  resumable and distributed with `accelerate launch` (`features`) on the one extraction path every feature
  of the package takes (`extraction`: loader workers decode, the model's own processor and the forward run on
  the device, bad images are left out and reported), data conventions such as split names
  (`data`), run records and summaries over seeds (`records`), the `evaluate` metric module (`metrics`) and
  the flags every evaluation command spells the same way (`cli`).
- `patch`: linear probing on the EXAONEPath paper's six benchmarks. The registry of PCAM, MHIST, CRC-100K, TIL,
  MSI-CRC, MSI-STAD and local imagefolders (`tasks`), original archives to imagefolders (`converters`), the
  paper's SGD protocol, an eva-style preset and L-BFGS logistic regression (`probes`), the run
  (`linear_probe`: `run_linear_probe`, `exaonepath-probe`) and the Table 1 report (`report`).
- `robustness`: does an encoder follow the tissue or the slide, lab, scanner? The PathoROB and PLISM tasks
  (`tasks`) and grouped image folders (`grouped_images`), virtual labs (`virtual_labs`), the exact neighbour
  search (`neighbours`), the field's metrics (`metrics`) and the run (`run`: `run_robustness`,
  `exaonepath-robustness`).
- `slide`: per-slide feature bags, one HDF5 file per slide in TRIDENT's layout (`bags`: `load_slide_features`),
  extracted from slides or `exaonepath-tile` output (`features`: `exaonepath-extract`), a labels CSV joined to
  the bags with patient-level splits (`data`), mean-pooling and gated attention MIL heads (`mil`), the slide
  probe (`probe`: `run_slide_probe`, `exaonepath-slide-probe`) and its attention heatmaps (`heatmaps`).

`patch`, `robustness` and `slide` never import each other: each uses only `common` and the layers below
(the core model, the helpers, `convert`, `tiling`), never `exaonepath_hf.train` or the demo; `common` imports
none of the three. `lint-imports` checks both rules (the contracts in `setup.cfg`), so one concern can change
without breaking another; what two of them need goes into `common`.

Each room's commands are parsed in its light `cli` module (the entry points in `setup.cfg`), which answers
`--help` and argument errors without importing torch; every command also runs as a module:
`python -m exaonepath_hf.eval.patch.linear_probe`, `python -m exaonepath_hf.eval.robustness.run`,
`python -m exaonepath_hf.eval.slide.probe`, ..., and `accelerate launch -m exaonepath_hf.eval.patch.linear_probe`
across processes.
"""
