"""`python -m litelvlm.cli validate --config configs/demo.yaml`: LightningCLI over the module and data."""

from __future__ import annotations

import sys

import yaml
from jsonargparse import set_loader
from lightning.pytorch.cli import LightningCLI

from litelvlm.data.datamodule import ReferringDataModule
from litelvlm.engine.callbacks import EvaluationReport
from litelvlm.engine.module import ReferringSegmentationModule
from litelvlm.errors import LitelvlmError
from litelvlm.pruners import PrunerError, resolve_pruner_class

PARSER_MODE = "litelvlm_yaml"
PRUNER_KEYS = {"pruner", "pruners"}


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
    """`--model.pruner fastv` (or `=fastv`) on the command line -> the pruner's class path."""
    out = list(args)
    for index, arg in enumerate(out):
        if arg == "--model.pruner" and index + 1 < len(out) and _is_name(out[index + 1]):
            out[index + 1] = _pruner_class_path(out[index + 1])
        elif arg.startswith("--model.pruner=") and _is_name(arg.split("=", 1)[1]):
            out[index] = "--model.pruner=" + _pruner_class_path(arg.split("=", 1)[1])
    return out


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
            sys.argv[1:] = _expand_pruner_flag(sys.argv[1:])
        else:
            args = _expand_pruner_flag(args)
        return LitelvlmCLI(
            ReferringSegmentationModule,
            ReferringDataModule,
            trainer_defaults={"callbacks": [EvaluationReport()]},
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
