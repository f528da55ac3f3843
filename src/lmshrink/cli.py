"""The `lmshrink` command line: a dict from command name to (settings class, function)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from lmshrink import __version__
from lmshrink.assets import AssetError, FetchSettings, fetch
from lmshrink.clean import CleanSettings
from lmshrink.clean import run as clean
from lmshrink.config import SettingsError, from_args
from lmshrink.data import DataError
from lmshrink.demo import DemoSettings
from lmshrink.demo import run as demo
from lmshrink.distill import DistillSettings
from lmshrink.distill import run as distill
from lmshrink.evaluate import EvalSettings
from lmshrink.evaluate import run as evaluate
from lmshrink.finetune import FinetuneSettings
from lmshrink.finetune import run as finetune
from lmshrink.models import ModelLoadError
from lmshrink.pretrain import PretrainSettings
from lmshrink.pretrain import run as pretrain
from lmshrink.score_layers import ScoreSettings
from lmshrink.score_layers import run as score_layers
from lmshrink.teacher_cache import CacheSettings
from lmshrink.teacher_cache import run as cache_teacher
from lmshrink.truncate import LayerSelectionError, TruncateSettings
from lmshrink.truncate import run as truncate

COMMANDS: dict[str, tuple[type, Callable[[Any], Any]]] = {
    "clean": (CleanSettings, clean),
    "truncate": (TruncateSettings, truncate),
    "score-layers": (ScoreSettings, score_layers),
    "pretrain": (PretrainSettings, pretrain),
    "distill": (DistillSettings, distill),
    "cache-teacher": (CacheSettings, cache_teacher),
    "finetune": (FinetuneSettings, finetune),
    "eval": (EvalSettings, evaluate),
    "demo": (DemoSettings, demo),
    "fetch": (FetchSettings, fetch),
}

# Errors that are the user's to fix: print the message, not a traceback.
USER_ERRORS = (SettingsError, LayerSelectionError, ModelLoadError, DataError, AssetError)


def usage() -> str:
    lines = [f"lmshrink {__version__}: compress decoder language models and measure what was lost", "",
             "usage: lmshrink COMMAND [--config FILE.yaml] [--flags]", "", "commands:"]
    for name, (cls, _) in COMMANDS.items():
        lines.append(f"  {name:<14}{(cls.__doc__ or '').strip().splitlines()[0]}")
    lines.append("\n`lmshrink COMMAND --help` lists a command's settings.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"lmshrink: unknown command {name!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    cls, function = COMMANDS[name]
    try:
        settings = from_args(cls, rest, prog=f"lmshrink {name}", description=(cls.__doc__ or "").strip())
        function(settings)
    except USER_ERRORS as err:
        print(f"lmshrink {name}: error: {err}", file=sys.stderr)
        return 2
    return 0
