"""Training recipes for EXAONEPath (not part of the installed `exaonepath_hf` package).

`train/pretrain_dino.py` reproduces the paper's DINO pretraining with Accelerate; its parts live in
`train/dino/`.
"""
