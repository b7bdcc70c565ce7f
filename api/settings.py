"""The app's settings: one row each (name, default, meaning), read from RETRIEVAL_* environment variables."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

from PIL import Image

from retrieval.names import MAX_EF_SEARCH, MAX_NPROBE

# Light on purpose: `serve-images --help` and `--print-config` import this module and must not load torch.

ENV_PREFIX = "RETRIEVAL"


TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One key of the Flask config; set with the environment variable RETRIEVAL_<name>."""
    name: str        # Flask config key, e.g. MAX_UPLOAD_MB
    default: Any     # used when neither the environment nor the command line sets it
    help: str        # one line for the configuration table (docs/configuration.md)
    minimum: float | None = None   # numbers: the smallest accepted
    maximum: float | None = None   # numbers: the largest accepted
    kind: type | None = None       # the value's type when the default's is not it (None: the default's; str for None)

    @property
    def envvar(self) -> str:
        return f"{ENV_PREFIX}_{self.name}"

    def checked(self, value: Any) -> Any:
        """value (a RETRIEVAL_* variable as JSON or a string, or the command's own) as this setting takes it. Raises
        ValueError naming the variable, the value and what it must be."""
        kind = self.kind or (str if self.default is None else type(self.default))
        if value is None or kind is str:
            return value
        if kind is bool:
            word = str(value).strip().lower()
            if isinstance(value, bool) or word in TRUE_WORDS + FALSE_WORDS:
                return value if isinstance(value, bool) else word in TRUE_WORDS
            raise ValueError(f"{self.envvar} must be true or false, not {value!r}")
        whole = kind is int
        if self.maximum is not None:
            bounds = f" from {self.minimum or 0:g} to {self.maximum:g}"
        else:
            bounds = f" of at least {self.minimum:g}" if self.minimum is not None else ""
        wanted = f"{'a whole number' if whole else 'a number'}{bounds}"
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not math.isfinite(number) or (whole and not number.is_integer()):   # nan passed every bound
                raise ValueError
            number = int(number) if whole else number
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{self.envvar} must be {wanted}, not {value!r}") from None
        if (self.minimum is not None and number < self.minimum) or (self.maximum is not None and number > self.maximum):
            raise ValueError(f"{self.envvar} must be {wanted}, not {value!r}")
        return number


# Adding a setting is one row here: create_app, `serve-images --print-config` and the
# configuration table (python -m tools.config_table --write docs/configuration.md) all read this tuple.
SETTINGS: tuple[Setting, ...] = (
    Setting("INDEX_DIR", "index", "folder made by index-images"),
    Setting("DB_URL", None, "the catalog's SQLAlchemy URL (postgresql://...); default SQLite catalog.db in INDEX_DIR"),
    Setting("DEVICE", "cpu", "where query features are computed: cpu, cuda or auto"),
    Setting("MAX_UPLOAD_MB", 20, "larger uploads answer 413", minimum=0.001, kind=float),
    Setting("MAX_PIXELS", Image.MAX_IMAGE_PIXELS,
            "larger images answer 415 (decompression bomb; a JPEG's pixels once reduced); Pillow's own limit by "
            "default", minimum=0),
    Setting("DEFAULT_K", 10, "neighbours when k is not given", minimum=1),
    Setting("MAX_K", 100, "largest k accepted", minimum=1),
    Setting("RELOAD_INTERVAL_S", 1.0, "seconds between looks at the index on disk; 0 turns hot reload off", minimum=0),
    Setting("BATCH_MAX_SIZE", 8, "most concurrent queries in one forward pass", minimum=1),
    Setting("BATCH_WAIT_MS", 30.0, "most a batch waits for concurrent queries on their way (a lone query never waits)",
            minimum=0),
    Setting("TORCH_THREADS", 0, "threads of a lone query's forward pass (one fewer under load); 0: one per core "
                                "(serve-images shares the cores between --workers)", minimum=0),
    Setting("SEARCH_THREADS", 0, "threads that scan the vectors for a query or a batch; 0: one per core", minimum=0),
    Setting("QUERY_TIMEOUT_S", 30.0, "a query waiting longer answers 503", minimum=0.001),
    Setting("DECODE_PROCESSES", 0, "processes that decode uploads, so at most this many decodes at once; 0: 2, or "
                                   "1 on one core (serve-images shares them between --workers)", minimum=0),
    Setting("DECODE_TIMEOUT_S", 4.0, "an upload waits at most this long for a decoder (else 503) and decodes at most "
                                     "this long (else 415)", minimum=0.001),
    Setting("MAX_DECODED_PIXELS", 24_000_000, "pixels an upload may decode to after JPEG draft reduction (larger: "
                                              "415); 0: only MAX_PIXELS", minimum=0),
    Setting("DECODE_MEMORY_MB", 224, "memory a decoder process may use above its baseline (RLIMIT_AS, Linux); a decode "
                                     "that needs more answers 415; 0: no cap", minimum=0),
    Setting("THUMBNAIL_DIR", None, "cached thumbnails and uploaded gallery searches (recent-queries.db); "
                                   "default INDEX_DIR/thumbnails"),
    Setting("THUMBNAIL_SIZE", 256, "long side of thumbnails, px", minimum=16),
    Setting("GALLERY_PAGE_SIZE", 48, "images per page of the gallery grid", minimum=1),
    Setting("GALLERY_K", 12, "neighbours shown on gallery pages", minimum=1),
    Setting("NPROBE", 0, "IVF lists searched per query; 0: as index-images recorded (tuned for recall)", minimum=0,
            maximum=MAX_NPROBE),
    Setting("EF_SEARCH", 0, "HNSW efSearch; 0: as index-images recorded", minimum=0, maximum=MAX_EF_SEARCH),
    Setting("MMAP", True, "memory-map a private copy of the FAISS file (IVF lists, flat codes); false reads it into memory"),
    Setting("TRAINING", None, "a fine-tune history (NAME.history.json) shown on /training; default: the one next to "
                              "the index's weights file"),
    Setting("COMPARE_INDEX", None, "a second index folder shown side by side on /evaluation"),
)

DEFAULTS: dict[str, Any] = {s.name: s.default for s in SETTINGS}


def checked_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The settings among config (a Flask config: defaults, RETRIEVAL_* variables, the command's own) checked and
    converted -> {name: value}. Raises ValueError naming the first variable that is wrong and what it must be (an
    unchecked 'abc' answered every search with 500)."""
    values = {s.name: s.checked(config[s.name]) for s in SETTINGS if s.name in config}
    for name in ("DEFAULT_K", "GALLERY_K"):
        if name in values and "MAX_K" in values and values[name] > values["MAX_K"]:
            raise ValueError(f"{ENV_PREFIX}_{name} ({values[name]}) must not be more than {ENV_PREFIX}_MAX_K "
                             f"({values['MAX_K']})")
    return values


@dataclasses.dataclass(frozen=True)
class SettingInForce:
    """A setting's value for a server about to start, and where the value came from."""
    name: str     # a command-line option (--port) or a RETRIEVAL_* variable
    value: Any
    source: str   # "default", "environment variable NAME", "command line", or what serve-images derived it from


def environment_value(text: str) -> Any:
    """A RETRIEVAL_* variable's value as create_app's app.config.from_prefixed_env reads it: JSON, else the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def settings_in_force(overrides: Mapping[str, tuple[Any, str]], environ: Mapping[str, str] | None = None
                      ) -> list[SettingInForce]:
    """Every setting as create_app will see it: DEFAULTS, then RETRIEVAL_* variables, then overrides.

    overrides: config key -> (value, source) for what the command passes to create_app itself.
    """
    environ = os.environ if environ is None else environ
    rows = []
    for s in SETTINGS:
        if s.name in overrides:
            value, source = overrides[s.name]
        elif s.envvar in environ:
            value, source = environment_value(environ[s.envvar]), f"environment variable {s.envvar}"
        else:
            value, source = s.default, "default"
        rows.append(SettingInForce(s.envvar, value, source))
    return rows
