"""What every command shares: the one UserError, common options, logging, option variables and sources, entry points."""
from __future__ import annotations

import logging
import math
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import click
from click.core import ParameterSource

from retrieval.names import DB_URL_ENV, INDEX_DIR_ENV

# Only click and the torch-free names above: --help and usage errors answer at once.


# RETRIEVAL_ variables that other parts of the project read, not the commands: a shell that exports them for
# docker-compose or the test suite must not be warned about them on every command.
READ_ELSEWHERE = frozenset({
    "RETRIEVAL_DATA", "RETRIEVAL_PORT",                                                   # docker-compose.yml
    "RETRIEVAL_REQUIRE_BROWSER", "RETRIEVAL_REQUIRE_DOCKER", "RETRIEVAL_REQUIRE_POSTGRES",  # the test suite
    "RETRIEVAL_CHROMIUM", "RETRIEVAL_POSTGRES_BIN", "RETRIEVAL_SCREENSHOTS", "RETRIEVAL_UPDATE_SNAPSHOTS",
})



class UserError(click.ClickException):
    """A problem the user can fix; exit status 2, message without a traceback."""
    exit_code = 2


class Busy(click.ClickException):
    """Another run holds the index's writer lock: try again later. Exit status 75 (EX_TEMPFAIL of sysexits.h), so
    a cron job can tell "skip this time" from a mistake (2)."""
    exit_code = 75


class DiskFull(click.ClickException):
    """A full disk: one line saying what to free; exit status 1, as index-images' (nothing was lost)."""
    exit_code = 1


class PathArg(click.Path):
    """click.Path that refuses an empty name: click resolves "" to the working folder, so `index-images ""` (an
    unset shell variable) indexed the working folder, and `--index-dir ""` wrote the index into it."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, (str, bytes)) and not value.strip():
            self.fail("is empty; give a path (. for the working folder)", param, ctx)
        if isinstance(value, str) and value.startswith("~"):
            value = os.path.expanduser(value)   # from a variable or a crontab line, which no shell expanded: ./~/idx
        if not self.dir_okay and isinstance(value, str) and value.endswith(("/", os.sep)):
            # resolve_path drops the slash: `--out tuned/` wrote a file named "tuned"
            self.fail(f"{value!r} ends with '/', so it names a folder; give a file's name", param, ctx)
        if not self.dir_okay and isinstance(value, str) and value != "-" and os.path.isdir(value):
            self.fail(f"{value!r} is a folder; give a file's name (in it: {value.rstrip(os.sep)}{os.sep}NAME)",
                      param, ctx)
        return super().convert(value, param, ctx)


class FloatRange(click.FloatRange):
    """click.FloatRange that refuses nan and inf: every bound check passes a nan (comparisons with it are false),
    and `--max-file-mb nan` or `--lr nan` then failed with a traceback deep in the work."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def index_dir_option(f):  # noqa: ANN001, ANN201 - click decorator
    return click.option("--index-dir", type=PathArg(file_okay=False, path_type=Path, resolve_path=True), default="index",
                        envvar=INDEX_DIR_ENV, show_default=True, show_envvar=True,
                        help="Folder holding the index (catalog.db, vectors.faiss).")(f)


def db_url_option(f):  # noqa: ANN001, ANN201 - click decorator
    return click.option("--db-url", default=None, envvar=DB_URL_ENV, show_envvar=True, metavar="URL",
                        help="SQLAlchemy URL of the catalog, e.g. postgresql://USER:PASSWORD@HOST:5432/DB to share it "
                             "between hosts (the FAISS file stays in the index folder). [default: SQLite catalog.db "
                             "in the index folder]")(f)


def setup_logging(verbose: bool, *, quiet: bool = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    # faiss says at import which build it tried first: "Could not load library with AVX2 support ...
    # ModuleNotFoundError" on every -v run of a machine without that build reads like a failure; it is not one
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    if not quiet:  # the batch size choice and its reason are always worth a line
        logging.getLogger("retrieval.features.batch_size").setLevel(logging.INFO)


def env_prefix(command_name: str) -> str:
    """index-images -> INDEX_IMAGES: the prefix of the command's option variables (INDEX_IMAGES_BATCH_SIZE)."""
    return command_name.upper().replace("-", "_")


def command_settings(command_name: str) -> dict[str, Any]:
    """click context_settings shared by the commands: -h, and an environment variable for every option."""
    return {"help_option_names": ["-h", "--help"], "auto_envvar_prefix": env_prefix(command_name)}


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    """--version: the package's version (what a bug report needs first), without importing torch."""
    if not value or ctx.resilient_parsing:
        return
    import platform
    from importlib.metadata import PackageNotFoundError, version

    try:
        mine = version("cnn-image-retrieval")
    except PackageNotFoundError:   # run from a checkout that was not installed
        mine = "unknown (not installed)"
    click.echo(f"{ctx.info_name} {mine} (cnn-image-retrieval; Python {platform.python_version()})")
    ctx.exit()


class Command(click.Command):
    """A command whose option variables are named after the options as typed: `search-images --json` reads
    SEARCH_IMAGES_JSON (and SEARCH_IMAGES_AS_JSON, the name from its Python parameter, as before), so the name a
    user guesses from --help works. Options with a variable of their own (RETRIEVAL_INDEX_DIR) read it only: click
    would also read INDEX_IMAGES_INDEX_DIR, while the warning for unread variables called it unread."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params.append(click.Option(["--version"], is_flag=True, expose_value=False, is_eager=True,
                                        allow_from_autoenv=False, callback=_print_version,
                                        help="Print the version and exit."))
        prefix = self.context_settings.get("auto_envvar_prefix")
        for param in self.params:
            if not isinstance(param, click.Option) or not param.allow_from_autoenv or not prefix:
                continue
            if param.envvar:
                param.allow_from_autoenv = False
                continue
            flag = next((opt[2:].replace("-", "_") for opt in param.opts if opt.startswith("--")),
                        next((opt[1:] for opt in param.opts if len(opt) == 2), None))   # -k alone: EVALUATE_INDEX_K
            if flag and param.name and flag != param.name:
                param.envvar = [f"{prefix}_{flag.upper()}", f"{prefix}_{param.name.upper()}"]

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.BadParameter as exc:   # a value from the environment: name the variable, not only the option
            param = exc.param
            if isinstance(param, click.Option) and param.name and \
                    ctx.get_parameter_source(param.name) is ParameterSource.ENVIRONMENT:
                names = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar or ())
                if param.allow_from_autoenv and ctx.auto_envvar_prefix:
                    names.append(f"{ctx.auto_envvar_prefix}_{param.name.upper()}")
                variable = next((name for name in names if os.environ.get(name)), None)
                if variable is not None:
                    exc.param_hint = f"{variable} (the environment's {param.opts[0]})"
            raise

    def invoke(self, ctx: click.Context) -> Any:
        for line in misspelt_variables(self, os.environ):
            click.echo(f"warning: {line}", err=True)
        return super().invoke(ctx)


def misspelt_variables(command: click.Command, environ: Any) -> list[str]:
    """Variables of this command's prefix (INDEX_IMAGES_) that none of its options reads, and RETRIEVAL_ ones that no
    command nor the server reads, each with the closest name that is read: a typo (RETRIEVAL_DB_ULR) was ignored
    without a word, and the command went on with the default (another catalog)."""
    import difflib

    from api.settings import SETTINGS

    prefix = (command.context_settings.get("auto_envvar_prefix") or "") + "_"
    reads = {name for p in command.params if isinstance(p, click.Option) and p.envvar
             for name in ([p.envvar] if isinstance(p.envvar, str) else p.envvar)}
    reads |= {f"{prefix}{p.name.upper()}" for p in command.params
              if isinstance(p, click.Option) and p.name and not p.envvar and p.allow_from_autoenv}
    shared = {s.envvar for s in SETTINGS} | {INDEX_DIR_ENV, DB_URL_ENV} | {n for n in reads if n.startswith("RETRIEVAL_")}
    own = {f"{prefix}{flag.upper()}": (option, own_var)   # INDEX_IMAGES_INDEX_DIR -> (--index-dir, RETRIEVAL_INDEX_DIR)
           for p in command.params if isinstance(p, click.Option) and isinstance(p.envvar, str)
           for option in p.opts if option.startswith("--")
           for flag, own_var in ((option[2:].replace("-", "_"), p.envvar),)}
    lines = []
    environ = {name: value for name, value in environ.items() if name not in READ_ELSEWHERE}
    for name in sorted(environ):
        if name in own and prefix != "_" and name not in reads:
            option, own_var = own[name]
            lines.append(f"{name} is set, but {option} reads {own_var}: set that instead")
        elif name.startswith(prefix) and prefix != "_" and name not in reads:
            close = difflib.get_close_matches(name, sorted(reads), n=1, cutoff=0.75)
            lines.append(f"{name} is set, but {prefix[:-1].lower().replace('_', '-')} has no option it names"
                         + (f" (did you mean {close[0]}?)" if close else ""))
        elif name.startswith("RETRIEVAL_") and name not in reads and prefix != "_" \
                and f"{prefix}{name[len('RETRIEVAL_'):]}" in reads and name in {s.envvar for s in SETTINGS}:
            # RETRIEVAL_DEVICE=cuda search-images ran on the CPU without a word: the server's variable, not this one's
            mine = f"{prefix}{name[len('RETRIEVAL_'):]}"
            lines.append(f"{name} is set, but it is the server's (serve-images); "
                         f"{prefix[:-1].lower().replace('_', '-')} reads {mine}")
        elif name.startswith("RETRIEVAL_") and name not in shared | reads:
            close = difflib.get_close_matches(name, sorted(shared | reads), n=1, cutoff=0.75)
            lines.append(f"{name} is set, but no command reads it" + (f" (did you mean {close[0]}?)" if close else ""))
    return lines


def option_envvar(option: click.Option, command_name: str) -> str | None:
    """The environment variable click reads for option (its own, else the command's prefix + its name)."""
    if option.envvar:
        return option.envvar if isinstance(option.envvar, str) else option.envvar[0]
    if not option.allow_from_autoenv or option.name is None:
        return None
    return f"{env_prefix(command_name)}_{option.name.upper()}"


def source_of(ctx: click.Context, param: click.Parameter, command_name: str) -> str:
    """Where the value of param in ctx came from, in words."""
    source = ctx.get_parameter_source(param.name)
    if source is ParameterSource.COMMANDLINE:
        return "command line"
    if source is ParameterSource.ENVIRONMENT:
        return f"environment variable {option_envvar(param, command_name)}"
    if source is ParameterSource.DEFAULT_MAP:
        return "configuration file"
    return "default"


def batch_size_value(_ctx: click.Context | None, _param: click.Parameter | None, value: str) -> int | str:
    """--batch-size's callback: a positive whole number, or "auto" (chosen from the free GPU memory; 32 on the CPU)."""
    if value.strip().lower() == "auto":
        return "auto"
    try:
        n = int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a whole number or 'auto'", param=_param) from None
    if n < 1:
        raise click.BadParameter("must be at least 1", param=_param)
    return n


def exit_without_teardown(command: click.Command) -> Callable[[], None]:
    """A console-script entry point for command that ends the process without Python's module teardown once
    torch is loaded: tearing down torch and torchvision costs about a second after the work is done and saved.
    A Ctrl-C exits 130 wherever it lands (click alone says "Aborted!" and exits 1 outside the command's own
    handler; one inside torch's import waits for its end). A SIGTERM (kill, timeout, systemd, docker stop, a batch
    scheduler) takes the same way out, saying so, with exit status 143 (128 + 15) instead of dying silently; a
    SIGHUP (the ssh session or terminal closed) too, with 129, unless it is ignored (nohup).
    (In-process callers, such as tests, call the command itself.)"""
    def entry() -> None:
        from retrieval.system import hold_interrupts_while_importing

        _open_closed_standard_streams()

        hold_interrupts_while_importing("torch", "torchvision")   # a Ctrl-C inside torch's import aborted the process
        terminated: list[int] = []

        def on_terminate(signum: int, _frame) -> None:  # noqa: ANN001 - a signal handler
            terminated.append(signum)
            if signum == signal.SIGHUP:   # the terminal is gone: writing to it fails (EIO), which ended the run with a
                _off_the_terminal()       # traceback and status 1 before its "interrupted" line; nowhere, instead
            if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:   # a job a script started with & ignores Ctrl-C;
                signal.signal(signal.SIGINT, signal.default_int_handler)   # a SIGTERM must still stop it
            os.kill(os.getpid(), signal.SIGINT)   # as a Ctrl-C, so a moment that holds Ctrl-C holds this too

        signal.signal(signal.SIGTERM, on_terminate)
        if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:   # (under nohup it stays ignored)
            signal.signal(signal.SIGHUP, on_terminate)   # an ssh session closed: as a SIGTERM, exit 129
        try:
            code = command.main(standalone_mode=False)   # click's own handling, less its Ctrl-C: "Aborted!", exit 1
        except SystemExit as exc:
            code = exc.code
        except OSError as exc:
            code = _output_failed(exc)
        except click.ClickException as exc:
            exc.show()
            code = exc.exit_code
        except click.Abort as exc:
            if isinstance(exc.__context__, KeyboardInterrupt):   # Ctrl-C before the command's own handler
                click.echo("interrupted", err=True)
                code = 130
            else:
                click.echo("Aborted!", err=True)
                code = 1
        else:
            code = code if isinstance(code, int) else 0
        if not isinstance(code, int):   # SystemExit("message") or SystemExit(None)
            if code is not None:
                print(code, file=sys.stderr)
            code = 0 if code is None else 1
        if terminated and code == 130:
            code = 128 + terminated[0]
        try:
            sys.stdout.flush()
        except OSError as exc:
            code = code or _output_failed(exc, flushing=True)
        if "torch" in sys.modules:
            logging.shutdown()
            sys.stderr.flush()
            os._exit(code)
        sys.exit(code)
    return entry


def _off_the_terminal() -> None:
    """stdout and stderr, where they are a terminal (a character device: isatty() is False once it hung up), to
    /dev/null; pipes and files are left as they are."""
    import stat

    for fd in (1, 2):
        try:
            if stat.S_ISCHR(os.fstat(fd).st_mode):
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, fd)
                os.close(null)
        except OSError:
            pass


def _open_closed_standard_streams() -> None:
    """Started with stdout or stderr closed (`index-images data >&-`, a daemon's launcher): /dev/null in their
    place. Python had set sys.stdout to None, and the run failed at its end on .isatty(); worse, the next file
    opened (the catalog) would have taken descriptor 1, and anything printed would have written into it."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
            continue
        except OSError:
            pass
        null = os.open(os.devnull, os.O_RDONLY if fd == 0 else os.O_WRONLY)
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, mode, closefd=False))


def _output_failed(exc: OSError, flushing: bool = False) -> int:
    """The exit status for an OSError that reached the entry point from writing the output, said in one line: the
    reader of a pipe gone (`search-images x.jpg | head -1`) at the last flush: quietly 1, as click exits when it meets
    it earlier; the output's disk full (> a file on a full disk, > /dev/full): one line, exit 1. flushing: raised by
    the entry point's own flush of stdout; else only an error raised by click.echo's write counts (a full disk under
    any other open file raises the same unnamed OSError). Anything else is raised again (a traceback: a bug)."""
    import errno
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    echoing = bool(frames) and frames[-1].name == "echo" and frames[-1].filename.endswith(os.path.join("click", "utils.py"))
    if not (flushing or echoing):
        raise exc
    if exc.errno not in (errno.EPIPE, errno.ENOSPC, errno.EDQUOT):
        raise exc
    devnull = os.open(os.devnull, os.O_WRONLY)   # the interpreter's last flush would fail again, out loud
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    if exc.errno != errno.EPIPE:   # the reader of a pipe left on purpose; a full disk is said
        try:
            click.echo(f"Error: cannot write the output (stdout): {exc.strerror}", err=True)
        except OSError:
            pass
    return 1


def index_lag_note(data_dir: Path, index_dir: Path, catalog: Any, what: str) -> str | None:
    """What index-images would find to do in the index's data folder now, in words, for a command whose answer (what:
    "these groups", "these numbers") is of the index as it was; None when the index is up to date or its folder is
    not here. catalog: the index's retrieval.catalog.Catalog."""
    from indexer.plan import pending_changes
    from retrieval.system import display_name

    if not Path(data_dir).is_dir():
        return None
    changed, gone = pending_changes(Path(data_dir), Path(index_dir), catalog)
    if not changed and not gone:
        return None
    return (f"the data folder changed since it was indexed ({changed} new or changed file{'' if changed == 1 else 's'}, "
            f"{gone} gone): {what} are of the index as it was; run index-images {display_name(str(data_dir))} "
            "first to include them")


def damaged_catalog_error(exc: BaseException, index_dir: Path, db_url: str | None,
                          data_dir: str | None = None) -> UserError | None:
    """A UserError naming the ways out when exc says the catalog is damaged (see retrieval.catalog.damaged_message),
    else None: running the same command again cannot help with a damaged file."""
    from retrieval.catalog import catalog_sqlite_file, damaged_message, damaged_reason

    reason = damaged_reason(exc)
    if reason is None:
        return None
    try:
        where = catalog_sqlite_file(Path(index_dir), db_url)
    except Exception:   # noqa: BLE001 - only for the message
        where = None
    return UserError(damaged_message(str(where) if where is not None else "database", reason, data_dir))


def full_disk_error(exc: BaseException, index_dir: Path, db_url: str | None) -> DiskFull | None:
    """A DiskFull naming the disk to free when exc says the catalog's disk is full, else None."""
    from retrieval.catalog import CatalogUnavailable, catalog_sqlite_file, database_full_message
    from retrieval.files import FULL, disk_trouble, no_space_message

    if disk_trouble(exc) != FULL:
        return None
    try:
        where = catalog_sqlite_file(Path(index_dir), db_url)
    except CatalogUnavailable:
        where = None
    if where is None and db_url is not None:   # the database server's disk, not the index folder's
        return DiskFull(database_full_message(db_url, exc))
    return DiskFull(no_space_message(index_dir if db_url is None or where is None else where.parent))


def catalog_error(exc: BaseException, index_dir: Path, db_url: str | None) -> click.ClickException | None:
    """The one line for a catalog error the user can act on: damaged or not the user's to read (exit 2), or on a full
    disk (exit 1); else None."""
    return (damaged_catalog_error(exc, index_dir, db_url) or privilege_error(exc, db_url)
            or full_disk_error(exc, index_dir, db_url))


def privilege_error(exc: BaseException, db_url: str | None) -> UserError | None:
    """A UserError when the database refused the user the catalog's tables (PostgreSQL's insufficient_privilege,
    SQLSTATE 42501), saying what to grant; else None (it was a raw 'permission denied for table' traceback)."""
    if db_url is None or getattr(getattr(exc, "orig", None), "sqlstate", None) != "42501":
        return None
    from retrieval.catalog import db_error_reason, mask_url

    return UserError(f"the database user may not use the catalog's tables in {mask_url(db_url)} "
                     f"({db_error_reason(exc, db_url)}): grant it SELECT on them to search, evaluate and serve "
                     "(GRANT SELECT ON ALL TABLES IN SCHEMA public TO ...), and the owner's rights to index")


def open_index(index_dir: Path, db_url: str | None, device: str, *, load_network: bool = True,  # noqa: ANN201
               search_params=None):  # noqa: ANN001 - retrieval.vectors.faiss_parts.SearchParams: over the recorded
    """retrieval.search.index.ImageIndex for a command's queries, its network loaded with the garbage collector off;
    every way it cannot open (no index, a damaged catalog, weights or device unavailable) is a UserError."""
    from retrieval.system import collector_paused

    with collector_paused():   # torch, FAISS and the network load sooner with the garbage collector off
        from sqlalchemy.exc import SQLAlchemyError

        from retrieval.features.backbones import DeviceUnavailable
        from retrieval.features.weights import WeightsUnavailable, weights_error_message
        from retrieval.search.index import ImageIndex, IndexNotFound, WeightsMismatch
        from retrieval.search.snapshot import IndexUnavailable

        try:
            return ImageIndex(index_dir, db_url=db_url, device=device, load_network=load_network,
                              search_params=search_params)
        except (IndexNotFound, IndexUnavailable, WeightsMismatch, DeviceUnavailable) as exc:
            raise UserError(str(exc)) from exc
        except SQLAlchemyError as exc:
            if (problem := catalog_error(exc, index_dir, db_url)) is not None:
                raise problem from None
            raise
        except WeightsUnavailable as exc:
            raise UserError(weights_error_message(exc)) from exc


@contextmanager
def querying(index, index_dir: Path, db_url: str | None):  # noqa: ANN001, ANN201 - an open_index ImageIndex
    """Query an index open_index opened, then close it: a damaged catalog met on the way is a UserError naming the
    ways out (as at opening); errors of the query itself are the caller's to translate inside."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield index
    except SQLAlchemyError as exc:
        if (problem := catalog_error(exc, index_dir, db_url)) is not None:
            raise problem from None
        raise
    finally:
        index.close()


def permission_denied(exc: BaseException | None) -> str | None:
    """'permission denied: this user may not read or write PATH' when exc (or an exception it was raised from) is a
    PermissionError; else None. For the one line a command prints instead of a traceback."""
    from retrieval.files import replaced_by

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, PermissionError):
            # a rename into place names the file it replaces second; a temporary file stands for the one it replaces
            where = exc.filename2 if exc.filename2 is not None else exc.filename
            name = os.fsdecode(replaced_by(os.fsdecode(where))) if where is not None else "a file it needs"
            why = (" (this user is root, so not by its permissions: an immutable or append-only attribute, see lsattr, "
                   "or a security policy)" if hasattr(os, "geteuid") and os.geteuid() == 0 else "")
            return f"permission denied: this user may not read or write {name}{why}"
        exc = exc.__cause__ or exc.__context__
    return None
