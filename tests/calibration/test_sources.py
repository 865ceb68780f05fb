"""Calibration data sources: .npz, .npy folders, images, synthetic data, and the dispatcher."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from calibration import sources
from calibration.data import ArrayData
from calibration.sources import (
    CalibrationSource,
    ImageFolderSource,
    ImageSpec,
    NpyFolderSource,
    NpzSource,
    SyntheticSource,
    effective_batch_size,
    open_source,
)
from optimizer.errors import InputError
from optimizer.runtime import InputSpec

F32 = np.dtype(np.float32)


def spec(name="x", shape=("N", 3), dtype=F32):
    return InputSpec(name, np.dtype(dtype), shape)


def collect(source, specs, batch_size):
    return list(source.batches(specs, batch_size))


# --- batch planning -----------------------------------------------------------------------------


def test_dynamic_batch_takes_requested_size_and_keeps_the_tail(tmp_path):
    data = np.arange(40 * 3, dtype=np.float32).reshape(40, 3)
    np.savez(tmp_path / "d.npz", x=data)
    source = open_source(tmp_path / "d.npz", [spec()])
    assert isinstance(source, NpzSource) and isinstance(source, CalibrationSource)
    assert source.num_samples == 40 and source.synthetic is False and "d.npz" in source.description
    batches = collect(source, [spec()], 16)
    assert [b["x"].shape[0] for b in batches] == [16, 16, 8]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), data)
    assert all(b["x"].flags.c_contiguous and b["x"].dtype == np.float32 for b in batches)


def test_fixed_batch_dim_dictates_batch_size_and_drops_the_remainder():
    specs = [spec(shape=(4, 3))]
    source = open_source({"x": np.ones((10, 3), np.float32)}, specs)
    batches = collect(source, specs, 16)
    assert [b["x"].shape[0] for b in batches] == [4, 4]
    assert any("2 sample(s) dropped" in w for w in source.warnings)


def test_batch_size_errors():
    with pytest.raises(InputError, match="different batch sizes"):
        effective_batch_size([spec("a", (1, 3)), spec("b", (2, 3))], 8)
    with pytest.raises(InputError, match="positive integer"):
        effective_batch_size([spec()], 0)
    with pytest.raises(InputError, match="fixed to 8"):
        collect(open_source({"x": np.ones((3, 3), np.float32)}, [spec(shape=(8, 3))]), [spec(shape=(8, 3))], 8)


def test_npz_shape_and_dtype_checks(tmp_path):
    with pytest.raises(InputError, match="expects Nx3"):
        open_source({"x": np.ones((5, 4), np.float32)}, [spec(shape=("N", 3))])
    with pytest.raises(InputError, match="no array for model input 'x'"):
        open_source({"y": np.ones((5, 3), np.float32)}, [spec()])
    with pytest.raises(InputError, match="expects float32"):
        open_source({"x": np.ones((5, 3), np.int64)}, [spec()])
    with pytest.raises(InputError, match="only plain numeric"):
        open_source({"x": np.array(["a", "b"])}, [spec(shape=("N",))])
    # float64 data feeds a float32 input after a cast
    batches = collect(open_source({"x": np.ones((5, 3), np.float64)}, [spec()]), [spec()], 2)
    assert batches[0]["x"].dtype == np.float32


def test_arraydata_is_accepted_and_labels_ignored():
    data = ArrayData({"x": np.zeros((6, 3), np.float32)}, np.arange(6), "mem")
    source = open_source(data, [spec()])
    assert [set(b) for b in collect(source, [spec()], 4)] == [{"x"}, {"x"}]


# --- .npy folders ---------------------------------------------------------------------------------


def test_npy_folder_one_file_per_input(tmp_path):
    a = np.random.default_rng(0).normal(size=(9, 3)).astype(np.float64)
    b = np.arange(9 * 2, dtype=np.float32).reshape(9, 2)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "input_0.npy", b)  # input name 'input:0' written with '_' for ':'
    specs = [spec("a"), spec("input:0", ("N", 2))]
    source = open_source(tmp_path, specs)
    assert isinstance(source, NpyFolderSource) and source.layout == "per-input" and source.num_samples == 9
    batches = collect(source, specs, 4)
    assert [x["a"].shape[0] for x in batches] == [4, 4, 1]
    np.testing.assert_allclose(np.concatenate([x["a"] for x in batches]), a.astype(np.float32))
    np.testing.assert_array_equal(np.concatenate([x["input:0"] for x in batches]), b)
    assert all(not isinstance(x["a"], np.memmap) for x in batches), "batches must be copies, not views of the map"


def test_npy_folder_per_sample_files_in_numeric_order(tmp_path):
    for n in range(12):
        np.save(tmp_path / f"img_{n}.npy", np.full((3,), n, np.float32))  # one sample per file
    np.save(tmp_path / "img_12.npy", np.stack([np.full((3,), 12.0), np.full((3,), 13.0)]).astype(np.float32))  # a chunk
    source = open_source(tmp_path, [spec()])
    assert source.layout == "per-sample" and source.num_samples == 14
    batches = collect(source, [spec()], 5)
    assert [b["x"].shape for b in batches] == [(5, 3), (5, 3), (4, 3)]
    np.testing.assert_array_equal(np.concatenate([b["x"][:, 0] for b in batches]), np.arange(14))


def test_npy_always_memory_mapped_without_pickle(tmp_path, monkeypatch):
    np.save(tmp_path / "x.npy", np.ones((4, 3), np.float32))
    calls = []
    real_load = np.load

    def spy(path, *args, **kwargs):
        calls.append(kwargs)
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(sources.np, "load", spy)
    collect(open_source(tmp_path, [spec()]), [spec()], 2)
    assert calls and all(c.get("allow_pickle") is False and c.get("mmap_mode") == "r" for c in calls)


def test_npy_object_array_is_refused(tmp_path):
    np.save(tmp_path / "x.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="Python objects"):
        open_source(tmp_path, [spec()])
    np.save(tmp_path / "x.npy", np.array(["a", "b"]))
    with pytest.raises(InputError, match="only plain numeric"):
        open_source(tmp_path, [spec()])


def test_npy_folder_layout_errors(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((4, 3), np.float32))
    with pytest.raises(InputError, match="missing: b"):
        open_source(tmp_path, [spec("a"), spec("b")])
    (tmp_path / "a.npy").unlink()
    np.save(tmp_path / "x.npy", np.ones((4, 3), np.float32))
    np.save(tmp_path / "y.npy", np.ones((5, 3), np.float32))
    with pytest.raises(InputError, match="different sample counts"):
        open_source(tmp_path, [spec("x"), spec("y")])
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    with pytest.raises(InputError):
        open_source(tmp_path / "bad.npy", [spec()])


def test_single_npy_file_for_a_single_input_model(tmp_path):
    np.save(tmp_path / "whatever.npy", np.ones((3, 3), np.float32))
    source = open_source(tmp_path / "whatever.npy", [spec()])
    assert source.num_samples == 3
    with pytest.raises(InputError, match="single-input"):
        open_source(tmp_path / "whatever.npy", [spec("a"), spec("b")])


# --- synthetic ----------------------------------------------------------------------------------------


def test_synthetic_source_is_flagged_and_deterministic():
    specs = [spec("x", ("N", 3, "H")), spec("ids", ("N",), np.int64)]
    source = open_source(None, specs, shapes={"x": (1, 3, 5)}, synthetic_samples=10)
    assert isinstance(source, SyntheticSource) and source.synthetic is True and source.num_samples == 10
    first = collect(source, specs, 4)
    again = collect(SyntheticSource(10, {"x": (1, 3, 5)}), specs, 4)
    assert [b["x"].shape for b in first] == [(4, 3, 5), (4, 3, 5), (2, 3, 5)]
    assert first[0]["ids"].dtype == np.int64
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["x"], b["x"])
    assert not np.array_equal(first[0]["x"], first[1]["x"])


def test_synthetic_samples_do_not_depend_on_the_batch_size():
    specs = [spec("x", ("N", 3)), spec("ids", ("N",), np.int64)]
    source = SyntheticSource(10, seed=3)
    for name in ("x", "ids"):
        whole = np.concatenate([b[name] for b in collect(source, specs, 10)])
        for size in (1, 3, 7):
            np.testing.assert_array_equal(np.concatenate([b[name] for b in collect(source, specs, size)]), whole)
    mine = np.concatenate([b["x"] for b in collect(source, specs, 10)])
    other = np.concatenate([b["x"] for b in collect(SyntheticSource(10, seed=4), specs, 10)])
    assert not any(np.array_equal(o, m) for o in other for m in mine)  # seeds never share a sample, shifted or not


def test_synthetic_dynamic_dims_default_to_one_with_a_warning():
    source = SyntheticSource(2)
    batches = collect(source, [spec("x", ("N", "C"))], 8)
    assert batches[0]["x"].shape == (2, 1)
    assert any("dynamic" in w for w in source.warnings)


def test_open_source_rejects_what_it_cannot_read(tmp_path):
    with pytest.raises(InputError, match="not found"):
        open_source(tmp_path / "missing.npz", [spec()])
    with pytest.raises(InputError, match="cannot use int"):
        open_source(3, [spec()])
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(InputError, match="unsupported"):
        open_source(tmp_path / "notes.txt", [spec()])
    with pytest.raises(InputError, match="neither"):
        open_source(tmp_path, [spec()])
    with pytest.raises(InputError, match="not a folder of images"):
        open_source({"x": np.ones((2, 3), np.float32)}, [spec()], ImageSpec())


# --- images -------------------------------------------------------------------------------------------


def test_missing_pillow_gives_an_install_hint(tmp_path, monkeypatch):
    (tmp_path / "a.png").write_bytes(b"\x89PNG fake")
    monkeypatch.setitem(sys.modules, "PIL", None)  # makes `import PIL` fail as if not installed
    with pytest.raises(InputError, match="pip install pillow"):
        open_source(tmp_path, [spec("img", (1, 3, 4, 4))])


def test_image_spec_validation():
    with pytest.raises(InputError, match="layout"):
        ImageSpec(layout="CHW")
    with pytest.raises(InputError, match="channel_order"):
        ImageSpec(channel_order="RGBA")
    with pytest.raises(InputError, match="std"):
        ImageSpec(std=(1.0, 0.0, 1.0))


def _write_images(folder, Image):
    folder.mkdir(exist_ok=True)
    Image.new("RGB", (8, 6), (255, 0, 0)).save(folder / "b_red.png")
    Image.new("RGB", (5, 9), (0, 0, 255)).save(folder / "a_blue.jpg", quality=100)
    sub = folder / "more"
    sub.mkdir()
    Image.new("RGB", (4, 4), (0, 255, 0)).save(sub / "c_green.jpeg", quality=100)
    (folder / "readme.txt").write_text("not an image")


def test_image_folder_nchw_preprocessing(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    _write_images(tmp_path / "imgs", Image)
    specs = [spec("img", ("N", 3, 4, 4))]
    image_spec = ImageSpec(size=(4, 4), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    source = open_source(tmp_path / "imgs", specs, image_spec)
    assert isinstance(source, ImageFolderSource) and source.num_samples == 3
    batches = collect(source, specs, 2)
    assert [b["img"].shape for b in batches] == [(2, 3, 4, 4), (1, 3, 4, 4)]
    x = np.concatenate([b["img"] for b in batches])
    # sorted by relative path: a_blue.jpg, b_red.png, more/c_green.jpeg
    per_channel = x.mean(axis=(2, 3))
    hi, lo = (1.0 - 0.5) / 0.25, (0.0 - 0.5) / 0.25
    np.testing.assert_allclose(per_channel, [[lo, lo, hi], [hi, lo, lo], [lo, hi, lo]], atol=0.05)


def test_image_folder_nhwc_bgr_grayscale_and_model_size(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    _write_images(tmp_path / "imgs", Image)
    specs = [spec("img", (1, 5, 7, 3))]
    source = open_source(tmp_path / "imgs", specs, ImageSpec(layout="NHWC", channel_order="BGR", scale=1.0))
    first = next(iter(source.batches(specs, 8)))["img"]
    assert first.shape == (1, 5, 7, 3)  # size taken from the model, batch fixed to 1
    np.testing.assert_allclose(first[0].mean(axis=(0, 1)), [255, 0, 0], atol=2)  # blue, in BGR order
    gray = [spec("img", ("N", 1, 4, 4), np.uint8)]
    batch = next(iter(open_source(tmp_path / "imgs", gray, ImageSpec(scale=1.0)).batches(gray, 3)))["img"]
    assert batch.shape == (3, 1, 4, 4) and batch.dtype == np.uint8


def test_image_folder_errors(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    _write_images(tmp_path / "imgs", Image)
    with pytest.raises(InputError, match="single-input"):
        open_source(tmp_path / "imgs", [spec("a", (1, 3, 4, 4)), spec("b", (1, 3, 4, 4))], ImageSpec())
    with pytest.raises(InputError, match="dynamic height/width"):
        open_source(tmp_path / "imgs", [spec("img", ("N", 3, "H", "W"))])
    with pytest.raises(InputError, match="height must be 4"):
        open_source(tmp_path / "imgs", [spec("img", (1, 3, 4, 4))], ImageSpec(size=(5, 4)))
    with pytest.raises(InputError, match="channels"):
        open_source(tmp_path / "imgs", [spec("img", (1, 3, 4, 4))], ImageSpec(layout="NHWC"))
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    source = open_source(tmp_path / "imgs", [spec("img", (1, 3, 4, 4))])
    with pytest.raises(InputError, match="broken.png"):
        collect(source, [spec("img", (1, 3, 4, 4))], 1)
