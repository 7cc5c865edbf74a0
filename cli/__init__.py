"""``tadsr`` command line: a thin layer that parses arguments and calls one library function per verb.

One module per verb (``upscale``, ``export``, ``quantize``, ``parity``, ``bench``, ``main_job`` for ``all``,
``distill_ae``), the shared arguments in :mod:`tadsr.cli.common`, and here the parser and the error policy.

Exit codes (README "Errors and exit codes"): 0 success; 1 a verdict failed (parity below its floor, some images
of a folder failed); 2 bad input or environment (a :class:`~tadsr.errors.TadsrError`, or argparse usage); 3 an
internal error (traceback in a log file, see :func:`crash_log_dir`); 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from tadsr.errors import TadsrError

log = logging.getLogger("tadsr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tadsr", description="One-step diffusion SR (TAD-SR) for phones.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in _verbs():
        register(sub)
    return parser


def _verbs() -> list[Callable[[argparse._SubParsersAction], None]]:
    """One module per verb in this package; each registers its sub-parser (imported here, so ``--help`` stays fast)."""
    from tadsr.cli.bench import add_bench_parser
    from tadsr.cli.distill_ae import add_distill_ae_parser
    from tadsr.cli.export import add_export_parser
    from tadsr.cli.main_job import add_all_parser
    from tadsr.cli.parity import add_parity_parser
    from tadsr.cli.quantize import add_quantize_parser
    from tadsr.cli.upscale import add_upscale_parser

    return [add_upscale_parser, add_export_parser, add_quantize_parser, add_parity_parser, add_bench_parser,
            add_all_parser, add_distill_ae_parser]  # fmt: skip


def crash_log_dir() -> Path:
    """Where internal-error tracebacks go: ``$TADSR_LOG_DIR``, else the system temp folder."""
    import os
    import tempfile

    return Path(os.environ.get("TADSR_LOG_DIR") or tempfile.gettempdir())


def _write_crash_log(exc: BaseException, argv: list[str] | None) -> Path | None:
    import datetime as dt
    import os
    import platform
    import traceback

    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = crash_log_dir() / f"tadsr-crash-{stamp}-{os.getpid()}.log"
    text = (f"tadsr {' '.join(sys.argv[:1] + list(sys.argv[1:] if argv is None else argv))}\n"
            f"python {platform.python_version()} on {platform.platform()}\n\n"
            + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))  # fmt: skip
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError:
        return None
    return path


def run_verb(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Call ``args.func(args)`` under the error policy (README "Errors and exit codes").

    Returns the verb's own status (0, or 1 when a verdict failed); a :class:`TadsrError` -> its one-line message
    and its ``exit_code`` (2 bad input or environment, 1 a failed verdict); Ctrl-C -> 130; an out-of-memory or a
    full / read-only disk -> 2 with what to do; any other exception is a bug -> 3, with the traceback in a log
    file (on the console only with -v).
    """
    import errno

    from tadsr.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED

    try:
        return int(args.func(args) or 0)
    except TadsrError as e:
        log.error("%s", e)
        log.debug("details", exc_info=True)
        return e.exit_code
    except KeyboardInterrupt:
        log.error("interrupted; no partial output was left behind")
        return EXIT_INTERRUPTED
    except MemoryError:
        log.error("out of memory; use a smaller --tile, --low-memory (ONNX Runtime) or free memory, then retry")
        return EXIT_BAD_INPUT
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
            where = f" ({e.filename})" if e.filename else ""
            log.error("cannot write%s: %s; free some space or choose a writable output, then retry", where,
                      e.strerror or e)  # fmt: skip
            return EXIT_BAD_INPUT
        return _internal(e, args, argv)
    except Exception as e:  # noqa: BLE001 - the policy: every other exception is an internal error
        return _internal(e, args, argv)


def _internal(e: BaseException, args: argparse.Namespace, argv: list[str] | None) -> int:
    from tadsr.errors import EXIT_INTERNAL

    path = _write_crash_log(e, argv)
    first = (str(e).splitlines() or [""])[0][:200]
    where = f"the traceback is in {path}" if path else "the traceback could not be saved; rerun with -v to see it"
    log.error("internal error (%s: %s); this is a bug, please report it: %s", type(e).__name__, first, where)
    if getattr(args, "verbose", 0):
        log.error("traceback:", exc_info=e)
    return EXIT_INTERNAL


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.quiet else (logging.DEBUG if args.verbose > 1 else logging.INFO)
    configure_logging(level)
    return run_verb(args, argv)


def configure_logging(level: int) -> None:
    """``level`` for tadsr's own messages; other libraries (coremltools logs every op it removes at INFO) only
    say warnings, unless ``-vv`` asks for everything."""
    logging.basicConfig(level=logging.DEBUG if level <= logging.DEBUG else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)  # fmt: skip
    logging.getLogger("tadsr").setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
