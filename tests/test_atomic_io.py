"""A folder's settings recorded on first use and checked on every later use (tiling and slide extraction)."""

import json

import pytest

from exaonepath_hf.atomic_io import record_folder_settings


def test_the_first_use_records_and_a_later_one_with_other_settings_is_refused(tmp_path):
    path = tmp_path / "out" / "settings.json"
    record_folder_settings(path, {"patch_size": 256, "mpp": (0.5, 0.5)}, "was made otherwise", "start over")
    assert json.loads(path.read_text()) == {"patch_size": 256, "mpp": [0.5, 0.5]}
    written = path.read_bytes()

    # the same settings again (a tuple reads back as a list): accepted, the record untouched
    record_folder_settings(path, {"mpp": [0.5, 0.5], "patch_size": 256}, "was made otherwise", "start over")
    with pytest.raises(ValueError) as raised:
        record_folder_settings(path, {"patch_size": 512, "mpp": (0.5, 0.5), "format": "png"}, "was x", "do y")
    assert str(raised.value) == f"{tmp_path / 'out'} was x (format, patch_size differ; see {path}); do y"
    assert path.read_bytes() == written
