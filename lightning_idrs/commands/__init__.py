"""The commands: ``python -m lightning_idrs {fit,validate,test,certify,predict,table,thresholds,dashboard,doctor} ...``.

* ``fit`` / ``validate`` / ``test``: LightningCLI over the training module (:mod:`.fit`);
* ``certify``: certify a checkpoint on a data split (:mod:`.certify`);
* ``predict``: Cohen et al.'s PREDICT with abstention on a split or on files (:mod:`.predict`);
* ``table``: a results table (Markdown or LaTeX) of certify folders (:mod:`.table`);
* ``thresholds``: the curse-of-dimensionality table of sigma1/sigma0 (:mod:`.thresholds`);
* ``dashboard``: a W&B workspace of the runs' panels (:mod:`.dashboard`).
* ``doctor``: checks the installation, ``--gpu`` the GPU path (:mod:`.doctor`).

Every command reports bad input (:class:`~lightning_idrs.arguments.UsageError`, or an option that
does not parse) as one ``error: ...`` line on stderr and exit code 2. Ctrl-C exits 130 and SIGTERM
143, after one line (from rank 0 of a distributed job) saying that a rerun resumes; a process of a
distributed job whose peer died exits 1 with one line saying so.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from lightning_idrs.arguments import UsageError, one_line

CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # the packaged configs, named without a path

COMMANDS = {
    "fit": "train a base classifier under input-dependent Gaussian noise (LightningCLI)",
    "validate": "evaluate a checkpoint on the validation set (LightningCLI)",
    "test": "evaluate a checkpoint on the test set (LightningCLI)",
    "certify": "certify a checkpoint: certified radius per point, summary, curve",
    "predict": "the smoothed classifier's prediction (PREDICT, with abstention) on a split or on files",
    "table": "a results table (Markdown or LaTeX, best in bold) of certify folders",
    "thresholds": "the curse-of-dimensionality thresholds of sigma1/sigma0 (Thm. 2.4)",
    "dashboard": "a W&B workspace (curves per run and epoch, class-wise, RS vs IDRS) for a project",
    "doctor": "check the installation (versions, faiss, kNN, certify); --gpu: the GPU path too",
}
USAGE = "usage: python -m lightning_idrs COMMAND [options]\n\ncommands:\n" + "".join(
    f"  {name:<12} {text}\n" for name, text in COMMANDS.items()
) + "\n'python -m lightning_idrs COMMAND --help' lists the options of a command.\n"

_KEY = re.compile(r'Parser key "([^"]+)":')
_RULE = re.compile(r"must be [^;]*")
_NOT_ACCEPTED = re.compile(r"class_path '([^']+)': Option '([^']+)' is not accepted")
_LITERAL = re.compile(r"Literal\[(.*?)\]\.? Got value: ([^;]*)")
_TYPE = re.compile(r"<class '(?:[\w.]+\.)?(\w+)'>")


def describe_parse_error(error) -> str:
    """A jsonargparse error as one line naming the option, e.g. ``--model.sigma.k must be an integer >= 1, got 0``."""
    text = one_line(error)
    key = ""
    for part in _KEY.findall(text):  # nested keys; jsonargparse sometimes repeats the last one
        if part != "init_args" and not key.endswith(part):
            key = f"{key}.{part}" if key else part
    if not key:
        return text
    detail = _KEY.split(text)[-1].strip()
    rule = _RULE.search(detail)  # a rule of lightning_idrs.arguments, however deeply it is nested
    if rule:
        return f"--{key} {rule.group(0)}"
    choice = _LITERAL.search(detail)
    if choice:
        options = ", ".join(re.findall(r"'([^']*)'", choice.group(1)))
        return f"--{key} must be one of {options}, got {choice.group(2)}"
    unknown = _NOT_ACCEPTED.search(detail)
    if unknown:
        return f"--{key}.{unknown.group(2)} is not an option of {unknown.group(1)}"
    errors = [e.strip() for e in re.findall(r"- ([^;]+)", detail) if "NoneType" not in e] or [detail.split(";")[0]]
    given = re.search(r"Got value: (.*)$|Given value: (.*)$", detail)
    if errors[0].startswith("Expected a <class 'bool'>") and given:  # a switch, however it is typed
        return f"--{key} must be true or false, got {given.group(1) or given.group(2)}"
    value = given and (given.group(1) or given.group(2))
    optional_choice = re.match(r"Expected a typing\.Literal\[(.*)\]$", errors[0])
    if optional_choice and value:  # an Optional[Literal[...]] option
        options = ", ".join(re.findall(r"'([^']*)'", optional_choice.group(1)))
        return f"--{key} must be one of {options}, got {value}"
    got = f", got {value}" if value and "NestedArg" not in value else ""
    return f"--{key}: {_TYPE.sub(lambda m: m.group(1), errors[0]).replace('Expected a ', 'expected ')}{got}"


def guarded(function, argv) -> int:
    """Run ``function(argv)``; bad input becomes one ``error:`` line and exit code 2."""
    from jsonargparse import ArgumentError

    from lightning_idrs.launching import PeerLostError, is_rank_zero

    try:
        code = function(argv)
    except UsageError as error:
        message = one_line(error)
    except ArgumentError as error:
        message = describe_parse_error(error)
    except KeyboardInterrupt as interrupt:
        terminated = str(interrupt) == "SIGTERM"
        if is_rank_zero():  # once per job, not once per process
            print(f"{'stopped by SIGTERM' if terminated else 'interrupted'}: finished results are saved; rerun the "
                  "same command to resume", file=sys.stderr, flush=True)
        return 143 if terminated else 130
    except PeerLostError as error:
        print(f"error: {one_line(error)}; finished results are saved: rerun the same command to resume",
              file=sys.stderr, flush=True)
        return 1
    except SystemExit as exit_:  # --help (0), or argparse already printed its error
        return exit_.code if isinstance(exit_.code, int) else 2
    else:
        return code if isinstance(code, int) else 0
    print(f"error: {message}", file=sys.stderr, flush=True)
    return 2


def keep_matplotlib_out_of_home() -> None:
    """Libraries (torchmetrics) import matplotlib before a command knows its output folder: its font
    cache goes to a temporary folder of this process instead of ~/.cache and ~/.config (unless the
    user set MPLCONFIGDIR). A command moves it into its output folder once it has one."""
    import atexit
    import os
    import shutil
    import tempfile

    if "MPLCONFIGDIR" not in os.environ:
        folder = tempfile.mkdtemp(prefix="lightning_idrs-matplotlib-")
        os.environ["MPLCONFIGDIR"] = folder
        atexit.register(shutil.rmtree, folder, ignore_errors=True)


def main(argv=None) -> int:
    keep_matplotlib_out_of_home()
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv else None
    if command in (None, "-h", "--help"):
        print(USAGE, file=sys.stdout if command else sys.stderr)
        return 0 if command else 2
    if command not in COMMANDS:
        print(USAGE + f"\nerror: unknown command {command!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if command == "thresholds":
        from lightning_idrs.commands.thresholds import main as command_main
    elif command == "certify":
        from lightning_idrs.commands.certify import main as command_main
    elif command == "predict":
        from lightning_idrs.commands.predict import main as command_main
    elif command == "table":
        from lightning_idrs.commands.table import main as command_main
    elif command == "dashboard":
        from lightning_idrs.commands.dashboard import main as command_main
    elif command == "doctor":
        from lightning_idrs.commands.doctor import main as command_main
    else:
        from lightning_idrs.commands.fit import main as command_main

        return command_main(argv)
    return command_main(argv[1:])


def packaged_config(value: str) -> str:
    """``value`` itself, or the packaged config it names (``rs`` -> .../configs/rs.yaml)."""
    candidate = CONFIGS / f"{value}.yaml"
    if not Path(value).exists() and os.sep not in value and candidate.is_file():
        return str(candidate)
    return value


def config_file_action(check=None):
    """jsonargparse's ``ActionConfigFile`` (``--config``: files that stack key by key) that also takes the
    name of a packaged config; ``check(path_or_yaml)`` may refuse a value first (UsageError)."""
    from jsonargparse import ActionConfigFile

    class PackagedConfig(ActionConfigFile):
        def __call__(self, parser, cfg, values, option_string=None):
            if isinstance(values, str):
                values = packaged_config(values)
                if check is not None:
                    check(values)
            super().__call__(parser, cfg, values, option_string)

    return PackagedConfig
