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
from litelvlm.pruners import class_path_of

PARSER_MODE = "litelvlm_yaml"


def _expand_pruner_names(value):
    """Let configs name pruners by registered short name: `class_path: fastv` -> its class path."""
    if isinstance(value, dict):
        class_path = value.get("class_path")
        if isinstance(class_path, str) and class_path_of(class_path):
            value = {**value, "class_path": class_path_of(class_path)}
        return {key: _expand_pruner_names(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_expand_pruner_names(item) for item in value]
    return value


def _load_yaml(text: str):
    from jsonargparse._loaders_dumpers import yaml_load

    return _expand_pruner_names(yaml_load(text))


def _expand_pruner_flag(args: list[str]) -> list[str]:
    """`--model.pruner fastv` (or `=fastv`) on the command line -> the pruner's class path."""
    out = list(args)
    for index, arg in enumerate(out):
        if arg == "--model.pruner" and index + 1 < len(out) and class_path_of(out[index + 1]):
            out[index + 1] = class_path_of(out[index + 1])
        elif arg.startswith("--model.pruner=") and class_path_of(arg.split("=", 1)[1]):
            out[index] = "--model.pruner=" + class_path_of(arg.split("=", 1)[1])
    return out


set_loader(PARSER_MODE, _load_yaml, exceptions=(yaml.YAMLError,))


class LitelvlmCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The data pipeline tokenises and resizes for the model it feeds: one name sets both.
        parser.link_arguments("model.checkpoint", "data.checkpoint")


def main(args: list[str] | None = None) -> LitelvlmCLI | None:
    if args is None:  # from the command line: LightningCLI reads sys.argv itself
        sys.argv[1:] = _expand_pruner_flag(sys.argv[1:])
    else:
        args = _expand_pruner_flag(args)
    try:
        return LitelvlmCLI(
            ReferringSegmentationModule,
            ReferringDataModule,
            trainer_defaults={"callbacks": [EvaluationReport()]},
            parser_kwargs={"parser_mode": PARSER_MODE},
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    except (LitelvlmError, FileNotFoundError) as err:
        # Known bad input: one clear line, not a traceback from deep inside a library.
        print(f"litelvlm: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
