"""`python -m litelvlm.cli validate --config configs/demo.yaml`: LightningCLI over the module and data.

Every run records each scored mask in its run folder (SampleRecords); `--resume RUN_DIR` re-opens
that folder and evaluates only what is not recorded yet.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Optional

import yaml
from jsonargparse import set_loader
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from litelvlm.console import quiet_console
from litelvlm.data.datamodule import ReferringDataModule
from litelvlm.engine.callbacks import EvaluationReport, RunStatus, SampleRecords
from litelvlm.engine.callbacks.records import EVALUATION_STAGES, earlier_records
from litelvlm.engine.module import ReferringSegmentationModule
from litelvlm.engine.records import MANIFEST_FILE, has_records, records_folder
from litelvlm.engine.runs import resolve_run
from litelvlm.errors import LitelvlmError
from litelvlm.pruners import PrunerError, resolve_pruner_class

PARSER_MODE = "litelvlm_yaml"
INTERRUPTED_EXIT = 128 + signal.SIGTERM  # the shell's code for a process ended by SIGTERM
PRUNER_KEYS = {"pruner", "pruners"}
NULLS = {"null", "Null", "NULL", "None"}  # YAML/jsonargparse spellings of no value
RESUME_HELP = (
    "RUN_DIR: evaluate only what the run folder's records lack, then report the whole run (a parent "
    "such as runs/sweep_demo takes its latest run with records)"
)


def _pruner_class_path(name: str) -> str:
    """A pruner's short name, class name or class path -> its class path; unknown names are an error."""
    if "." in name:
        return name
    try:
        cls = resolve_pruner_class(name)
    except PrunerError as err:
        raise LitelvlmError(str(err)) from None
    return f"{cls.__module__}.{cls.__qualname__}"


def _expand_pruner_names(value, key: str | None = None):
    """Let configs name pruners by registered short name: `pruner: {class_path: fastv}` -> its class path."""
    if isinstance(value, dict):
        class_path = value.get("class_path")
        if key in PRUNER_KEYS and isinstance(class_path, str):
            value = {**value, "class_path": _pruner_class_path(class_path)}
        return {name: _expand_pruner_names(item, name) for name, item in value.items()}
    if isinstance(value, list):
        return [_expand_pruner_names(item, key) for item in value]
    return value


def _load_yaml(text: str):
    from jsonargparse._loaders_dumpers import yaml_load

    return _expand_pruner_names(yaml_load(text))


def _expand_pruner_flag(args: list[str]) -> list[str]:
    """Pruner short names on the command line -> class paths.

    `--model.pruner fastv` (or `=fastv`); `--model.pruners '[{class_path: fastv, init_args: ...}, ...]'`.
    `--model.pruner null` clears a config's pruner (to sweep over it with `--model.pruners`).
    """
    out = list(args)
    for index, arg in enumerate(out):
        flag, has_equals, value = arg.partition("=")
        if flag not in ("--model.pruner", "--model.pruners"):
            continue
        if not has_equals:
            if index + 1 >= len(out):
                continue
            value = out[index + 1]
        if flag == "--model.pruner":
            expanded = _pruner_class_path(value) if _is_name(value) and value not in NULLS else value
        else:
            loaded = _load_yaml(value)
            expanded = json.dumps(_expand_pruner_names(loaded, "pruners")) if isinstance(loaded, list) else value
        if has_equals:
            out[index] = f"{flag}={expanded}"
        else:
            out[index + 1] = expanded
    return out


def _expand_resume_flag(args: list[str]) -> list[str]:
    """`--resume RUN_DIR` -> the logger arguments that make RUN_DIR this run's folder again.

    The run then finds its own records there and evaluates only what is missing (SampleRecords).
    """
    out, run_dir = [], None
    iterator = iter(args)
    for arg in iterator:
        if arg == "--resume":
            run_dir = next(iterator, None)
            if run_dir is None:
                raise LitelvlmError("--resume needs the run folder to resume (the one holding records/)")
        elif arg.startswith("--resume="):
            run_dir = arg.split("=", 1)[1]
        else:
            out.append(arg)
    if run_dir is None:
        return out
    run = resolve_run(run_dir, has_records, "records", complete=False, flag="--resume")  # killed runs too
    if not has_records(run):
        raise LitelvlmError(f"--resume {run_dir}: no run to resume there (no records/{MANIFEST_FILE})")
    if records_folder(run) == run:  # given the records folder itself
        run = run.parent
    version = run.name.removeprefix("version_") if run.name.startswith("version_") else run.name
    if run.name.isdigit():
        raise LitelvlmError(f"--resume {run_dir}: a run folder named by digits alone is ambiguous to the logger")
    logger = "--trainer.logger.init_args."
    return out + [f"{logger}save_dir", str(run.parent), f"{logger}name", "", f"{logger}version", version]


def _check_config_files(args: list[str]) -> None:
    """Each `--config FILE` exists and is YAML, else one line naming the file (and the line of a syntax
    error), before the parser prints its usage or reports the error inside a string of YAML."""
    for index, arg in enumerate(args):
        flag, has_equals, value = arg.partition("=")
        if flag not in ("--config", "-c"):
            continue
        if not has_equals:
            if index + 1 >= len(args):
                continue
            value = args[index + 1]
        if "\n" in value or value.lstrip().startswith("{"):  # YAML given inline, not a file
            continue
        path = Path(value).expanduser()
        if not path.is_file():
            raise LitelvlmError(f"config file {value} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
        try:
            yaml.compose(path.read_text())  # syntax only: what the values mean is the parser's to check
        except yaml.MarkedYAMLError as error:
            mark = error.problem_mark or error.context_mark
            where = f"{value}, line {mark.line + 1}, column {mark.column + 1}" if mark else value
            context = f" ({error.context} at line {error.context_mark.line + 1})" if error.context and error.context_mark else ""
            raise LitelvlmError(f"config file {where}: YAML syntax error: {error.problem}{context}") from None
        except yaml.YAMLError as error:
            raise LitelvlmError(f"config file {value}: not YAML ({error})") from None


def _without_version(get_metrics):
    """The progress bar's items minus the logger's version (`v_num: 0.000`): the run prints its folder."""

    def items(trainer, pl_module):
        return {key: value for key, value in get_metrics(trainer, pl_module).items() if key != "v_num"}

    return items


def _is_name(value: str) -> bool:
    """A bare name (not YAML/JSON, not a path to a config file)."""
    return value.replace("-", "").replace("_", "").replace(".", "").isalnum()


def _known_error(err: BaseException) -> BaseException | None:
    """Our own bad-input error, even when jsonargparse or Lightning wrapped it on the way up."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, (LitelvlmError, FileNotFoundError)):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


set_loader(PARSER_MODE, _load_yaml, exceptions=(yaml.YAMLError,))


class LitelvlmCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The data pipeline tokenises and resizes for the model it feeds: one name sets both.
        parser.link_arguments("model.checkpoint", "data.checkpoint")

    def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand in EVALUATION_STAGES:  # read by `_expand_resume_flag` before parsing; listed for --help
            parser.add_argument("--resume", type=Optional[str], default=None, help=RESUME_HELP)
            # EvaluationReport prints the results table (configurations, budgets, the random-weights note);
            # Lightning's own dump of every logged metric (4 rows per configuration) would bury it.
            parser.set_defaults(verbose=False)
        return parser

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        bar = getattr(self.trainer, "progress_bar_callback", None)
        if bar is not None:
            bar.get_metrics = _without_version(bar.get_metrics)

    def before_fit(self) -> None:
        self._check_inputs("fit")

    def before_validate(self) -> None:
        self._check_inputs("validate")

    def before_test(self) -> None:
        self._check_inputs("test")

    def _check_inputs(self, stage: str) -> None:
        """Open the data and check a re-used run folder before the logger makes or touches a run folder,
        so bad input leaves no `version_N` behind and a refused resume writes nothing into that run."""
        if self.config.get(self.subcommand, {}).get("resume") is not None:  # only `_expand_resume_flag` reads it
            raise LitelvlmError("resume: give it on the command line (--resume RUN_DIR), not in a config file")
        self.datamodule.setup(stage)
        logger = self.trainer.logger
        if stage in EVALUATION_STAGES and logger is not None and getattr(logger, "_version", None) is not None:
            if not getattr(self.model, "encoders_only", False):  # a named version may hold earlier records
                earlier_records(Path(logger.log_dir), stage, self.model, self.datamodule)


def main(args: list[str] | None = None, run: bool = True) -> LitelvlmCLI | None:
    try:
        quiet_console()
        given = list(sys.argv[1:] if args is None else args)  # as typed: what an interrupted run's resume line repeats
        _check_config_files(given)
        if args is None:  # from the command line: LightningCLI reads sys.argv itself
            sys.argv[1:] = _expand_resume_flag(_expand_pruner_flag(sys.argv[1:]))
        else:
            args = _expand_resume_flag(_expand_pruner_flag(args))
        return LitelvlmCLI(
            ReferringSegmentationModule,
            ReferringDataModule,
            trainer_defaults={"callbacks": [SampleRecords(), EvaluationReport(), RunStatus(command=given)]},
            parser_kwargs={"parser_mode": PARSER_MODE},
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )
    except SIGTERMException:  # stopped cleanly (RunStatus printed how to resume); a scheduler must not read success
        raise SystemExit(INTERRUPTED_EXIT) from None
    except Exception as err:
        known = _known_error(err)
        if known is None:
            raise
        # Known bad input: one clear line, not a traceback from deep inside a library.
        print(f"litelvlm: error: {known}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
