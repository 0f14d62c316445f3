"""`fieldreid export`: every option is honoured or refused with a sentence, never dropped; outputs land at --out."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime.quantization")

from test_quantize import _broken_embedder, _write_crops  # noqa: E402

from fieldreid.errors import FieldreidError, InputError  # noqa: E402
from fieldreid.export.run import ExportOptions, run_export  # noqa: E402


@pytest.fixture
def model_and_crops(tmp_path):
    return _broken_embedder(tmp_path / "m.onnx"), _write_crops(tmp_path / "crops", 64)


def _beside_input(tmp_path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.is_file())


def test_int8_lands_at_out_and_a_second_run_replaces_it(tmp_path, model_and_crops):
    model, crops = model_and_crops
    out = tmp_path / "deploy" / "p.onnx"  # a folder that does not exist yet
    for _ in range(2):  # the second run, with the INT8 file present, does the same again
        res = run_export(model, ExportOptions(int8=True, calib=crops, out=out))
        assert res.written == [out, out.with_name("p.onnx.json")]
        assert _beside_input(tmp_path) == ["m.onnx"]  # nothing written beside the input
        manifest = json.loads(out.with_name("p.onnx.json").read_text())
        assert manifest["artefact"] == "p.onnx" and manifest["source"]["file"] == "m.onnx"
        assert manifest["gate"]["passed"]


def test_int8_out_folder_and_refusals(tmp_path, model_and_crops):
    model, crops = model_and_crops
    folder = tmp_path / "models"
    folder.mkdir()
    res = run_export(model, ExportOptions(int8=True, calib=crops, out=folder))
    assert res.written[0] == folder / "m.int8.onnx"
    with pytest.raises(InputError, match="is the FP32 model itself"):
        run_export(model, ExportOptions(int8=True, calib=crops, out=model))
    with pytest.raises(InputError, match=r"--out .*\.bin: give a path ending in \.onnx, or a folder"):
        run_export(model, ExportOptions(int8=True, calib=crops, out=tmp_path / "m.bin"))


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        # INT8 options without INT8 quantisation
        (dict(fp16=True, calib="CROPS"), r"--calib: they apply to INT8 quantisation"),
        (dict(fp16=True, val="CROPS", min_cosine=0.9), r"--val, --min-cosine: they apply to INT8"),
        (dict(fp32_plan=True, fallback=False), r"--no-fallback: they apply to INT8"),
        # checkpoint-conversion options on an ONNX
        (dict(int8=True, calib="CROPS", imgsz=1280), r"--imgsz sets the input size when a detector checkpoint"),
        (dict(int8=True, calib="CROPS", kind="yolov5"), r"--kind yolov5: .* is an ONNX embedder"),
        # a plan is built beside its ONNX: --out cannot move it
        (dict(fp16=True, out="OUT"), r"--out: .* only a TensorRT plan is built from it"),
        # a split selects metadata.csv rows: not meaningful for a folder
        (dict(int8=True, calib="CROPS", calib_split="train"), r"selects rows of a metadata.csv"),
        (dict(int8=True, calib="CROPS", val_split="val"), r"selects rows of a metadata.csv"),
    ],
)
def test_options_are_honoured_or_refused(tmp_path, model_and_crops, opts, match):
    model, crops = model_and_crops
    opts = {k: (crops if v == "CROPS" else tmp_path / "o.onnx" if v == "OUT" else v) for k, v in opts.items()}
    with pytest.raises(FieldreidError, match=match):
        run_export(model, ExportOptions(**opts))
    assert _beside_input(tmp_path) == ["m.onnx"]


def test_int8_of_an_int8_model_says_what_is_left(tmp_path, model_and_crops):
    model, crops = model_and_crops
    q = run_export(model, ExportOptions(int8=True, calib=crops)).written[0]
    with pytest.raises(InputError, match=r"--calib: .*already an INT8 QDQ ONNX, so --int8 only builds its TensorRT"):
        run_export(q, ExportOptions(int8=True, calib=crops))


def test_cli_export_prints_where_int8_landed(tmp_path, model_and_crops):
    from typer.testing import CliRunner

    from fieldreid.cli import app

    model, crops = model_and_crops
    out = tmp_path / "x.onnx"
    r = CliRunner().invoke(app, ["export", str(model), "--int8", "--calib", str(crops), "--out", str(out),
                                 "--min-cosine-p05", "0.9"])
    assert r.exit_code == 0, r.output
    flat = " ".join(r.output.split())
    assert f"wrote{out}" in "".join(r.output.split()) and "5th percentile >= 0.9" in flat  # whatever the wrapping
    assert json.loads((tmp_path / "x.onnx.json").read_text())["gate"]["min_cosine_p05"] == 0.9
    r = CliRunner().invoke(app, ["export", str(model), "--fp16", "--calib", str(crops)])
    assert r.exit_code == 2 and "apply to INT8 quantisation" in r.output
