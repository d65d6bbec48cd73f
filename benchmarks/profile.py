"""Profile the service under load with py-spy (how benchmarks/PROFILE.md was made).

``python -m benchmarks.profile [--mode miss|hit|pairs] [--seconds 20] [--rate 100] [--out DIR]``

Spawns the stack (:mod:`benchmarks.stack`), drives it with wrk in the ``miss``
scenario (base64 bodies), the ``hit`` one (10 of them repeated) or the ``pairs``
one (JSON ``[[I, Q]]`` bodies, every one distinct too) at 100 connections, then,
one process at a time: psutil CPU per
process group over a window, ``py-spy record --gil`` of each gunicorn worker,
of one pool child and of the Celery main process, and a ``py-spy dump`` of each.
Prints the top functions (self and inclusive %) per process and keeps the raw
collapsed stacks in ``--out``. Needs ``py-spy`` (``pip install py-spy``) and
``wrk``; py-spy must be allowed to read other processes (root, or ptrace scope 0).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

from benchmarks.bench import LUA_SCRIPT, Options, build_workload, wrk_binary
from benchmarks.report import load_average
from benchmarks.stack import ROOT, spawn_stack

# Frames that every sample of a process carries (entry points, loops): not informative.
_BORING = re.compile(
    r"^(Thread|_WorkItem|_worker|Flask\.|ThreadWorker\.handle|Arbiter|Worker\.|<module>|_run|"
    r"BaseApp|Application|run \(gunicorn|Command|Group|Context|pass_context|main|handle_pre|"
    r"BaseProcess|Pool|Popen|ForkProcess|AsynPool|TaskPool|BasePool|Blueprint|StartStop|"
    r"WorkController|worker \()"
)


def _short(frame: str) -> str:
    match = re.match(r"(.*) \((.*?):(\d+)\)$", frame)
    if not match:
        return frame
    function, path, _ = match.groups()
    path = re.sub(r"^.*/site-packages/", "", path)
    path = path.replace(str(ROOT) + "/", "")
    path = re.sub(r"^.*/lib/python3\.\d+/", "", path)
    return f"{function} ({path})"


def top_functions(raw_files: Sequence[Path], n_self: int = 20, n_incl: int = 30) -> str:
    """Self and inclusive shares of py-spy collapsed stacks (``-f raw``) as text."""
    self_count: collections.Counter[str] = collections.Counter()
    incl_count: collections.Counter[str] = collections.Counter()
    total = 0
    for path in raw_files:
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            stack, count = line.rsplit(" ", 1)
            frames = [_short(f) for f in stack.split(";")]
            n = int(count)
            total += n
            self_count[frames[-1]] += n
            for frame in set(frames):
                incl_count[frame] += n
    if not total:
        return "no samples (the process never held the GIL?)"
    lines = [f"{total} samples", "-- self"]
    lines += [f"{100 * n / total:5.1f}%  {f}" for f, n in self_count.most_common(n_self)]
    lines.append("-- inclusive")
    shown = [(f, n) for f, n in incl_count.most_common() if not _BORING.match(f)]
    lines += [f"{100 * n / total:5.1f}%  {f}" for f, n in shown[:n_incl]]
    return "\n".join(lines)


def _switches(pid: int) -> int:
    """Context switches of every thread of ``pid`` (its /proc status counts the main one only)."""
    total = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        try:
            lines = status.read_text().splitlines()
        except OSError:  # the thread ended
            continue
        total += sum(int(line.split()[1]) for line in lines if "ctxt_switches" in line)
    return total


def _cpu(pids: Sequence[int]) -> dict[int, tuple[float, float, int]]:
    """pid -> (CPU s, of which system s, context switches of all its threads) so far."""
    out = {}
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        out[pid] = (times.user + times.system, times.system, _switches(pid))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.profile``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__)
    parser.add_argument("--seconds", type=float, default=20.0, help="per py-spy record")
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--scenes", type=int, default=60)
    parser.add_argument(
        "--mode",
        choices=("miss", "hit", "pairs"),
        default="miss",
        help="the bench scenario to drive",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/profile"))
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        print("py-spy not found: pip install py-spy", file=sys.stderr)
        return 2
    wrk = wrk_binary()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="heimdall-profile-"))
    try:
        workload = build_workload(
            Options(scenes=args.scenes, pairs_scenes=args.scenes if args.mode == "pairs" else 1),
            work,
        )
        with spawn_stack() as stack:
            api = [p.pid for p in psutil.Process(stack.pids["gunicorn"]).children()]
            pool = [p.pid for p in psutil.Process(stack.pids["worker"]).children()]
            groups = {"api_workers": api, "celery_main": [stack.pids["worker"]],
                      "celery_children": pool, "redis": [stack.pids["redis"]]}  # fmt: skip
            records = [(f"api{i}", pid) for i, pid in enumerate(api)]
            records += [("child", pool[0]), ("celery_main", stack.pids["worker"])]
            manifest = "pairs" if args.mode == "pairs" else "base64"
            duration = 15 + 20 + args.seconds * len(records) + 10
            load = subprocess.Popen(
                [wrk, "-t2", f"-c{args.connections}", f"-d{int(duration)}s", "--timeout", "60s",
                 "-s", str(LUA_SCRIPT), stack.base_url, "--", f"mode={args.mode}",
                 f"manifest={workload.manifests[manifest]}", "path=/api/v1/predict", "salt=1",
                 f"conns_per_thread={max(1, args.connections // 2)}"],
                stdout=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(6)
            everyone = [pid for pids in groups.values() for pid in pids] + [load.pid]
            before, load_before = _cpu(everyone), load_average()
            time.sleep(20)
            after = _cpu(everyone)

            def spent(pids: Sequence[int], field: int) -> float:
                return sum(
                    after[p][field] - before[p][field] for p in pids if p in before and p in after
                )

            every = {**groups, "wrk": [load.pid]}
            cpu = {name: round(spent(pids, 0), 2) for name, pids in every.items()}
            system = {name: round(spent(pids, 1), 2) for name, pids in every.items()}
            switches = {name: int(spent(pids, 2)) for name, pids in every.items()}
            summary: dict[str, object] = {
                "cpu_s_in_20s": cpu, "of_which_system_s": system,
                "context_switches_in_20s": switches, "load_average": load_before,
            }  # fmt: skip
            print(json.dumps(summary))
            for name, pid in records:
                raw = args.out / f"{name}.raw"
                subprocess.run([py_spy, "dump", "--pid", str(pid)], check=False,
                               stdout=(args.out / f"{name}.dump.txt").open("w"),
                               stderr=subprocess.STDOUT)  # fmt: skip
                subprocess.run([py_spy, "record", "--pid", str(pid), "-d", str(int(args.seconds)),
                                "-r", str(args.rate), "--gil", "-f", "raw", "-o", str(raw)],
                               check=False, stderr=subprocess.DEVNULL)  # fmt: skip
            load.terminate()
            load.communicate(timeout=30)
            (args.out / "cpu.json").write_text(json.dumps(summary, indent=2) + "\n")
        for label, files in (
            ("API (gunicorn workers)", sorted(args.out.glob("api*.raw"))),
            ("pool child", [args.out / "child.raw"]),
            ("Celery main process", [args.out / "celery_main.raw"]),
        ):
            text = top_functions([f for f in files if f.exists()])
            (args.out / f"{label.split()[0].lower()}.top.txt").write_text(text + "\n")
            print(f"== {label}\n{text}\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"raw stacks and dumps in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
