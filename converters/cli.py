"""`keras-bn`: fold, export and inspect batch normalization from the shell.

    keras-bn export MODEL.keras -o OUT.onnx [--no-fold] [--opset N]
                                            [--samples N] [--rtol R] [--force]
                                            [--benchmark]
    keras-bn fold MODEL.keras -o OUT.keras [--force]
    keras-bn inspect FILE            # FILE: .keras or .onnx

Common options: `--custom-objects MODULE` (repeatable) imports a module that
registers the model's custom classes before loading; `--max-uncompressed
BYTES` (or `KERAS_BN_MAX_UNCOMPRESSED`) bounds what a `.keras` file may expand
to (default: 4 times its size plus 256 MiB); `--debug` shows the traceback of
an internal error.

Exit status, each failure with one line `keras-bn: ...` on stderr:
    0  success
    1  ONNX verification failed (ONNX Runtime disagrees with Keras)
    2  usage or input error: bad arguments; missing, corrupt, unsupported or
       oversized input file; unknown custom class; output that exists (without
       --force), is a directory, or whose folder is missing or not writable
    3  internal error (a bug, or a model the converters cannot handle): rerun
       with --debug for the traceback
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import traceback
import zipfile

PROG = "keras-bn"
ENV_MAX_UNCOMPRESSED = "KERAS_BN_MAX_UNCOMPRESSED"
FLOOR_BYTES = 256 * 2**20
_MAX_MESSAGE = 400


class UsageError(Exception):
    """A usage or input error (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit 2
        raise UsageError(message)


def _common(p: argparse.ArgumentParser, default) -> None:
    # Accepted before or after the command; a subcommand's default must not
    # override a value given before it (hence SUPPRESS there).
    p.add_argument(
        "--custom-objects",
        action="append",
        metavar="MODULE",
        default=default([]),
        help="import MODULE (which registers custom classes) before loading; "
        "repeatable",
    )
    p.add_argument(
        "--max-uncompressed",
        type=int,
        metavar="BYTES",
        default=default(None),
        help=f"largest size a .keras file may expand to (env {ENV_MAX_UNCOMPRESSED};"
        " default 4x its size + 256 MiB)",
    )
    p.add_argument(
        "--debug",
        action="store_true",
        default=default(False),
        help="show the traceback of an internal error",
    )


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Fold batch normalization; export to ONNX.")
    _common(p, lambda v: v)
    common = _Parser(add_help=False)
    _common(common, lambda v: argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    e = sub.add_parser(
        "export", parents=[common], help="fold and export a .keras model to ONNX"
    )
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
    f = sub.add_parser(
        "fold", parents=[common], help="write a .keras model with BN folded away"
    )
    f.add_argument("model", help="input .keras file")
    f.add_argument("-o", "--output", required=True, help="output .keras file")
    f.add_argument("--force", action="store_true", help="replace an existing output")
    i = sub.add_parser(
        "inspect", parents=[common], help="list BN layers/nodes and whether they fold"
    )
    i.add_argument("file", help=".keras or .onnx file")
    return p


def _check_input(path: str, suffixes: tuple[str, ...], limit=None) -> None:
    if not path.endswith(suffixes):
        raise UsageError(f"unsupported file {path!r}: expected {' or '.join(suffixes)}")
    if not os.path.isfile(path):
        raise UsageError(f"input file {path!r} does not exist")
    if path.endswith(".keras"):
        if not zipfile.is_zipfile(path):
            raise UsageError(f"{path!r} is not a valid .keras file (not a zip archive)")
        _check_expansion(path, limit)


def _expansion_limit(path: str, limit) -> tuple[int, str]:
    if limit is None and os.environ.get(ENV_MAX_UNCOMPRESSED):
        value = os.environ[ENV_MAX_UNCOMPRESSED]
        try:
            limit = int(value)
        except ValueError:
            raise UsageError(
                f"{ENV_MAX_UNCOMPRESSED} must be a number of bytes; got {value!r}"
            ) from None
        return limit, ENV_MAX_UNCOMPRESSED
    if limit is not None:
        return limit, "--max-uncompressed"
    return 4 * os.path.getsize(path) + FLOOR_BYTES, "the default 4x file size + 256 MiB"


def _check_expansion(path: str, limit) -> None:
    """Zip-bomb guard from the central directory, before anything is read.

    Reading a member with `zipfile` stops at the size the central directory
    declares (and a member whose data is longer fails its CRC check), so the
    declared sizes also bound what loading reads and writes.
    """
    limit, source = _expansion_limit(path, limit)
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise UsageError(f"{path!r} is not a valid .keras file ({e})") from e
    total = sum(info.file_size for info in infos)
    if total > limit:
        raise UsageError(
            f"{path!r} would expand to {total} bytes, over the limit of {limit} "
            f"({source}); if the file is trusted, raise it with "
            f"--max-uncompressed BYTES or {ENV_MAX_UNCOMPRESSED}"
        )


def _check_output(path: str, suffix: str, force: bool) -> None:
    from converters._io import check_writable

    if not path.endswith(suffix):
        raise UsageError(f"output {path!r} must end with {suffix}")
    if os.path.isdir(path):
        raise UsageError(f"output {path!r} is a directory; give a file name")
    if os.path.exists(path) and not force:
        raise UsageError(f"output {path!r} exists; pass --force to replace it")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"output folder {folder!r} does not exist")
    try:
        check_writable(path)
    except OSError as e:
        raise UsageError(f"output folder {folder!r} is not writable") from e


def _import_custom_objects(modules: list[str]) -> None:
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - the user's module: input error
            raise UsageError(
                f"cannot import --custom-objects module {name!r}: "
                f"{type(e).__name__}: {_one_line(e)}"
            ) from e


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if len(text) > _MAX_MESSAGE:
        text = text[: _MAX_MESSAGE - 3] + "..."
    return text or type(e).__name__


def _load_keras(path: str):
    import keras

    import converters.affine  # noqa: F401 - registers ChannelAffine
    import keras_bn  # noqa: F401 - registers keras_bn>BatchNormalization

    try:
        return keras.saving.load_model(path)
    except Exception as e:  # noqa: BLE001 - any load failure is an input error
        missing = re.search(r"Could not locate (class|function) '([^']+)'", str(e))
        if missing:
            raise UsageError(
                f"cannot load {path!r}: {missing.group(0)}; import the module "
                "that registers it with --custom-objects MODULE (it must use "
                "@keras.saving.register_keras_serializable)"
            ) from e
        raise UsageError(f"cannot load {path!r}: {_one_line(e)}") from e


def _raised_by_converters(e: BaseException) -> bool:
    frames = traceback.extract_tb(e.__traceback__)
    here = os.path.dirname(os.path.abspath(__file__))
    return (
        bool(frames) and os.path.dirname(os.path.abspath(frames[-1].filename)) == here
    )


def _write_error(e: OSError, path: str) -> UsageError:
    if isinstance(e, FileExistsError):
        return UsageError(
            f"output {path!r} appeared while writing (another process?); nothing "
            "was replaced: pass --force to replace it"
        )
    return UsageError(f"cannot write {path!r}: {e.strerror or _one_line(e)}")


def _export(args) -> int:
    _check_input(args.model, (".keras",), args.max_uncompressed)
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
        print(f"{PROG}: verification failed: {_one_line(e)}", file=sys.stderr)
        return 1
    except OSError as e:
        raise _write_error(e, args.output) from e
    print(report)
    return 0


def _fold(args) -> int:
    _check_input(args.model, (".keras",), args.max_uncompressed)
    _check_output(args.output, ".keras", args.force)
    from converters._io import atomic_path
    from converters.fold_keras import fold_batchnorm

    model = _load_keras(args.model)
    try:
        folded, report = fold_batchnorm(model)
    except TypeError as e:
        raise UsageError(str(e)) from e
    try:
        with atomic_path(args.output, overwrite=args.force, suffix=".keras") as tmp:
            folded.save(tmp)
    except OSError as e:
        raise _write_error(e, args.output) from e
    print(report)
    return 0


def _inspect(args) -> int:
    _check_input(args.file, (".keras", ".onnx"), args.max_uncompressed)
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
        0 on success, 1 when verification fails, 2 on usage or input errors,
        3 on an internal error (see the module docstring).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        return _main(argv)
    except Exception as e:  # noqa: BLE001 - the contract: one line, exit 3
        if debug:
            traceback.print_exc()
        print(
            f"{PROG}: internal error: {type(e).__name__}: {_one_line(e)}"
            + ("" if debug else " (rerun with --debug for the traceback)"),
            file=sys.stderr,
        )
        return 3


def _main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
        run = {"export": _export, "fold": _fold, "inspect": _inspect}[args.command]
        _import_custom_objects(args.custom_objects)
        return run(args)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as e:
        if not _raised_by_converters(e):
            raise
        # The converters' own argument checks (e.g. an input with unknown
        # dimensions): a clear message about the model, an input error.
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
