"""Slide level: per-slide feature bags (`features`, `exaonepath-extract`), labels joined to bags with
patient-level splits (`data`), MIL heads (`mil`) and `exaonepath-slide-probe` (`probe`)."""
