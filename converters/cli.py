"""`keras-bn`: fold, export and inspect batch normalization from the shell.

    keras-bn export MODEL.keras -o OUT.onnx [--no-fold] [--opset N]
                                            [--samples N] [--rtol R] [--force]
                                            [--benchmark]
    keras-bn fold MODEL.keras -o OUT.keras [--force]
    keras-bn inspect FILE            # FILE: .keras or .onnx

Exit status: 0 on success, 1 when ONNX verification fails, 2 for usage or
input errors (missing, corrupt or unsupported file; existing output without
--force), each with a one-line message on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import zipfile

PROG = "keras-bn"


class UsageError(Exception):
    """A usage or input error (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit 2
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Fold batch normalization; export to ONNX.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    e = sub.add_parser("export", help="fold and export a .keras model to ONNX")
    e.add_argument("model", help="input .keras file")
    e.add_argument("-o", "--output", required=True, help="output .onnx file")
    e.add_argument("--no-fold", action="store_true", help="export without folding")
    e.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    e.add_argument("--samples", type=int, default=16, help="verification batch")
    e.add_argument("--rtol", type=float, default=1e-5, help="parity tolerance")
    e.add_argument("--force", action="store_true", help="replace an existing output")
    e.add_argument(
        "--benchmark",
        action="store_true",
        help="time the file against Keras's own export (ONNX Runtime, batch 1)",
    )
    f = sub.add_parser("fold", help="write a .keras model with BN folded away")
    f.add_argument("model", help="input .keras file")
    f.add_argument("-o", "--output", required=True, help="output .keras file")
    f.add_argument("--force", action="store_true", help="replace an existing output")
    i = sub.add_parser("inspect", help="list BN layers/nodes and whether they fold")
    i.add_argument("file", help=".keras or .onnx file")
    return p


def _check_input(path: str, suffixes: tuple[str, ...]) -> None:
    if not path.endswith(suffixes):
        raise UsageError(f"unsupported file {path!r}: expected {' or '.join(suffixes)}")
    if not os.path.isfile(path):
        raise UsageError(f"input file {path!r} does not exist")
    if path.endswith(".keras") and not zipfile.is_zipfile(path):
        raise UsageError(f"{path!r} is not a valid .keras file (not a zip archive)")


def _check_output(path: str, suffix: str, force: bool) -> None:
    if not path.endswith(suffix):
        raise UsageError(f"output {path!r} must end with {suffix}")
    if os.path.exists(path) and not force:
        raise UsageError(f"output {path!r} exists; pass --force to replace it")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"output folder {folder!r} does not exist")


def _load_keras(path: str):
    import keras

    import converters.affine  # noqa: F401 - registers ChannelAffine
    import keras_bn  # noqa: F401 - registers keras_bn>BatchNormalization

    try:
        return keras.saving.load_model(path)
    except Exception as e:  # noqa: BLE001 - any load failure is an input error
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot load {path!r}: {msg}") from e


def _export(args) -> int:
    _check_input(args.model, (".keras",))
    _check_output(args.output, ".onnx", args.force)
    if args.samples < 1 or args.opset < 13:
        raise UsageError("--samples must be >= 1 and --opset >= 13")
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    if backend != "tensorflow":
        raise UsageError(
            f"export needs KERAS_BACKEND=tensorflow (got {backend!r}); rerun with "
            "KERAS_BACKEND=tensorflow"
        )
    from converters.export import ParityError, export_onnx

    model = _load_keras(args.model)
    try:
        report = export_onnx(
            model,
            args.output,
            fold=not args.no_fold,
            opset=args.opset,
            samples=args.samples,
            rtol=args.rtol,
            overwrite=args.force,
            benchmark=args.benchmark,
        )
    except ParityError as e:
        print(f"{PROG}: verification failed: {e}", file=sys.stderr)
        return 1
    print(report)
    return 0


def _fold(args) -> int:
    _check_input(args.model, (".keras",))
    _check_output(args.output, ".keras", args.force)
    from converters._io import atomic_path
    from converters.fold_keras import fold_batchnorm

    model = _load_keras(args.model)
    try:
        folded, report = fold_batchnorm(model)
    except TypeError as e:
        raise UsageError(str(e)) from e
    with atomic_path(args.output, overwrite=args.force, suffix=".keras") as tmp:
        folded.save(tmp)
    print(report)
    return 0


def _inspect(args) -> int:
    _check_input(args.file, (".keras", ".onnx"))
    if args.file.endswith(".onnx"):
        import onnx

        from converters.onnx_fold import fold_onnx

        try:
            proto = onnx.load(args.file)
            onnx.checker.check_model(proto)
        except Exception as e:  # noqa: BLE001 - corrupt file: input error
            raise UsageError(f"cannot load {args.file!r}: {type(e).__name__}") from e
        _, report = fold_onnx(proto)
        bn = sum(n.op_type == "BatchNormalization" for n in proto.graph.node)
        print(f"{args.file}: {bn} BatchNormalization node(s)")
    else:
        from converters.fold_keras import fold_batchnorm

        try:
            _, report = fold_batchnorm(_load_keras(args.file))
        except TypeError as e:
            raise UsageError(str(e)) from e
        print(f"{args.file}: {len(report.records)} BatchNormalization layer(s)")
    print(report)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs the `keras-bn` command line; returns the exit status.

    Args:
        argv: Arguments without the program name (default: `sys.argv[1:]`).

    Returns:
        0 on success, 1 when verification fails, 2 on usage or input errors.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        args = _parser().parse_args(argv)
        run = {"export": _export, "fold": _fold, "inspect": _inspect}[args.command]
        return run(args)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
