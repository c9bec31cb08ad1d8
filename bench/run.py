"""Run benchmark cases and append their rows to bench/results/<device>/<suite>.jsonl (on a CPU: <tmp>/fastseg3d-bench).

    python -m bench.run [ops|model] [--case NAME ...] [--dtype fp32,bf16] [--modes fwd,bwd,fwd+bwd,train_step,infer]
                        [--providers default,NAME,GLOB,all] [--shapes GLOB,...] [--quick] [--out DIR] [--plot]
                        [--json [PATH]] [--csv PATH] [--time-limit SECONDS] [--list] [--report]

The optional suite runs every case of that suite (``--case`` narrows it). Without ``--providers`` each case runs
its default providers; ``--providers`` takes names, shell globs (``'*compile*'``) and the words ``default`` and
``all``; ``--shapes`` keeps the shapes whose label matches one of its globs (``'2x32x128^3*'``; ``--list`` shows
the labels). A mode, provider pattern or shape pattern that selects nothing in the chosen cases is an error, not
an empty run. ``--json`` prints the rows as JSON lines instead of the table; ``--json PATH`` writes them to PATH as
one JSON array (the table is still printed), ``--csv PATH`` as CSV, one row a line. ``--report`` measures nothing:
it prints the table (and ``--plot``s) of the rows already under ``--out``. On a CPU the timings only exercise the
harness (``--quick``); they say nothing about a GPU kernel, and the compiled providers are left out unless asked
for.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fnmatch
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import utils
from bench.registry import (
    COMPILE_MODES,
    COMPILED_PEERS,
    CUDA_GRAPH,
    MODEL_MODES,
    MODES,
    SUITES,
    Case,
    Unavailable,
    compile_variant,
    load_cases,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class _TimeUp(Exception):
    """The run's --time-limit passed: no new measurement starts."""


def _closure(setup, mode: str):
    if setup.runners is not None:
        return setup.runners.get(mode)
    if mode == "fwd":
        def fn():
            with torch.no_grad():
                return setup.forward()
        return fn
    y = setup.forward()
    # a loss is backpropagated with 1, as loss.backward() does; a tensor output with random values
    g = torch.ones_like(y) if y.numel() == 1 else torch.randn_like(y)
    if mode == "bwd":
        def fn():
            y.backward(g, retain_graph=True)
        return fn

    def fn():
        setup.forward().backward(g)
    return fn


def _graph_steps(fn, setup):
    """A CUDA-graph provider's call as one training step: a new step for the graph trees (the previous step's
    outputs may be overwritten), and no gradient accumulated into the previous step's graph outputs."""
    def step():
        torch.compiler.cudagraph_mark_step_begin()
        for t in setup.grads_of or ():
            t.grad = None
        return fn()
    return step


@contextlib.contextmanager
def _eager_loss_seeds():
    """The fused losses' backward returns the gradient its forward made as it is where the incoming gradient is 1
    (``ops.utils.scaled_grads``), which it learns by reading that gradient back (``ops.utils.unit_grad``): not
    allowed in a capture, where it scales the gradient instead, a pass over every gradient that the eager call does
    not make. Here each decision of the eager warm-up calls is recorded and the capture repeats the first call's, in
    order, so that the graph holds the eager call's GPU work."""
    from fastseg3d.ops import utils as op_utils

    original = op_utils.unit_grad
    decisions: list[bool] = []
    replayed = [0]

    def unit_grad(grad_out):
        if not torch.cuda.is_current_stream_capturing():
            decisions.append(original(grad_out))
            return decisions[-1]
        i, replayed[0] = replayed[0], replayed[0] + 1
        return i < len(decisions) and decisions[i]

    op_utils.unit_grad = unit_grad
    try:
        yield
    finally:
        op_utils.unit_grad = original


def _graph_ms(fn, setup, device: torch.device, label: str) -> float | None:
    """Median time of ``fn`` captured in one CUDA graph and replayed: the GPU's own time for the call, without the
    host's time to issue it, which on a slow host can exceed it (None where the call cannot be captured)."""
    from bench.models import graphed

    replay = None
    try:
        with _eager_loss_seeds():
            replay = graphed(fn, list(setup.grads_of or ()), device)
        ms = utils.time_ms(replay, device, rep=100)[0]
    except Exception as err:  # noqa: BLE001  (a call that cannot be captured loses this column only)
        if utils.device_lost(err):
            raise  # no clean-up: every CUDA call would raise again
        print(f"  {label}: no graph time ({utils.first_line(err)})", file=sys.stderr)
        ms = None
    replay = None  # noqa: F841  (the graph and its memory pool go with it)
    _free(device)
    return ms


def select_providers(case: Case, spec: dict, patterns: list[str] | None, device: torch.device) -> list[str]:
    """The providers of ``case`` at ``spec`` that this run measures (see the module docstring)."""
    names = case.providers(spec)
    optional = case.optional(spec)
    defaults = [n for n in names if n not in optional]
    if not patterns:
        if device.type != "cuda":
            # Inductor on a CPU takes minutes per graph and its timing means nothing for the GPU comparison.
            defaults = [n for n in defaults if compile_variant(n) is None]
        return defaults
    keep = set()
    for p in patterns:
        if p == "all":
            keep.update(names)
        elif p == "default":
            keep.update(defaults)
        else:
            keep.update(n for n in names if fnmatch.fnmatchcase(n, p))
    return [n for n in names if n in keep]


def default_out(device_name: str, device: torch.device) -> Path:
    """bench/results/<device> on a GPU; on a CPU <tmp>/fastseg3d-bench/<device> (it accumulates like the results
    folder), so smoke runs never land among the results."""
    if device.type == "cuda":
        return utils.RESULTS / utils.device_slug(device_name)
    return Path(tempfile.gettempdir()) / "fastseg3d-bench" / utils.device_slug(device_name)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _shape_selected(label: str, patterns: list[str] | None) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(label, p) for p in patterns)


def _check_selection(parser, cases: list[Case], modes: list[str], providers: list[str] | None,
                     shapes: list[str] | None, quick: bool) -> None:
    """parser.error for a mode or pattern that matches nothing in ``cases`` (a typo would otherwise measure
    nothing and exit 0)."""
    unknown = [m for m in modes if m not in MODES + MODEL_MODES]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from {', '.join(MODES + MODEL_MODES)}")
    if not any(m in case.modes for case in cases for m in modes):
        parser.error(f"no selected case has the mode(s) {modes}")
    labels = [(case, label, spec) for case in cases for label, spec in case.shapes(quick)]
    for p in shapes or ():
        if not any(fnmatch.fnmatchcase(label, p) for _, label, _ in labels):
            parser.error(f"--shapes pattern {p!r} matches no shape of the selected cases; shapes: "
                         + ", ".join(label for _, label, _ in labels))
    names = {n for case, label, spec in labels if _shape_selected(label, shapes) for n in case.providers(spec)}
    for p in providers or ():
        if p not in ("all", "default") and not any(fnmatch.fnmatchcase(n, p) for n in names):
            parser.error(f"--providers pattern {p!r} matches no provider of the selected cases; providers: "
                         + ", ".join(sorted(names)))


def run_case(case: Case, dtypes, modes, providers, quick, device, env, ceilings, rows_path: Path,
             deadline: float | None = None, rows: list[dict] | None = None,
             shapes: list[str] | None = None) -> list[dict]:
    """Measure every (shape, dtype, provider, mode) of ``case``; each row is appended to ``rows_path`` and to
    ``rows`` at once, so a run stopped by a time limit keeps what it measured. Raises ``_TimeUp`` once
    ``deadline`` has passed."""
    rows = [] if rows is None else rows
    # a model step takes 0.1-1 s: 100 ms of repetitions would leave one sample for the median and quantiles
    rep = 1000 if case.suite == "model" else 100
    case_modes = [m for m in modes if m in case.modes]
    after_compiled = False
    for label, spec in case.shapes(quick):
        if not _shape_selected(label, shapes):
            continue
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            for provider in select_providers(case, spec, providers, device):
                if deadline is not None and time.monotonic() > deadline:
                    raise _TimeUp(f"{case.name} {label} {dtype_name} {provider}")
                compiles = compile_variant(provider) is not None or provider in COMPILED_PEERS
                if compiles or after_compiled:
                    # a fresh cache per compiled setup: no recompile limit reached silently (which would run
                    # eager); and after one, no compiled graph's memory (a reduce-overhead pool) in the next's peak
                    torch._dynamo.reset()
                after_compiled = compiles
                try:
                    setup = case.setup(spec, dtype, provider, device)
                except Unavailable as err:
                    print(f"  {case.name} {label} {dtype_name} {provider}: skipped ({err})", file=sys.stderr)
                    continue
                except torch.OutOfMemoryError:
                    print(f"  {case.name} {label} {dtype_name} {provider}: out of memory in setup", file=sys.stderr)
                    setup = None
                except Exception as err:  # noqa: BLE001  (a peer that rejects the case must not stop the others)
                    if utils.device_lost(err):
                        raise utils.DeviceLost(f"{case.name} {label} {dtype_name} {provider}: "
                                               f"{utils.first_line(err)}") from err
                    print(f"  {case.name} {label} {dtype_name} {provider}: skipped ({utils.error_summary(err)})",
                          file=sys.stderr)
                    continue
                if setup is None:
                    _free(device)  # outside the except block, whose traceback holds the failed setup's tensors
                    continue
                for mode in case_modes:
                    if deadline is not None and time.monotonic() > deadline:
                        raise _TimeUp(f"{case.name} {label} {dtype_name} {provider} {mode}")
                    try:
                        fn = _closure(setup, mode)
                        if fn is None:
                            continue
                        replayed = COMPILE_MODES.get(compile_variant(provider)) == "reduce-overhead"
                        if replayed:
                            fn = _graph_steps(fn, setup)
                        med, p20, p80 = utils.time_ms(fn, device, grad_to_none=setup.grads_of, rep=rep)
                        # a graph's replay allocates nothing: its buffers stay in the pool captured with it
                        peak = (None if replayed or provider.endswith(CUDA_GRAPH)
                                else utils.peak_memory_mb(fn, device, grad_to_none=setup.grads_of))
                        host = utils.host_ms(fn, device, grad_to_none=setup.grads_of)
                        what = f"{case.name} {label} {dtype_name} {mode} {provider}"
                        # not for bwd rows: their forward ran before, outside the capture, and autograd would run
                        # the backward on that forward's stream rather than the capturing one
                        graph = (_graph_ms(fn, setup, device, what) if case.suite == "ops" and mode != "bwd"
                                 and device.type == "cuda" and not replayed else None)
                    except torch.OutOfMemoryError:
                        print(f"  {case.name} {label} {dtype_name} {mode} {provider}: out of memory", file=sys.stderr)
                        fn = None
                    except Exception as err:  # noqa: BLE001  (likewise, at the first call: compile errors)
                        if utils.device_lost(err):
                            raise utils.DeviceLost(f"{case.name} {label} {dtype_name} {mode} {provider}: "
                                                   f"{utils.first_line(err)}") from err
                        print(f"  {case.name} {label} {dtype_name} {mode} {provider}: skipped "
                              f"({utils.error_summary(err)})", file=sys.stderr)
                        continue
                    if fn is None:
                        _free(device)  # outside the except block, whose traceback holds the step's tensors
                        continue
                    bandwidth = utils.bandwidth_pct(setup, mode, ceilings, med)  # the copy, measured at start
                    exp = utils.exp_pct(setup, mode, ceilings, med)
                    try:
                        roof, bound = utils.roofline(setup, mode, dtype, ceilings, med)
                    except Exception as err:  # noqa: BLE001  (a ceiling that cannot be measured loses its column)
                        print(f"  {case.name} {label} {dtype_name} {mode}: no roofline ({utils.first_line(err)})",
                              file=sys.stderr)
                        roof, bound = None, None
                    row = {"suite": case.suite, "case": case.name, "shape": label, "dtype": dtype_name, "mode": mode,
                           "provider": provider, "median_ms": med, "p20_ms": p20, "p80_ms": p80,
                           "host_ms": host, "graph_ms": graph, "peak_mem_mb": peak, "roofline_pct": roof,
                           "roofline_bound": bound, "bandwidth_pct": bandwidth, "exp_pct": exp,
                           "backend": setup.backend, **env}
                    utils.write_rows([row], rows_path)
                    rows.append({k: row.get(k) for k in utils.ROW_KEYS})
                    print(f"  {case.name} {label} {dtype_name} {mode} {provider}: {med:.4f} ms", file=sys.stderr)
                fn = setup = None  # the last closure holds the setup (a model, a captured graph) too
                _free(device)
    return rows


def _selected_cases(cases: dict[str, Case], suite: str | None, names: list[str] | None,
                    parser: argparse.ArgumentParser) -> list[Case]:
    if names:
        wrong = [n for n in names if suite and cases[n].suite != suite]
        if wrong:
            parser.error(f"case(s) {', '.join(wrong)} are not in the {suite!r} suite")
        return [cases[n] for n in dict.fromkeys(names)]  # a case named twice is measured once
    return [c for _, c in sorted(cases.items()) if suite is None or c.suite == suite]


def _emit(rows: list[dict], by_case: dict[str, list[dict]], args, out: Path) -> None:
    if args.json == "-":
        for row in rows:
            print(json.dumps(row))
    else:
        print(utils.format_table(rows))
    if args.json not in (None, "-"):
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows, indent=1) + "\n")
    if args.csv is not None:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=utils.ROW_KEYS)
            writer.writeheader()
            writer.writerows(rows)
    if args.plot:
        for name, case_rows in by_case.items():
            if case_rows:
                utils.plot_rows(case_rows, out / f"{name}.png")


def main(argv: list[str] | None = None, prog: str = "python -m bench.run") -> int:
    """The command line (see the module docstring); returns the exit status."""
    cases = load_cases()
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", nargs="?", choices=SUITES, help="run every case of this suite")
    parser.add_argument("--case", action="append", choices=sorted(cases), help="repeatable; default: all")
    parser.add_argument("--dtype", default=None, help="comma list of fp32,fp16,bf16 (default: the case's; models: "
                                                      "bf16/fp16 mean autocast)")
    parser.add_argument("--modes", default=",".join(MODES + MODEL_MODES))
    parser.add_argument("--providers", default=None,
                        help="comma list of provider names, globs, 'default' or 'all' (default: each case's defaults)")
    parser.add_argument("--shapes", default=None, help="comma list of globs on the shape labels (default: all)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test of the harness")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default: bench/results/<device>; CPU: <tmp>/fastseg3d-bench/<device>)")
    parser.add_argument("--plot", action="store_true", help="write <case>.png beside the rows")
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                        help="print JSON lines instead of the table; with PATH, write the rows there as a JSON array")
    parser.add_argument("--csv", type=Path, default=None, metavar="PATH", help="write the rows to PATH as CSV")
    parser.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                        help="start no measurement after this many seconds (what was measured is kept)")
    parser.add_argument("--list", action="store_true",
                        help="list the cases, their suites, shape labels (--quick: the tiny ones) and providers, and "
                             "exit")
    parser.add_argument("--report", action="store_true",
                        help="measure nothing: table (and --plot) of the rows already in --out")
    args = parser.parse_args(argv)
    utils.show_fallbacks()
    selected = _selected_cases(cases, args.suite, args.case, parser)

    if args.list:
        for case in selected:
            print(f"{case.name} ({case.suite}; {', '.join(case.modes)}; {', '.join(case.dtypes)})")
            # shapes grouped by their (default, optional) providers, which can differ (volumes and tokens)
            groups: dict[tuple, list[str]] = {}
            for label, spec in case.shapes(args.quick):
                optional = case.optional(spec)
                default = tuple(p for p in case.providers(spec) if p not in optional)
                groups.setdefault((default, tuple(optional)), []).append(label)
            for (default, optional), labels in groups.items():
                print(f"    shapes:   {', '.join(labels)}")
                print(f"    default:  {', '.join(default)}")
                if optional:
                    print(f"    optional: {', '.join(optional)}")
        return 0

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = utils.environment(device)
    out = args.out or default_out(env["device"], device)
    # before anything is measured: a path that cannot take the results would lose them at the end
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} is a file, not a folder")
    for flag, path in (("--json", args.json if args.json != "-" else None), ("--csv", args.csv)):
        if path is not None and Path(path).is_dir():
            parser.error(f"{flag} {path} is a folder: give the file to write the rows to")

    if args.report:
        names = {c.name for c in selected}
        rows = []
        for suite in SUITES:
            path = out / f"{suite}.jsonl"
            if path.exists():
                rows += utils.timing_rows([r for r in utils.read_rows(path) if r.get("case") in names], str(path))
        if not rows:
            print(f"no rows of {', '.join(sorted(names))} under {out}", file=sys.stderr)
            return 1
        by_case = {}
        for r in rows:
            by_case.setdefault(r["case"], []).append(r)
        _emit(rows, by_case, args, out)
        return 0

    start = time.monotonic()
    deadline = start + args.time_limit if args.time_limit is not None else None
    ceilings = utils.Ceilings(device) if device.type == "cuda" else None
    if ceilings is not None:
        print(f"measured ceilings: {ceilings.describe()}", file=sys.stderr)
    elif not args.providers:
        print("no GPU: the compiled and GPU-only providers are left out or skipped; the timings only exercise "
              "the harness", file=sys.stderr)
    modes = [m for m in args.modes.split(",") if m]
    providers = args.providers.split(",") if args.providers else None
    shapes = args.shapes.split(",") if args.shapes else None
    _check_selection(parser, selected, modes, providers, shapes, args.quick)
    all_rows: list[dict] = []
    by_case: dict[str, list[dict]] = {}
    status = 0
    for case in selected:
        dtypes = args.dtype.split(",") if args.dtype else list(case.dtypes)
        unknown = [d for d in dtypes if d not in DTYPES]
        if unknown:
            parser.error(f"unknown dtype(s) {unknown}; choose from {sorted(DTYPES)}")
        rows = by_case.setdefault(case.name, [])
        try:
            run_case(case, dtypes, modes, providers, args.quick, device, env, ceilings,
                     out / f"{case.suite}.jsonl", deadline, rows, shapes)
        except _TimeUp as stop:
            print(f"time limit ({args.time_limit:.0f} s) reached before {stop}; later measurements skipped",
                  file=sys.stderr)
            break
        except utils.DeviceLost as lost:
            print(f"the GPU's context is lost at {lost}; the rows measured before are written, the rest of this run "
                  "is not measured (run the cases left in a new process)", file=sys.stderr)
            status = 1
            break
        finally:
            all_rows += rows
    _emit(all_rows, by_case, args, out)
    print(f"rows appended under {out}", file=sys.stderr)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
