"""Slide level: per-slide feature bags on disk (`bags`, TRIDENT's HDF5 layout), their extraction (`features`,
`exaonepath-extract`), labels joined to bags with patient-level splits (`data`), the runs' settings
(`settings`), MIL heads (`mil`), `exaonepath-slide-probe` (`probe`) and its attention heatmaps (`heatmaps`);
the commands' parsers in `cli`."""
