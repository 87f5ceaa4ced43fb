"""Turn a command line (and its --config_file) into a RunConfig: defaults < config file < flags, checked strictly."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from library.config.checks import check_value, option_range_text, place, rule_problems, shown_value, value_problems
from library.config.config_file import (SCRIPT_FILES, ConfigFile, config_path, dump_config, load_config_file,
                                        parse_number, write_config)
from library.config.options import IntOrFloat, Option
from library.config.problems import raise_problems
from library.config.run_config import RunConfig
from library.config.suggest import did_you_mean
from library.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message + exit
        raise UserError(message)


def options_for(script: str, options: Iterable[Option]) -> dict[str, Option]:
    return {o.name: o.for_script(script) for o in options if script in o.scripts}


def build_parser(description: str, options: Mapping[str, Option]) -> argparse.ArgumentParser:
    """argparse from the declarations, one --help group per section; unset flags stay absent (SUPPRESS)."""
    parser = _Parser(description=description, argument_default=argparse.SUPPRESS,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    groups: dict[str, Any] = {}
    for opt in options.values():
        group = groups.setdefault(opt.section, parser.add_argument_group(opt.section))
        limits = option_range_text(opt)
        help_text = opt.help + (f"; {limits}" if limits else "")
        help_text += "" if opt.default in (None, False, "") else f" (default: {opt.default})"
        help_text = help_text.replace("%", "%%")  # argparse formats help with %
        if opt.later:
            help_text += f" [not supported yet: issue #{opt.later}]"
        if opt.type is bool and not opt.nargs:
            group.add_argument(f"--{opt.name}", action="store_true", help=help_text)
        else:
            group.add_argument(f"--{opt.name}", type=_converter(opt), nargs=opt.nargs, choices=opt.choices,
                               help=help_text, metavar=opt.name.upper() if not opt.choices else None)
    return parser


def _converter(opt: Option):
    if opt.type in (int, float, IntOrFloat):
        def convert(text: str):
            try:
                return parse_number(text, opt.type)
            except ValueError:
                raise argparse.ArgumentTypeError(f"--{opt.name} expects {_expected(opt)}, got {text!r}") from None
        convert.__name__ = opt.type.__name__
        return convert
    return opt.type


def _expected(opt: Option) -> str:
    if opt.type is IntOrFloat:
        return "a step count, a fraction below 1 or a percentage (e.g. 100, 0.1 or 10%)"
    return "a whole number" if opt.type is int else "a number"


def resolve(argv: Sequence[str] | None, script: str, options: Iterable[Option], description: str = "",
            *, families: Sequence[str] = ()) -> RunConfig:
    """Resolve the run's options: every problem of the file and the flags in one error. `--output_config` writes
    them as TOML and exits here. `families`: the model families the script trains (`model_families`; some checks,
    such as block-wise network_args counts, depend on them)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    everything = {o.name: o for o in options}
    declared = options_for(script, everything.values())
    given = _parse_command_line(argv, declared, description)
    values = {name: opt.default for name, opt in declared.items()}
    origins: dict[str, str] = {}
    problems: list[str] = []
    notes: list[str] = []
    loaded = None
    # With --output_config, a config file that does not exist yet is the target to write (sd-scripts), not an input.
    target = given.get("config_file")
    if target and "config_file" in declared:  # a name no file system takes must not reach open()
        check_value(declared["config_file"], target, place("config_file", target, "command line"))
    if target and not (given.get("output_config") and not config_path(target).exists()):
        loaded = load_config_file(target, everything, script)
        values |= loaded.values
        origins |= loaded.origins
        problems += loaded.problems
        notes += _ignored_note(loaded)
    values |= given
    origins |= {name: "command line" for name in given}
    notes += _old_spelling(values, origins, declared)
    config = RunConfig(values, origins, script)
    if families:
        config = config.replace(model_families=tuple(families))
    # Every value against its declaration (ranges, names, paths) before anything is read or loaded.
    bad_values = value_problems(config, declared)
    problems += [*bad_values.values(), *rule_problems(config, declared)]
    if not config.get("output_config"):  # sd-scripts writes them all; a bad value is named once, for its value
        problems += unsupported_problems(config, [o for o in declared.values() if o.name not in bad_values],
                                         include_later=False)
    raise_problems(problems, loaded.path if loaded else None)
    notes += _inert_note(config, declared)
    for note in notes:
        print(note, file=sys.stderr)
    if config.get("output_config"):
        _output_config(config, declared)
    return config


def _ignored_note(loaded: ConfigFile) -> list[str]:
    """One line naming the GUI keys ignored, by the tool that writes them."""
    if not loaded.ignored:
        return []
    count = sum(len(keys) for keys in loaded.ignored.values())
    groups = "; ".join(f"{source}: {', '.join(keys)}" for source, keys in loaded.ignored.items())
    return [f"note: {loaded.path}: ignoring {count} GUI key{'s' if count > 1 else ''} that sd-scripts does not read "
            f"either ({groups})"]


def _old_spelling(values: dict[str, Any], origins: dict[str, str], declared: Mapping[str, Option]) -> list[str]:
    """sd-scripts still reads --caption_extention, its old misspelling, and lets it win over --caption_extension."""
    old = values.get("caption_extention")
    if old is None or "caption_extension" not in declared:
        return []
    where = origins.get("caption_extention", "default")
    also = ""
    if origins.get("caption_extension") and values.get("caption_extension") != old:
        also = (f"; it wins over caption_extension = {shown_value(values['caption_extension'])} "
                f"({origins['caption_extension']}), as in sd-scripts")
    values["caption_extension"], values["caption_extention"] = old, None
    origins["caption_extension"] = origins.pop("caption_extention", where)
    place_text = "--caption_extention" if where == "command line" else f"{where}: caption_extention"
    return [f"warning: {place_text} is sd-scripts' old misspelling of caption_extension; read as caption_extension "
            f"= {shown_value(old)}{also}; rename it to caption_extension"]


def _inert_note(config: RunConfig, declared: Mapping[str, Option]) -> list[str]:
    """One line per option that others act only with: set here, but changing nothing without it."""
    inert: dict[tuple, list[str]] = {}
    for opt in declared.values():
        if opt.inert_without and config.is_set(opt.name) and config[opt.name] != opt.default and is_inert(opt, config):
            inert.setdefault(opt.inert_without, []).append(opt.name)
    notes = []
    for (other, active), names in inert.items():
        condition = f"{other} set" if active is None else f"{other} = {' or '.join(active)}"
        notes.append(f"note: {', '.join(names)} act{'s' if len(names) == 1 else ''} only with {condition}, and it is "
                     "not: ignored")
    return notes


def is_inert(opt: Option, config: Mapping[str, Any]) -> bool:
    """Whether `opt` changes nothing in this run because the option it acts with is not set (Option.inert_without)."""
    if not opt.inert_without:
        return False
    other, active = opt.inert_without
    have = config.get(other)
    return have in (None, False, "") if active is None else have not in active


def _parse_command_line(argv: list[str], declared: Mapping[str, Option], description: str) -> dict[str, Any]:
    parser = build_parser(description, declared)
    namespace, unknown = parser.parse_known_args(argv)
    for token in unknown:
        if token.startswith("-"):
            name = token.lstrip("-").split("=", 1)[0]
            raise UserError(f"unknown option --{name}{_suggest_flag(name, declared)}")
        raise UserError(f"unexpected argument {token!r}; every option is a --flag (see --help)")
    given = vars(namespace)
    _warn_repeated(argv, declared, given)
    return given


def _warn_repeated(argv: list[str], declared: Mapping[str, Option], given: Mapping[str, Any]) -> None:
    """sd-scripts' argparse keeps the last of a repeated flag, and wrappers rely on it: keep it too, but say so."""
    counts: dict[str, int] = {}
    for token in argv:
        if token == "--":
            break
        if token.startswith("--"):
            name = _flag_name(token[2:].split("=", 1)[0], declared)
            if name is not None:
                counts[name] = counts.get(name, 0) + 1
    for name, count in counts.items():
        if count > 1 and not (declared[name].type is bool and not declared[name].nargs):  # a switch: same either way
            print(f"warning: --{name} is given {count} times on the command line; the last one "
                  f"({shown_value(given.get(name))}) is used, as in sd-scripts", file=sys.stderr)


def _flag_name(name: str, declared: Mapping[str, Option]) -> str | None:
    """The option a flag names, also when abbreviated as argparse allows (--learning_r for --learning_rate)."""
    if name in declared:
        return name
    matches = [option for option in declared if option.startswith(name)] if name else []
    return matches[0] if len(matches) == 1 else None


def _suggest_flag(name: str, declared: Mapping[str, Option]) -> str:
    hint = did_you_mean(name, declared)
    return hint.replace("(did you mean '", "(did you mean '--") if hint else ""


def _output_config(config: RunConfig, declared: Mapping[str, Option]) -> None:
    """sd-scripts' --output_config: write the non-default options to --config_file (refusing to overwrite) and exit;
    without a config file to write, print them."""
    changed = {k: v for k, v in config.items()
               if k not in ("config_file", "output_config") and v != declared[k].default}
    text = dump_config(changed, declared)
    target = config.get("config_file")
    if target and not config_path(target).exists():
        write_config(config_path(target), text)
        print(f"wrote {config_path(target)}")
    elif target:
        print(text, end="")
        print(f"# {config_path(target)} exists and was read; the resolved options are printed, not written",
              file=sys.stderr)
    else:
        print(text, end="")
    raise SystemExit(0)


def write_resolved_config(config: RunConfig, declared: Iterable[Option], output_dir: str | Path, name: str) -> Path:
    """Every resolved option, next to the run's outputs, as a --config_file that reproduces the run."""
    by_name = {o.name: o for o in declared}
    values = {k: v for k, v in config.items() if k not in ("config_file", "output_config", "dry_run")}
    header = f"# resolved options of {SCRIPT_FILES[config.script]}; rerun with --config_file\n"
    return write_config(Path(output_dir) / f"{name}.config.toml", header + dump_config(values, by_name))


def check_supported(config: RunConfig, declared: Iterable[Option], *, include_later: bool = True) -> None:
    """Refuse a run that sets options we accept for compatibility but do not implement yet — naming all of them.

    `include_later=False` (dry runs) refuses only options that will never work as given (those with a note)."""
    raise_problems(unsupported_problems(config, declared, include_later=include_later))


def unsupported_problems(config: RunConfig, declared: Iterable[Option], *, include_later: bool = True) -> list[str]:
    """One message per option set to a value other than its default that we do not implement (an option that acts
    only with another one that is not set changes nothing and passes)."""
    problems = []
    for opt in declared:
        refused = opt.note or (include_later and opt.later)
        if refused and opt.name in config and config.is_set(opt.name) and config[opt.name] != opt.default \
                and not is_inert(opt, config):
            why = opt.note or f"is not supported yet (it lands with issue #{opt.later})"
            problems.append(f"--{opt.name} (from {config.origin(opt.name)}) {why}; remove it to run now")
    return problems


def parse_tool_args(argv: Sequence[str] | None, description: str, options: Iterable[Option], names: Iterable[str],
                    positionals: Sequence[tuple[str, str]] = ()) -> argparse.Namespace:
    """For tools/: the named declared options (same names, types and help as the trainers) plus positionals."""
    wanted = set(names)
    declared = {o.name: o for o in options if o.name in wanted}
    parser = build_parser(description, declared)
    for name, help_text in positionals:
        parser.add_argument(name, help=help_text)
    namespace = parser.parse_args(argv)
    for name, opt in declared.items():
        if not hasattr(namespace, name):
            setattr(namespace, name, opt.default)
    return namespace
