"""Mutation testing of the core modules: do the tests fail when the code is wrong?

Runs `mutmut <https://github.com/boxed/mutmut>`_ (3.x) over the core modules
with the test files that guard them, in a scratch copy of the repository (the
working tree is never touched), and reports the kill rate per module.

    python -m benchmarks.mutation --out results/mutation                # every mutant
    python -m benchmarks.mutation --sample 0.1 --out results/mutation   # a 10% sample
    python -m benchmarks.mutation --modules masks,recurrent --out ...    # some modules
    python -m benchmarks.mutation --tests-rev HEAD~5 --out ...          # older tests
    python -m benchmarks.mutation --sample 0.1 --work DIR --recheck --out ...  # see below

A mutant is one small change to the source (``+`` -> ``-``, ``<`` -> ``<=``, a
number changed, an argument dropped or replaced by ``None``, ...). It is
*killed* when at least one test fails, *survives* when all pass. A surviving
mutant is either a missing test or an *equivalent* mutant (a change that cannot
alter behaviour); the equivalent ones are listed with a one-line reason in
``benchmarks/mutation_equivalent.json`` and reported apart.

``--recheck`` takes a finished run in ``--work`` and re-runs only its undetected,
unexplained mutants against today's tests (only the tests added since), so
that killing the survivors of a long run needs no second long run.
``--report-only`` rewrites the report from ``--work``; ``--baseline`` adds the
score of an earlier ``mutation.json`` (e.g. the same sample with older tests).

What is not mutated: ``raise`` statements (the error messages are asserted by
the bad-input tests, and a mutated message is not a behaviour) and decorated
functions (mutmut skips them: here the two ``custom_vjp`` cores of blockwise
attention, whose forward and backward rules are mutated separately). What is
not scored: in ``training`` only the step, optimizer, losses and LM evaluation
are (``OUT_OF_SCOPE`` lists the loop, logging and sharding helpers left out,
and why).

Speed: every mutant runs in a fresh process forked from a server that has
imported the test modules; a persistent JAX compilation cache (in the scratch
directory) lets a mutant whose compiled programs are unchanged skip XLA
compilation. mutmut runs only the tests that executed the mutated function in
a first, traced run of the suite, stopping at the first failure.

Writes ``<out>/mutation.json`` (every mutant and its status) and
``<out>/mutation.md`` (the table per module and the surviving mutants with
their diffs).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from benchmarks._environment import cpu_model

ROOT = Path(__file__).resolve().parent.parent

# Core group (a sub-package or top-level module of jaxseq, the second part of a mutant's
# name) -> the files mutated and the test files that guard them.
MODULES = {
    "_numerics": (("jaxseq/_numerics.py",), ("tests/test_cells.py", "tests/test_rollout.py")),
    "masks": (
        ("jaxseq/masks.py",),
        ("tests/test_masks.py", "tests/test_attention.py", "tests/test_losses.py"),
    ),
    "recurrent": (
        ("jaxseq/recurrent/*",),
        (
            "tests/test_cells.py",
            "tests/test_rollout.py",
            "tests/test_kernels.py",
            "tests/test_layers.py",
            "tests/test_protocols.py",
        ),
    ),
    "nn": (
        ("jaxseq/nn/*",),
        ("tests/test_nn.py", "tests/test_layers.py", "tests/test_transformer.py"),
    ),
    "attention": (
        ("jaxseq/attention/*",),
        ("tests/test_attention.py", "tests/test_transformer.py", "tests/test_positional.py"),
    ),
    "training": (
        (
            "jaxseq/training/losses.py",
            "jaxseq/training/optimizer.py",
            "jaxseq/training/step.py",
            "jaxseq/training/lm.py",
        ),
        ("tests/test_losses.py", "tests/test_train.py", "tests/test_training_any_task.py"),
    ),
}


def _tests_of(group: str) -> list[str]:
    return [t for t in MODULES[group][1] if (ROOT / t).exists()]


# Functions left out of the score, with why. In training only the step, the optimizer,
# the losses and the LM evaluation are mutated; the loop (`fit`: files, logging,
# checkpoints, progress bar) and multi-device sharding are exercised by the integration
# tests and the examples, not guarded by unit tests.
OUT_OF_SCOPE = {
    "training": (
        "fit",
        "_filter_jsonl",
        "_tqdm",
        "init_distributed",
        "make_mesh",
        "_axis_name",
        "_put",
        "_shard_tree",
        "replicate",
        "shard_state",
        "shard_batch",
    ),
}

# mutmut's exit-code -> status mapping, reduced to what the report needs.
KILLED, SURVIVED, TIMEOUT, NO_TESTS = "killed", "survived", "timeout", "no tests"
_STATUS = {1: KILLED, 3: KILLED, 0: SURVIVED, 5: NO_TESTS, 33: NO_TESTS, 36: TIMEOUT, 24: TIMEOUT}
_STATUS.update({-24: TIMEOUT, 152: TIMEOUT, 255: TIMEOUT})

EQUIVALENT_FILE = Path(__file__).resolve().parent / "mutation_equivalent.json"


def _status(code) -> str:
    if code is None:
        return "not checked"
    return _STATUS.get(code, "suspicious")


def _mutmut_config(modules: list[str]) -> str:
    tests = sorted({t for m in modules for t in _tests_of(m)})
    lines = [
        "",
        "[tool.mutmut]",
        'source_paths = ["jaxseq/"]',
        f"only_mutate = {json.dumps([f for m in modules for f in MODULES[m][0]])}",
        f"pytest_add_cli_args_test_selection = {json.dumps(tests)}",
        'pytest_add_cli_args = ["-p", "no:xdist", "-p", "no:cacheprovider", "-p", "no:benchmark"]',
        'do_not_mutate_patterns = ["^\\\\s*raise "]',
        'process_isolation = "forkserver"',
        "timeout_multiplier = 4.0",
        "timeout_constant = 20.0",
        "",
    ]
    return "\n".join(lines)


def _prepare(work: Path, modules: list[str], tests_rev: str | None) -> None:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    shutil.copytree(ROOT / "jaxseq", work / "jaxseq", ignore=shutil.ignore_patterns("__pycache__"))
    if tests_rev is None:
        shutil.copytree(
            ROOT / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__")
        )
    else:
        archive = subprocess.run(
            ["git", "archive", "--format=tar", tests_rev, "tests"],
            cwd=ROOT,
            check=True,
            capture_output=True,
        ).stdout
        with tempfile.TemporaryFile() as f:
            f.write(archive)
            f.seek(0)
            with tarfile.open(fileobj=f) as tar:
                tar.extractall(work, filter="data")
    config = (ROOT / "pyproject.toml").read_text() + _mutmut_config(modules)
    (work / "pyproject.toml").write_text(config)


def _env(work: Path) -> dict:
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(work / "jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        PYTHONDONTWRITEBYTECODE="1",
    )
    return env


def _read_meta(work: Path) -> dict[str, int | None]:
    codes = {}
    for meta in sorted((work / "mutants" / "jaxseq").glob("*.py.meta")):
        codes.update(json.loads(meta.read_text())["exit_code_by_key"])
    return codes


def _module_of(name: str) -> str:
    return name.split(".")[1]


def _generate(work: Path, env: dict) -> dict[str, int | None]:
    """Creates the mutants and the test statistics (mutmut's first run with no match)."""
    subprocess.run(
        [sys.executable, "-m", "mutmut", "run", "--max-children", "2", "__no_such_mutant__*"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    codes = _read_meta(work)
    if not codes:
        raise RuntimeError(f"mutmut generated no mutants in {work}")
    return codes


def _function_of(name: str) -> str:
    """``jaxseq.train.x_fit__mutmut_3`` -> ``fit``; methods: ``xǁClassǁmethod`` -> ``method``."""
    mangled = name.split(".")[2].rsplit("__mutmut_", 1)[0]
    return mangled.split("ǁ")[-1] if "ǁ" in mangled else mangled[2:]


def _in_scope(name: str) -> bool:
    return _function_of(name) not in OUT_OF_SCOPE.get(_module_of(name), ())


def _sample(names: list[str], fraction: float, seed: int) -> list[str]:
    if fraction >= 1.0:
        return names
    by_module: dict[str, list[str]] = {}
    for n in names:
        by_module.setdefault(_module_of(n), []).append(n)
    rng = random.Random(seed)
    chosen = []
    for mod in sorted(by_module):
        group = sorted(by_module[mod])
        k = max(1, round(fraction * len(group)))
        chosen += sorted(rng.sample(group, k))
    # Drawn before the scope filter, so that a change of scope keeps the other draws.
    return [n for n in chosen if _in_scope(n)]


def _diff(work: Path, env: dict, name: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "mutmut", "show", name],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def _pytest(tree: Path, env: dict, args: list[str], mutant: str | None, timeout: float):
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
    cmd += ["-p", "no:xdist", "-p", "no:benchmark", "-p", "no:randomly", *args]
    run_env = dict(env, MUTANT_UNDER_TEST=mutant or "")
    try:
        proc = subprocess.run(
            cmd, cwd=tree, env=run_env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return None, ""
    return proc.returncode, proc.stdout


def _test_ids(tree: Path, env: dict, files: list[str]) -> list[str]:
    code, out = _pytest(tree, env, ["--collect-only", *files], None, 600)
    if code not in (0, 5):
        raise RuntimeError(f"collecting {files} in {tree} failed:\n{out[-3000:]}")
    return [line for line in out.splitlines() if "::" in line]


def _recheck(work: Path, env: dict, names: list[str], codes: dict, equivalent: dict, jobs: int):
    """Re-runs the undetected, unexplained mutants of a finished run against today's tests.

    The mutated tree mutmut built is copied with ``tests/`` replaced by the working
    tree's; each mutant is switched on by mutmut's own ``MUTANT_UNDER_TEST`` variable.
    Only the tests added since the run are run (the others already let the mutant
    through), stopping at the first failure. Statuses go to ``<work>/recheck.json``.
    """
    from concurrent.futures import ThreadPoolExecutor

    todo = [
        n for n in names if _status(codes.get(n)) in (SURVIVED, NO_TESTS) and n not in equivalent
    ]
    done_file = work / "recheck.json"
    done = json.loads(done_file.read_text()) if done_file.exists() else {}
    todo = [n for n in todo if done.get(n) != KILLED]  # a second recheck skips the killed
    tree = work / "recheck"
    if tree.exists():
        shutil.rmtree(tree)
    shutil.copytree(work / "mutants", tree, ignore=shutil.ignore_patterns("__pycache__"))
    old_ids = {
        m: set(_test_ids(tree, env, _tests_of(m))) for m in sorted({_module_of(n) for n in todo})
    }
    shutil.rmtree(tree / "tests")
    shutil.copytree(ROOT / "tests", tree / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    new_ids = {
        m: [t for t in _test_ids(tree, env, _tests_of(m)) if t not in old_ids[m]] for m in old_ids
    }
    # The new tests must pass without a mutant (the suite as a whole is CI's to check).
    fresh = sorted({t for ids in new_ids.values() for t in ids})
    code, out = _pytest(tree, env, fresh, None, 3600) if fresh else (0, "")
    if code != 0:
        raise RuntimeError(f"the new tests fail without any mutant:\n{out[-3000:]}")

    def one(name):
        # The run's tests already let this mutant through: only the tests added since
        # can kill it (an old test strengthened in place is not re-run: conservative).
        added = new_ids[_module_of(name)]
        if not added:
            return name, SURVIVED
        code, _ = _pytest(tree, env, added, name, 1800)
        return name, {None: TIMEOUT, 1: KILLED, 0: SURVIVED}.get(code, "suspicious")

    results = dict(done)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for i, (name, status) in enumerate(pool.map(one, todo), 1):
            results[name] = status
            print(f"[{i}/{len(todo)}] {status}: {name}", flush=True)
            done_file.write_text(json.dumps(results, indent=1))  # kept if the run is stopped
    return results


def _rates(records: list[dict], module: str) -> dict:
    """Counts and the mutation score of one module ("all": every module).

    Detected = killed + timeout; the score is detected / (detected + survived +
    no tests): a mutant no test runs counts against it, as a survivor does.
    """
    group = [r for r in records if module == "all" or r["module"] == module]
    n = {s: sum(r["status"] == s for r in group) for s in (KILLED, SURVIVED, TIMEOUT, NO_TESTS)}
    n["run"] = len(group)
    n["equivalent"] = sum(r["status"] == SURVIVED and bool(r.get("equivalent")) for r in group)
    detected = n[KILLED] + n[TIMEOUT]
    judged = detected + n[SURVIVED] + n[NO_TESTS]
    n["score"] = detected / judged if judged else float("nan")
    rest = judged - n["equivalent"]
    n["score_eq"] = detected / rest if rest else float("nan")
    return n


def _report(records: list[dict], modules: list[str], meta: dict, baseline: dict | None) -> str:
    lines = [
        "# Mutation testing of the core modules",
        "",
        f"mutmut {meta['mutmut']}, {meta['when']}, CPU: {meta['cpu']}, "
        + (f"{meta['seconds']:.0f} s for " if meta["seconds"] else "")
        + f"{meta['run']} mutants "
        f"(sample {meta['sample']:.0%} of {meta['generated']}, seed {meta['seed']}), "
        f"tests from {meta['tests']}.",
        "",
        "Score = (killed + timeout) / (killed + timeout + survived + no tests). Equivalent "
        "survivors (a change that cannot alter behaviour) are listed in "
        "`benchmarks/mutation_equivalent.json` with their reason and left out of the last "
        "column.",
    ]
    unchecked = sum(r["status"] == "not checked" for r in records)
    if unchecked:
        lines += ["", f"{unchecked} sampled mutants were not checked (the run was stopped first)."]
    head = "| module | run | killed | timeout | survived | no tests | equivalent | score "
    head += "| score, equivalent left out |"
    if baseline:
        head += f" score with tests from {baseline['meta']['tests']} |"
        lines += [
            "",
            f"Baseline: the same mutants (those checked here) with the tests from "
            f"{baseline['meta']['tests']} "
            f"({baseline['meta']['when']}).",
        ]
    lines += ["", head, "|---" + "|---:" * (head.count("|") - 2) + "|"]
    for mod in [*modules, "all"]:
        n = _rates(records, mod)
        row = (
            f"| {mod} | {n['run']} | {n[KILLED]} | {n[TIMEOUT]} | {n[SURVIVED]} | {n[NO_TESTS]} "
            f"| {n['equivalent']} | {n['score']:.1%} | {n['score_eq']:.1%} |"
        )
        if baseline:  # over the same mutants: those this run checked
            checked = {r["name"] for r in records if r["status"] != "not checked"}
            b = _rates([r for r in baseline["mutants"] if r["name"] in checked], mod)
            row += f" {b['score']:.1%} ({b[SURVIVED] + b[NO_TESTS]} undetected) |"
        lines.append(row)
    undetected = [r for r in records if r["status"] in (SURVIVED, NO_TESTS)]
    if undetected:
        lines += ["", "## Undetected mutants", ""]
        for r in undetected:
            why = r.get("equivalent") or "**not explained: a missing test**"
            lines += [f"### `{r['name']}` ({r['status']})", "", f"Equivalent: {why}", ""]
            lines += ["```diff", r.get("diff", ""), "```", ""]
    return "\n".join(lines) + "\n"


def _describe_rev(rev: str | None) -> str:
    if rev is None:
        return "the working tree"
    out = subprocess.run(
        ["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True
    )
    return f"commit {out.stdout.strip() or rev}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modules", default=",".join(MODULES), help="comma-separated core modules")
    ap.add_argument("--sample", type=float, default=1.0, help="fraction of mutants to run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tests-rev", default=None, help="take tests/ from this git revision")
    ap.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--out", default="results/mutation")
    ap.add_argument("--baseline", default=None, help="a mutation.json to compare with")
    ap.add_argument(
        "--recheck",
        action="store_true",
        help="re-run the undetected mutants of the finished run in --work with today's tests",
    )
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="only (re)write the report from the mutants already run in --work",
    )
    args = ap.parse_args(argv)

    modules = [m.strip() for m in args.modules.split(",") if m.strip()]
    unknown = sorted(set(modules) - set(MODULES))
    if unknown:
        ap.error(f"--modules: unknown {unknown}; choose from {sorted(MODULES)}")
    if not 0.0 < args.sample <= 1.0:
        ap.error(f"--sample: expected a fraction in (0, 1], got {args.sample}")
    try:
        import mutmut
    except ImportError:
        print("mutmut is not installed: pip install mutmut", file=sys.stderr)
        return 2

    if (args.report_only or args.recheck) and not args.work:
        ap.error("--report-only and --recheck need --work")
    work = Path(args.work or tempfile.mkdtemp(prefix="jaxseq-mutation-")).resolve()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = _env(work)
    start = time.perf_counter()
    equivalent = json.loads(EQUIVALENT_FILE.read_text()) if EQUIVALENT_FILE.exists() else {}
    if args.report_only or args.recheck:
        names = _sample(sorted(_read_meta(work)), args.sample, args.seed)
        if args.recheck:
            _recheck(work, env, names, _read_meta(work), equivalent, args.max_children)
    else:
        _prepare(work, modules, args.tests_rev)
        print(f"generating mutants and test statistics in {work} ...", flush=True)
        codes = _generate(work, env)
        names = _sample(sorted(codes), args.sample, args.seed)
        print(f"{len(codes)} mutants generated, running {len(names)}", flush=True)
        # mutmut shows its own progress line; it re-runs only the mutants named.
        subprocess.run(
            [sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children)]
            + names,
            cwd=work,
            env=env,
            check=False,
        )
    seconds = time.perf_counter() - start
    previous = out / "mutation.json"
    if args.report_only:  # the time of the run itself, when an earlier report kept it
        seconds = json.loads(previous.read_text())["meta"]["seconds"] if previous.exists() else None
    codes = _read_meta(work)
    rechecked_file = work / "recheck.json"
    rechecked = json.loads(rechecked_file.read_text()) if rechecked_file.exists() else {}
    records = []
    for name in names:
        status = rechecked.get(name) or _status(codes.get(name))
        rec = {"name": name, "module": _module_of(name), "status": status}
        if name in rechecked:
            rec["rechecked"] = True
        if rec["status"] in (SURVIVED, NO_TESTS):
            rec["diff"] = _diff(work, env, name)
            rec["equivalent"] = equivalent.get(name)
        records.append(rec)
    meta = {
        "mutmut": getattr(mutmut, "__version__", "3"),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": cpu_model(),
        "seconds": seconds,
        "run": len(names),
        "generated": len(codes),
        "sample": args.sample,
        "seed": args.seed,
        "tests": _describe_rev(args.tests_rev)
        + (
            f"; its {len(rechecked)} undetected, unexplained mutants re-run with "
            "the working tree's tests"
            if rechecked
            else ""
        ),
        "modules": modules,
    }
    (out / "mutation.json").write_text(json.dumps({"meta": meta, "mutants": records}, indent=1))
    baseline = json.loads(Path(args.baseline).read_text()) if args.baseline else None
    report = _report(records, modules, meta, baseline)
    (out / "mutation.md").write_text(report)
    print(report.split("\n## ")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
