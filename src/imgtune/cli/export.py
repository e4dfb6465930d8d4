"""imgtune export RUN: the run's model as model.onnx with its preprocessing and softmax inside, a model
card and export.json, checked against imgtune predict (exit 4 when they disagree).

The input is a batch of uint8 RGB images (N x H x W x 3) already resized and centre-cropped as the
model card's code does; see docs/export.md."""

from __future__ import annotations

# imgtune.export's FORMATS, DEFAULT_OPSET and OPSETS, repeated so that `imgtune --help` does not import
# torch (tests/test_export.py checks that they agree)
FORMATS, DEFAULT_OPSET, OPSETS = ("onnx",), 18, range(9, 21)


def register(commands) -> None:
    p = commands.add_parser("export", help="export a run's model to ONNX, checked against imgtune predict",
                            description=__doc__)
    p.add_argument("run", help="run folder written by imgtune train")
    p.add_argument("--format", choices=FORMATS, default="onnx")
    p.add_argument("--out", metavar="PATH", help="export folder (default: RUN/export); a previous export there "
                                                 "is replaced once the new one has passed its check")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, metavar="N",
                   help=f"ONNX opset version, {OPSETS[0]}-{OPSETS[-1]} (default: {DEFAULT_OPSET})")
    p.add_argument("--check-images", metavar="DIR",
                   help="images to check the export on (default: the run's validation split)")
    p.add_argument("--calibrated", action="store_true",
                   help="put the temperature fitted on the validation split (calibration.json) into the graph")
    p.add_argument("--int8", action="store_true",
                   help="also write model.int8.onnx (static int8 quantisation calibrated on training images) "
                        "and report its accuracy change on the val (and test) split")
    p.set_defaults(handler=run)


def run(args) -> int:
    from ..export import export_run, parity_text

    result = export_run(args.run, args.out, args.format, args.opset, args.check_images, args.calibrated, args.int8)
    print(f"parity with imgtune predict on {parity_text(result.report['parity'])}")
    if "int8" in result.report:
        from ..export_int8 import int8_text

        print(int8_text(result.report["int8"]))
    print(f"export folder: {result.path}  ({', '.join(sorted(p.name for p in result.path.iterdir()))})")
    return 0
