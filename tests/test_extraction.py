"""The one extraction path (`eval.common.extraction`): what `AutoImageProcessor` + `AutoModel` give, wherever the
processor runs, in source order, with unreadable and unprocessable images left out and reported."""

import numpy as np
import pytest
import torch
from conftest import shared_data_dir
from torch.utils.data import Dataset
from transformers import AutoImageProcessor, AutoModel

from exaonepath_hf import ExaonePathImageProcessor, StainReference
from exaonepath_hf.eval.common.encoders import load_encoder
from exaonepath_hf.eval.common.extraction import ForwardSettings, ForwardTimes, stream_features
from exaonepath_hf.images import image_files, open_rgb


class _Items(Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a processor whose stain reference and crop are not the package's defaults, as a
    model pretrained with its own `data.stain_reference` exports it."""
    path = tmp_path_factory.mktemp("own-processor") / "model"
    AutoModel.from_pretrained(tiny_model_dir).save_pretrained(path)
    reference = StainReference(
        stain_matrix=[[0.61, 0.18], [0.70, 0.83], [0.37, 0.53]], max_concentrations=[2.7187, 1.31]
    )
    ExaonePathImageProcessor(
        stain_reference=reference, crop_size={"height": 192, "width": 192}
    ).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def images(shared_data):
    files = image_files(shared_data / "he-images")[:6]
    assert len(files) == 6, shared_data_dir()
    return [open_rgb(path).resize((240, 240)) for path in files[:4]] + [
        open_rgb(files[4]),
        open_rgb(files[5]),
    ]


def _reference(model_dir, images):
    processor = AutoImageProcessor.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(**processor(images, return_tensors="pt").to(torch.float32)).pooler_output


@pytest.mark.parametrize("preprocess_on", ["workers", "device"])
def test_stream_equals_processor_and_model_and_isolates_bad_images(model_dir, images, preprocess_on):
    empty = np.zeros((0, 5, 3), dtype=np.uint8)  # decodes, but no processor takes it
    items = [(f"ok{i}", image, None) for i, image in enumerate(images)]
    items.insert(2, ("unreadable", None, "OSError: truncated file"))
    items.insert(5, ("empty", empty, None))
    encoder = load_encoder(model_dir)
    settings = ForwardSettings(batch_size=4, num_workers=0, preprocess_on=preprocess_on, progress=False)
    times = ForwardTimes()
    batches = list(
        stream_features(
            encoder, encoder.default_preprocessing(), _Items(items), settings, torch.device("cpu"), times
        )
    )
    keys = [key for batch in batches for key in batch.keys]
    assert keys == [f"ok{i}" for i in range(len(images))]  # source order, bad ones left out
    failed = dict(failure for batch in batches for failure in batch.failed)
    assert set(failed) == {"unreadable", "empty"}
    assert failed["unreadable"] == "OSError: truncated file" and failed["empty"].startswith("preprocessing: ")
    features = torch.cat([batch.features for batch in batches])
    torch.testing.assert_close(features, _reference(model_dir, images), atol=1e-4, rtol=0)
    assert torch.cat([batch.stain_normalized for batch in batches]).all()
    assert times.images == len(images) and times.batches == 2
    assert 0 <= times.to_dict()["data_wait_fraction"] <= 1


def test_stream_with_loader_workers_keeps_the_order(model_dir, images):
    items = [(i, image, None) for i, image in enumerate(images * 2)]
    encoder = load_encoder(model_dir)
    settings = ForwardSettings(batch_size=3, num_workers=2, preprocess_on="device", progress=False)
    batches = list(
        stream_features(
            encoder, encoder.default_preprocessing(), _Items(items), settings, torch.device("cpu")
        )
    )
    assert [key for batch in batches for key in batch.keys] == list(range(len(items)))
    features = torch.cat([batch.features for batch in batches])
    torch.testing.assert_close(features[: len(images)], features[len(images) :], atol=0, rtol=0)


def test_forward_settings_reject_bad_values():
    with pytest.raises(ValueError, match="preprocess_on"):
        ForwardSettings(preprocess_on="gpu")
    with pytest.raises(ValueError, match="batch_size"):
        ForwardSettings(batch_size=0)
    assert ForwardSettings().uses_bf16(torch.device("cuda")) and not ForwardSettings().uses_bf16(
        torch.device("cpu")
    )
    assert ForwardSettings().preprocesses_on_device(torch.device("cuda"))
    assert not ForwardSettings().preprocesses_on_device(torch.device("cpu"))
