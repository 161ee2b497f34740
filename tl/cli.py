"""Command-line front door shared by the entry points.

Hydra reports an unknown group option (`scenario=typo`) or key (`optimizer.lrr=0.1`) in a multi-line block, and for a
key it advises `+optimizer.lrr=0.1`, which then trains silently with the default. tl checks the command line first so
the user gets one line naming the culprit and the closest valid names, and exit status 2:
- group options (`check_group_choices`);
- keys (`check_override_keys`): a key set without `+` must exist in the composed config; a key added with `+` must
  be an argument of the object its node builds (`_target_`), since nothing else would read it;
- the run directory (`check_run_dir`): creatable, and not holding another run unless resumed or overwritten, checked
  before Hydra writes its own record (RUN/.hydra) into it.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import inspect
import os
import re
import signal
import sys
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from tl.config import CONF_DIR
from tl.errors import Terminated, TLError


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


# the training config's `optional GROUP: null` defaults (experiment, hparams_search, debug): off unless chosen
OPTIONAL_GROUPS = tuple(key.split()[-1] for entry in OmegaConf.load(CONF_DIR / "train.yaml").defaults
                        if isinstance(entry, DictConfig) for key in entry if key.startswith("optional "))
REQUIRED_GROUPS = ("data", "model", "optimizer", "trainer", "scenario")  # `~GROUP` leaves the config unusable


def _group_off(group: str) -> str:
    options = group_options(group)
    if group in OPTIONAL_GROUPS:
        return f"{group} is off unless chosen: leave it out, or choose one of {', '.join(options)}"
    if "none" in options:
        return f"use {group}=none to switch it off"
    return f"{group} is required: choose one of {', '.join(options)}"


def _dropped_group(arg: str) -> str | None:
    """The one-line refusal for `GROUP=null` (Hydra's traceback: null is none of a group's options) or `~GROUP` of a
    group the run cannot do without; None for anything else."""
    key = arg.lstrip("+~").split("=", 1)[0]
    if "." in key or "@" in key or not (CONF_DIR / key).is_dir():
        return None
    if arg.startswith("~") and not arg.startswith("~~") and key in REQUIRED_GROUPS:
        return f"{arg}: {_group_off(key)}"
    if not arg.startswith("~") and arg.split("=", 1)[-1] == "null" and "=" in arg:
        return f"{arg}: {key} is a config group, null picks none of its options; {_group_off(key)}"
    return None


def check_group_choices(argv: list[str], train: bool = True) -> None:
    """Exit with one line if an override picks a config group option that does not exist, or (`train`: the training
    config, whose groups these are) drops a group the run cannot do without (found by a hostile tester:
    `logger=null` and `~model` were Hydra's tracebacks)."""
    for arg in argv:
        dropped = _dropped_group(arg) if train and not arg.startswith(("hydra", "-")) else None
        if dropped:
            _fail(dropped)
        if "=" not in arg or arg.startswith(("~", "hydra", "-")):
            continue
        key, value = arg.lstrip("+").split("=", 1)
        group = key.split("@", 1)[0]
        if "." in group or not (CONF_DIR / group).is_dir() or value in ("null", "") or "(" in value or "$" in value:
            continue  # not a group, or a sweep function / interpolation that Hydra expands itself
        for choice in value.split(","):  # a multirun sweep lists several choices
            if choice not in group_options(group):
                _fail(f"{group}={choice} is not a known {group}: choose one of {', '.join(group_options(group))}")


def _fail(message: str) -> None:
    print(f"tl: error: {message}", file=sys.stderr)
    sys.exit(2)


def _is_group(key: str) -> bool:
    return (CONF_DIR / key.split("@", 1)[0]).is_dir()


def _closest(name: str, options, prefix: str = "") -> str:
    options = sorted(str(o) for o in options)
    close = [f"{prefix}{c}" for c in difflib.get_close_matches(name, options, n=3, cutoff=0.5)]
    return f"did you mean {' or '.join(close)}?" if close else f"choose one of {', '.join(options) or '(none)'}"


def _walk(cfg: DictConfig, key: str) -> tuple[object, str, list[str]]:
    """Follow the dotted `key` through `cfg` without resolving interpolations: (deepest node reached, the path to
    it, the parts not found below it)."""
    node, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
        if isinstance(node, DictConfig) and part in node.keys():  # `in node` is False for ??? values
            node = node._get_node(part)
            continue
        if isinstance(node, ListConfig) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
            node = node._get_node(int(part))
            continue
        return node, ".".join(parts[:i]), parts[i:]
    return node, key, []


def _arguments(target: str) -> list[str] | None:
    """The argument names the callable `target` takes (None: cannot tell, or it takes any **kwargs)."""
    from hydra.utils import get_object

    try:
        params = inspect.signature(get_object(target)).parameters.values()
    except Exception:  # noqa: BLE001 - not importable here, or no signature: leave it to instantiation
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind is not p.VAR_POSITIONAL and p.name != "self"]


def check_override_keys(argv: list[str], config_name: str) -> None:
    """Exit with one line if an override names a key this config does not have (see the module docstring)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from tl.config import compose_config

    try:
        overrides = OverridesParser.create().parse_overrides([a for a in argv if "=" in a or a.startswith("~")])
    except Exception:  # noqa: BLE001 - a syntax error: Hydra's own message says where
        return
    multirun = bool({"-m", "--multirun"} & set(argv))
    if config_name != "train":
        _check_tool_overrides(overrides, config_name)
    subdir = next((o for o in overrides if o.key_or_group == "hydra.sweep.subdir" and not o.is_delete()), None)
    if multirun and config_name == "train" and subdir is not None and "${" not in str(subdir.input_line) and any(
            o.is_sweep_override() and len(list(o.sweep_string_iterator())) > 1 for o in overrides):
        _fail(f"{subdir.input_line} puts every job of the sweep in one folder: the second job would be refused after "
              "the first trained (and Hydra would first rewrite its record); leave hydra.sweep.subdir out (one "
              "folder per job number) or make it vary per job, e.g. 'hydra.sweep.subdir=${hydra.job.num}'")
    base, structural = [], []  # groups and deletions; and additions: they shape the config keys are checked against
    for o in overrides:
        if o.key_or_group.startswith("hydra"):
            continue
        if o.is_sweep_override() and not multirun:
            raw = o.input_line.split("=", 1)[1]
            _fail(f"{o.input_line} lists several values: add -m (--multirun) to run one job per value"
                  + (f"; or, if the comma is part of one value (a path), quote it for Hydra: \"{o.key_or_group}="
                     f"'{raw}'\"" if "/" in raw or "\\" in raw else ""))
        if _is_group(o.key_or_group) or o.is_add() or o.is_force_add() or o.is_delete():
            line = o.input_line
            if o.is_sweep_override():  # the first choice of a sweep has the shape of the others
                prefix = "+" if o.is_add() else "++" if o.is_force_add() else ""
                pkg = f"@{o.package}" if o.package else ""
                line = f"{prefix}{o.key_or_group}{pkg}={next(iter(o.sweep_string_iterator()), '')}"
            structural.append(line)
            if not (o.is_add() or o.is_force_add()) or _is_group(o.key_or_group):
                base.append(line)
    nulled = {o.key_or_group for o in overrides if not (o.is_sweep_override() or o.is_delete() or o.is_add()
              or o.is_force_add() or _is_group(o.key_or_group)) and o.value() is None}
    for o in overrides:  # callbacks.progress=null callbacks.progress.metrics_every=0: Hydra's "use +", then tl's "no +"
        section = next((n for n in nulled if o.key_or_group.startswith(f"{n}.")), None)
        if section:
            _fail(f"{o.input_line}: {section}=null on the same command line switches {section} off, so "
                  f"{o.key_or_group} has nothing to set: drop one of the two")
    try:
        before = compose_config(base, config_name)
    except Exception:  # noqa: BLE001 - composition fails for another reason: Hydra reports it
        return
    for o in overrides:
        if o.is_add() and not _is_group(o.key_or_group) and not _walk(before, o.key_or_group)[2]:
            _fail(f"+{o.key_or_group}: {o.key_or_group} exists already: set it without the +, i.e. "
                  f"{o.key_or_group}=...")
    try:
        cfg = compose_config(structural, config_name)
    except Exception:  # noqa: BLE001
        return
    for o in overrides:
        key = o.key_or_group
        if key.startswith("hydra") or _is_group(key) or o.is_delete() or o.is_force_add():
            continue
        if not o.is_add():
            node, found, missing = _walk(cfg, key)
            if missing:
                if not found and missing[0] == "data" and config_name == "evaluate":
                    # tl.evaluate reads the run's own data unless data=NAME names other data
                    _fail(f"{key}: the data settings apply to data named on the command line: add data=imagefolder "
                          f"(or digits, shards, ...), e.g. data=imagefolder {o.input_line}")
                target = node._get_node("_target_") if isinstance(node, DictConfig) and len(missing) == 1 \
                    and "_target_" in node.keys() else None
                arguments = _arguments(str(target._value())) if target is not None else None
                if arguments and missing[0] in arguments:  # a real argument the config leaves at its default
                    _fail(f"{key} is not in this config yet, but {target._value()} takes {missing[0]!r}: add it "
                          f"with a +, i.e. +{o.input_line}")
                siblings = list(node.keys()) if isinstance(node, DictConfig) else []
                prefix = f"{found}." if found else ""
                hint = _closest(missing[0], siblings, prefix)
                if arguments and len(missing) == 1:  # the object's own arguments too, those not set need the +
                    names = {f"{prefix}{a}": a for a in siblings} | {
                        f"+{prefix}{a}": a for a in arguments if a not in siblings}
                    close = difflib.get_close_matches(missing[0], sorted(set(names.values())), n=3, cutoff=0.5)
                    if close:
                        hint = "did you mean " + " or ".join(n for c in close for n, a in names.items() if a == c) + "?"
                _fail(f"{key} is not a setting of this config ({missing[0]!r} is not under "
                      f"{found or 'the top level'}): {hint}")
            continue
        # +key=value: only an argument of the object its parent node builds is read by anything
        parent, _, leaf = key.rpartition(".")
        if leaf.startswith("_") and leaf.endswith("_"):  # _target_, _partial_, ...: a new object entry
            continue
        pnode, _, pmissing = _walk(cfg, parent) if parent else (cfg, "", [])
        target = pnode.get("_target_") if isinstance(pnode, DictConfig) and not pmissing else None
        if target is not None:
            arguments = _arguments(str(target))
            if arguments is not None and leaf not in arguments:
                _fail(f"+{key}: {target} takes no argument {leaf!r}, so nothing would read it: "
                      f"{_closest(leaf, arguments, f'{parent}.' if parent else '')}")
            continue
        siblings = [k for k in pnode.keys() if k != leaf] if isinstance(pnode, DictConfig) and not pmissing else []
        _fail(f"+{key} adds a key that nothing reads ({parent or 'the top level'} builds no object): "
              f"{_closest(leaf, siblings, f'{parent}.' if parent else '')}")
    if multirun and config_name == "train":
        check_sweep_values(overrides, structural)


def _check_tool_overrides(overrides, config_name: str) -> None:
    """predict, evaluate, export, shard: a config group they do not have (data=digits on tl.predict, which Hydra
    reports in three lines, and +data=digits, which nothing would read), a setting removed (~output) or a section
    emptied (ensemble=null): each was a traceback or silently ignored."""
    primary = OmegaConf.load(CONF_DIR / f"{config_name}.yaml")
    own_groups = {next(iter(d)) for d in primary.get("defaults", []) if isinstance(d, DictConfig)}
    tool = f"python -m tl.{config_name}"
    for o in overrides:
        key = o.key_or_group.split("@", 1)[0]
        if key.startswith("hydra"):
            continue
        if _is_group(key) and key not in own_groups:
            _fail(f"{o.input_line}: {tool} has no {key} settings ({key}= belongs to python -m tl.train); drop it")
        if o.is_delete() and key in primary:
            _fail(f"{o.input_line} removes {key}, which {tool} reads: set {key}=VALUE instead")
        value = None if o.is_sweep_override() or o.is_delete() else o.value()
        if value is None and not o.is_delete() and not o.is_sweep_override() and isinstance(
                OmegaConf.select(primary, key, default=None), DictConfig) and not _is_group(key):
            _fail(f"{o.input_line}: {key} is a group of settings, not a switch: set its keys instead, e.g. "
                  f"{key}.{next(iter(OmegaConf.select(primary, key)), 'KEY')}=...")


def check_sweep_values(overrides, structural: list[str], limit: int = 50) -> None:
    """Every value a training sweep lists passes the validation rules, before the first job trains (a bad value in
    the last element would otherwise surface after the others have run)."""
    from tl.checks import validate
    from tl.config import compose_config

    fixed = [o.input_line for o in overrides if not o.is_sweep_override() and not _is_group(o.key_or_group)
             and not o.key_or_group.startswith("hydra") and not (o.is_add() or o.is_force_add() or o.is_delete())]
    firsts = {o.key_or_group: next(iter(o.sweep_string_iterator()), "") for o in overrides
              if o.is_sweep_override() and not _is_group(o.key_or_group) and not o.key_or_group.startswith("hydra")
              and not (o.is_add() or o.is_force_add() or o.is_delete())}
    checked = 0
    for key in firsts:
        for value in next(o for o in overrides if o.key_or_group == key).sweep_string_iterator():
            if checked >= limit:
                return
            checked += 1
            others = [f"{k}={v}" for k, v in firsts.items() if k != key]
            try:
                cfg = compose_config([*structural, *fixed, *others, f"{key}={value}"], "train")
            except Exception:  # noqa: BLE001 - a value Hydra cannot parse: Hydra reports it
                continue
            try:
                validate(cfg, final=False)
            except TLError as e:
                _fail(f"the sweep's {key}={value}: {e}" if key in str(e) else str(e))


def _rank() -> int:
    """This process's global rank as the launcher set it in the environment (0 when not launched as a rank)."""
    from lightning_fabric.utilities.rank_zero import _get_rank

    return _get_rank() or 0


def _check_creatable(setting: str, target: Path) -> None:
    """`target` exists as a folder or can be made: its nearest existing parent takes a new folder (a read-only or
    pseudo filesystem such as /proc does not), and no part of the new path is longer than a name may be."""
    import tempfile

    for part in (target, *target.parents):  # mkdir meets a dangling link or a link loop as "File exists"
        try:
            dangling = part.is_symlink() and not part.exists()
        except OSError:  # a name longer than the filesystem allows (ENAMETOOLONG): said below, in one line
            continue
        if dangling:
            _fail(f"{setting}={target}: {part} is a symbolic link to a missing folder, or a link loop: remove or "
                  "repoint the link, or choose another folder")
    try:
        parent = target
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if parent == target and target.is_dir():
            return
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            _fail(f"{setting}={target} cannot be created ({parent} is not a writable folder): choose a writable place")
        name_max = os.pathconf(parent, "PC_NAME_MAX")
        for part in target.relative_to(parent).parts:
            if len(os.fsencode(part)) > name_max:
                _fail(f"{setting}=...: a folder name in it ({part[:24]!r}...) is longer than this filesystem allows "
                      f"({len(os.fsencode(part))} bytes, at most {name_max}): choose a shorter name")
        os.rmdir(tempfile.mkdtemp(prefix=".tl-probe-", dir=parent))  # what mkdir will meet there
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            _fail(f"{setting}=...: a folder name in it is longer than this filesystem allows (File name too long): "
                  "choose a shorter name")
        _fail(f"{setting}={target} cannot be created ({e.strerror or e}): choose a writable place")


def check_sweeper(argv: list[str]) -> None:
    """The sweeper's own settings that Hydra passes through unchecked (a sweep of no trials ends in a traceback)."""
    for arg in argv:
        key, _, value = arg.lstrip("+").partition("=")
        if key in ("hydra.sweeper.n_trials", "hydra.sweeper.n_jobs"):
            if not (value.strip().isdigit() and int(value) >= 1):
                _fail(f"{key}={value}: use a whole number >= 1, e.g. {key}=20")


def check_syntax(argv: list[str]) -> None:
    """An override Hydra cannot parse (an unquoted space or non-ASCII character, an unbalanced bracket or quote):
    one line naming it, instead of Hydra's parser trace."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    takes_value = {"-c", "--cfg", "-i", "--info", "-p", "--package", "-cn", "--config-name", "-cp", "--config-path",
                   "-cd", "--config-dir", "--experimental-rerun", "-sc", "--shell-completion"}
    for i, arg in enumerate(argv):
        if "=" not in arg and not arg.startswith(("-", "~")) and (i == 0 or argv[i - 1] not in takes_value):
            previous = argv[i - 1] if i else ""
            joined = f' (with the one before: "{previous} {arg}")' if "=" in previous else ""
            _fail(f"{arg!r} is not a KEY=VALUE override: a value with a space must be quoted whole{joined}, e.g. "
                  "'data.root=/data/my photos'")
        if arg.startswith("-") or ("=" not in arg and not arg.startswith("~")):
            continue
        try:
            parser.parse_overrides([arg])
        except Exception as e:  # noqa: BLE001 - OverrideParseException, and whatever a grammar error raises
            key, _, value = arg.partition("=")
            why = (str(e).splitlines() or [""])[0][:100]
            _fail(f"{arg!r} cannot be parsed as an override ({why}): quote the value, e.g. {key}='{value}' (in the "
                  "shell: \"" + key + "='" + value + "'\")")


LABELS = ("augment", "scenario")  # groups whose `name` only names the preset chosen (results.json, the plan)


def check_labels(argv: list[str]) -> None:
    """`augment.name=light` changed only the label recorded in results.json while the strong policy trained: the
    preset is chosen with `augment=light`."""
    for arg in argv:
        key, sep, value = arg.lstrip("+").partition("=")
        group = key.rsplit(".", 1)[0]
        if sep and key.endswith(".name") and group in LABELS:
            options = group_options(group)
            fix = (f"choose the preset with {group}={value}" if value in options
                   else f"choose a preset with {group}=NAME ({', '.join(options)})")
            _fail(f"{arg}: {group}.name only names the {group} preset in use and changes nothing else; {fix}")


def check_values(argv: list[str]) -> None:
    """The training config's values (tl.checks.validate), before Hydra makes the run directory: a refused run leaves
    no folder behind. (train() validates the final config again: auto's choice, edits from Python.)"""
    from tl.checks import validate
    from tl.config import compose_config

    overrides = [a for a in argv if ("=" in a or a.startswith("~")) and not a.lstrip("+~").startswith("hydra")]
    try:
        cfg = compose_config(overrides, "train")
    except Exception:  # noqa: BLE001 - composition fails for another reason: Hydra reports it
        return
    try:
        validate(cfg, final=False)
    except TLError as e:
        _fail(str(e))


def check_run_dir(argv: list[str], config_name: str = "") -> None:
    """Exit with one line if `hydra.run.dir=DIR` cannot be created (Hydra would fail with a traceback), or, for a
    training run, if DIR holds another run (tl.rundir), before Hydra rewrites RUN/.hydra in it."""
    values = dict(a.lstrip("+").split("=", 1) for a in argv if "=" in a)
    multirun = bool({"-m", "--multirun"} & set(argv))
    overwrite = values.get("overwrite", "false").lower() == "true"
    given = [a.lstrip("+").split("=", 1)[0] for a in argv if a.lstrip("+").startswith(("hydra.sweep.dir=",
                                                                                         "hydra.run.dir="))]
    asks_help = bool({"--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c"} & set(argv))
    if multirun and "hydra.run.dir" in given and "hydra.sweep.dir" not in given:
        _fail(f"hydra.run.dir={values['hydra.run.dir']} applies to a single run, and -m (a sweep) would ignore it: "
              "give hydra.sweep.dir=DIR instead (each job writes to DIR/<job number>)")
    ckpt = values.get("ckpt_path", "").strip("'\"")
    if config_name == "train" and ckpt not in ("", "last", "auto", "null", "None") \
            and Path(ckpt).expanduser().is_file():
        from tl.checks import load_training_checkpoint

        try:  # a weights file or junk: one line before Hydra rewrites the run's record (train() checks it again)
            load_training_checkpoint(str(Path(ckpt).expanduser()))
        except TLError as e:
            _fail(str(e))
    if ("hydra.sweep.dir" if multirun else "hydra.run.dir") not in given and not asks_help:  # default: logs/ here
        _check_default_logs()
    for raw in argv:
        arg = raw.lstrip("+")  # +hydra.run.dir= and ++hydra.run.dir= set it too
        if arg.startswith(("hydra.sweep.dir=", "hydra.run.dir=")):
            setting, target = arg.split("=", 1)
            if not target.strip().strip("'\""):
                _fail(f"{setting} is empty (an unset variable in a script?): give a folder, or leave it out for "
                      "logs/ under the current folder")
            # a $NAME the shell did not expand (quoted); Hydra resolves its own ${...} before anyone sees the path
            if re.search(r"\$(?!\{)", target) and config_name == "train":
                _fail(f"{setting}={target!r} holds a '$': Lightning's TensorBoard logger expands $NAME in its folder "
                      "as an environment variable and would write the logs elsewhere; choose a folder name without $")
            _check_creatable(setting, Path(target).expanduser())
        if arg.startswith("hydra.run.dir="):
            target = Path(arg.split("=", 1)[1]).expanduser()
            _check_not_inside_a_run(target, config_name)
            if config_name == "train" and target.is_dir() and not multirun and not _rank():
                _check_not_holding_runs(target)
            if config_name == "train" and target.is_dir() and not multirun \
                    and not _rank():  # the other processes of a DDP or SLURM job share rank 0's directory
                from tl.rundir import check_free, own_resume

                try:
                    check_free(target, own_resume(values.get("ckpt_path"), target), overwrite)
                except TLError as e:
                    _fail(str(e))
        if arg.startswith("hydra.sweep.dir=") and config_name == "train" and multirun and not overwrite \
                and not _rank():
            sweep = Path(arg.split("=", 1)[1]).expanduser()
            from tl.rundir import RESUMABLE

            done = sorted(d for d in (sweep.iterdir() if sweep.is_dir() else ()) if d.is_dir() and (
                (d / "results.json").is_file() or any((d / "checkpoints" / n).is_file() for n in RESUMABLE)))
            if done:  # Hydra would rewrite their records (multirun.yaml, JOB/.hydra) before a job is refused
                _fail(f"hydra.sweep.dir={str(sweep)!r} holds the runs of an earlier sweep ({done[0].name}/, ...): "
                      "choose another hydra.sweep.dir, or replace them with overwrite=true")


RUN_PARTS = ("checkpoints", "export", "report", "tensorboard", "csv", ".hydra")


def _check_default_logs() -> None:
    """The default run folder is logs/... under the current folder: where that cannot be made (a read-only folder),
    say so in one line, not in Hydra's traceback."""
    logs = Path("logs")
    parent = logs if logs.exists() else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK) or _read_only(parent):
        _fail(f"the default run folder logs/ cannot be made in {str(Path.cwd())!r} (not a writable folder): run from "
              "a writable folder, or give hydra.run.dir=DIR (hydra.sweep.dir=DIR with -m)")


def _read_only(folder: Path) -> bool:
    """Is `folder` on a read-only filesystem (which os.access does not see for root)?"""
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _check_not_holding_runs(target: Path) -> None:
    """A training run's folder must not be one that holds other runs (logs/train/runs/, a sweep's folder): its
    files would be mixed with theirs."""
    if _is_training_run(target):
        return  # a run's own folder: check_free decides (resume, overwrite)
    with contextlib.suppress(OSError):
        runs = sorted(d.name for d in target.iterdir() if d.is_dir() and _is_training_run(d))
        if runs:
            _fail(f"hydra.run.dir={str(target)!r} holds other runs ({runs[0]}/{', ...' if len(runs) > 1 else ''}): "
                  "this run's files would be mixed with theirs; choose a new folder, e.g. "
                  f"hydra.run.dir={target / 'NAME'}")


def _is_training_run(folder: Path) -> bool:
    return (folder / "results.json").is_file() or (folder / "checkpoints").is_dir() or (
        (folder / "config.yaml").is_file() and (folder / ".hydra").is_dir())


def _check_not_inside_a_run(target: Path, config_name: str) -> None:
    """A run folder inside another run's parts (RUN/checkpoints/, RUN/export/, ...) would plant a second run's
    record where tools look for the first one's (and its exports would replace the first run's); predict,
    evaluate, export and shard writing their record into a training run would replace that run's own (.hydra/)."""
    try:
        resolved = target.resolve(strict=False)
    except (OSError, RuntimeError):
        return
    for folder in [resolved, *resolved.parents][:6]:
        if folder.name in RUN_PARTS and _is_training_run(folder.parent):
            _fail(f"hydra.run.dir={str(target)!r} is inside {str(folder)!r}, a part of the training run "
                  f"{str(folder.parent)!r}: choose a folder outside it")
    if config_name != "train" and resolved.is_dir() and _is_training_run(resolved):
        _fail(f"hydra.run.dir={str(target)!r} holds a training run: python -m tl.{config_name} would replace its "
              "record (.hydra/); leave hydra.run.dir at its default or choose a new folder")


def launch(hydra_main, config_name: str) -> None:
    """Run a `@hydra.main` entry point (of the config `config_name`) after the one-line checks on its command line."""
    # Hydra's parser takes -m only before the overrides: move it there, where a user's `... -m` meant it
    flags = [a for a in sys.argv[1:] if a in ("-m", "--multirun")]
    sys.argv[1:] = flags + [a for a in sys.argv[1:] if a not in ("-m", "--multirun")]
    import tl

    if signal.getsignal(signal.SIGTERM) is tl._on_sigterm_while_starting:
        # imports done: from here a SIGTERM raises Terminated (one line, status 143, locks released and scratch files
        # removed by their finally blocks) until an entry point's own handling takes over (tl.train's fit runs under
        # Lightning's, which saves interrupted.ckpt: tl.utils.default_sigterm)
        from tl.utils import terminate_as_exception

        terminate_as_exception()
    try:
        _launch(hydra_main, config_name)
    except Terminated:  # during the command line's checks, before the entry point's own handling
        print("tl: interrupted by SIGTERM while starting: nothing was written", file=sys.stderr, flush=True)
        sys.exit(128 + signal.SIGTERM)


def _launch(hydra_main, config_name: str) -> None:
    argv = sys.argv[1:]
    for stream in (sys.stdout, sys.stderr):  # a file name that is not valid UTF-8 is printed with escapes
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")
    check_syntax(argv)
    check_sweeper(argv)
    check_group_choices(argv, train=config_name == "train")
    if config_name == "train":
        check_labels(argv)
    check_run_dir(argv, config_name)
    if not {"--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c"} & set(argv):
        check_override_keys(argv, config_name)
        if config_name == "train" and not {"-m", "--multirun"} & set(argv):
            check_values(argv)
    hydra_main()
