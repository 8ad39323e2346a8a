"""`python -m litelvlm.cli validate --config configs/demo.yaml`: LightningCLI over the module and data.

Every run records each scored mask in its run folder (SampleRecords); `--resume RUN_DIR` re-opens
that folder and evaluates only what is not recorded yet.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml
from jsonargparse import set_loader
from lightning.pytorch.cli import LightningCLI

from litelvlm.data.datamodule import ReferringDataModule
from litelvlm.engine.callbacks import EvaluationReport, SampleRecords
from litelvlm.engine.module import ReferringSegmentationModule
from litelvlm.engine.records import MANIFEST_FILE, records_folder
from litelvlm.errors import LitelvlmError
from litelvlm.pruners import PrunerError, resolve_pruner_class

PARSER_MODE = "litelvlm_yaml"
PRUNER_KEYS = {"pruner", "pruners"}
NULLS = {"null", "Null", "NULL", "None"}  # YAML/jsonargparse spellings of no value


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
    run = Path(run_dir).expanduser()
    if not (records_folder(run) / MANIFEST_FILE).is_file():
        raise LitelvlmError(f"--resume {run_dir}: no run to resume there (no records/{MANIFEST_FILE})")
    if records_folder(run) == run:  # given the records folder itself
        run = run.parent
    version = run.name.removeprefix("version_") if run.name.startswith("version_") else run.name
    if run.name.isdigit():
        raise LitelvlmError(f"--resume {run_dir}: a run folder named by digits alone is ambiguous to the logger")
    logger = "--trainer.logger.init_args."
    return out + [f"{logger}save_dir", str(run.parent), f"{logger}name", "", f"{logger}version", version]


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


def main(args: list[str] | None = None) -> LitelvlmCLI | None:
    try:
        if args is None:  # from the command line: LightningCLI reads sys.argv itself
            sys.argv[1:] = _expand_resume_flag(_expand_pruner_flag(sys.argv[1:]))
        else:
            args = _expand_resume_flag(_expand_pruner_flag(args))
        return LitelvlmCLI(
            ReferringSegmentationModule,
            ReferringDataModule,
            trainer_defaults={"callbacks": [SampleRecords(), EvaluationReport()]},
            parser_kwargs={"parser_mode": PARSER_MODE},
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    except Exception as err:
        known = _known_error(err)
        if known is None:
            raise
        # Known bad input: one clear line, not a traceback from deep inside a library.
        print(f"litelvlm: error: {known}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
