"""bench/gpu_check.sh, the one script a short and rare GPU session runs: if it misbehaves there, the session is lost.

Two tests run it for real (the setting checks; one quick case end to end with a stand-in nvidia-smi). The rest run
it with stand-ins first on PATH, so that each run takes a fraction of a second: a ``python3`` that records its
arguments and the environment it was given and answers as the test asks (exit status, output, files), a
``timeout`` that records the box and runs the command, ``nproc`` and ``nvidia-smi``; and a frozen clock (bash's
``SECONDS`` made an ordinary variable through ``BASH_ENV``), so that every box is the exact arithmetic on BUDGET.
They pin the control flow: the test tier's box and pytest's exit codes, the plans' tables and arguments, the
boxes, reserve and ``--time-limit`` of each step, what was not run, the report, the archive and the exit status.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from bench.utils import gpu_check_target_args

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
TAIL = 30  # the script's time kept back for the report and the archive

# python3 for the script (bash: a Python stand-in costs 20 ms a call): one record per call in the log (its kind,
# the box its stand-in `timeout` gave it, the environment it saw, its arguments; fields split by \x1f, records by
# \x1e); what it does comes from the spec folder the test writes (see the fixture), keyed by the call's kind
STAND_IN_PYTHON = r"""#!/bin/bash
S=@SPEC@
listed() { local line; while IFS= read -r line; do [ "$line" = "$2" ] && return 0; done < "$S/$1"; return 1; }
value() { local v; if [ -n "${!1+x}" ]; then v="s${!1}"; else v=u; fi; printf '%s\x1f' "$v"; }
file() { if [ -n "$1" ] && [ -f "$1" ]; then printf s; cat "$1"; printf '\x1f'; else printf 'u\x1f'; fi; }
if [ "$1" = -c ]; then
  case "$2" in
    *importlib.metadata*) key="dist $3" ;;
    *ptxas_variable*) key=ptxas ;;
    *git_commit*) key=commit ;;
    "import torch as t"*) key=torch ;;
    *find_spec*) key=optional ;;
    *) if [[ "$2" =~ ^import\ [A-Za-z0-9_]+$ ]]; then key="$2"; else key="-c ?"; fi ;;
  esac
elif [ "$1" = -m ]; then
  case "$2" in
    bench.run) key="bench.run --report"; prev=
       for a in "$@"; do [ "$prev" = --case ] && key="bench.run $a"; prev=$a; done ;;
    bench.tune|bench.host_profile|bench.warm_cache|fastseg3d) key="$2 $3" ;;
    pip) key="pip ${!#}" ;;
    *) key=$2 ;;
  esac
else
  key="?"
fi
{
  printf '%s\x1f%s\x1f%s\x1f' "$key" "${FAKE_BOX-}" "${FAKE_KILL-}"
  for v in @ENV_KEYS@; do value "$v"; done
  if [ "$key" = pytest ]; then file "${FASTSEG3D_RESULTS_LOG-}"; file "${FASTSEG3D_SKIP_PASSED-}"
  else printf 'u\x1fu\x1f'; fi
  printf '%s\x1d' "$@"
  printf '\x1e'
} >> @LOG@
rc=0
case "$key" in
  "dist "*) listed dists "${key#dist }" || rc=1 ;;
  ptxas|commit) if [ -f "$S/$key" ]; then cat "$S/$key"; else rc=1; fi ;;
  torch) echo "torch 9.9 stand-in cudnn 1" ;;
  optional) echo "optional: stand-in" ;;
  "import "*) listed missing "${key#import }" && rc=1 ;;
esac
d="$S/does/${key//\//%}"
if [ -d "$d" ]; then
  [ -f "$d/stdout" ] && cat "$d/stdout"
  for f in "$d"/append/*; do [ -f "$f" ] && var=${f##*/} && cat "$f" >> "${!var}"; done
  if [ -f "$d/out" ]; then
    prev=; for a in "$@"; do [ "$prev" = --out ] && cp "$d/out" "$a"; prev=$a; done
  fi
  [ -f "$d/sleep" ] && read -r t < "$d/sleep" && sleep "$t"
  [ -f "$d/signal" ] && read -r sig < "$d/signal" && kill "-$sig" $$
  [ -f "$d/rc" ] && read -r rc < "$d/rc"
fi
exit "$rc"
"""
# timeout for the script: records its box (and -k) for the command it runs, and runs it
STAND_IN_TIMEOUT = """#!/bin/sh
kill=
if [ "$1" = -k ]; then kill=$2; shift 2; fi
box=$1; shift
FAKE_BOX=$box FAKE_KILL=$kill exec "$@"
"""
ENV_KEYS = ["OMP_NUM_THREADS", "PYTHONPATH", "FASTSEG3D_COMMIT", "TRITON_CACHE_DIR", "PYTHONUNBUFFERED",
            "FASTSEG3D_SKIP_PASSED", "FASTSEG3D_RESULTS_LOG", "FASTSEG3D_FAILURE_LOG", "FASTSEG3D_DURATIONS_LOG",
            "TRITON_PTXAS_PATH"]


def _call(record: str) -> dict:
    """A stand-in python3's record: its kind, box, -k, environment (None where unset), its arguments, and for pytest
    what the results log and FASTSEG3D_SKIP_PASSED held when it started."""
    fields = record.split("\x1f")
    key, box, kill, *values, results, skip, args = fields
    values = [None if v == "u" else v[1:] for v in values]
    return {"key": key, "box": box or None, "kill": kill or None, "env": dict(zip(ENV_KEYS, values)),
            "results_at_start": None if results == "u" else results[1:],
            "skip_passed": None if skip == "u" else skip[1:], "args": args.split("\x1d")[:-1]}


# what the stand-in's runs print where the test does not say
DOES = {"bench.run --report": {"stdout": "REPORT TABLE\n"}, "bench.targets": {"stdout": "TARGETS REPORT\n"},
        "bench.warm_cache --report": {"stdout": "Triton cache: REPORT\n"}, "fastseg3d info": {"stdout": "INFO\n"}}
# the steps after the cases where nothing is asked: no sweep, no search, no profile
QUIET = {"LARGEST_CUBE_MODELS": "", "HOST_PROFILE_MODELS": ""}


class Run:
    """One run of the script under stand-ins: its exit status, its output, the stand-in python3's calls."""

    def __init__(self, proc: subprocess.CompletedProcess, log: Path, out: Path):
        self.rc, self.stdout, self.out = proc.returncode, proc.stdout + proc.stderr, out
        self.calls = [_call(record) for record in log.read_text().split("\x1e")[:-1]] if log.exists() else []

    def called(self, key: str) -> list[dict]:
        return [c for c in self.calls if c["key"] == key]

    def one(self, key: str) -> dict:
        calls = self.called(key)
        assert len(calls) == 1, (key, [c["key"] for c in self.calls], self.stdout[-3000:])
        return calls[0]

    def keys(self, prefix: str) -> list[str]:
        return [c["key"] for c in self.calls if c["key"].startswith(prefix)]

    def archived(self, name: str) -> str | None:
        """A file from gpu_check.tgz (``results/targets.txt``, say); None where it holds none."""
        with tarfile.open(self.out / "gpu_check.tgz") as tar:
            try:
                return tar.extractfile(f"./{name}").read().decode()
            except KeyError:
                return None

    def __repr__(self):  # what an assertion shows
        return f"Run(rc={self.rc})\n{self.stdout[-4000:]}"


@pytest.fixture
def gpu_check(tmp_path):
    """``gpu_check(env, ...)`` runs the script once under stand-ins in a directory of its own (its working
    directory, with ``out/`` as OUT; "@HOME@" in a value of ``env`` names it) and returns a Run. ``does``: a call's
    kind (``pytest``, ``bench.run <case>``, ``bench.tune <op>``, ``pip <wheel>``, ...) -> what it does: ``rc``,
    ``stdout``, ``sleep``, ``signal`` (kills itself), ``out`` (written to its --out path), ``append`` ({variable
    naming a file: text}); ``missing``: the modules ``import`` fails on; ``dists``: the distributions installed;
    ``ptxas``, ``commit``: the queries' answers (None: the query fails); ``files``: written in the directory first.
    The clock stands still unless clock="real"; a bash error in the script fails the test."""
    count = [0]

    def run(env: dict | None = None, *, does: dict | None = None, missing=(), dists=(), ptxas=None,
            commit="c0ffee", nproc=16, clock="frozen", files: dict | None = None) -> Run:
        count[0] += 1
        home = tmp_path / f"run{count[0]}"
        bin_dir = home / "bin"
        bin_dir.mkdir(parents=True)
        spec, log = home / "spec", home / "calls.log"
        (spec / "does").mkdir(parents=True)
        (spec / "missing").write_text("".join(f"{m}\n" for m in missing))
        (spec / "dists").write_text("".join(f"{d}\n" for d in dists))
        for name, answer in (("ptxas", ptxas), ("commit", commit)):
            if answer is not None:
                (spec / name).write_text(answer + "\n")
        for key, what in {**DOES, **(does or {})}.items():
            d = spec / "does" / key.replace("/", "%")
            (d / "append").mkdir(parents=True)
            for name, text in what.items():
                if name == "append":
                    for var, appended in text.items():
                        (d / "append" / var).write_text(appended)
                else:  # a number ends with its newline, for bash's read
                    (d / name).write_text(text if isinstance(text, str) else f"{text}\n")
        stand_ins = {"python3": STAND_IN_PYTHON.replace("@SPEC@", str(spec)).replace("@LOG@", str(log))
                     .replace("@ENV_KEYS@", " ".join(ENV_KEYS)), "timeout": STAND_IN_TIMEOUT,
                     "nproc": f"#!/bin/sh\necho {nproc}\n", "nvidia-smi": "#!/bin/sh\necho 'Stand-in GPU, 0.0'\n"}
        for name, text in stand_ins.items():
            (bin_dir / name).write_text(text)
            (bin_dir / name).chmod(0o755)
        for name, text in (files or {}).items():
            (home / name).parent.mkdir(parents=True, exist_ok=True)
            (home / name).write_text(text)
        full_env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(home), "OUT": str(home / "out")}
        if clock == "frozen":  # SECONDS an ordinary variable: no time passes for the script (started at 1000 s)
            (home / "frozen.sh").write_text("unset SECONDS; SECONDS=1000\n")
            full_env["BASH_ENV"] = str(home / "frozen.sh")
        full_env.update({k: v.replace("@HOME@", str(home)) for k, v in (env or {}).items()})
        proc = subprocess.run(["bash", str(SCRIPT)], cwd=home, env=full_env, capture_output=True, text=True,
                              timeout=60)
        # a bash error (arithmetic on an empty or zero operand, an unbound variable) skips its command silently
        # (bash's report of a command killed by a signal, "line N:  <pid> Killed", is none)
        assert not re.search(r"gpu_check\.sh: line \d+: (?! *\d+ )", proc.stderr), proc.stderr
        return Run(proc, log, home / "out")

    return run


def _tables(plan: str) -> tuple[dict[str, int], dict[str, list[str]]]:
    """The script's LIMIT table for ``plan`` and its TARGET_ARGS (empty for PLAN=full), read from the script."""
    text = SCRIPT.read_text()
    blocks = re.findall(r"declare -A LIMIT=\((.*?)\n  \)", text, re.S)
    limits = {k: int(v) for k, v in re.findall(r"\[(\w+)\]=(\d+)", blocks[0 if plan == "targets" else 1])}
    return limits, gpu_check_target_args() if plan == "targets" else {}


def _time_limit(box: int) -> int:
    """bench.run's --time-limit in a box of ``box`` seconds: 15 s short of it, half of a box under 30 s."""
    return box - 15 if box >= 30 else box // 2


def _bench_run_args(case: str, out: Path, box: int, *args: str) -> list[str]:
    return ["-m", "bench.run", "--case", case, "--out", f"{out}/results", "--time-limit", str(_time_limit(box)),
            *args]


# --- moved from tests/test_bench.py: the script for real ----------------------------------------------------------

def _write_wheel(path, name: str, tag: str) -> None:
    """A minimal wheel of an empty package ``name`` (what pip needs: the package, METADATA, WHEEL, RECORD)."""
    import zipfile

    info = f"{name}-0.1.dist-info"
    files = {f"{name}/__init__.py": "", f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n",
             f"{info}/WHEEL": f"Wheel-Version: 1.0\nGenerator: fastseg3d-tests\nRoot-Is-Purelib: true\nTag: {tag}\n"}
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as z:
        for f, text in files.items():
            z.writestr(f, text)


def test_gpu_check_script_runs_end_to_end(tmp_path):
    """The whole script on a CPU (a GPU session is short, so it must not fail there first): a stand-in
    nvidia-smi, the project's install left as it is, one quick case; it leaves the three files a device call
    brings back, and the archive holds the rows, the table, the targets report and the logs."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'Stand-in GPU, 0.0, 0 MiB, 0 MHz'\n")
    (fake / "nvidia-smi").chmod(0o755)
    out = tmp_path / "out"
    # carried wheels: one this machine takes, one it refuses (a Windows tag), which must not keep the first out
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name, tag in (("fs3dprobe", "py3-none-any"), ("fs3drefused", "cp312-cp312-win_amd64")):
        _write_wheel(wheels / f"{name}-0.1-{tag}.whl", name, tag)
    # a carried Triton cache (bench/warm_cache.py) of one kernel: its entry, the group file naming it, the manifest
    from bench import warm_cache

    built = tmp_path / "built"
    (built / "KEY").mkdir(parents=True)
    (built / "KEY" / "_k.json").write_text("{}")
    (built / "KEY" / "__grp___k.json").write_text(json.dumps({"child_paths": {"_k.json": str(built / "KEY/_k.json")}}))
    warm_cache._pack(str(built), str(tmp_path / "cache.tgz"))
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "OUT": str(out), "SKIP_INSTALL": "1",
           "SKIP_TESTS": "1", "PLAN": "full", "BENCH_CASES": "selfreg", "LARGEST_CUBE_MODELS": "",
           "HOST_PROFILE_MODELS": "", "WHEELS": str(wheels), "WHEEL_SITE": str(tmp_path / "site"),
           "BENCH_ARGS": "--quick --dtype fp32 --modes fwd --providers fastseg3d", "BUDGET": "300",
           "TRITON_CACHE_TARBALL": str(tmp_path / "cache.tgz"), "TRITON_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"installed from {wheels}: fs3dprobe-0.1-py3-none-any.whl" in proc.stdout, proc.stdout[-3000:]
    assert f"could not install from {wheels}: fs3drefused-0.1-cp312-cp312-win_amd64.whl" in proc.stdout
    assert (tmp_path / "site" / "fs3dprobe" / "__init__.py").exists()
    assert f"Triton cache: 1 kernels carried into {tmp_path / 'cache'}" in proc.stdout, proc.stdout[-3000:]
    group = json.loads((tmp_path / "cache" / "KEY" / "__grp___k.json").read_text())
    assert group["child_paths"] == {"_k.json": str(tmp_path / "cache" / "KEY" / "_k.json")}
    assert "Triton cache: 1 kernels carried, 0 compiled in this run" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["bench_table.txt", "gpu_check.tgz", "info.txt"]
    listing = subprocess.run(["tar", "-tzf", str(out / "gpu_check.tgz")], capture_output=True, text=True,
                             check=True).stdout.split()
    for name in ("./results/ops.jsonl", "./results/targets.txt", "./results/info.txt", "./bench.log",
                 "./results/selfreg.png", "./triton_cache.txt"):
        assert name in listing, listing
    assert "not measured" in (out / "bench_table.txt").read_text()  # the targets report, on a CPU run


@pytest.mark.parametrize("env,message", [
    ({"TEST_TIMEOUT": "5m"}, "TEST_TIMEOUT=5m must be a whole number"),
    ({"BUDGET": "10m"}, "BUDGET=10m must be a whole number"),
    ({"CASE_LIMIT": "60s"}, "CASE_LIMIT=60s must be a whole number"),
    ({"LARGEST_CUBE_LIMIT": "-1"}, "LARGEST_CUBE_LIMIT=-1 must be a whole number"),
    ({"TEST_TIMEOUT": "090"}, "TEST_TIMEOUT=090 must be a whole number"),  # bash would read it as octal
    ({"TESTS_PASSED": "no/such/file.txt"}, "TESTS_PASSED=no/such/file.txt: no such file"),
])
def test_gpu_check_refuses_wrong_settings_before_anything_runs(tmp_path, env, message):
    """A unit on a number ("5m") skipped the test tier or every benchmark silently (bash arithmetic), or killed the
    script with nothing archived; a missing TESTS_PASSED was found after the install and cache steps."""
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OUT": str(out), **env}, timeout=60)
    assert proc.returncode == 2 and message in proc.stdout, proc.stdout + proc.stderr
    assert not out.exists()



# --- the test tier -------------------------------------------------------------------------------------------------

PYTEST = ["-m", "pytest", "tests", "-m", "gpu", "-v", "-rfE", "-p", "no:cacheprovider",
          "--continue-on-collection-errors", "--durations=30", "--durations-min=5"]
TIER_ONLY = {"BENCH_CASES": "", **QUIET}


@pytest.mark.parametrize("budget,test_timeout,box", [
    (570, None, 300), (200, None, 170), (570, 100, 100), (60, None, 30), (59, None, None), (570, 30, 30),
    (570, 29, None),
])
def test_tier_box_keeps_the_tail_back_and_needs_30_seconds(gpu_check, budget, test_timeout, box):
    """The tier's box is TEST_TIMEOUT (300) or what is left of BUDGET less the tail, whichever is less, so that a tier
    taking all it may still leaves its results archived; under 30 s it does not start, and the script ends with 3
    (the tier was cut), its benchmarks and archive done."""
    env = {"BUDGET": str(budget), **TIER_ONLY, **({"TEST_TIMEOUT": str(test_timeout)} if test_timeout else {})}
    run = gpu_check(env)
    if box is None:
        t = min(budget - TAIL, test_timeout or 300)
        assert run.rc == 3 and not run.called("pytest"), run
        assert f"GPU tier: not run, {t} s left of BUDGET={budget}s after the setup" in run.stdout, run
        assert (run.out / "gpu_check.tgz").exists() and run.called("bench.targets")
    else:
        assert run.rc == 0 and (run.one("pytest")["box"], run.one("pytest")["kill"]) == (str(box), "15"), run
        assert "GPU tier: not run" not in run.stdout


@pytest.mark.parametrize("does,status,message", [
    ({"rc": 0}, 0, None),
    ({"rc": 1}, 1, None),
    ({"rc": 2}, 1, "GPU tier: pytest exited 2 (2 interrupted, 3 internal error, 4 usage, 5 no tests)"),
    ({"rc": 3}, 1, "GPU tier: pytest exited 3 "),
    ({"rc": 5}, 1, "GPU tier: pytest exited 5 "),  # no test at all: a failure without TESTS_PASSED
    ({"rc": 124}, 3, "GPU tier: cut by its 300 s box"),
    ({"rc": 128}, 1, "GPU tier: pytest exited 128 "),
    ({"rc": 129}, 1, "GPU tier: killed by signal 1"),
    ({"signal": 9}, 1, "GPU tier: killed by signal 9"),
])
def test_tier_exit_codes_map_to_the_script_s(gpu_check, does, status, message):
    """pytest's codes would read as the script's own (2: a wrong setting, 3: a cut tier): a box that closed (124)
    is a cut tier, 3 where nothing failed; a killed tier (over 128) and every other code a failure, 1; the code is
    named where it is not pytest's plain "tests failed"."""
    run = gpu_check({"BUDGET": "570", "BENCH_CASES": "selfreg", **QUIET}, does={"pytest": does})
    assert run.rc == status, run
    assert run.called("bench.run selfreg") and run.called("bench.targets"), run  # the rest runs all the same
    lines = [line for line in run.stdout.splitlines() if line.startswith("GPU tier:")]
    assert lines == ([] if message is None else [next(line for line in lines if message in line)]), run


@pytest.mark.parametrize("env,does,status", [
    ({}, {"pytest": {"rc": 124}, "bench.run selfreg": {"rc": 1}}, 1),
    ({}, {"pytest": {"rc": 124}, "bench.targets": {"rc": 1}}, 1),
    ({}, {"pytest": {"rc": 124}, "bench.largest_cube": {"rc": 1}}, 1),
    ({"TEST_TIMEOUT": "20"}, {"bench.host_profile segformer3d": {"rc": 1}}, 1),  # the tier not run, a failure
    ({"TEST_TIMEOUT": "20"}, {}, 3),
    ({}, {"bench.run selfreg": {"rc": 1}}, 1),
])
def test_a_failure_outranks_a_cut_tier(gpu_check, env, does, status):
    """Exit 3 says "cut, nothing failed": with a failure anywhere the script ends with 1, cut tier or not."""
    run = gpu_check({"BUDGET": "570", "BENCH_CASES": "selfreg", **env}, does=does)
    assert run.rc == status, run


def test_tests_passed_starts_the_record_and_is_left_out(gpu_check, tmp_path):
    """TESTS_PASSED (an earlier run's gpu_results.txt) reaches pytest as FASTSEG3D_SKIP_PASSED, and the new
    gpu_results.txt starts with it, so that it stays the whole record: also where TESTS_PASSED names that log
    itself; pytest's "no tests" is then the end of a tier that had passed, no failure. The copy pytest reads is
    the run's own (a temporary file), not one that two runs on a machine would share."""
    earlier = f"passed tests/a.py::t[{tmp_path.name}]\nfailed tests/b.py::t\npassed tests/b.py::t\n"
    new = "passed tests/c.py::t[x y]\n"
    appended = {"pytest": {"append": {"FASTSEG3D_RESULTS_LOG": new}}}
    for passed in ("earlier.txt", "out/gpu_results.txt", "@HOME@/out/gpu_results.txt"):
        run = gpu_check({"TESTS_PASSED": passed, **TIER_ONLY}, does=appended, files={passed.replace("@HOME@/", ""):
                                                                                      earlier})
        call = run.one("pytest")
        assert run.rc == 0 and call["skip_passed"] == earlier and call["results_at_start"] == earlier, run
        assert run.archived("gpu_results.txt") == earlier + new
        assert call["env"]["FASTSEG3D_SKIP_PASSED"] not in (passed, "/tmp/gpu_tests_passed.txt"), call
        assert _tally(run) == {"passed": 3}, run
    run = gpu_check({"TESTS_PASSED": "earlier.txt", **TIER_ONLY}, does={"pytest": {"rc": 5}},
                    files={"earlier.txt": earlier})
    assert run.rc == 0 and "GPU tier: every test had passed in earlier.txt" in run.stdout, run
    # without it, nothing is left out and an earlier run's logs in OUT start empty
    stale = {"out/gpu_results.txt": earlier, "out/gpu_failures.log": "=== stale (call)\nE   stale\n",
             "out/gpu_durations.txt": "1.0 gw0 99.0 tests/stale.py::t\n"}
    run = gpu_check(TIER_ONLY, does=appended, files=stale)
    call = run.one("pytest")
    assert run.rc == 0 and call["env"]["FASTSEG3D_SKIP_PASSED"] is None and call["results_at_start"] == "", run
    assert run.archived("gpu_results.txt") == new and run.archived("gpu_failures.log") == ""
    assert run.archived("gpu_durations.txt") == "" and "stale" not in run.stdout, run
    # with SKIP_TESTS=1 TESTS_PASSED is not read: a missing one is no wrong setting
    run = gpu_check({"TESTS_PASSED": "no/such.txt", "SKIP_TESTS": "1", **TIER_ONLY})
    assert run.rc == 0 and not run.called("pytest") and run.archived("gpu_results.txt") is None, run
    assert "GPU tier" not in run.stdout and "slowest tests" not in run.stdout


def _tally(run: Run) -> dict[str, int]:
    [line] = [line for line in run.stdout.splitlines() if line.startswith("GPU tier so far:")]
    words = line[len("GPU tier so far:"):].split()
    return {words[i + 1]: int(words[i]) for i in range(0, len(words), 2)}


def test_pytest_command_and_logs(gpu_check):
    """The tier's pytest: the gpu marker, -v, collection errors not fatal, durations, xdist's workers and
    pytest-timeout's limit where installed; the three logs it writes as tests end, all in OUT; its output in
    gpu_tests.log, whose last 25 lines are shown."""
    log = "".join(f"log line {i:02d}\n" for i in range(30))
    run = gpu_check(TIER_ONLY, does={"pytest": {"stdout": log}})
    call, out = run.one("pytest"), run.out
    assert call["args"] == [*PYTEST, "-n", "12", "--timeout", "150"], call
    assert {k: call["env"][k] for k in ("FASTSEG3D_FAILURE_LOG", "FASTSEG3D_RESULTS_LOG", "FASTSEG3D_DURATIONS_LOG",
                                        "PYTHONUNBUFFERED")} == {
        "FASTSEG3D_FAILURE_LOG": f"{out}/gpu_failures.log", "FASTSEG3D_RESULTS_LOG": f"{out}/gpu_results.txt",
        "FASTSEG3D_DURATIONS_LOG": f"{out}/gpu_durations.txt", "PYTHONUNBUFFERED": "1"}
    assert run.archived("gpu_tests.log") == log
    assert "log line 05\n" in run.stdout and "log line 04" not in run.stdout and "log line 29\n" in run.stdout
    run = gpu_check({"TEST_CASE_TIMEOUT": "99", "TEST_WORKERS": "3", **TIER_ONLY})
    assert run.one("pytest")["args"] == [*PYTEST, "-n", "3", "--timeout", "99"], run
    run = gpu_check(TIER_ONLY, missing=["xdist", "pytest_timeout"])
    assert run.one("pytest")["args"] == PYTEST, run


@pytest.mark.parametrize("workers,nproc,omp,n,tier_omp", [
    (None, 16, None, "12", "1"),
    ("4", 16, "7", "4", "4"),
    ("3", 16, None, "3", "5"),
    ("32", 16, "7", "32", "1"),
    ("4", 16, "", "4", "4"),
    ("auto", 16, "7", "auto", "7"),
    ("0", 16, None, "0", None),
    ("4", 16, "7", None, "7"),  # no xdist
])
def test_xdist_workers_share_the_cores_and_the_threads_are_restored(gpu_check, workers, nproc, omp, n, tier_omp):
    """With pytest-xdist the tier runs TEST_WORKERS (12) workers, each with its share of the cores for ATen's
    threads (at least one; "auto" and 0 are left to xdist); the benchmarks after it see OMP_NUM_THREADS as it was,
    unset, empty or set."""
    env = {"BENCH_CASES": "selfreg", **QUIET}
    if workers is not None:
        env["TEST_WORKERS"] = workers
    if omp is not None:
        env["OMP_NUM_THREADS"] = omp
    run = gpu_check(env, nproc=nproc, missing=[] if n else ["xdist"])
    call = run.one("pytest")
    assert call["args"][len(PYTEST):len(PYTEST) + 2] == (["-n", n] if n else ["--timeout", "150"]), call
    assert call["env"]["OMP_NUM_THREADS"] == tier_omp, call
    assert run.one("bench.run selfreg")["env"]["OMP_NUM_THREADS"] == omp, run
    assert run.one("bench.targets")["env"]["OMP_NUM_THREADS"] == omp, run


def test_tier_summary_tally_slowest_tests_and_failures(gpu_check):
    """After the tier: the tally of each test's last line (a test retried, ids with blanks), the 12 slowest tests
    by time taken, and the failures' headers and E lines (40 at most), from the logs written as tests end."""
    results = ("passed tests/a.py::t\nfailed tests/b.py::t[a b]\npassed tests/b.py::t[a b]\n"
               "error tests/c.py::t\nskipped tests/d.py::t\nfailed tests/e.py::t[x y z]\n")
    rows = [(f"{10 + i}.5", f"gw{i % 3}", f"{(i * 7) % 15}.0", f"tests/t{i}.py::t[{i} x]") for i in range(15)]
    durations = "".join(" ".join(r) + "\n" for r in rows)
    failures = "=== tests/b.py::t[a b] (call)\nTraceback\n  code\n" + "".join(f"E   line {i}\n" for i in range(45))
    run = gpu_check(TIER_ONLY, does={"pytest": {"rc": 1, "append": {"FASTSEG3D_RESULTS_LOG": results,
                                                                     "FASTSEG3D_DURATIONS_LOG": durations,
                                                                     "FASTSEG3D_FAILURE_LOG": failures}}})
    assert run.rc == 1 and _tally(run) == {"passed": 2, "failed": 1, "error": 1, "skipped": 1}, run
    lines = run.stdout.splitlines()
    start = lines.index("slowest tests (s taken, worker, s since start):")
    slowest = sorted(rows, key=lambda r: -float(r[2]))[:12]
    assert lines[start + 1:start + 13] == [f"  {r[2]:>6} {r[1]:<5} {r[0]:>6}  {r[3]}" for r in slowest], run
    assert not lines[start + 13].startswith("  "), run
    start = lines.index(f"failures ({run.out}/gpu_failures.log, first lines):")
    assert lines[start + 1:start + 41] == ["=== tests/b.py::t[a b] (call)"] + [f"E   line {i}" for i in range(39)], run
    assert "E   line 39" not in run.stdout and "Traceback" not in run.stdout
    run = gpu_check(TIER_ONLY)
    assert _tally(run) == {} and "failures (" not in run.stdout, run


# --- the benchmark cases -------------------------------------------------------------------------------------------

CASES = {"dwconv3d", "attention", "attention_block", "kl_distill", "channel_kl", "selfreg", "dice_ce",
         "group_norm_act", "upsample_sum", "layer_norm", "segformer3d", "mobileutr", "mobileutrl", "missu",
         "dsd_unet", "selfreg_unet", "unetr", "mednext"}


@pytest.mark.parametrize("plan", ["targets", "full"])
def test_each_case_runs_in_its_box_with_its_plan_s_arguments(gpu_check, plan):
    """Every case once, SegFormer3D's first where the targets lead; each with its plan's LIMIT (less where less is
    left after RESERVE) and --time-limit 15 s short of it (half of a box under 30 s); PLAN=targets passes each
    case's TARGET_ARGS, then BENCH_ARGS (last, so that it wins); glob characters reach bench.run as they are,
    though files in the working directory match them."""
    limits, target_args = _tables(plan)
    assert set(limits) == CASES and set(target_args) <= CASES
    assert (limits["segformer3d"], limits["dwconv3d"]) == ((210, 45) if plan == "targets" else (45, 50))
    files = {"a128^3": "", "stage1@128^3x": "", "fastseg3d,torchX(Y)": "", "xcompilex": ""}
    budget = 300 if plan == "targets" else 200  # each plan's longest box cut to what is left
    env = {"SKIP_TESTS": "1", "BUDGET": str(budget), "BENCH_ARGS": "--shapes *compile* --dtype fp32", "TUNE_OPS": "",
           **({"PLAN": plan} if plan == "full" else {})}
    run = gpu_check(env, files=files)
    avail = budget - 90 - 40 - TAIL  # less the search's, the profile's and the tail's
    calls = [c for c in run.calls if c["key"].startswith("bench.run ") and c["key"] != "bench.run --report"]
    assert sorted(c["args"][3] for c in calls) == sorted(CASES), run
    if plan == "targets":
        assert calls[0]["args"][3] == "segformer3d"
    for call in calls:
        case = call["args"][3]
        box = min(avail, limits[case])
        assert call["box"] == str(box), (case, call)
        assert call["args"] == _bench_run_args(case, run.out, box, *target_args.get(case, []), "--shapes",
                                               "*compile*", "--dtype", "fp32"), call
    assert any(min(avail, limit) < limit for limit in limits.values())  # both sides of the min were seen
    assert run.rc == 0 and "not run within" not in run.stdout, run


@pytest.mark.parametrize("env,box", [
    ({"BENCH_CASES": "nosuch"}, 45),
    ({"BENCH_CASES": "nosuch", "PLAN": "full"}, 45),
    ({"CASE_LIMIT": "31"}, 31), ({"CASE_LIMIT": "30"}, 30), ({"CASE_LIMIT": "29"}, 29),
    ({"CASE_LIMIT": "1000"}, 570 - 90 - 40 - TAIL),
    ({"BUDGET": "188"}, 28),  # what is left after RESERVE
])
def test_case_box_and_time_limit(gpu_check, env, box):
    """A case's box: CASE_LIMIT for all, else LIMIT (45 for a case it lacks), cut to what is left after RESERVE;
    --time-limit 15 s short of it from 30 s on, half of it below."""
    case = env.get("BENCH_CASES", "segformer3d")
    run = gpu_check({"SKIP_TESTS": "1", "BENCH_CASES": case, "BENCH_ARGS": "--x", **env})
    call = run.one(f"bench.run {case}")
    assert call["box"] == str(box) and call["args"][:8] == _bench_run_args(case, run.out, box), call


@pytest.mark.parametrize("env,reserve", [
    ({}, 2 * 21 + 23 + 22 + TAIL),
    ({"LARGEST_CUBE_MODELS": ""}, 2 * 21 + 22 + TAIL),
    ({"HOST_PROFILE_MODELS": ""}, 2 * 21 + 23 + TAIL),
    ({"TUNE_OPS": ""}, 23 + 22 + TAIL),
    ({"TUNE_OPS": "dwconv3d", "HOST_PROFILE_MODELS": "segformer3d mobileutr"}, 21 + 23 + 22 + TAIL),
])
def test_reserve_keeps_back_the_sweeps_search_profile_and_tail(gpu_check, env, reserve):
    """The cases leave RESERVE: TUNE_LIMIT per sweep, the cube search's and the profile's limits where they run (one
    box each, however many models), and the tail; a case with 15 s left runs in a box of 15 s, with 14 it is not
    run, and is named in the rerun hint."""
    base = {"SKIP_TESTS": "1", "BENCH_CASES": "selfreg channel_kl", "TUNE_OPS": "dwconv3d attention",
            "TUNE_LIMIT": "21", "LARGEST_CUBE_LIMIT": "23", "HOST_PROFILE_LIMIT": "22"}
    run = gpu_check({**base, **env, "BUDGET": str(reserve + 15)})
    boxes = [c["box"] for c in run.calls if c["key"] in ("bench.run selfreg", "bench.run channel_kl")]
    assert boxes == ["15", "15"], run
    assert run.rc == 0 and "not run within" not in run.stdout, run
    run = gpu_check({**base, **env, "BUDGET": str(reserve + 14)})
    assert not run.called("bench.run selfreg") and not run.called("bench.run channel_kl"), run
    assert run.rc == 0 and f'not run within BUDGET={reserve + 14}s: selfreg channel_kl (cases: run again with ' \
        f'SKIP_TESTS=1 BENCH_CASES="selfreg channel_kl")' in run.stdout, run


def test_a_failed_case_is_a_failure_and_the_next_runs(gpu_check):
    """A case that fails or is killed by its box is a failure (1), named with its box; the next case runs."""
    run = gpu_check({"SKIP_TESTS": "1", "BENCH_CASES": "dice_ce selfreg", **QUIET},
                    does={"bench.run dice_ce": {"rc": 124}})
    assert run.rc == 1 and "bench dice_ce failed or was killed at its 10 s box" in run.stdout, run
    assert run.called("bench.run selfreg") and "bench selfreg failed" not in run.stdout
    run = gpu_check({"SKIP_TESTS": "1", "BENCH_CASES": "", **QUIET})
    assert run.rc == 0 and run.keys("bench.run ") == ["bench.run --report"], run


def test_what_no_box_reached_is_named_with_a_rerun_hint_for_the_cases(gpu_check):
    """Cases, sweeps, profiles and the cube search that found no time are listed at the end (not a failure); the
    rerun hint names the cases only."""
    run = gpu_check({"SKIP_TESTS": "1", "BUDGET": "49", "BENCH_CASES": "segformer3d dwconv3d",
                     "TUNE_OPS": "dwconv3d attention"})
    assert run.rc == 0, run
    assert ("not run within BUDGET=49s: segformer3d dwconv3d tune:dwconv3d tune:attention host_profile:segformer3d "
            'largest_cube (cases: run again with SKIP_TESTS=1 BENCH_CASES="segformer3d dwconv3d")') in run.stdout, run
    assert [c["key"] for c in run.calls if c["box"]] == [], run
    assert run.called("bench.run --report") and (run.out / "gpu_check.tgz").exists()
    run = gpu_check({"SKIP_TESTS": "1", "BUDGET": "49", "BENCH_CASES": "", "LARGEST_CUBE_MODELS": ""})
    assert "not run within BUDGET=49s: host_profile:segformer3d (cases: run again with SKIP_TESTS=1 " \
        'BENCH_CASES="")' in run.stdout, run


# --- the sweeps, the profile and the cube search -------------------------------------------------------------------

def test_tune_sweeps(gpu_check):
    """Each op of TUNE_OPS in its own box (TUNE_LIMIT, or what is left less the tail), --time-limit 10 s short of
    it, its JSON and table in results/; a box that closed is no failure (rows are written as measured), another
    code is; under 20 s left it is not run."""
    env = {"SKIP_TESTS": "1", "BENCH_CASES": "", **QUIET, "TUNE_OPS": "dwconv3d attention"}
    run = gpu_check(env, does={"bench.tune dwconv3d": {"rc": 124, "stdout": "SWEEP dwconv3d\n"},
                               "bench.tune attention": {"stdout": "SWEEP attention\n"}})
    assert run.rc == 0 and "tune dwconv3d: cut by its 60 s box (rows written)" in run.stdout, run
    assert "SWEEP dwconv3d" in run.stdout and "SWEEP attention" in run.stdout and "tune attention" not in run.stdout
    for op in ("dwconv3d", "attention"):
        call = run.one(f"bench.tune {op}")
        assert call["box"] == "60" and call["args"] == ["-m", "bench.tune", op, "--time-limit", "50", "--out",
                                                         f"{run.out}/results/tune_{op}.json"], call
        assert run.archived(f"results/tune_{op}.txt") == f"SWEEP {op}\n"
    run = gpu_check({**env, "TUNE_LIMIT": "25"}, does={"bench.tune attention": {"rc": 3}})
    assert run.rc == 1 and "tune attention failed (3)" in run.stdout and "tune dwconv3d" not in run.stdout, run
    assert run.one("bench.tune dwconv3d")["args"][3:5] == ["--time-limit", "15"]
    run = gpu_check({**env, "BUDGET": "50"})
    assert [(c["box"], c["args"][4]) for c in run.calls if c["key"].startswith("bench.tune")] == [("20", "10")] * 2
    run = gpu_check({**env, "BUDGET": "49"})
    assert not run.keys("bench.tune") and "not run within BUDGET=49s: tune:dwconv3d tune:attention " in run.stdout


def test_host_profile(gpu_check):
    """Each model of HOST_PROFILE_MODELS profiled in its own box (HOST_PROFILE_LIMIT, 40, or what is left less the
    tail), the first line of its profile shown; a box that closed is no failure, another code is; under 20 s it
    is not run."""
    env = {"SKIP_TESTS": "1", "BENCH_CASES": "", "LARGEST_CUBE_MODELS": "",
           "HOST_PROFILE_MODELS": "segformer3d mobileutr"}
    run = gpu_check(env, does={"bench.host_profile segformer3d": {"rc": 124, "out": "PROFILE HEAD\nmore\n"},
                               "bench.host_profile mobileutr": {"rc": 2}})
    assert run.rc == 1 and "host_profile segformer3d: cut by its 40 s box" in run.stdout, run
    assert "host_profile mobileutr failed (2)" in run.stdout and "PROFILE HEAD" in run.stdout
    assert "more" not in run.stdout
    for model in ("segformer3d", "mobileutr"):
        call = run.one(f"bench.host_profile {model}")
        assert call["box"] == "40" and call["args"] == ["-m", "bench.host_profile", model, "--out",
                                                         f"{run.out}/results/host_profile_{model}.txt"], call
    run = gpu_check({**env, "HOST_PROFILE_LIMIT": "33"}, does={"bench.host_profile mobileutr": {"rc": 124}})
    assert run.rc == 0 and [c["box"] for c in run.calls if c["key"].startswith("bench.host")] == ["33", "33"], run
    run = gpu_check({**env, "BUDGET": "50"})
    assert [c["box"] for c in run.calls if c["key"].startswith("bench.host")] == ["20", "20"], run
    run = gpu_check({**env, "BUDGET": "49"})
    assert not run.keys("bench.host") and "host_profile:segformer3d host_profile:mobileutr (cases" in run.stdout


def test_largest_cube(gpu_check):
    """One search over every model of LARGEST_CUBE_MODELS, in its box (LARGEST_CUBE_LIMIT, 90, or what is left less
    the tail) with --time-limit 15 s short of it, --max-side and --dtype passed on; a box that closed is the
    designed end (the search under way writes its row), another code a failure; under 20 s it is not run."""
    env = {"SKIP_TESTS": "1", "BENCH_CASES": "", "HOST_PROFILE_MODELS": ""}
    run = gpu_check({**env, "LARGEST_CUBE_MODELS": "segformer3d mobileutr", "LARGEST_CUBE_MAX_SIDE": "512",
                     "LARGEST_CUBE_DTYPE": "fp16"}, does={"bench.largest_cube": {"rc": 124, "stdout": "CUBE ROW\n"}})
    call = run.one("bench.largest_cube")
    assert call["box"] == "90" and call["args"] == [
        "-m", "bench.largest_cube", "--model", "segformer3d", "--model", "mobileutr", "--max-side", "512", "--out",
        f"{run.out}/results", "--dtype", "fp16", "--time-limit", "75"], call
    assert run.rc == 0 and "largest_cube: cut by its 90 s box (rows written)" in run.stdout, run
    assert "CUBE ROW" in run.stdout and run.archived("largest_cube.txt") == "CUBE ROW\n"
    run = gpu_check({**env, "LARGEST_CUBE_LIMIT": "60"}, does={"bench.largest_cube": {"rc": 1}})
    assert run.rc == 1 and "largest_cube failed (1)" in run.stdout, run
    assert run.one("bench.largest_cube")["box"] == "60" and run.one("bench.largest_cube")["args"] == [
        "-m", "bench.largest_cube", "--model", "segformer3d", "--max-side", "1280", "--out", f"{run.out}/results",
        "--dtype", "bf16", "--time-limit", "45"], run
    run = gpu_check({**env, "BUDGET": "50"})
    assert run.one("bench.largest_cube")["box"] == "20" and run.one("bench.largest_cube")["args"][-1] == "5", run
    run = gpu_check({**env, "BUDGET": "49"})
    assert not run.called("bench.largest_cube") and "not run within BUDGET=49s: largest_cube (cases" in run.stdout
    run = gpu_check({**env, "LARGEST_CUBE_MODELS": ""})
    assert not run.called("bench.largest_cube") and "not run within" not in run.stdout, run


# --- the report, the archive and the exit status -------------------------------------------------------------------

def test_report_targets_and_archive(gpu_check):
    """The table from every row on disk, then the targets (a failure there is the script's), appended to
    bench_table.txt; the lines of bench.log that matter; what the run compiled itself; then one archive of
    everything, and OUT left with info.txt, bench_table.txt and gpu_check.tgz only (no temporary folder left)."""
    bench_log = "".join(f"noise {i}\n" for i in range(5)) + "case selfreg: fastseg3d skipped (no monai)\n"
    does = {"bench.run selfreg": {"stdout": bench_log},
            "bench.warm_cache --report": {"stdout": "Triton cache: 2 carried, 1 compiled\nsecond line\n"}}
    files = {"out/stale.txt": "stale", "out/gpu_check.tgz": "an earlier archive", "out/olddir/x": "x",
             "tmp/.keep": ""}
    run = gpu_check({"SKIP_TESTS": "1", "BENCH_CASES": "selfreg", "TMPDIR": "@HOME@/tmp"}, does=does, files=files)
    out = run.out
    assert run.rc == 0, run
    assert run.one("bench.run --report")["args"] == ["-m", "bench.run", "--report", "--out", f"{out}/results",
                                                     "--plot"]
    assert run.one("bench.targets")["args"] == ["-m", "bench.targets", "--out", f"{out}/results"]
    assert run.one("bench.warm_cache --report")["args"] == ["-m", "bench.warm_cache", "--report",
                                                            "/tmp/fastseg3d-triton-cache"]
    assert (out / "bench_table.txt").read_text() == "REPORT TABLE\nTARGETS REPORT\n"
    assert "REPORT TABLE\nTARGETS REPORT\n" in run.stdout
    assert "case selfreg: fastseg3d skipped (no monai)" in run.stdout and "noise" not in run.stdout
    assert "Triton cache: 2 carried, 1 compiled" in run.stdout and "second line" not in run.stdout
    assert sorted(p.name for p in out.iterdir()) == ["bench_table.txt", "gpu_check.tgz", "info.txt"]
    assert sorted(p.name for p in (out.parent / "tmp").iterdir()) == [".keep"]
    with tarfile.open(out / "gpu_check.tgz") as tar:
        names = set(tar.getnames())
    assert {"./results/targets.txt", "./results/info.txt", "./bench.log", "./triton_cache.txt", "./install.log",
            "./largest_cube.txt", "./info.txt", "./bench_table.txt", "./stale.txt", "./olddir/x"} <= names, names
    assert "./gpu_check.tgz" not in names
    assert run.archived("results/targets.txt") == "TARGETS REPORT\n"
    assert run.archived("results/info.txt") == (out / "info.txt").read_text()
    assert run.archived("bench_table.txt") == "REPORT TABLE\nTARGETS REPORT\n"
    # a report that failed or found no rows is said, no failure; failed targets are one
    run = gpu_check({"SKIP_TESTS": "1", "BENCH_CASES": "", **QUIET},
                    does={"bench.run --report": {"rc": 1}, "bench.warm_cache --report": {"rc": 1, "stdout": "W\n"}})
    assert run.rc == 0 and "bench.run --report failed or found no rows (bench.log)" in run.stdout, run
    assert "W\n" not in run.stdout
    run = gpu_check({"SKIP_TESTS": "1", "BENCH_CASES": "", **QUIET}, does={"bench.targets": {"rc": 1}})
    assert run.rc == 1 and "bench.targets failed (bench.log)" in run.stdout, run


def test_info_commit_and_optional_packages(gpu_check):
    """info.txt (kept beside the archive): the GPU, torch, the optional packages, the commit and fastseg3d's info;
    the commit is FASTSEG3D_COMMIT where given, else the tree's, exported to every step, with a warning where it is
    unknown (a tree without .git); a missing monai or einops is said."""
    run = gpu_check({"SKIP_TESTS": "1", "BENCH_CASES": "selfreg", **QUIET})
    info = "Stand-in GPU, 0.0\ntorch 9.9 stand-in cudnn 1\noptional: stand-in\ncommit c0ffee\nINFO\n"
    assert (run.out / "info.txt").read_text() == info and run.stdout.startswith(info), run
    assert run.one("bench.run selfreg")["env"]["FASTSEG3D_COMMIT"] == "c0ffee" and "WARNING" not in run.stdout
    assert "is missing" not in run.stdout
    run = gpu_check({"SKIP_TESTS": "1", "BENCH_CASES": "selfreg", "FASTSEG3D_COMMIT": "abc123", **QUIET})
    assert not run.called("commit") and run.one("bench.run selfreg")["env"]["FASTSEG3D_COMMIT"] == "abc123", run
    assert "commit abc123\n" in (run.out / "info.txt").read_text()
    for commit in (None, "unknown"):
        run = gpu_check({"SKIP_TESTS": "1", "BENCH_CASES": "selfreg", **QUIET}, commit=commit, missing=["monai",
                                                                                                      "einops"])
        assert run.rc == 0 and run.one("bench.run selfreg")["env"]["FASTSEG3D_COMMIT"] == "unknown", run
        assert "WARNING: commit unknown (a tree without .git): pass FASTSEG3D_COMMIT=<sha>" in run.stdout
        assert "commit unknown\n" in (run.out / "info.txt").read_text()
        assert "monai is missing (carry its wheel): unetr and mednext will skip" in run.stdout
        assert "einops is missing (carry its wheel): unetr and the SABlock tests will skip" in run.stdout


# --- the setup -----------------------------------------------------------------------------------------------------

def test_wheels_install_only_what_the_image_lacks(gpu_check):
    """Each carried wheel whose distribution the image lacks is installed on its own into WHEEL_SITE (a refused one
    does not keep the others out), which then leads PYTHONPATH for every step; none is installed where the image
    has them all, and PYTHONPATH stays as it was."""
    wheels = {f".whl/{name}": "" for name in ("monai-1.4-py3-none-any.whl", "liger_kernel-0.5-py3-none-any.whl",
                                              "xformers-0.1-cp312-cp312-manylinux_x86_64.whl")}
    env = {"SKIP_TESTS": "1", "BENCH_CASES": "selfreg", "SKIP_INSTALL": "1", **QUIET}
    run = gpu_check({**env, "PYTHONPATH": "/old"}, dists=["monai"], files=wheels,
                    does={"pip .whl/xformers-0.1-cp312-cp312-manylinux_x86_64.whl": {"rc": 1}})
    assert run.rc == 0 and run.keys("dist ") == ["dist liger_kernel", "dist monai", "dist xformers"], run
    pip = [c["args"] for c in run.calls if c["key"].startswith("pip ")]
    assert pip == [["-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
                    "--target", "/tmp/site", f".whl/{name}"] for name in ("liger_kernel-0.5-py3-none-any.whl",
                                                                          "xformers-0.1-cp312-cp312-manylinux_x86_64.whl")]
    assert "installed from .whl: liger_kernel-0.5-py3-none-any.whl" in run.stdout
    assert "could not install from .whl: xformers-0.1-cp312-cp312-manylinux_x86_64.whl" in run.stdout
    assert run.one("bench.run selfreg")["env"]["PYTHONPATH"] == "/tmp/site:/old"
    run = gpu_check({**env, "WHEELS": "w", "WHEEL_SITE": "@HOME@/site"}, dists=["monai"],
                    files={"w/liger_kernel-0.5-py3-none-any.whl": ""})
    assert run.one("bench.run selfreg")["env"]["PYTHONPATH"] == f"{run.out.parent}/site", run
    run = gpu_check({**env, "PYTHONPATH": "/old"}, dists=["monai", "liger_kernel", "xformers"], files=wheels)
    assert not run.keys("pip ") and run.one("bench.run selfreg")["env"]["PYTHONPATH"] == "/old", run
    run = gpu_check(env)
    assert not run.keys("dist ") and not run.keys("pip ") and run.one("bench.run selfreg")["env"]["PYTHONPATH"] is None


def test_project_install(gpu_check):
    """The project installs (editable, offline, no dependencies) unless SKIP_INSTALL=1; an install that fails ends
    the script with 1 and its log, before the tier and the benchmarks."""
    env = {"BENCH_CASES": "selfreg", **QUIET}
    run = gpu_check(env)
    assert run.one("pip .")["args"] == ["-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation",
                                        "-e", "."], run
    run = gpu_check(env, does={"pip .": {"rc": 1, "stdout": "BUILD ERROR\n"}})
    assert run.rc == 1 and "install failed\nBUILD ERROR\n" in run.stdout, run
    assert not run.called("pytest") and not run.keys("bench.")
    run = gpu_check({**env, "SKIP_INSTALL": "1"})
    assert not run.keys("pip") and run.rc == 0, run


def test_ptxas_and_the_carried_cache(gpu_check, tmp_path):
    """Triton's own ptxas is set for the whole run where its variable is not set already (and the file is there);
    the carried cache tarball is installed into TRITON_CACHE_DIR, exported to every step (a tarball that fails to
    install is said, no failure)."""
    ptxas = f"TRITON_PTXAS_PATH {sys.executable}"
    env = {"SKIP_TESTS": "1", "BENCH_CASES": "selfreg", **QUIET}
    run = gpu_check(env, ptxas=ptxas)
    assert run.one("bench.run selfreg")["env"]["TRITON_PTXAS_PATH"] == sys.executable, run
    assert run.one("bench.run selfreg")["env"]["TRITON_CACHE_DIR"] == "/tmp/fastseg3d-triton-cache"
    assert not run.keys("bench.warm_cache --install")
    run = gpu_check({**env, "TRITON_PTXAS_PATH": "/given/ptxas"}, ptxas=ptxas)
    assert run.one("bench.run selfreg")["env"]["TRITON_PTXAS_PATH"] == "/given/ptxas", run
    not_executable = tmp_path / "ptxas"
    not_executable.write_text("")
    for answer in ("TRITON_PTXAS_PATH /no/such/ptxas", f"TRITON_PTXAS_PATH {not_executable}", None):
        run = gpu_check(env, ptxas=answer)
        assert run.rc == 0 and run.one("bench.run selfreg")["env"]["TRITON_PTXAS_PATH"] is None, run
    run = gpu_check({**env, "TRITON_CACHE_DIR": "@HOME@/cache"}, files={".triton-cache.tgz": "x"},
                    does={"bench.warm_cache --install": {"rc": 1}})
    cache = f"{run.out.parent}/cache"
    assert run.one("bench.warm_cache --install")["args"] == ["-m", "bench.warm_cache", "--install",
                                                             ".triton-cache.tgz", "--dir", cache], run
    assert "could not install the carried Triton cache .triton-cache.tgz" in run.stdout and run.rc == 0
    assert run.one("bench.run selfreg")["env"]["TRITON_CACHE_DIR"] == cache
    run = gpu_check({**env, "TRITON_CACHE_TARBALL": "c.tgz"}, files={"c.tgz": "x"})
    assert run.one("bench.warm_cache --install")["args"][3] == "c.tgz" and "could not" not in run.stdout, run


@pytest.mark.parametrize("env,box", [({}, 150), ({"BUDGET": "200"}, 110), ({"WARM_LIMIT": "40"}, 40),
                                     ({"BUDGET": "100"}, 10), ({"BUDGET": "99"}, None)])
def test_warm_plan_compiles_in_its_box_before_the_tier(gpu_check, env, box):
    """WARM_PLAN compiles what the carried cache lacks before the tier, in a box of WARM_LIMIT (150) or what is left
    less the tail and a minute for the tier, not under 10 s; a failure or a cut is said, no failure."""
    run = gpu_check({"WARM_PLAN": "gpu_tests targets", **TIER_ONLY, **env}, does={"bench.warm_cache --plan": {"rc": 1}})
    assert run.rc == 0, run
    if box is None:
        assert not run.keys("bench.warm_cache --plan")
        return
    call = run.one("bench.warm_cache --plan")
    assert (call["box"], call["kill"]) == (str(box), "10") and call["args"] == [
        "-m", "bench.warm_cache", "--plan", "gpu_tests", "targets", "--cache-dir", "/tmp/fastseg3d-triton-cache"], call
    assert f"warm_cache: failed or cut by its {box} s box" in run.stdout
    assert run.keys("bench.warm_cache --plan") + run.keys("pytest") == ["bench.warm_cache --plan", "pytest"], run


def test_without_warm_plan_nothing_compiles_beforehand(gpu_check):
    run = gpu_check(TIER_ONLY)
    assert not run.keys("bench.warm_cache --plan") and run.rc == 0, run


def test_boxes_follow_the_clock(gpu_check):
    """With the clock running, what a step took is gone from the next one's box (the other tests stop the clock)."""
    env = {"SKIP_TESTS": "1", "BENCH_CASES": "selfreg dice_ce", "CASE_LIMIT": "100", "BUDGET": "80", **QUIET}
    run = gpu_check(env, clock="real", does={"bench.run selfreg": {"sleep": 2.2}})
    first, second = int(run.one("bench.run selfreg")["box"]), int(run.one("bench.run dice_ce")["box"])
    assert 40 <= second <= first - 2 and first <= 50, run  # 2.2 s apart: at least 2 ticks of the clock


NUMBERS = ["BUDGET", "TEST_TIMEOUT", "TEST_CASE_TIMEOUT", "CASE_LIMIT", "LARGEST_CUBE_LIMIT", "LARGEST_CUBE_MAX_SIDE",
           "HOST_PROFILE_LIMIT", "TUNE_LIMIT", "WARM_LIMIT"]


def test_every_number_is_checked_before_anything_runs(gpu_check):
    """Each of the script's numbers is refused with a unit or a leading zero before any step (exit 2, OUT not
    made), and taken as a whole number of seconds (voxels) without."""
    for var in NUMBERS:
        for value in ("5m", "07"):
            run = gpu_check({var: value})
            assert run.rc == 2 and f"{var}={value} must be a whole number" in run.stdout, run
            assert not run.calls and not run.out.exists()
    run = gpu_check({**{var: "100" for var in NUMBERS}, "BENCH_CASES": "selfreg", "TUNE_OPS": "dwconv3d",
                     "WARM_PLAN": "targets", "BUDGET": "900", "SKIP_TESTS": "0"})
    assert run.rc == 0 and run.calls and (run.out / "gpu_check.tgz").exists(), run
    assert [c["box"] for c in run.calls if c["box"]] == ["100"] * 6, run  # warm, tier, case, tune, profile, cube


@pytest.mark.parametrize("workers,ok", [("8", True), ("auto", True), ("logical", True), ("0", True), ("08", False),
                                        ("4x", False), ("-2", False), ("", True)])
def test_test_workers_is_a_count_or_xdist_s_word(gpu_check, workers, ok):
    """TEST_WORKERS is divided into the cores: "08" (octal to bash) or a unit failed that arithmetic and left the
    tier's thread count unset; refused before anything runs, as the numbers are (xdist's auto and logical pass)."""
    run = gpu_check({"TEST_WORKERS": workers, **TIER_ONLY})
    if ok:
        assert run.rc == 0 and run.called("pytest"), run
    else:
        assert run.rc == 2 and f"TEST_WORKERS={workers} must be a whole number, auto or logical" in run.stdout, run
        assert not run.calls and not run.out.exists()
