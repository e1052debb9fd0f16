"""The one grammar for target-module names: which linears quantization and LoRA act on.

A spec is a preset (``attn``, ``mlp``, ``all``), a comma list of presets and module names matched as suffixes of full
module names (``q_proj``, ``self_attn.q_proj``), or ``re:<regex>`` matched with ``re.fullmatch`` against full names.
``parse_targets`` reads a spec (``--lora-targets``, an adapter's ``target_modules``); ``resolve_targets`` narrows it
to the LLaMA block linears quantization knows (``--targets``). A regex is accepted only when matching it cannot hang
(``check_target_regex``).
"""

from __future__ import annotations

import re
from typing import Any

from gptqlora.errors import UsageError

# Block-relative names of the LLaMA decoder-block linears (quantization's stage order is quant.driver.STAGES).
ATTN_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP_TARGETS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
ALL_TARGETS = ATTN_TARGETS + MLP_TARGETS
TARGET_PRESETS = {"attn": ATTN_TARGETS, "mlp": MLP_TARGETS, "all": ALL_TARGETS}

# A target regex comes from --lora-targets or from a stranger's adapter_config.json, and Python's re has no timeout:
# "(.*.*)*X" backtracks for hours on a 30-character module name. So a regex is accepted only when the work of
# matching it is bounded before it is ever run (``_regex_ways``).
# Our own adapters write a '|' join of escaped full names when short names would select other layers too
# (lora/adapter.py); 126 layers of 7 linears less one layer is ~31 KB, and 64 KB still compiles in ~0.1 s.
MAX_TARGET_REGEX_CHARS = 65_536
# Upper bound on the ways a regex may match one module name (its backtracking paths: each choice of an alternative
# or of a repeat count), counted for a name of _REGEX_NAME_CHARS characters: three '.*' make 65**3 ~ 2.7e5, four
# 1.8e7. A path costs < 0.1 us (2**23 paths of alternatives took 0.7 s), so an accepted regex spends < 0.1 s a name.
MAX_TARGET_REGEX_WAYS = 10**6
_REGEX_NAME_CHARS = 64  # "model.layers.31.self_attn.q_proj" is 32; multimodal and MoE names reach ~55


class _NestedRepeat(Exception):
    """A repeat, unbounded or longer than a name, of a part that can itself match in several ways."""


def _regex_ways(items: Any, n: int = _REGEX_NAME_CHARS) -> int:
    """An upper bound on the ways the parsed regex ``items`` (``re._parser.parse``) can match an n-character name.

    Sequences multiply, alternatives add, a repeat of a single-way part chooses its count (at most n + 1 ways);
    capped at MAX_TARGET_REGEX_WAYS + 1 so the arithmetic stays small.

    Raises:
        _NestedRepeat: for a repeat of more than n of a part with several ways ("(.*)*", "(a|ab)*"): exponential.
    """
    from re import _constants as sre

    cap = MAX_TARGET_REGEX_WAYS + 1
    total = 1
    for op, av in items:
        if op is sre.BRANCH:
            ways = sum(_regex_ways(alt, n) for alt in av[1])
        elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT):
            lo, hi, body = av
            inner = _regex_ways(body, n)
            counts = max(1, min(hi, n) - lo + 1)  # the repeat counts it can try on an n-character name
            if inner > 1 and hi > n:
                raise _NestedRepeat
            ways = counts if inner == 1 else sum(inner ** c for c in range(lo, min(hi, n) + 1))
        elif op is sre.SUBPATTERN:
            ways = _regex_ways(av[3], n)
        elif op in (sre.ASSERT, sre.ASSERT_NOT):
            ways = _regex_ways(av[1], n)
        elif op is sre.ATOMIC_GROUP:
            ways = _regex_ways(av, n)
        elif op is sre.GROUPREF_EXISTS:
            ways = _regex_ways(av[1], n) + (_regex_ways(av[2], n) if av[2] is not None else 1)
        else:  # one character, a class, an anchor or a back-reference: one way
            ways = 1
        total = min(cap, total * min(cap, ways))
    return total


def check_target_regex(pattern: str, where: str = "--lora-targets") -> re.Pattern:
    """Compile a target regex after checking that matching it cannot hang.

    Args:
        pattern: the regex, matched with ``re.fullmatch`` against full module names.
        where: where it came from, for the message (``"--lora-targets"``, an adapter's config file).
    Returns:
        The compiled regex.
    Raises:
        UsageError: an invalid regex, one longer than MAX_TARGET_REGEX_CHARS, one with nested repeats, or one with
            more than MAX_TARGET_REGEX_WAYS ways to match a name.
    """
    shown = repr(pattern[:80] + ("..." if len(pattern) > 80 else ""))
    instead = "list the module names instead (e.g. q_proj,v_proj)"
    if len(pattern) > MAX_TARGET_REGEX_CHARS:
        raise UsageError(f"{where}: the target regex {shown} is {len(pattern)} characters, more than "
                         f"{MAX_TARGET_REGEX_CHARS}: {instead}")
    try:
        compiled = re.compile(pattern)
        from re import _parser as sre_parse  # the parse re.compile made, to walk; no public API gives it
        ways = _regex_ways(sre_parse.parse(pattern))
    except re.error as e:
        raise UsageError(f"{where}: the target regex {shown} is invalid ({e}): give a Python regex, or "
                         f"{instead}") from None
    except _NestedRepeat:
        raise UsageError(f"{where}: the target regex {shown} repeats a part that itself repeats or alternates "
                         "(as in '(.*)*' or '(a|ab)*'), which can take hours to match a module name: "
                         f"{instead}, or a regex without nested repeats") from None
    if ways > MAX_TARGET_REGEX_WAYS:
        raise UsageError(f"{where}: the target regex {shown} has too many repeats and alternatives in a row (more "
                         f"than {MAX_TARGET_REGEX_WAYS:,} ways to match a {_REGEX_NAME_CHARS}-character name), "
                         f"which can take hours to match: {instead}, or a regex with fewer '.*'")
    return compiled


def parse_targets(spec: str | list[str] | tuple[str, ...],
                  where: str = "--lora-targets") -> tuple[str, ...] | re.Pattern:
    """The one grammar for target-module names (quantization and LoRA read it alike).

    Args:
        spec: ``"attn"`` (q/k/v/o), ``"mlp"``, ``"all"``, a comma-separated list (or a list) of presets and module
            names matched as suffixes of full module names (``q_proj``, ``self_attn.q_proj``), or ``"re:<regex>"``
            matched with ``re.fullmatch`` against full module names.
        where: where the spec came from, named in errors (an option, or an adapter's config file).
    Returns:
        The name suffixes, presets expanded and duplicates dropped, or the compiled regex.
    Raises:
        UsageError: an empty spec, or a regex that is invalid or could take too long to match
            (``check_target_regex``).
    """
    if isinstance(spec, str) and spec.startswith("re:"):
        return check_target_regex(spec[3:], where)
    entries = [t.strip() for t in spec.split(",")] if isinstance(spec, str) else [str(t).strip() for t in spec]
    out: list[str] = []
    for entry in filter(None, entries):
        for name in TARGET_PRESETS.get(entry, (entry,)):
            if name not in out:
                out.append(name)
    if not out:
        raise UsageError(f"{where}: no targets given ({spec!r}): use 'attn', 'mlp', 'all', names such as "
                         "'q_proj,v_proj', or 're:<regex>'")
    return tuple(out)


def resolve_targets(targets: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Block-relative names of the LLaMA block linears a quantization target spec selects, in true-sequential order.

    Raises:
        UsageError: for a regex, or a name that is not a LLaMA block linear.
    """
    parsed = parse_targets(targets, where="--targets")
    if isinstance(parsed, re.Pattern):
        raise UsageError("quantization targets take names, not a regex: use 'attn', 'mlp', 'all' or a list such as "
                         "'q_proj,v_proj'")
    chosen = []
    for t in parsed:
        full = next((name for name in ALL_TARGETS if name == t or name.split(".")[-1] == t), None)
        if full is None:
            raise UsageError(f"unknown quantization target {t!r}: use 'attn', 'mlp', 'all' or a comma-separated "
                             f"list of {', '.join(n.split('.')[-1] for n in ALL_TARGETS)}")
        chosen.append(full)
    return tuple(n for n in ALL_TARGETS if n in chosen)
