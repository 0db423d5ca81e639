"""`keras-bn`: fold, export and inspect batch normalization from the shell.

    keras-bn export MODEL.keras -o OUT.onnx [--no-fold] [--opset N]
        [--samples N] [--rtol R] [--force] [--benchmark]
        [--input-signature SPECS] [--input-names A,B] [--output-names Y]
        [--batch-size N] [--float16]
    keras-bn fold MODEL.keras -o OUT.keras [--force]
    keras-bn inspect FILE            # FILE: .keras or .onnx
    keras-bn --version

`export` runs on the Keras backend `KERAS_BACKEND` names (default
tensorflow) and converts with that backend's exporter: tf2onnx, jax2onnx or
torch.onnx. `--input-signature` gives the input shapes and dtypes of a
subclassed model, one `(dims):dtype` per input, separated by `;`, `None` for a
free dimension: `"(None,28,28,1):float32;(None,10):int32"` (the dtype defaults
to float32).

Common options: `--custom-objects MODULE` (repeatable) imports a module that
registers the model's custom classes before loading; `--max-uncompressed
BYTES` (or `KERAS_BN_MAX_UNCOMPRESSED`) bounds what a `.keras` file may expand
to (default: 4 times its size plus 256 MiB); `--quiet` hides the progress
lines; `--verbose` lets TensorFlow's and the exporters' logs and warnings
through (hidden by default); `--debug` does too and shows the traceback of an
internal error.

An output that is a symbolic link is replaced itself (with `--force`), never
written through; a link to a missing file counts as an existing output.

Exit status, each failure with one line `keras-bn: ...` on stderr (after the
progress lines `keras-bn: <step> ... <seconds> s`):
    0    success
    1    ONNX verification failed (ONNX Runtime disagrees with Keras); nothing
         written
    2    usage or input error, checked before converting: bad arguments (an
         opset the installed exporter does not support, a tolerance that is
         not a finite number > 0, ...); missing, corrupt, unsupported or
         oversized input file; unknown custom class; a package the backend's
         exporter needs is not installed; output that exists (without
         --force), is a dangling symbolic link (without --force), is a
         directory, or whose folder is missing or not writable
    3    internal error (a bug, or a model the converters cannot handle):
         rerun with --debug for the traceback
    130  interrupted (Ctrl-C); nothing written
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
import traceback
import warnings
import zipfile

from . import _deps, _io

PROG = "keras-bn"
ENV_MAX_UNCOMPRESSED = "KERAS_BN_MAX_UNCOMPRESSED"
FLOOR_BYTES = 256 * 2**20
EXIT_INTERRUPTED = 130
_MAX_MESSAGE = 400
SIGNATURE_EXAMPLE = "(None,28,28,1):float32;(None,10):int32"
DTYPES = (
    "float16",
    "bfloat16",
    "float32",
    "float64",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "bool",
)
# Loggers of the libraries the conversion runs, quiet unless --verbose.
_LIBRARY_LOGGERS = ("tensorflow", "tf2onnx", "absl", "jax2onnx", "onnxscript", "torch")


class UsageError(Exception):
    """A usage or input error (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit 2
        raise UsageError(message)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default where there is one to show (not None, False or [])."""

    def _get_help_string(self, action):
        if action.default in (None, False, []) or isinstance(action.default, list):
            return action.help
        return super()._get_help_string(action)


# -- argument types: each error names the argument (argparse adds it), the
# -- value received and what would be accepted.


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1; got {text!r}")
    return value


def _opset(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < _deps.MIN_OPSET:
        raise argparse.ArgumentTypeError(
            f"expected an integer >= {_deps.MIN_OPSET}; got {text!r}"
        )
    return value


def _rtol(text: str) -> float | None:
    if text == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(
            f"expected a finite number > 0 (e.g. 1e-5) or 'auto'; got {text!r}"
        )
    return value


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated non-empty names, e.g. 'image,mask'; got {text!r}"
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(
            f"names must be distinct; {text!r} repeats {', '.join(repeated)}"
        )
    return names


def parse_input_signature(text: str) -> list[tuple[tuple[int | None, ...], str]]:
    """Parses `--input-signature`: `(dims):dtype` per input, `;` between inputs.

    A dimension is a positive integer or `None` (free); the dtype defaults to
    float32.

    Example:

    >>> parse_input_signature("(None,28,28,1):float32;(None,10):int32")
    [((None, 28, 28, 1), 'float32'), ((None, 10), 'int32')]

    Raises:
        ValueError: A malformed spec, naming it and showing the form.
    """
    specs = []
    for i, part in enumerate(text.split(";"), start=1):
        part = part.strip()
        where = f"input {i} ({part!r})"
        match = re.fullmatch(r"\(([^()]*)\)\s*(?::\s*(\w+))?", part)
        if match is None:
            raise ValueError(
                f"{where} is not '(dims):dtype'; expected e.g. {SIGNATURE_EXAMPLE!r}"
            )
        items = [d.strip() for d in match.group(1).split(",")]
        if len(items) > 1 and items[-1] == "":
            items.pop()  # "(None,)": a trailing comma, as in a Python tuple
        dims = []
        for d in items:
            if d in ("None", "none", "?"):
                dims.append(None)
            elif d.isdigit() and int(d) > 0:
                dims.append(int(d))
            else:
                raise ValueError(
                    f"{where}: dimension {d!r} is not a positive integer or None; "
                    f"expected e.g. {SIGNATURE_EXAMPLE!r}"
                )
        dtype = match.group(2) or "float32"
        if dtype not in DTYPES:
            raise ValueError(
                f"{where}: unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}"
            )
        specs.append((tuple(dims), dtype))
    return specs


def _input_signature(text: str):
    try:
        return parse_input_signature(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _version() -> str:
    """keras_bn's version from the source that would be imported (no import)."""
    version = None
    spec = importlib.util.find_spec("keras_bn")
    if spec is not None and spec.origin:
        try:
            with open(spec.origin, encoding="utf-8") as f:
                found = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M)
            version = found and found.group(1)
        except OSError:
            pass
    if not version:
        try:
            version = importlib.metadata.version("keras-bn")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
    try:
        keras_version = importlib.metadata.version("keras")
    except importlib.metadata.PackageNotFoundError:
        keras_version = "not installed"
    python = ".".join(map(str, sys.version_info[:3]))
    return f"{PROG} {version} (keras {keras_version}, Python {python})"


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
        "--quiet",
        action="store_true",
        default=default(False),
        help="no progress lines on stderr (errors only)",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        default=default(False),
        help="show TensorFlow's and the exporters' logs and warnings",
    )
    p.add_argument(
        "--debug",
        action="store_true",
        default=default(False),
        help="as --verbose, and show the traceback of an internal error",
    )


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Fold batch normalization; export to ONNX.",
        formatter_class=_Formatter,
    )
    p.add_argument("--version", action="version", version=_version())
    _common(p, lambda v: v)
    common = _Parser(add_help=False)
    _common(common, lambda v: argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    e = sub.add_parser(
        "export",
        parents=[common],
        formatter_class=_Formatter,
        help="fold and export a .keras model to ONNX (exporter of KERAS_BACKEND)",
        description="Fold batch normalization and export a .keras model to a "
        "verified ONNX file, with the exporter of the Keras backend KERAS_BACKEND "
        "names: tf2onnx (tensorflow, the default), jax2onnx (jax) or torch.onnx "
        "(torch).",
    )
    e.add_argument("model", help="input .keras file")
    e.add_argument("-o", "--output", required=True, help="output .onnx file")
    e.add_argument(
        "--no-fold",
        action="store_true",
        help="export without folding (needed for a subclassed model)",
    )
    e.add_argument(
        "--opset",
        type=_opset,
        default=None,
        metavar="N",
        help="ONNX opset, from 13 to the highest the installed exporter supports "
        "(default: the exporter's own, 17 with tf2onnx, 18 with jax2onnx and "
        "torch.onnx)",
    )
    e.add_argument(
        "--samples",
        type=_positive_int,
        default=16,
        metavar="N",
        help="batch size of the random inputs the file is verified with",
    )
    e.add_argument(
        "--rtol",
        type=_rtol,
        default="auto",
        metavar="R",
        help="tolerance on max|onnx - keras| / max|keras|; 'auto': from the "
        "model's compute dtype (1e-5 for float32, larger for float16/bfloat16)",
    )
    e.add_argument(
        "--input-signature",
        type=_input_signature,
        metavar="SPECS",
        help="input shapes and dtypes, '(dims):dtype' per input separated by ';', "
        f"None for a free dimension, e.g. '{SIGNATURE_EXAMPLE}' (needed for a "
        "subclassed model)",
    )
    e.add_argument(
        "--input-names",
        type=_names,
        metavar="A,B",
        help="names of the ONNX graph inputs, in the model's input order",
    )
    e.add_argument(
        "--output-names",
        type=_names,
        metavar="Y,Z",
        help="names of the ONNX graph outputs, in the model's output order",
    )
    e.add_argument(
        "--batch-size",
        type=_positive_int,
        metavar="N",
        help="fixed batch dimension (default: dynamic, named 'batch')",
    )
    e.add_argument(
        "--float16",
        action="store_true",
        help="float16 weights and compute (verified at a float16 tolerance)",
    )
    e.add_argument("--force", action="store_true", help="replace an existing output")
    e.add_argument(
        "--benchmark",
        action="store_true",
        help="time the file against Keras's own export (ONNX Runtime, batch 1)",
    )
    f = sub.add_parser(
        "fold",
        parents=[common],
        formatter_class=_Formatter,
        help="write a .keras model with BN folded away",
    )
    f.add_argument("model", help="input .keras file")
    f.add_argument("-o", "--output", required=True, help="output .keras file")
    f.add_argument("--force", action="store_true", help="replace an existing output")
    i = sub.add_parser(
        "inspect",
        parents=[common],
        formatter_class=_Formatter,
        help="list BN layers/nodes and whether they fold",
    )
    i.add_argument("file", help=".keras or .onnx file")
    return p


# -- output on stderr: progress lines and the one error line ------------------


class _Stderr:
    """Progress lines `keras-bn: <step> ... <seconds> s`, and the error line.

    On a terminal the step is shown when it starts and its time appended when
    it ends; elsewhere (a log file, a pipe) and with --verbose (other output
    may come in between) one line is written when it ends.
    """

    LABELS = {
        "import": "importing keras ({backend}) and {route}",
        "load": "loading {model}",
        "fold": "folding batch normalization",
        "convert": "converting with {route}",
        "check": "checking the ONNX graph",
        "verify": "verifying with ONNX Runtime",
        "benchmark": "benchmarking with ONNX Runtime",
        "write": "writing {output}",
    }

    def __init__(self, quiet: bool = False, verbose: bool = False, **names):
        self.quiet = quiet
        self.names = names
        self.open = None
        self.inline = not verbose and _isatty(sys.stderr)
        self.started = {}

    def label(self, stage: str) -> str:
        text = self.LABELS.get(stage, stage)
        try:
            return text.format(**self.names)
        except KeyError:
            return stage

    def __call__(self, stage: str, seconds: float | None = None) -> None:
        if _io.interrupted.is_set():  # a library swallowed the KeyboardInterrupt
            raise KeyboardInterrupt
        if self.quiet:
            return
        if seconds is None:
            self.started[stage] = time.perf_counter()
            if self.inline:
                self._end_line()
                sys.stderr.write(f"{PROG}: {self.label(stage)} ...")
                sys.stderr.flush()
                self.open = stage
            return
        if self.inline and self.open == stage:
            sys.stderr.write(f" {seconds:.1f} s\n")
        else:
            self._end_line()
            sys.stderr.write(f"{PROG}: {self.label(stage)} ... {seconds:.1f} s\n")
        sys.stderr.flush()
        self.open = None

    def step(self, stage: str):
        """A context manager timing a step of the command itself."""
        return _Step(self, stage)

    def _end_line(self) -> None:
        if self.open is not None:
            sys.stderr.write("\n")
            self.open = None

    def error(self, line: str) -> None:
        self._end_line()
        print(f"{PROG}: {line}", file=sys.stderr)


class _Step:
    def __init__(self, out: _Stderr, stage: str):
        self.out, self.stage = out, stage

    def __enter__(self):
        self.out(self.stage)
        self.t = time.perf_counter()

    def __exit__(self, kind, *_):
        if kind is None:
            self.out(self.stage, time.perf_counter() - self.t)


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


_OUT = _Stderr()


def _quiet_libraries(verbose: bool) -> None:
    """Hides TensorFlow's C++ and Python logs and library deprecation warnings.

    Must run before TensorFlow is imported (its C++ log level is read then).
    """
    if verbose:
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    for name in _LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    if importlib.util.find_spec("absl") is not None:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)


# -- checks before converting ---------------------------------------------------


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
    if not path.endswith(suffix):
        raise UsageError(f"output {path!r} must end with {suffix}")
    if os.path.isdir(path):
        raise UsageError(f"output {path!r} is a directory; give a file name")
    if os.path.islink(path) and not os.path.exists(path) and not force:
        raise UsageError(
            f"output {path!r} is a symbolic link to {os.readlink(path)!r}, which "
            "does not exist; remove the link, or pass --force to replace the link "
            "itself (its target is not written)"
        )
    if os.path.exists(path) and not force:
        raise UsageError(f"output {path!r} exists; pass --force to replace it")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"output folder {folder!r} does not exist")
    try:
        _io.check_writable(path)
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


def backend_name() -> str:
    """The Keras backend a fresh `import keras` would use, without importing it.

    `KERAS_BACKEND`, else the `"backend"` of `$KERAS_HOME/keras.json` (default
    `~/.keras/keras.json`), else `"tensorflow"`: Keras's own order.
    """
    name = os.environ.get("KERAS_BACKEND")
    if name:
        return name
    home = os.environ.get("KERAS_HOME") or os.path.join(
        os.path.expanduser("~"), ".keras"
    )
    try:
        with open(os.path.join(home, "keras.json"), encoding="utf-8") as f:
            name = json.load(f).get("backend")
    except (OSError, ValueError, AttributeError):
        name = None
    return name if isinstance(name, str) and name else "tensorflow"


def _route(backend: str) -> str:
    try:
        return _deps.require_route(backend)
    except ValueError as e:
        raise UsageError(str(e)) from e


def _load_keras(path: str):
    import keras

    import keras_bn  # noqa: F401 - registers keras_bn>BatchNormalization

    from . import affine  # noqa: F401 - registers ChannelAffine

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
    """Whether `e` comes from a converters module's own argument checks."""
    frames = traceback.extract_tb(e.__traceback__)
    if not frames:
        return False
    last = os.path.abspath(frames[-1].filename)
    here = os.path.abspath(__file__)
    return os.path.dirname(last) == os.path.dirname(here) and last != here


def _write_error(e: OSError, path: str) -> UsageError:
    if isinstance(e, FileExistsError):
        return UsageError(
            f"output {path!r} appeared while writing (another process?); nothing "
            "was replaced: pass --force to replace it"
        )
    return UsageError(f"cannot write {path!r}: {e.strerror or _one_line(e)}")


def _check_subclassed(model, args) -> None:
    from keras_bn import _keras_graph

    if _keras_graph.is_graph_model(model):
        _check_signature(model, args.input_signature)
        return
    needed = [
        flag
        for flag, given in (
            ("--no-fold", args.no_fold),
            (f"--input-signature '{SIGNATURE_EXAMPLE}'", args.input_signature),
        )
        if not given
    ]
    if needed:
        raise UsageError(
            f"{args.model!r} holds a subclassed {type(model).__name__}: its call "
            "cannot be rewritten to fold batch normalization and it declares no "
            f"inputs; export it with {' '.join(needed)} (one '(dims):dtype' per "
            "input of its call, ';' between inputs), or rebuild it with the "
            "Functional API"
        )


def _check_signature(model, signature) -> None:
    """A given --input-signature must fit a Functional model's inputs."""
    if signature is None:
        return
    inputs = list(model.inputs)
    if len(signature) != len(inputs):
        raise UsageError(
            f"argument --input-signature: {len(signature)} input(s) given, but the "
            f"model has {len(inputs)}; give one '(dims):dtype' per input, ';' "
            "between them"
        )
    for i, ((dims, _), x) in enumerate(zip(signature, inputs, strict=True), 1):
        shape = tuple(x.shape)
        fits = len(dims) == len(shape) and all(
            a is None or b is None or a == b for a, b in zip(dims, shape, strict=True)
        )
        if not fits:
            raise UsageError(
                f"argument --input-signature: input {i} has shape "
                f"{_dims_text(dims)}, but the model's input "
                f"{getattr(x, 'name', i)!r} has shape {_dims_text(shape)}; use "
                f"e.g. '{_dims_text(shape)}'"
            )


def _dims_text(dims) -> str:
    return "(" + ",".join("None" if d is None else str(d) for d in dims) + ")"


def _low_precision(model) -> str | None:
    """The first float16/bfloat16 compute dtype among the model's layers."""
    seen, stack = set(), [model]
    while stack:
        layer = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        dtype = getattr(layer, "compute_dtype", None)
        if dtype in ("float16", "bfloat16"):
            return dtype
        stack.extend(getattr(layer, "layers", None) or [])
    return None


def _export(args) -> int:
    _check_input(args.model, (".keras",), args.max_uncompressed)
    _check_output(args.output, ".onnx", args.force)
    backend = backend_name()
    route = _route(backend)
    _OUT.names.update(route=route, backend=backend)
    with _OUT.step("import"):
        import keras  # noqa: F401 - imports the backend: the slow part

        top = _deps.max_opset(route)
    if args.opset is not None and args.opset > top:
        raise UsageError(
            f"argument --opset: {args.opset} is above {top}, the highest opset the "
            f"installed {route} and onnx support; use --opset "
            f"{_deps.MIN_OPSET} to {top}"
        )
    with _OUT.step("load"):
        model = _load_keras(args.model)
    _check_subclassed(model, args)
    from . import export

    try:
        report = export.export_onnx(
            model,
            args.output,
            fold=not args.no_fold,
            opset=args.opset,
            input_signature=args.input_signature,
            samples=args.samples,
            rtol=args.rtol,
            overwrite=args.force,
            benchmark=args.benchmark,
            input_names=args.input_names,
            output_names=args.output_names,
            batch_size=args.batch_size,
            precision="float16" if args.float16 else "float32",
            progress=_OUT,
            verbose=args.verbose or args.debug,
        )
    except export.ParityError as e:
        message = f"verification failed: {_one_line(e)}"
        low = _low_precision(model)
        if args.rtol is not None and low:
            message += (
                f" The model computes in {low}: leave out --rtol (auto) for a "
                "tolerance that follows its compute dtype."
            )
        _OUT.error(message)
        return 1
    except OSError as e:
        raise _write_error(e, args.output) from e
    text = str(report)
    print(text)
    reason = getattr(report, "rtol_reason", None)
    if reason and reason not in text:
        print(f"tolerance: {report.rtol:g} ({reason})")
    if getattr(report, "outputs_vary", None) is False:
        _OUT.error(
            "warning: the model's outputs are the same for every sample input, so "
            "the parity check proves nothing about its numbers"
        )
    return 0


def _fold(args) -> int:
    _check_input(args.model, (".keras",), args.max_uncompressed)
    _check_output(args.output, ".keras", args.force)
    with _OUT.step("load"):
        model = _load_keras(args.model)
    from .fold_keras import fold_batchnorm

    try:
        with _OUT.step("fold"):
            folded, report = fold_batchnorm(model)
    except TypeError as e:
        raise UsageError(str(e)) from e
    try:
        with _OUT.step("write"):
            with _io.atomic_path(
                args.output, overwrite=args.force, suffix=".keras"
            ) as tmp:
                folded.save(tmp)
    except OSError as e:
        raise _write_error(e, args.output) from e
    print(report)
    return 0


def _inspect(args) -> int:
    _check_input(args.file, (".keras", ".onnx"), args.max_uncompressed)
    if args.file.endswith(".onnx"):
        onnx = _deps.require("onnx", what="inspecting an ONNX file")

        from .onnx_fold import fold_onnx

        try:
            proto = onnx.load(args.file)
            onnx.checker.check_model(proto)
        except Exception as e:  # noqa: BLE001 - corrupt file: input error
            raise UsageError(f"cannot load {args.file!r}: {type(e).__name__}") from e
        _, report = fold_onnx(proto)
        bn = sum(n.op_type == "BatchNormalization" for n in proto.graph.node)
        print(f"{args.file}: {bn} BatchNormalization node(s)")
    else:
        from .fold_keras import fold_batchnorm

        with _OUT.step("load"):
            model = _load_keras(args.file)
        try:
            _, report = fold_batchnorm(model)
        except TypeError as e:
            raise UsageError(str(e)) from e
        print(f"{args.file}: {len(report.records)} BatchNormalization layer(s)")
    print(report)
    return 0


def _on_sigint(signum, frame):
    _io.interrupted.set()
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Runs the `keras-bn` command line; returns the exit status.

    Args:
        argv: Arguments without the program name (default: `sys.argv[1:]`).

    Returns:
        0 on success, 1 when verification fails, 2 on usage or input errors,
        3 on an internal error, 130 when interrupted (see the module
        docstring).
    """
    global _OUT
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    debug = "--debug" in argv
    _OUT = _Stderr(quiet="--quiet" in argv, verbose=debug or "--verbose" in argv)
    _io.interrupted.clear()
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, _on_sigint) if main_thread else None
    try:
        try:
            code = _main(argv)
        except Exception as e:  # noqa: BLE001 - the contract: one line, exit 3
            if _io.interrupted.is_set():  # a library wrapped the interrupt
                raise KeyboardInterrupt from e
            if debug:
                _OUT._end_line()
                traceback.print_exc()
            _OUT.error(
                f"internal error: {type(e).__name__}: {_one_line(e)}"
                + ("" if debug else " (rerun with --debug for the traceback)")
            )
            return 3
        if _io.interrupted.is_set():  # swallowed by a library, then finished
            raise KeyboardInterrupt
        return code
    except KeyboardInterrupt:
        if main_thread:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # one line, even twice
        if debug:  # where it was, e.g. to see what hung
            _OUT._end_line()
            traceback.print_exc()
        _OUT.error("interrupted")
        return EXIT_INTERRUPTED
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)


def _main(argv: list[str]) -> int:
    try:
        try:
            args = _parser().parse_args(argv)
        except SystemExit as e:  # --help, --version
            return e.code if isinstance(e.code, int) else 0
        _quiet_libraries(args.verbose or args.debug)
        _OUT.names.update(
            model=getattr(args, "model", ""), output=getattr(args, "output", "")
        )
        run = {"export": _export, "fold": _fold, "inspect": _inspect}[args.command]
        _import_custom_objects(args.custom_objects)
        return run(args)
    except UsageError as e:
        if _io.interrupted.is_set():
            raise KeyboardInterrupt from e
        _OUT.error(f"error: {e}")
        return 2
    except _deps.MissingDependency as e:
        if _io.interrupted.is_set():
            raise KeyboardInterrupt from e
        _OUT.error(f"error: {_one_line(e)}")
        return 2
    except (ValueError, TypeError) as e:
        if _io.interrupted.is_set() or not _raised_by_converters(e):
            raise
        # The converters' own argument checks (e.g. an input with unknown
        # dimensions): a clear message about the model, an input error.
        _OUT.error(f"error: {_one_line(e)}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
