"""The `lmshrink` command line: a dict from command name to where its settings and function live.

A command's module is imported only when that command runs, so `lmshrink --help` does not pay
for torch, transformers and datatrove.
"""

from __future__ import annotations

import errno
import importlib
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from lmshrink import __version__
from lmshrink.config import from_args
from lmshrink.errors import Interrupted, LmshrinkError, Stopped

# name -> (module, settings class, function, one-line summary)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "clean": ("lmshrink.recipes.clean", "CleanSettings", "run", "Clean a pre-training corpus with datatrove"),
    "truncate": ("lmshrink.recipes.truncate", "TruncateSettings", "run", "Build a student from a subset of the teacher's blocks"),
    "prune": ("lmshrink.recipes.prune", "PruneSettings", "run",
              "Prune heads, MLP channels, hidden size (and depth) by activation importance"),
    "search": ("lmshrink.recipes.search", "SearchSettings", "run",
               "Depth, width or both at one size: prune, heal briefly, rank (Minitron)"),
    "score-layers": ("lmshrink.recipes.score_layers", "ScoreSettings", "run", "Score how much each block of a model matters"),
    "pretrain": ("lmshrink.recipes.pretrain", "PretrainSettings", "run", "Heal a student with the plain causal-LM loss"),
    "distill": ("lmshrink.recipes.distill", "DistillSettings", "run", "Heal a student by distillation from a frozen teacher"),
    "generate": ("lmshrink.recipes.generate", "GenerateSettings", "run",
                 "Write a healing corpus sampled from a teacher (teacher-written data)"),
    "cache-teacher": ("lmshrink.recipes.cache_teacher", "CacheSettings", "run", "Store a teacher's top-k log-probs for distill"),
    "finetune": ("lmshrink.recipes.finetune", "FinetuneSettings", "run", "Fine-tune on a downstream task, with KD methods"),
    "eval": ("lmshrink.recipes.evaluate", "EvalSettings", "run",
             "Perplexity, zero-shot benchmarks, speed and size of models, side by side"),
    "export": ("lmshrink.recipes.export", "ExportSettings", "run",
               "Write a model as GGUF files for llama.cpp (f16, q8_0, q4_0, ...)"),
    "demo": ("lmshrink.recipes.demo", "DemoSettings", "run", "The embedded study: score, cut, heal and compare SmolLM2-135M"),
    "study": ("lmshrink.recipes.study", "StudySettings", "run",
              "The paper's study from one config: healing, block choice, KD fine-tuning, cleaning; verdicts"),
    "fetch": ("lmshrink.recipes.fetch", "FetchSettings", "fetch", "Fetch the real assets into the cache"),
}


def page(command: str) -> str:
    """A command's page, relative to the repository root."""
    return f"docs/{command}.md"


def command(name: str) -> tuple[type, Callable[[Any], Any]]:
    """A command's settings class and function (importing its module now)."""
    module_name, settings_name, function_name, _ = COMMANDS[name]
    module = importlib.import_module(module_name)
    return getattr(module, settings_name), getattr(module, function_name)


def usage() -> str:
    lines = [f"lmshrink {__version__}: compress decoder language models and measure what was lost", "",
             "usage: lmshrink COMMAND [--config FILE.yaml] [--flags]", "", "commands:"]
    lines += [f"  {name:<14}{summary}" for name, (*_, summary) in COMMANDS.items()]
    lines.append("\n`lmshrink COMMAND --help` lists a command's settings; the manual is docs/COMMAND.md.")
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
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if on_main_thread else None
    try:
        cls, function = command(name)
        settings = from_args(cls, rest, prog=f"lmshrink {name}", description=(cls.__doc__ or COMMANDS[name][3]).strip(),
                             epilog=f"manual: {page(name)}")
        function(settings)
    except LmshrinkError as err:  # the user's to fix: the message, not a traceback
        print(f"lmshrink {name}: error: {err}", file=sys.stderr)
        return 2
    except Stopped as stop:  # Ctrl-C / SIGTERM: what was kept and how to go on
        print(f"lmshrink {name}: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM outside a training loop (which checkpoints first)
        signum = stop.signum if isinstance(stop, Interrupted) else signal.SIGINT
        print(f"lmshrink {name}: stopped ({signal.Signals(signum).name}); what had finished is kept (every output "
              "is written whole or not at all); run the same command to carry on", file=sys.stderr)
        return 128 + signum
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        # whatever was being written was a temporary file or a checkpoint not yet whole: nothing published is touched
        print(f"lmshrink {name}: error: no space left on device while writing {err.filename or 'a file'}; "
              "free some space (df -h) and run the same command to carry on", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _terminate(signum: int, _frame: Any) -> None:
    if os.getpid() != _MAIN_PID:  # a forked worker (clean's pool) ends as SIGTERM ends it by default
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise Interrupted(signum)


_MAIN_PID = os.getpid()
