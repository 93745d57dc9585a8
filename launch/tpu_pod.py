#!/usr/bin/env python3
"""Run jaxunlearn on every worker of a Cloud TPU VM slice, or of several slices (multislice).

    python launch/tpu_pod.py launch NAME --zone=ZONE --accelerator-type=v5e-16 [--spot] [--slices=N] -- \\
        --config=configs/ga_kl.py:arxiv --config.model.path=01-ai/Yi-6B --workdir=gs://BUCKET/run ...
    python launch/tpu_pod.py logs|status|stop NAME --zone=ZONE [--run-name=RUN]
    python launch/tpu_pod.py delete NAME --zone=ZONE

``launch`` reuses the TPU VM ``NAME`` or creates it (``--queued``: a queued resource, waited for until ACTIVE;
``--slices=N``: N slices ``NAME-0`` ... ``NAME-<N-1>``), packs this checkout's files (uncommitted changes
included) into an archive, copies it with the worker script ``tpu_worker.sh`` to every worker, and there
(``~/jaxunlearn/<run>/`` on each worker's own disk) unpacks it, builds or reuses a Python 3.11 environment with
uv, and starts ``python -m jaxunlearn.main --config=CONFIG --config.distributed=True FLAGS`` (the flags after
``--``) detached, logging to ``~/jaxunlearn/<run>/logs/worker-<id>.log``. ``--dry-run`` prints every gcloud
command and runs none. Standard library only: it runs wherever gcloud does. See launch/README.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORKER_SCRIPT = HERE / "tpu_worker.sh"
REMOTE_ROOT = "jaxunlearn"  # on each worker, relative to its home directory

# Cloud TPU's accelerator type prefix per generation (the planner's v5e-16 is gcloud's v5litepod-16), and the
# stock TPU VM image for it (they ship Python 3.10; the worker script brings its own 3.11 with uv).
GENERATIONS = {"v5e": "v5litepod"}
RUNTIME_VERSIONS = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
NOT_FOUND = re.compile(r"NOT_FOUND|not found", re.IGNORECASE)
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class LaunchError(Exception):
    """A step failed; the message says which and what to do."""


def accelerator_type(spec: str) -> str:
    """gcloud's name of a slice type: ``v5e-16`` -> ``v5litepod-16``; ``v4-32`` stays."""
    generation, _, size = spec.partition("-")
    if not size.isdigit():
        raise LaunchError(f"--accelerator-type {spec!r}: expected GENERATION-SIZE, e.g. v5e-16, v5litepod-16, v4-32")
    return f"{GENERATIONS.get(generation, generation)}-{size}"


def runtime_version(accelerator: str) -> str:
    generation = accelerator.split("-")[0]
    if generation not in RUNTIME_VERSIONS:
        raise LaunchError(f"no default TPU VM image for {accelerator}: give --version (gcloud's --version)")
    return RUNTIME_VERSIONS[generation]


@dataclasses.dataclass
class Gcloud:
    """``gcloud compute tpus ...`` with the zone and project; every command is printed before it runs."""

    zone: str
    project: str | None = None
    dry_run: bool = False

    def command(self, *args: str) -> list[str]:
        project = [f"--project={self.project}"] if self.project else []
        return ["gcloud", "compute", "tpus", *args, f"--zone={self.zone}", *project]

    def run(self, *args: str, capture: bool = False, check: bool = True) -> subprocess.CompletedProcess:
        cmd = self.command(*args)
        print("+ " + shlex.join(cmd), flush=True)
        if self.dry_run:
            return subprocess.CompletedProcess(cmd, 0, "", "")
        result = subprocess.run(cmd, text=True, capture_output=capture)
        if check and result.returncode:
            detail = f": {result.stderr.strip()}" if capture and result.stderr else ""
            raise LaunchError(f"{shlex.join(cmd)} exited with status {result.returncode}{detail}")
        return result

    def describe(self, *args: str) -> str | None:
        """The output of a ``describe``, or ``None`` when the resource does not exist (always, in a dry run)."""
        result = self.run(*args, capture=True, check=False)
        if self.dry_run:
            print("# dry run: assuming it does not exist yet", flush=True)
            return None
        if result.returncode == 0:
            return result.stdout.strip()
        if NOT_FOUND.search(result.stderr):
            return None
        raise LaunchError(f"gcloud compute tpus {args[0]} describe failed: {result.stderr.strip()}")


# ----------------------------------------------------------------------------------------------- the slice


def node_names(args: argparse.Namespace) -> list[str]:
    """The TPU VMs of the run: ``NAME``, or ``NAME-0`` ... for a multislice queued resource."""
    return [f"{args.name}-{i}" for i in range(args.slices)] if args.slices > 1 else [args.name]


def ensure_node(gcloud: Gcloud, args: argparse.Namespace) -> None:
    """Reuse the TPU VM ``NAME`` when it is READY and of the requested type, else create it."""
    accelerator = accelerator_type(args.accelerator_type)
    found = gcloud.describe("tpu-vm", "describe", args.name, "--format=value(state,acceleratorType)")
    if found is None:
        spot = ["--spot"] if args.spot else []
        version = args.version or runtime_version(accelerator)
        gcloud.run("tpu-vm", "create", args.name, f"--accelerator-type={accelerator}", f"--version={version}", *spot)
        return
    state, _, existing = found.partition("\t")
    if existing.strip() and existing.strip() != accelerator:
        raise LaunchError(f"{args.name} exists as a {existing.strip()}, not a {accelerator}: use another name")
    if state.strip() != "READY":
        raise LaunchError(
            f"{args.name} is {state.strip()}, not READY; delete it ({this_script()} delete {where(args)}) "
            "and launch again"
        )
    print(f"# reusing {args.name} ({accelerator}, READY)", flush=True)


def ensure_queued(gcloud: Gcloud, args: argparse.Namespace) -> None:
    """Reuse or create the queued resource ``NAME`` and wait until it is ACTIVE."""
    accelerator = accelerator_type(args.accelerator_type)
    if gcloud.describe("queued-resources", "describe", args.name, "--format=value(state.state)") is None:
        nodes = [f"--node-count={args.slices}", f"--node-prefix={args.name}"] if args.slices > 1 else []
        gcloud.run(
            "queued-resources",
            "create",
            args.name,
            f"--accelerator-type={accelerator}",
            f"--runtime-version={args.version or runtime_version(accelerator)}",
            *(nodes or [f"--node-id={args.name}"]),
            *(["--spot"] if args.spot else []),
        )
    wait_active(gcloud, args)


def wait_active(gcloud: Gcloud, args: argparse.Namespace) -> None:
    describe = ("queued-resources", "describe", args.name, "--format=value(state.state)")
    if gcloud.dry_run:
        print(
            f"# then, every {args.poll_seconds:g} s until ACTIVE: {shlex.join(gcloud.command(*describe))}", flush=True
        )
        return
    deadline, last = time.monotonic() + args.wait_minutes * 60, None
    while (state := gcloud.describe(*describe)) != "ACTIVE":
        if state in ("FAILED", "SUSPENDED", "SUSPENDING", "DELETING", None):
            raise LaunchError(f"queued resource {args.name} is {state or 'gone'}; delete it and launch again")
        if time.monotonic() > deadline:
            raise LaunchError(f"queued resource {args.name} still {state} after {args.wait_minutes:g} min")
        if state != last:
            print(f"# queued resource {args.name}: {state}; waiting", flush=True)
            last = state
        time.sleep(args.poll_seconds)


# ------------------------------------------------------------------------------------------------ the code


def git(*args: str, repo: Path = REPO) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def checkout_files(repo: Path, mode: str) -> list[str]:
    """Files to ship: ``worktree`` = tracked plus untracked files git does not ignore, ``tracked`` = tracked
    only; both as they are on disk (uncommitted changes included; deleted files and submodules left out)."""
    others = ["--others", "--exclude-standard"] if mode == "worktree" else []
    names = git("ls-files", "-z", "--cached", *others, repo=repo).split("\0")
    return sorted({n for n in names if n and ((repo / n).is_file() or (repo / n).is_symlink())})


def describe_checkout(repo: Path) -> dict[str, object]:
    commit = git("rev-parse", "--short", "HEAD", repo=repo).strip()
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", repo=repo).strip())
    return {"commit": commit, "uncommitted_changes": dirty}


def write_archive(repo: Path, mode: str, dest: Path) -> str:
    """Pack the code into ``dest`` (tar.gz): the checkout (``worktree``/``tracked``) or a git ref."""
    if mode not in ("worktree", "tracked"):
        git("archive", "--format=tar.gz", f"--output={dest}", mode, repo=repo)
        return f"git archive {mode} ({git('rev-parse', '--short', mode, repo=repo).strip()})"
    files = checkout_files(repo, mode)
    stamp = {**describe_checkout(repo), "files": len(files), "packed": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with tarfile.open(dest, "w:gz") as tar:
        for name in files:
            tar.add(repo / name, arcname=name, recursive=False)
        data = json.dumps(stamp, indent=1).encode()
        info = tarfile.TarInfo("LAUNCHED_FROM.json")
        info.size, info.mtime = len(data), int(time.time())
        tar.addfile(info, io.BytesIO(data))
    changes = " + uncommitted changes" if stamp["uncommitted_changes"] else ""
    return f"{len(files)} files of {repo} at {stamp['commit']}{changes}"


# ------------------------------------------------------------------------------------------------- the run


def main_command(args: argparse.Namespace) -> list[str]:
    """The arguments of ``python -m MODULE`` on every worker: the flags after ``--``, the config file first, then
    ``--config.distributed=True`` (and the data axis over slices for multislice) before the other flags."""
    config = [f for f in args.flags if f.startswith("--config=")]
    rest = [f for f in args.flags if not f.startswith("--config=")]
    multislice = [f"--config.mesh.dcn_data={args.slices}"] if args.slices > 1 else []
    return [*config, "--config.distributed=True", *multislice, *rest]


def worker_start_command(args: argparse.Namespace, run: str) -> str:
    short = "jaxunlearn.main" if args.module == "main" else f"jaxunlearn.commands.{args.module}"
    module = args.module if args.module.startswith("jaxunlearn.") else short
    options = [f"--module={module}"]
    options += [f"--python={args.python}"] if args.python else [f"--python-version={args.python_version}"]
    options += [f"--pip={spec}" for spec in args.pip] + [f"--env={kv}" for kv in args.env]
    return f"bash ~/{REMOTE_ROOT}/{run}/worker.sh start {shlex.join(options)} -- {shlex.join(main_command(args))}"


def start_on_node(gcloud: Gcloud, node: str, stage: Path, args: argparse.Namespace, run: str) -> None:
    """Copy the code and the worker script to every worker of ``node`` and start the run there."""
    remote = f"{REMOTE_ROOT}/{run}"
    gcloud.run("tpu-vm", "ssh", node, "--worker=all", f"--command=mkdir -p ~/{remote}")
    gcloud.run(
        "tpu-vm", "scp", str(stage / "code.tar.gz"), str(stage / "worker.sh"), f"{node}:{remote}/", "--worker=all"
    )
    gcloud.run("tpu-vm", "ssh", node, "--worker=all", f"--command={worker_start_command(args, run)}")


def on_nodes(gcloud: Gcloud, nodes: list[str], fn, *rest) -> None:
    """``fn(gcloud, node, *rest)`` for every node, the slices of a multislice run at the same time."""
    if len(nodes) == 1 or gcloud.dry_run:
        for node in nodes:
            fn(gcloud, node, *rest)
        return
    with concurrent.futures.ThreadPoolExecutor(len(nodes)) as pool:
        for future in [pool.submit(fn, gcloud, node, *rest) for node in nodes]:
            future.result()


def this_script() -> str:
    return shlex.quote(os.path.relpath(__file__))


def where(args: argparse.Namespace) -> str:
    """The slice options of the follow-up commands."""
    out = f"{args.name} --zone={args.zone}" + (f" --project={args.project}" if args.project else "")
    return out + (f" --slices={args.slices}" if args.slices > 1 else " --queued" if args.queued else "")


def follow_up(args: argparse.Namespace, run: str) -> str:
    """How to follow, inspect and stop the run, and delete the slice."""
    me, at, nodes = this_script(), f"{where(args)} --run-name={run}", node_names(args)
    tail = f"tail -n 100 -F ~/{REMOTE_ROOT}/{run}/logs/worker-0.log"
    ssh = f"gcloud compute tpus tpu-vm ssh {nodes[0]} --zone={args.zone} --worker=0 --command='{tail}'"
    started = "would start" if args.dry_run else "started"
    return "\n".join(
        [
            f"run {run} {started} on every worker of {', '.join(nodes)}, detached (a dropped ssh does not stop it)",
            f"  follow worker 0:  {me} logs {at}   (--worker=N: another worker; Ctrl-C stops following)",
            f"                    i.e. {ssh}",
            f"  status:           {me} status {at}",
            f"  stop:             {me} stop {at}   (SIGTERM: the step is checkpointed, exit 130; --kill: SIGKILL)",
            "  resume:           launch the same command again (same --workdir): the run continues from its checkpoint",
            f"  delete the slice: {me} delete {where(args)}   (billing stops only then)",
        ]
    )


def stage_code(args: argparse.Namespace, stage: Path) -> None:
    """``code.tar.gz`` and ``worker.sh`` in ``stage`` (a dry run only says what it would pack)."""
    if not args.dry_run:
        print(f"# code: {write_archive(REPO, args.code, stage / 'code.tar.gz')}", flush=True)
        (stage / "worker.sh").write_bytes(WORKER_SCRIPT.read_bytes())
    elif args.code in ("worktree", "tracked"):
        print(f"# code: {len(checkout_files(REPO, args.code))} files of {REPO} -> {stage}/code.tar.gz", flush=True)
    else:
        print(f"# code: git archive {args.code} -> {stage}/code.tar.gz", flush=True)


def launch(args: argparse.Namespace) -> int:
    gcloud = Gcloud(args.zone, args.project, args.dry_run)
    run = args.run_name or time.strftime("%Y%m%d-%H%M%S")
    if not RUN_NAME.match(run):
        raise LaunchError(f"--run-name {run!r}: letters, digits, '.', '_' and '-' only")
    (ensure_queued if args.queued or args.slices > 1 else ensure_node)(gcloud, args)
    with tempfile.TemporaryDirectory(prefix="jaxunlearn-launch-") as tmp:
        stage_code(args, Path(tmp))
        on_nodes(gcloud, node_names(args), start_on_node, Path(tmp), args, run)
    print(follow_up(args, run), flush=True)
    return 0


def on_workers(args: argparse.Namespace, script_args: str) -> int:
    """``worker.sh SCRIPT_ARGS`` on every worker of the run (status, stop)."""
    command = f"--command=bash ~/{REMOTE_ROOT}/{args.run_name or 'latest'}/worker.sh {script_args}"
    on_nodes(Gcloud(args.zone, args.project, args.dry_run), node_names(args), _ssh_all, command)
    return 0


def _ssh_all(gcloud: Gcloud, node: str, command: str) -> None:
    gcloud.run("tpu-vm", "ssh", node, "--worker=all", command)


def logs(args: argparse.Namespace) -> int:
    gcloud = Gcloud(args.zone, args.project, args.dry_run)
    log = f"~/{REMOTE_ROOT}/{args.run_name or 'latest'}/logs/worker-{args.worker}.log"
    node = node_names(args)[args.slice]
    command = f"--command=tail -n {args.lines} -F {log}"
    return gcloud.run("tpu-vm", "ssh", node, f"--worker={args.worker}", command, check=False).returncode


def delete(args: argparse.Namespace) -> int:
    gcloud = Gcloud(args.zone, args.project, args.dry_run)
    if args.queued or args.slices > 1:
        gcloud.run("queued-resources", "delete", args.name, "--force", "--quiet")
    else:
        gcloud.run("tpu-vm", "delete", args.name, "--quiet")
    return 0


# --------------------------------------------------------------------------------------------- command line


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("name", help="TPU VM (or queued resource) name")
    common.add_argument("--zone", required=True)
    common.add_argument("--project", help="default: gcloud's configured project")
    common.add_argument("--slices", type=int, default=1, help="multislice: slices NAME-0 ... (a queued resource)")
    common.add_argument("--queued", action="store_true", help="a queued resource (implied by --slices > 1)")
    common.add_argument(
        "--run-name",
        help="the run's directory on the workers (default: a time stamp; logs/status/stop: the latest run)",
    )
    common.add_argument("--dry-run", action="store_true", help="print the gcloud commands, run none")
    top = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="action", required=True)
    run = sub.add_parser(
        "launch",
        parents=[common],
        help="create or reuse the slice, ship the code, start the run",
        usage="%(prog)s NAME --zone=ZONE [options] -- --config=CONFIG [flags of the module]",
        epilog="Everything after -- goes to `python -m jaxunlearn.MODULE` on every worker, after --config=... come "
        "--config.distributed=True (and --config.mesh.dcn_data=SLICES) and then the other flags.",
    )
    run.add_argument("--accelerator-type", default="v5e-16", help="v5e-16 (= v5litepod-16), v4-32, v5p-8, v6e-8 ...")
    run.add_argument("--version", help="TPU VM image (default per generation, e.g. v2-alpha-tpuv5-lite for v5e)")
    run.add_argument("--spot", action="store_true", help="Spot VMs (cheaper, preemptible: resume by relaunching)")
    run.add_argument("--wait-minutes", type=float, default=24 * 60, help="how long to wait for a queued resource")
    run.add_argument("--poll-seconds", type=float, default=30)
    run.add_argument(
        "--module",
        default="main",
        help="jaxunlearn command to run: main (unlearn), evaluate, compare, muse, or a module path",
    )
    run.add_argument(
        "--code",
        default="worktree",
        help="worktree (default: tracked + untracked, unignored files as "
        "on disk), tracked, or a git ref (git archive REF)",
    )
    run.add_argument("--python", help="an existing Python >= 3.11 on every worker (skips the uv environment)")
    run.add_argument("--python-version", default="3.11", help="Python of the uv environment")
    run.add_argument("--pip", action="append", default=[], help="extra package spec for the environment (repeat)")
    run.add_argument("--env", action="append", default=[], help="KEY=VALUE for the run's environment (repeat)")
    logs_p = sub.add_parser("logs", parents=[common], help="follow a worker's log (tail -F)")
    logs_p.add_argument("--worker", type=int, default=0)
    logs_p.add_argument("--slice", type=int, default=0, help="multislice: which slice's worker")
    logs_p.add_argument("--lines", type=int, default=100)
    sub.add_parser("status", parents=[common], help="running / finished (exit status) and the last log lines")
    stop = sub.add_parser("stop", parents=[common], help="SIGTERM every worker's run (checkpoint, exit 130)")
    stop.add_argument("--kill", action="store_true", help="SIGKILL instead (no checkpoint)")
    sub.add_parser("delete", parents=[common], help="delete the slice (or queued resource with its nodes)")
    return top


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Options before ``--``; everything after it is passed to the module on every worker."""
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser().parse_args(argv[:split])
    args.flags = argv[split + 1 :]
    if args.flags and args.action != "launch":
        raise LaunchError(f"{args.action} takes no flags after --")
    if args.slices < 1:
        raise LaunchError("--slices must be >= 1")
    if args.action == "logs" and not 0 <= args.slice < args.slices:
        raise LaunchError(f"--slice={args.slice}: the run has slices 0 to {args.slices - 1} (--slices)")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        actions = {
            "launch": launch,
            "logs": logs,
            "status": lambda a: on_workers(a, "status"),
            "stop": lambda a: on_workers(a, "stop --signal=KILL" if a.kill else "stop"),
            "delete": delete,
        }
        return actions[args.action](args)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
