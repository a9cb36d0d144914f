"""--extra against the matrix: flags appended to every configuration may add to what it runs (``--sym``,
``--seqlen 64``, ``--alloc-cost rtn``), never change what its id says it is.

A configuration's id names its method, sparsity, width, K and seed, and the report pairs runs by them. So an
--extra flag is refused, before anything runs, when in any configuration of the sweep it would
- change a setting the matrix sets: sparsity (--sparsity, --prunen/--prunem), width (--wbits), K (--groups),
  the seed (--seed), or any setting the configuration's own method flags set (g128's --groupsize, miA's
  --strategy, ...): ``OWNED`` and the flags of ``methods.run_flags``;
- make it another method of ``methods.METHODS`` (``--gmp`` turns sparsegpt into magnitude, ``--act-order``
  uniform into act-order): ``methods.identify`` of the configuration with and without the flag;
- name the outputs the sweep gives each configuration (--json, --analysis-dir).

The rule is computed from the vocabulary and the real flag parser, not listed by hand: a method added to
``methods.py`` is covered as it is.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from miq import methods
from miq.errors import ConfigError
from miq.run import config
from miq.run.config import RunConfig

# a configuration's opt_mi.py arguments, with the --extra flags (True) or without them (False)
ArgsOf = Callable[[methods.SweepConfig, bool], list[str]]

# the settings the matrix sets for every configuration (its point), and the sweep option that sets them
OWNED = {"sparsity": "--sparsities", "prunen": "--sparsities", "prunem": "--sparsities", "wbits": "--wbits",
         "seed": "--seeds", "groups": "--groups"}
SWEEP_OUTPUTS = {"json": "OUT/<id>.json", "analysis_dir": "OUT/analysis/<id>"}  # set per configuration
_OPTIONS = {s: a.dest for a in config.build_parser()._actions for s in a.option_strings}


def dest(flag: str) -> str | None:
    """The RunConfig field an opt_mi.py flag sets, as argparse reads it (``--flag=value`` and unambiguous
    abbreviations included); None for an unknown one (opt_mi.py's parser refuses it later)."""
    name = flag.split("=", 1)[0]
    if name in _OPTIONS:
        return _OPTIONS[name]
    found = {d for s, d in _OPTIONS.items() if s.startswith(name)} if name.startswith("--") else set()
    return found.pop() if len(found) == 1 else None


def items(extra: tuple[str, ...]) -> list[list[str]]:
    """--extra split into flags with their values: a new item at each word that starts with a dash (a
    negative number is a value)."""
    out: list[list[str]] = []
    for word in extra:
        if re.match(r"-[-A-Za-z]", word) or not out:
            out.append([word])
        else:
            out[-1].append(word)
    return out


def _method(cfg: RunConfig) -> str | None:
    try:
        return methods.identify(cfg).id
    except ValueError:
        return None


def _parse(args: list[str]) -> RunConfig | None:
    try:
        return config.parse(args)
    except ConfigError:  # check_matrix says what is wrong with it, naming the configuration
        return None


def check(extra: tuple[str, ...], configs: list[methods.SweepConfig], args_of: ArgsOf) -> None:
    """ConfigError naming the first --extra flag that would set what the matrix sets (see the module's doc)."""
    if not extra:
        return
    flags = items(extra)
    for item in flags:
        field = dest(item[0])
        if field in SWEEP_OUTPUTS:
            raise ConfigError(f"--extra {item[0].split('=')[0]}: the sweep sets it per configuration "
                              f"({SWEEP_OUTPUTS[field]}); use --out")
    for cfg in configs:
        if cfg.skip is None:
            _check_one(cfg, flags, args_of)


def _check_one(cfg: methods.SweepConfig, flags: list[list[str]], args_of: ArgsOf) -> None:
    base, new = _parse(args_of(cfg, False)), _parse(args_of(cfg, True))
    if base is None or new is None:
        return
    grouped = methods.BY_ID[cfg.id.split("_")[0]].per_k  # K is the matrix's only where the method has groups
    owned = {f: o for f, o in OWNED.items() if f != "groups" or grouped}
    owned.update({d: "--methods" for f in cfg.flags if (d := dest(f)) and d not in owned})
    for field, option in owned.items():
        was, now = getattr(base, field), getattr(new, field)
        if was != now:
            flag = next((it[0] for it in flags if dest(it[0]) == field), flags[0][0]).split("=")[0]
            raise ConfigError(f"--extra {flag}: the matrix sets {field} per configuration ({cfg.id} has {was}; "
                             f"--extra would make it {now}); use {option}")
    if (was := _method(base)) != (now := _method(new)):
        culprit = next((it for it in flags if (one := _parse([*args_of(cfg, False), *it])) is not None
                        and _method(one) != was), flags[0])
        raise ConfigError(f"--extra {culprit[0].split('=')[0]}: it would make configuration {cfg.id} a {now} run, "
                         f"not the {was} its id says; use --methods")
