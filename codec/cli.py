"""The ``dcm`` command: encode, decode, info and verify .dcm files.

Every failure dcm raises on purpose is a :class:`~dcm.errors.DcmError`; the
command prints its message (no traceback) and exits with the error's code
(``EXIT_CODES``).  Operating-system errors on the paths given (missing file,
permission denied) exit 3 the same way; on the output side, 6.  SIGINT,
SIGTERM and SIGHUP stop a command the same way: temporaries are removed and
it exits 128 + the signal's number.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import os
import re
import signal
import sys
import warnings

from ._version import __version__
from .errors import EXIT_CODES, DcmError, DcmWarning, UsageError

OS_ERROR_EXIT = 3  # a missing or unreadable path is invalid input

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_size(text: str) -> int:
    """'500MB' -> 500_000_000, '2GiB' -> 2_147_483_648, '4096' -> 4096 (decimal units as transformers)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", str(text))
    unit = m and m.group(2).lower()
    if not m or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: use e.g. 4096, 500MB, 2GiB")
    value = int(float(m.group(1)) * _UNITS[unit]) if "." in m.group(1) else int(m.group(1)) * _UNITS[unit]
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: must be at least 1 byte")
    return value


def _epilog() -> str:
    lines = ["exit codes:"] + [f"  {code:<4} {meaning}" for code, meaning in sorted(EXIT_CODES.items())]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    # -q after the subcommand too; SUPPRESS keeps a subcommand from resetting a global -q.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="print nothing but errors and warnings, no progress bars")

    parser = argparse.ArgumentParser(
        prog="dcm", description="Compressed deltas of fine-tuned models in .dcm files.",
        epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"dcm {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", default=False,
                        help="print nothing but errors and warnings, no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parser.subcommands = {}  # name -> its parser, for usage errors in the subcommand's words

    def add(name, help_text):
        p = sub.add_parser(name, parents=[common], help=help_text, description=help_text,
                           epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.subcommands[name] = p
        return p

    from .methods import METHODS, BudgetedMethod

    lossy = [n for n, c in METHODS.items() if c.codes_tensors()]
    default_ratio = BudgetedMethod.default_ratio
    p = add("encode", "encode a fine-tune against its base into a .dcm file")
    p.add_argument("base", metavar="BASE", help="base model directory or .safetensors file")
    p.add_argument("finetune", metavar="FT", help="fine-tuned model directory or .safetensors file")
    p.add_argument("-o", "--output", required=True, metavar="OUT.dcm", help="the .dcm file to write")
    p.add_argument("--method", default="lossless", metavar="METHOD",
                   help=f"codec method: lossless (default, exact), or lossy: {', '.join(lossy)}")
    p.add_argument("--ratio", default=None,
                   help=f"target size of a lossy method's matrices against a 16-bit dense delta, e.g. 1/16 "
                        f"(default: {default_ratio}; bitdelta: every row)")
    p.add_argument("--allow-uncoded", action="store_true",
                   help="write the file even when a lossy method codes no tensor, or the file takes more "
                        "than twice its budget (refused by default, with the reasons per tensor group)")
    p.add_argument("--include", action="extend", nargs="+", default=None, metavar="GLOB",
                   help="apply the method only to tensors matching these patterns")
    p.add_argument("--exclude", action="extend", nargs="+", default=None, metavar="GLOB",
                   help="never apply the method to tensors matching these patterns")
    p.add_argument("--zstd-level", type=int, default=None, metavar="N",
                   help="zstd level 1..22 of every blob (default: 3, and 1 for the byte planes of exact deltas)")
    p.add_argument("--no-entropy", action="store_true",
                   help="store no blob rANS-coded, only zstd or raw (by default each blob takes the smallest; "
                        "without rANS, codes stay fixed-width in the file for a server to read as they are)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT.dcm if it exists (a regular file, never an input)")
    g = p.add_argument_group("delta-come, impart-qt (recipe, calibration, group size)")
    g.add_argument("--alloc", choices=("recipe", "rd"), default=None,
                   help="delta-come: bit widths by rate-distortion over the file (default) or the paper's "
                        "fixed recipe (to reproduce the paper); impart-qt: each matrix's budget by "
                        "its size (recipe, the paper's, default) or by rate-distortion (rd)")
    g.add_argument("--clip", choices=("mse", "minmax"), default=None,
                   help="delta-come: each quantization group's grid over its whole range (the paper's "
                        "min-max, default) or clipped for least squared error")
    g.add_argument("--rotation", choices=("none", "hadamard"), default=None,
                   help="delta-come: store singular vectors rotated by a seeded randomized Hadamard transform "
                        "(a lowrank-rotated record, format 1.3) or as they are (default)")
    g.add_argument("--svd", choices=("exact", "randomized"), default=None, help="SVD (default: exact)")
    g.add_argument("--calibration", default=None, metavar="STATS",
                   help="statistics from `dcm calibrate`: quantize with GPTQ instead of round-to-nearest")
    g.add_argument("--recipe", default=None, metavar="B:N,...",
                   help="fixed recipe, bits:count, the last count open (default: 8:2,3:32,2)")
    g.add_argument("--group-size", type=int, default=None, metavar="N",
                   help="elements per scale and zero point (default: 128)")
    g = p.add_argument_group("impart, impart-qt, dare")
    g.add_argument("--mask", choices=("auto", "hash", "bitmask"), default=None,
                   help="kept positions regenerated from a hash (no bytes), stored as bits, or the smaller "
                        "of the two per tensor (default: auto)")
    g.add_argument("--seed", type=int, default=None, metavar="N", help="seed of the random masks (default: 0)")
    g.add_argument("--beta", type=float, default=None, metavar="B",
                   help="impart: share of the smallest singular vectors dropped outright (default: 0.6)")
    g.add_argument("--power", type=float, default=None, metavar="C",
                   help="impart: importance = singular value to this power (default: 0.5)")
    g = p.add_argument_group("bitdelta")
    g.add_argument("--scales", choices=("row", "matrix"), default=None,
                   help="one scale per row (default) or per matrix")
    g = p.add_argument_group("speed (none of these changes the file's bytes, except --device)")
    g.add_argument("--threads", type=_positive, default=None, metavar="N",
                   help="tensors coded at once in this process, each on one thread "
                        "(default: one per core, at most 8)")
    g.add_argument("--workers", type=_positive, default=None, metavar="N",
                   help="code tensors in N worker processes instead (memory: N tensors' working sets)")
    g.add_argument("--max-memory", type=parse_size, default=None, metavar="SIZE",
                   help="start a tensor only while the estimated working sets in flight stay under SIZE "
                        "(one whose estimate alone exceeds it runs by itself)")
    g.add_argument("--device", default=None, metavar="DEV",
                   help="where SVD, GPTQ and quantization run: cpu (default) or cuda[:N] (a GPU's file is "
                        "close to the CPU's, not the same bytes)")
    g.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="code tensors as Ray tasks (needs dcm[ray]): --ray=HOST:PORT or ray://HOST:PORT of a "
                        "cluster, --ray=auto for the one `ray start` runs here; alone: RAY_ADDRESS, else a "
                        "Ray of this machine alone")
    g.add_argument("--ray-inputs", choices=("shared", "stream"), default="shared",
                   help="Ray workers read the checkpoints from the same paths (shared storage, default) "
                        "or get each tensor through Ray's object store (stream)")
    p.set_defaults(func=cmd_encode)

    p = add("calibrate", "collect per-layer input statistics of a model on a text, for GPTQ")
    p.add_argument("model", metavar="MODEL_DIR", help="Hugging Face model directory (transformers loads it)")
    p.add_argument("text", metavar="TEXT_FILE", help="UTF-8 text; blank lines separate sequences")
    p.add_argument("-o", "--output", required=True, metavar="STATS", help="the statistics file to write")
    p.add_argument("--max-tokens", type=int, default=65536, metavar="N", help="tokens to run (default: 65536)")
    p.add_argument("--seq-len", type=int, default=128, metavar="N", help="tokens per sequence (default: 128)")
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="sequences per batch (default: 16)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace STATS if it exists (a regular file, never an input)")
    p.set_defaults(func=cmd_calibrate)

    p = add("decode", "rebuild the fine-tuned checkpoint from a .dcm file and its base")
    p.add_argument("input", metavar="IN.dcm", help="the .dcm file to decode")
    p.add_argument("--base", required=True, metavar="BASE", help="base model directory or .safetensors file")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="the model directory to write")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUTDIR if it exists: a regular file or a directory dcm wrote, never anything else")
    p.add_argument("--max-shard-size", type=parse_size, default=None, metavar="SIZE",
                   help="largest safetensors shard, e.g. 500MB, 2GiB or bytes (default: 5GiB)")
    p.set_defaults(func=cmd_decode)

    p = add("info", "show what a .dcm file holds and where its bytes go")
    p.add_argument("input", metavar="IN.dcm", help="the .dcm file to describe")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--check", action="store_true",
                   help="also check every payload (checksums, decoding), as `dcm verify` without a base")
    p.set_defaults(func=cmd_info)

    p = add("verify", "check a .dcm file completely (checksums, payloads, optionally the base)")
    p.add_argument("input", metavar="IN.dcm", help="the .dcm file to check")
    p.add_argument("--base", default=None, metavar="BASE",
                   help="also check the base and decode every tensor against it")
    p.set_defaults(func=cmd_verify)

    p = add("export", "make what a serving engine loads from a .dcm file (vLLM: a model directory or a LoRA adapter)")
    targets = p.add_subparsers(dest="target", metavar="TARGET", required=True, help="vllm or lora")
    for target, help_text in (("vllm", "a model directory vLLM serves as the fine-tune, its linear deltas kept "
                                       "packed (the base's weights linked, not copied)"),
                              ("lora", "a PEFT LoRA adapter for vLLM's multi-LoRA (many fine-tunes per server)")):
        t = targets.add_parser(target, parents=[common], help=help_text, description=help_text)
        t.add_argument("input", metavar="IN.dcm", help="the .dcm file")
        t.add_argument("--base", required=True, metavar="BASE", help="the base model directory")
        t.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="the directory to write")
        t.add_argument("--overwrite", action="store_true",
                       help="replace OUTDIR if it exists and dcm wrote it, never anything else")
        if target == "lora":
            t.add_argument("--max-rank", type=int, default=None, metavar="R",
                           help="truncate every module to rank R (vLLM's --max-lora-rank); prints the error it causes")
        else:
            t.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                           help="dcm kernels in vLLM: Triton on CUDA and torch elsewhere (auto), or one of them")
        parser.subcommands[f"export {target}"] = t
    p.set_defaults(func=cmd_export)
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: must be a positive integer")
    return value


def _progress(args) -> bool:
    try:
        return not args.quiet and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _say(args, text: str) -> None:
    if not args.quiet:
        print(text)


def _warn(text: str) -> None:
    print(f"dcm: warning: {text}", file=sys.stderr)


def _note_inputs(*paths, carried=None) -> None:
    """What the user should know about how the input directories were read (which weights), and
    which side files of ``carried`` (the fine-tune) are not carried."""
    from .checkpoint import TRAINING_STATE, Checkpoint
    from .info import sanitize

    skipped = []
    for path in paths + ((carried,) if carried is not None else ()):
        with Checkpoint(path) as ckpt:
            for note in ckpt.notes:
                _warn(sanitize(note))
            if path is carried:
                skipped = ckpt.skipped_attachments()
    training = [rel for rel, reason in skipped if reason == TRAINING_STATE]
    if training:
        shown = ", ".join(map(sanitize, training[:4])) + (", ..." if len(training) > 4 else "")
        _warn(f"not carrying the training state beside the model ({shown}): not part of the model")
    for relpath, reason in skipped:
        if reason != TRAINING_STATE:
            _warn(f"not carrying {sanitize(relpath)!s}: {reason}")


# --- commands --------------------------------------------------------------------


def cmd_encode(args) -> int:
    from .encode import encode
    from .info import one_in, sanitize
    from .methods import get_method

    names = ("alloc", "clip", "rotation", "svd", "calibration", "recipe", "group_size", "mask", "seed", "beta", "power",
             "scales")
    options = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    # Arguments first, before anything is read (the statistics file is opened by encode itself).
    get_method(args.method, {k: v for k, v in options.items() if k != "calibration"}, ratio=args.ratio,
               include=args.include, exclude=args.exclude, zstd_level=args.zstd_level)
    executor = None
    if args.ray is not None:
        if args.workers or args.threads:
            raise UsageError("--ray runs every tensor as a Ray task: drop --workers and --threads")
        from .distributed.ray import RayExecutor
        executor = RayExecutor(args.ray or None, inputs=args.ray_inputs, device=args.device)
    _note_inputs(args.base, carried=args.finetune)
    report = encode(args.base, args.finetune, args.output, method=args.method, ratio=args.ratio,
                    include=args.include, exclude=args.exclude, options=options,
                    zstd_level=args.zstd_level, overwrite=args.overwrite, progress=_progress(args),
                    threads=args.threads, workers=args.workers, executor=executor, device=args.device,
                    max_memory=args.max_memory, entropy=not args.no_entropy,
                    allow_uncoded=args.allow_uncoded)
    if report.params:
        ratio = report.file_bytes / (2 * report.params)
        sizes = (f"{report.bits_per_param:.3f} bits/param, "
                 f"{ratio:.4f} ({one_in(ratio)}) of a 16-bit dense delta")
    else:
        sizes = "no parameters in the fine-tune"
    _say(args, f"wrote {sanitize(report.path)}: {report.file_bytes} bytes, {report.records} records, "
               f"{sizes}, {report.seconds:.2f} s")
    cov = report.coverage
    if cov is not None and cov.lossy:
        _say(args, f"  {cov.summary()}")
        for line in cov.reason_lines():
            _say(args, f"  not coded: {line}")
        for problem in cov.problems():  # only with --allow-uncoded: otherwise encode refused
            _warn(problem)
    return 0


def cmd_calibrate(args) -> int:
    from .calibrate import calibrate
    from .info import sanitize

    if args.quiet:  # transformers' own warnings too: -q prints only ours
        with contextlib.suppress(ImportError):
            import transformers

            transformers.utils.logging.set_verbosity_error()
    report = calibrate(args.model, args.text, args.output, max_tokens=args.max_tokens, seq_len=args.seq_len,
                       batch_size=args.batch_size, overwrite=args.overwrite, progress=_progress(args))
    _say(args, f"wrote {sanitize(report.path)}: {report.layers} tensors from {report.tokens} tokens "
               f"in {report.sequences} sequences, {report.seconds:.1f} s")
    return 0


def cmd_decode(args) -> int:
    from .decode import DEFAULT_MAX_SHARD_BYTES, decode
    from .info import sanitize

    _note_inputs(args.base)
    report = decode(args.input, args.base, args.output, overwrite=args.overwrite, progress=_progress(args),
                    max_shard_bytes=args.max_shard_size or DEFAULT_MAX_SHARD_BYTES)
    _say(args, f"wrote {sanitize(report.path)}: {report.tensors} tensors ({report.bytes_written} bytes), "
               f"{report.attachments} attachments, {report.seconds:.2f} s")
    if report.lossy_tensors:
        _say(args, f"  approximate: {report.lossy_tensors} of the {report.tensors} tensors were coded by the "
                   f"lossy method {sanitize(report.method)}; they approximate the fine-tune's, the rest are exact")
    return 0


def cmd_info(args) -> int:
    from .info import format_info, info
    from .verify import verify

    d = info(args.input)
    if args.check:
        report = verify(args.input, progress=_progress(args))  # raises on the first bad payload
        d["payloads_checked"] = {"records": report.records_checked, "blobs": report.blobs_checked,
                                 "bytes": report.bytes_checked}
    if args.json:
        print(json.dumps(d, indent=2))  # ensure_ascii: file strings cannot reach the terminal raw
    else:
        print(format_info(d))
    return 0


def cmd_verify(args) -> int:
    from .info import sanitize
    from .verify import verify

    if args.base is not None:
        _note_inputs(args.base)
    report = verify(args.input, base=args.base, progress=_progress(args))
    _say(args, f"OK {sanitize(report.path)}: {report.summary()}")
    return 0


def cmd_export(args) -> int:
    from .integrations.vllm import commands

    return commands.run(args, _say, _warn)


# --- entry point -----------------------------------------------------------------


def _clean(message) -> str:
    """An error message safe for a terminal (names in it may come from a hostile file)."""
    from .info import sanitize

    return "\n".join(sanitize(line, escape_backslash=False) for line in str(message).split("\n"))


def _os_message(e: OSError) -> str:
    what = e.strerror or str(e)
    names = [n for n in (e.filename, e.filename2) if n is not None]
    return f"{': '.join(map(str, names))}: {what}" if names else what


class Interrupted(KeyboardInterrupt):
    """A stopping signal (SIGINT, SIGTERM, SIGHUP), raised where the program is so that cleanup runs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


@contextlib.contextmanager
def _stop_signals():
    """SIGTERM and SIGHUP are handled like Ctrl-C: an exception unwinds the writers, which remove their
    temporaries.  Later signals are ignored while that cleanup runs (it takes moments); the previous
    handlers come back on the way out (main() may run inside another program, or a test)."""
    stopping = []

    def handler(signum, frame):
        if not stopping:
            stopping.append(signum)
            raise Interrupted(signum)

    previous = {}
    try:
        for sig in _STOP_SIGNALS:
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def _warnings_to_stderr():
    """dcm's warnings (DcmWarning) print as 'dcm: warning: ...', not with a file and line."""
    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DcmWarning):
            _warn(_clean(message))
        else:
            original(message, category, filename, lineno, file, line)

    original = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always", DcmWarning)
        warnings.showwarning = show
        yield


_NEGATIVE = re.compile(r"-[0-9.][0-9./eE+-]*")


def _join_negative_values(argv: list[str], parser) -> list[str]:
    """``--ratio -1/16`` -> ``--ratio=-1/16``: argparse would take -1/16 for an option, not a value."""
    takes_value = {opt for p in parser.subcommands.values() for a in p._actions
                   if a.nargs is None and a.option_strings and not isinstance(a, argparse._StoreTrueAction)
                   for opt in a.option_strings}
    out, i = [], 0
    while i < len(argv):
        if argv[i] in takes_value and i + 1 < len(argv) and _NEGATIVE.fullmatch(argv[i + 1]):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def _parse(parser, argv):
    """Parse; an unknown option is reported with its subcommand's usage, and a near miss suggested."""
    argv = _join_negative_values(list(sys.argv[1:] if argv is None else argv), parser)
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = parser.subcommands.get(getattr(args, "command", None), parser)
        known = [o for a in sub._actions for o in a.option_strings]
        hints = [m for e in extra if e.startswith("-") for m in difflib.get_close_matches(e.split("=")[0], known, 1)]
        hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
        sub.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    return args


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = _parse(parser, argv)
    except SystemExit as e:  # --help, --version, usage errors (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        with _stop_signals(), _warnings_to_stderr():
            return args.func(args)
    except DcmError as e:
        print(f"dcm: error: {_clean(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"dcm: interrupted ({signal.Signals(signum).name}); no partial output was left",
              file=sys.stderr)
        return 128 + signum
    except BrokenPipeError:
        # `dcm info x.dcm | head`: stop quietly; point stdout at devnull so the
        # interpreter's final flush does not fail again.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 1
    except OSError as e:
        print(f"dcm: error: {_clean(_os_message(e))}", file=sys.stderr)
        return OS_ERROR_EXIT  # invalid input: a path that cannot be used


if __name__ == "__main__":
    sys.exit(main())
