"""The model file: reading from a path or bytes, and every value it must refuse, with the reason."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from padim_core.errors import ModelFileError, PadimError
from padim_core.model_file import (
    FORMAT_VERSION,
    MAX_IMAGE_SIDE,
    encode_model,
    read_model_file,
    write_model_file,
)
from padim_core.padim import PadimModel

from support.images import noise_png
from support.models import images
from support.models import model_metadata as metadata_of
from support.models import rewrite_model_file as rewrite

CALIBRATION = {"method": "fixed", "threshold": 1.0, "false_alarm_rate": None, "count": 2, "scores": [0.5, 0.9]}


def test_the_file_reads_the_same_from_a_path_and_from_bytes(tiny_padim_file, tmp_path):
    path = tmp_path / "bottle.safetensors"
    path.write_bytes(tiny_padim_file)
    from_path = read_model_file(path)
    for source in (tiny_padim_file, bytearray(tiny_padim_file), memoryview(tiny_padim_file), str(path)):
        found = read_model_file(source)
        assert (found.kind, found.metadata) == (from_path.kind, from_path.metadata) == ("padim", metadata_of(tiny_padim_file))
        assert found.tensors.keys() == from_path.tensors.keys()
        assert all(torch.equal(found.tensors[name], from_path.tensors[name]) for name in found.tensors)
    assert from_path.where == str(path) and read_model_file(tiny_padim_file).where == f"<{len(tiny_padim_file)} bytes>"
    assert from_path.metadata["format_version"] == FORMAT_VERSION and from_path.calibration is None

    by_path, by_bytes = PadimModel.load(path), PadimModel.load(tiny_padim_file)
    assert by_path.metadata() == by_bytes.metadata()
    batch = images(2, seed=7)
    torch.testing.assert_close(by_path.predict(batch), by_bytes.predict(batch), rtol=0, atol=0)


def test_written_files_are_the_encoded_bytes_and_appear_whole(tiny_padim_file, tmp_path):
    model_file = read_model_file(tiny_padim_file)
    meta = {key: value for key, value in model_file.metadata.items() if key not in ("format", "format_version")}
    path = write_model_file(tmp_path / "deep" / "m.safetensors", model_file.tensors, meta)
    assert path.read_bytes() == encode_model(model_file.tensors, meta)
    assert read_model_file(path).metadata == model_file.metadata
    assert [item.name for item in path.parent.iterdir()] == ["m.safetensors"]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"kind": 7}, "metadata kind is 7; expected a detector kind name"),
        ({"backbone": "vgg16"}, "unknown backbone 'vgg16'"),
        ({"backbone": 5}, "metadata backbone is 5; expected a backbone name"),
        ({"layers": "layer1"}, "metadata layers is 'layer1'; expected a list of layer names"),
        ({"layers": ["layer1", "layer9"]}, r"unknown layer\(s\) \['layer9'\]"),
        ({"pretrained": "yes"}, "metadata pretrained is 'yes'; expected true or false"),
        ({"image_size": [100_000, 100_000]},
         rf"metadata image_size is \[100000, 100000\]; expected \[height, width\] of integers from 1 to {MAX_IMAGE_SIDE}"),
        ({"image_size": [4096, 4096]}, rf"image_size is \[4096, 4096\]; expected .* from 1 to {MAX_IMAGE_SIDE}"),
        ({"image_size": [64.0, 64]}, r"image_size is \[64.0, 64\]; expected \[height, width\] of integers"),
        ({"image_size": 128}, r"image_size is 128; expected \[height, width\]"),
        ({"image_size": [128, 128]},
         r"metadata grid_shape is \[16, 16\]; expected \[32, 32\]: image size \[128, 128\] at the stride 4 of layer1"),
        ({"grid_shape": [8, 8]}, r"metadata grid_shape is \[8, 8\]; expected \[16, 16\]: image size \[64, 64\] at the stride 4"),
        ({"grid_shape": None}, r"metadata grid_shape is None; expected \[16, 16\]"),
        ({"image_size": [4, 4], "grid_shape": [1, 1]}, "image_size is \\[4, 4\\]; expected sides of at least the deepest layer's stride 8"),
        ({"normalization": {"mean": [0.5, 0.5], "std": [1, 1, 1]}}, r"normalization is .*; expected \{mean: \[3 numbers\]"),
        ({"normalization": {"mean": [0.5] * 3, "std": [1, 0, 1]}}, "3 positive numbers"),
        ({"blur_sigma": math.nan}, "metadata blur_sigma is nan; expected a finite number >= 0"),
        ({"blur_sigma": -1.0}, "metadata blur_sigma is -1.0; expected a finite number >= 0"),
        ({"blur_sigma": "4"}, "metadata blur_sigma is '4'; expected a finite number >= 0"),
        ({"settings": [20]}, "metadata settings is \\[20\\]; expected a mapping of the detector's settings"),
        ({"n_train": -1}, "metadata n_train is -1; expected an integer >= 0"),
        ({"n_train": True}, "metadata n_train is True; expected an integer >= 0"),
        ({"calibration": {**CALIBRATION, "threshold": "abc"}}, "calibration.threshold must be a finite number, got 'abc'"),
        ({"calibration": {**CALIBRATION, "threshold": math.inf}}, "calibration.threshold must be a finite number, got inf"),
        ({"calibration": {**CALIBRATION, "method": ""}}, "calibration.method must be a non-empty string"),
        ({"calibration": {**CALIBRATION, "false_alarm_rate": 1.5}}, r"false_alarm_rate must be null or in \(0, 1\), got 1.5"),
        ({"calibration": {**CALIBRATION, "scores": [0.9, 0.5]}}, "calibration.scores must be sorted in ascending order"),
        ({"calibration": {**CALIBRATION, "scores": [0.5, "x"]}}, "calibration.scores must be a list of at most"),
        ({"calibration": {**CALIBRATION, "count": 5}}, "calibration.count is 5 but it lists 2 scores"),
        ({"calibration": "0.5"}, "calibration must be a mapping, got '0.5'"),
        ({"score_stats": {"map_max": "big"}}, "metadata score_stats is .*; expected a mapping of names to finite numbers"),
        ({"score_stats": [1.0]}, "metadata score_stats is \\[1.0\\]; expected a mapping"),
    ],
    ids=lambda value: json.dumps(value) if isinstance(value, dict) else None,
)
def test_every_common_value_is_checked_for_type_and_range(tiny_padim_file, changes, expected):
    data = rewrite(tiny_padim_file, **changes)
    with pytest.raises(ModelFileError, match=expected) as caught:
        read_model_file(data)
    assert str(caught.value).startswith(f"<{len(data)} bytes>: ")


def test_a_calibrated_file_reads_back_its_calibration(tiny_padim_file):
    data = rewrite(tiny_padim_file, calibration=CALIBRATION, score_stats={"map_max": 3.0})
    model_file = read_model_file(data)
    assert model_file.calibration.threshold == 1.0 and model_file.calibration.scores == (0.5, 0.9)
    assert PadimModel.load(data).threshold_ == 1.0


def test_missing_metadata_is_named(tiny_padim_file):
    with pytest.raises(ModelFileError, match=r"padim metadata lacks \['grid_shape', 'score_stats'\]"):
        read_model_file(rewrite(tiny_padim_file, drop=("grid_shape", "score_stats")))


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"format_version": 1}, "model format version 1; this padim reads version 2 \\(fit the model again with this version\\)"),
        ({"format_version": "2"}, "model format version '2'; this padim reads version 2"),
        ({"format": "another-model"}, "metadata format is 'another-model', expected 'padim-model'"),
    ],
)
def test_files_of_another_format_or_version_say_what_to_do(tiny_padim_file, tmp_path, changes, expected):
    path = tmp_path / "old.safetensors"
    path.write_bytes(rewrite(tiny_padim_file, **changes))
    with pytest.raises(ModelFileError, match=f"{path}: {expected}"):
        read_model_file(path)


def test_anything_but_safetensors_is_not_a_safetensors_file(tiny_padim_file, tmp_path):
    pickled = tmp_path / "model.safetensors"  # a torch pickle renamed: refused before anything is unpickled
    torch.save({"mean": torch.zeros(3)}, pickled)
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, not a model")
    picture = tmp_path / "image.safetensors"
    picture.write_bytes(noise_png())
    for path in (pickled, text, picture):
        with pytest.raises(ModelFileError, match=f"{path}: not a safetensors file"):
            PadimModel.load(path)
    for data in (b"", b"1234567", struct.pack("<Q", 10**12) + b"{}", struct.pack("<Q", 2) + b"[]"):
        with pytest.raises(ModelFileError, match="not a safetensors file"):
            read_model_file(data)


def test_safetensors_without_padim_metadata_are_refused(tmp_path):
    foreign = save_tensors({"weight": torch.zeros(2)})
    with pytest.raises(ModelFileError, match="a safetensors file, but not a padim model"):
        read_model_file(foreign)
    with pytest.raises(ModelFileError, match="padim metadata is not valid JSON"):
        read_model_file(save_tensors({"weight": torch.zeros(2)}, metadata={"padim": "{broken"}))


def test_missing_truncated_and_unreadable_files_are_refused(tiny_padim_file, tmp_path):
    with pytest.raises(ModelFileError, match="absent.safetensors: no such model file"):
        read_model_file(tmp_path / "absent.safetensors")
    with pytest.raises(ModelFileError, match="no such model file"):
        read_model_file(tmp_path)  # a folder
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(tiny_padim_file[: len(tiny_padim_file) // 2])
    with pytest.raises(ModelFileError, match="cut.safetensors: a safetensors header, but its tensors cannot be read.*truncated"):
        read_model_file(cut)


@pytest.mark.parametrize(
    ("tensors", "expected"),
    [
        ({"mean": torch.zeros(100, 20)}, r"tensor mean has shape \(100, 20\), expected \(256, 20\)"),
        ({"mean": torch.zeros(256, 20, dtype=torch.float64)}, "tensor mean is torch.float64, expected torch.float32"),
        ({"mean": torch.full((256, 20), math.nan)}, "tensor mean holds NaN or infinity"),
        ({"channel_index": torch.arange(20, dtype=torch.int32)}, "tensor channel_index is torch.int32, expected torch.int64"),
    ],
)
def test_tensors_are_checked_for_shape_dtype_and_finiteness(tiny_padim_file, tensors, expected):
    with pytest.raises(ModelFileError, match=expected):
        PadimModel.load(rewrite(tiny_padim_file, tensors))


def test_a_missing_tensor_and_inconsistent_settings_are_refused(tiny_padim_file):
    tensors = load_tensors(tiny_padim_file)
    del tensors["inv_covariance"]
    missing = save_tensors(tensors, metadata={"padim": json.dumps(metadata_of(tiny_padim_file))})
    with pytest.raises(ModelFileError, match=r"missing tensor 'inv_covariance' \(has \['channel_index', 'mean'\]\)"):
        PadimModel.load(missing)
    settings = metadata_of(tiny_padim_file)["settings"]
    with pytest.raises(ModelFileError, match="settings do not describe a usable padim model.*embedding_size 999"):
        PadimModel.load(rewrite(tiny_padim_file, settings={**settings, "embedding_size": 999}))
    lacking = {key: value for key, value in settings.items() if key != "seed"}
    with pytest.raises(ModelFileError, match="settings do not describe a usable padim model"):
        PadimModel.load(rewrite(tiny_padim_file, settings=lacking))


def test_model_file_errors_are_padim_errors_not_value_errors():
    assert issubclass(ModelFileError, PadimError) and not issubclass(ModelFileError, ValueError)


def test_a_real_model_file_path_names_itself_in_errors(tiny_padim_file, tmp_path: Path):
    path = tmp_path / "named.safetensors"
    path.write_bytes(rewrite(tiny_padim_file, blur_sigma=math.nan))
    with pytest.raises(ModelFileError, match=f"^{path}: metadata blur_sigma is nan"):
        PadimModel.load(path)
