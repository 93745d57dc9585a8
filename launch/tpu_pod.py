#!/usr/bin/env python3
"""Run jaxunlearn on every worker of a Cloud TPU VM slice, or of several slices (multislice).

    python launch/tpu_pod.py launch NAME --zone=ZONE --accelerator-type=v5e-16 [--spot] [--slices=N] -- \\
        --config=configs/ga_kl.py:arxiv --config.model.path=01-ai/Yi-6B --workdir=gs://BUCKET/run ...
    python launch/tpu_pod.py watch NAME --zone=ZONE --run-name=RUN [the launch's options] -- FLAGS
    python launch/tpu_pod.py logs|status|stop NAME --zone=ZONE [--run-name=RUN]
    python launch/tpu_pod.py delete NAME --zone=ZONE

``launch`` reuses the TPU VM ``NAME`` or creates it (``--queued``: a queued resource, waited for until ACTIVE;
``--slices=N``: N slices ``NAME-0`` ... ``NAME-<N-1>``), packs this checkout's files (uncommitted changes
included) into an archive, copies it with the worker script ``tpu_worker.sh`` to every worker, and there
(``~/jaxunlearn/<run>/`` on each worker's own disk) unpacks it, builds or reuses a Python >= 3.11 environment with
a pinned uv from the package index, and starts ``python -m jaxunlearn.main --config=CONFIG --config.distributed=True
FLAGS`` (the flags after ``--``) detached, logging to ``~/jaxunlearn/<run>/logs/worker-<id>.log``. ssh and scp are
retried with exponential backoff while a fresh slice refuses connections. ``--watch`` then polls the slice and the
workers and, on a preemption or a dead worker, deletes the slice, recreates it and relaunches the run, which resumes
from its checkpoint. ``--dry-run`` prints every gcloud command and runs none. Standard library only: it runs wherever
gcloud does. See launch/README.md.
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
# TPU VM image for it: Cloud TPU's "TPU software versions" table for PyTorch and JAX (v6e, v5p, v5e, "v4 and
# older"). These images are Ubuntu 22.04 with Python 3.10: the worker script then finds another Python >= 3.11 on
# the image or has uv download one (see build_env in tpu_worker.sh).
GENERATIONS = {"v5e": "v5litepod", "trillium": "v6e"}
RUNTIME_VERSIONS = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
# Ironwood (TPU7x) is not served by the Cloud TPU API that `gcloud compute tpus` drives (GKE or Compute Engine only).
NOT_ON_TPU_API = ("tpu7", "v7", "ironwood")
# Slice states that are on their way to READY/ACTIVE (the watcher waits); any other one than READY/ACTIVE is lost.
PASSING_STATES = {"CREATING", "STARTING", "RESTARTING", "REPAIRING", "REIMAGING", "ACCEPTED", "PROVISIONING",
                  "WAITING_FOR_RESOURCES", "CREATING_RESOURCES"}  # fmt: skip
# Worker exit statuses the watcher does not retry (a relaunch would end the same way, or a person stopped the run).
FINAL_STATUSES = {2: "bad input", 3: "non-finite values", 130: "stopped by SIGTERM/SIGINT"}
STATUS_LINE = re.compile(r"JAXUNLEARN_STATUS worker=(\d+) state=(\w+)(?: exit=(\d+))?")
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
    if generation.lower().startswith(NOT_ON_TPU_API):
        raise LaunchError(
            f"{accelerator}: Ironwood (TPU7x) is not available through the Cloud TPU API (gcloud compute tpus); "
            "use GKE or Compute Engine"
        )
    if generation not in RUNTIME_VERSIONS:
        raise LaunchError(f"no default TPU VM image for {accelerator}: give --version (gcloud's --version)")
    return RUNTIME_VERSIONS[generation]


@dataclasses.dataclass
class Gcloud:
    """``gcloud compute tpus ...`` with the zone and project; every command is printed before it runs (polls of
    the watcher excepted). ssh and scp (:meth:`remote`) go over ``ssh_via`` and are retried: a fresh slice refuses
    connections for a while."""

    zone: str
    project: str | None = None
    dry_run: bool = False
    ssh_via: str | None = None  # None: external IPs; "internal-ip": --internal-ip; "iap": --tunnel-through-iap
    tries: int = 6
    retry_seconds: float = 10.0

    def command(self, *args: str, alpha: bool = False) -> list[str]:
        project = [f"--project={self.project}"] if self.project else []
        track = ["alpha"] if alpha else []
        return ["gcloud", *track, "compute", "tpus", *args, f"--zone={self.zone}", *project]

    def run(
        self, *args: str, capture: bool = False, check: bool = True, echo: bool = True, alpha: bool = False
    ) -> subprocess.CompletedProcess:
        cmd = self.command(*args, alpha=alpha)
        if echo or self.dry_run:
            print("+ " + shlex.join(cmd), flush=True)
        if self.dry_run:
            return subprocess.CompletedProcess(cmd, 0, "", "")
        result = subprocess.run(cmd, text=True, capture_output=capture)
        if check and result.returncode:
            detail = f": {result.stderr.strip()}" if capture and result.stderr else ""
            raise LaunchError(f"{shlex.join(cmd)} exited with status {result.returncode}{detail}")
        return result

    def remote(self, *args: str, capture: bool = False, check: bool = True, echo: bool = True):
        """``tpu-vm ssh|scp ...`` over ``ssh_via``, retried with exponential backoff (``retry_seconds`` x 1, 2, 4
        ... up to ``tries`` tries) when the connection fails: ssh's status 255 (the remote command's own status is
        not retried), any scp failure. ``--tunnel-through-iap`` is a flag of gcloud's alpha track only."""
        verb = args[1]
        node = args[2] if verb == "ssh" else next(a.split(":")[0] for a in args[2:] if ":" in a)
        via = {"internal-ip": ["--internal-ip"], "iap": ["--tunnel-through-iap"]}.get(self.ssh_via or "", [])
        for attempt in range(1, self.tries + 1):
            result = self.run(*args, *via, capture=capture, check=False, echo=echo, alpha=self.ssh_via == "iap")
            failed = result.returncode == 255 if verb == "ssh" else result.returncode != 0
            if not failed or attempt == self.tries:
                break
            delay = self.retry_seconds * 2 ** (attempt - 1)
            why = (result.stderr or "").strip().splitlines()[-1:] if capture else []
            print(
                f"# {verb} to {node} failed with status {result.returncode}{': ' + why[0] if why else ''}; "
                f"try {attempt + 1} of {self.tries} in {delay:g} s",
                flush=True,
            )
            time.sleep(delay)
        if check and result.returncode:
            detail = f": {result.stderr.strip()}" if capture and result.stderr else ""
            raise LaunchError(f"{shlex.join(result.args)} exited with status {result.returncode}{detail}")
        return result

    def describe(self, *args: str, echo: bool = True) -> str | None:
        """The output of a ``describe``, or ``None`` when the resource does not exist (always, in a dry run)."""
        result = self.run(*args, capture=True, check=False, echo=echo)
        if self.dry_run:
            print("# dry run: assuming it does not exist yet", flush=True)
            return None
        if result.returncode == 0:
            return result.stdout.strip()
        if NOT_FOUND.search(result.stderr):
            return None
        raise LaunchError(f"gcloud compute tpus {args[0]} describe failed: {result.stderr.strip()}")


def make_gcloud(args: argparse.Namespace) -> Gcloud:
    return Gcloud(args.zone, args.project, args.dry_run, args.ssh_via, args.ssh_tries, args.ssh_retry_seconds)


# ----------------------------------------------------------------------------------------------- the slice


def node_names(args: argparse.Namespace) -> list[str]:
    """The TPU VMs of the run: ``NAME``, or ``NAME-0`` ... for a multislice queued resource."""
    return [f"{args.name}-{i}" for i in range(args.slices)] if args.slices > 1 else [args.name]


def queued(args: argparse.Namespace) -> bool:
    return args.queued or args.slices > 1


def create_options(args: argparse.Namespace) -> list[str]:
    """The options ``tpu-vm create`` and ``queued-resources create`` share (same spelling in both)."""
    values = [("network", args.network), ("subnetwork", args.subnetwork)]
    values += [("service-account", args.service_account), ("scopes", args.scopes), ("boot-disk", args.boot_disk)]
    flags = [
        f
        for f, on in (("--spot", args.spot), ("--reserved", args.reserved), ("--internal-ips", args.internal_ips))
        if on
    ]
    flags += [f"--{name}={value}" for name, value in values if value]
    return flags + [f"--data-disk={disk}" for disk in args.data_disk]


def ensure_node(gcloud: Gcloud, args: argparse.Namespace) -> None:
    """Reuse the TPU VM ``NAME`` when it is READY and of the requested type, else create it."""
    accelerator = accelerator_type(args.accelerator_type)
    found = gcloud.describe("tpu-vm", "describe", args.name, "--format=value(state,acceleratorType)")
    if found is None:
        version = args.version or runtime_version(accelerator)
        gcloud.run(
            "tpu-vm", "create", args.name, f"--accelerator-type={accelerator}", f"--version={version}",
            *create_options(args),
        )  # fmt: skip
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


QUEUED_FORMAT = "--format=value(state.state,tpu.nodeSpec[0].node.acceleratorType)"


def ensure_queued(gcloud: Gcloud, args: argparse.Namespace) -> None:
    """Reuse (when of the requested type) or create the queued resource ``NAME`` and wait until it is ACTIVE."""
    accelerator = accelerator_type(args.accelerator_type)
    found = gcloud.describe("queued-resources", "describe", args.name, QUEUED_FORMAT)
    if found is None:
        nodes = [f"--node-count={args.slices}", f"--node-prefix={args.name}"] if args.slices > 1 else []
        gcloud.run(
            "queued-resources",
            "create",
            args.name,
            f"--accelerator-type={accelerator}",
            f"--runtime-version={args.version or runtime_version(accelerator)}",
            *(nodes or [f"--node-id={args.name}"]),
            *create_options(args),
        )
    else:
        state, _, existing = found.partition("\t")
        if existing.strip() and existing.strip() != accelerator:
            raise LaunchError(
                f"queued resource {args.name} exists as a {existing.strip()} ({state.strip() or 'state unknown'}), "
                f"not a {accelerator}: use another name, or delete it first ({this_script()} delete {where(args)})"
            )
    wait_active(gcloud, args)


def ensure_slice(gcloud: Gcloud, args: argparse.Namespace) -> None:
    (ensure_queued if queued(args) else ensure_node)(gcloud, args)


def wait_active(gcloud: Gcloud, args: argparse.Namespace) -> None:
    describe = ("queued-resources", "describe", args.name, "--format=value(state.state)")
    if gcloud.dry_run:
        print(
            f"# then, every {args.poll_seconds:g} s until ACTIVE: {shlex.join(gcloud.command(*describe))}", flush=True
        )
        return
    deadline, last = time.monotonic() + args.wait_minutes * 60, None
    while (state := gcloud.describe(*describe, echo=last is None)) != "ACTIVE":
        if state in ("FAILED", "SUSPENDED", "SUSPENDING", "DELETING", None):
            raise LaunchError(f"queued resource {args.name} is {state or 'gone'}; delete it and launch again")
        if time.monotonic() > deadline:
            raise LaunchError(f"queued resource {args.name} still {state} after {args.wait_minutes:g} min")
        if state != last:
            print(f"# queued resource {args.name}: {state}; waiting", flush=True)
            last = state
        time.sleep(args.poll_seconds)


def slice_state(gcloud: Gcloud, args: argparse.Namespace, echo: bool = False) -> str:
    """The slice's state (the queued resource's ``state.state`` for ``--queued``/multislice), or ``GONE``."""
    if queued(args):
        found = gcloud.describe("queued-resources", "describe", args.name, "--format=value(state.state)", echo=echo)
    else:
        found = gcloud.describe("tpu-vm", "describe", args.name, "--format=value(state)", echo=echo)
    return (found or "").strip() or "GONE"


def delete_slice(gcloud: Gcloud, args: argparse.Namespace) -> None:
    if queued(args):
        gcloud.run("queued-resources", "delete", args.name, "--force", "--quiet")
    else:
        gcloud.run("tpu-vm", "delete", args.name, "--quiet")


def wait_gone(gcloud: Gcloud, args: argparse.Namespace) -> None:
    """Until ``describe`` finds the deleted slice no more (a queued resource passes through DELETING)."""
    if gcloud.dry_run:
        return
    deadline = time.monotonic() + args.wait_minutes * 60
    while (state := slice_state(gcloud, args)) != "GONE":
        if time.monotonic() > deadline:
            raise LaunchError(f"{args.name} still {state} {args.wait_minutes:g} min after its deletion")
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
    index = [f"PIP_INDEX_URL={args.index_url}", f"UV_DEFAULT_INDEX={args.index_url}"] if args.index_url else []
    options += [f"--pip={spec}" for spec in args.pip] + [f"--env={kv}" for kv in [*index, *args.env]]
    return f"bash ~/{REMOTE_ROOT}/{run}/worker.sh start {shlex.join(options)} -- {shlex.join(main_command(args))}"


def start_on_node(gcloud: Gcloud, node: str, stage: Path, args: argparse.Namespace, run: str, ready: str) -> None:
    """Copy the code and the worker script to every worker of ``node`` and start the run there (the run's
    directory exists already on ``ready``)."""
    remote = f"{REMOTE_ROOT}/{run}"
    if node != ready:
        gcloud.remote("tpu-vm", "ssh", node, "--worker=all", f"--command=mkdir -p ~/{remote}")
    gcloud.remote(
        "tpu-vm", "scp", str(stage / "code.tar.gz"), str(stage / "worker.sh"), f"{node}:{remote}/", "--worker=all"
    )
    gcloud.remote("tpu-vm", "ssh", node, "--worker=all", f"--command={worker_start_command(args, run)}")


def start_run(gcloud: Gcloud, args: argparse.Namespace, run: str) -> None:
    """Ship the code to every worker of every slice and start the run. The first ssh goes alone (slice 0, all its
    workers): gcloud sets up the user's ssh key on the first connection, which parallel slices would race."""
    nodes = node_names(args)
    with tempfile.TemporaryDirectory(prefix="jaxunlearn-launch-") as tmp:
        stage_code(args, Path(tmp))
        gcloud.remote("tpu-vm", "ssh", nodes[0], "--worker=all", f"--command=mkdir -p ~/{REMOTE_ROOT}/{run}")
        on_nodes(gcloud, nodes, start_on_node, Path(tmp), args, run, nodes[0])


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
    out += f" --ssh-via={args.ssh_via}" if args.ssh_via else ""
    return out + (f" --slices={args.slices}" if args.slices > 1 else " --queued" if args.queued else "")


def follow_up(args: argparse.Namespace, run: str) -> str:
    """How to follow, inspect and stop the run, and delete the slice."""
    me, at, nodes = this_script(), f"{where(args)} --run-name={run}", node_names(args)
    tail = f"tail -n 100 -F ~/{REMOTE_ROOT}/{run}/logs/worker-0.log"
    via = {"internal-ip": " --internal-ip", "iap": " --tunnel-through-iap"}.get(args.ssh_via or "", "")
    track = " alpha" if args.ssh_via == "iap" else ""
    ssh = f"gcloud{track} compute tpus tpu-vm ssh {nodes[0]} --zone={args.zone}{via} --worker=0 --command='{tail}'"
    started = "would start" if args.dry_run else "started"
    return "\n".join(
        [
            f"run {run} {started} on every worker of {', '.join(nodes)}, detached (a dropped ssh does not stop it)",
            f"  follow worker 0:  {me} logs {at}   (--worker=N: another worker; Ctrl-C stops following)",
            f"                    i.e. {ssh}",
            f"  status:           {me} status {at}",
            f"  stop:             {me} stop {at}   (SIGTERM: the step is checkpointed, exit 130; --kill: SIGKILL)",
            "  resume:           launch the same command again (same --workdir): the run continues from its checkpoint",
            f"  watch:            the same launch command with watch instead of launch and --run-name={run}: recreates"
            " the slice and relaunches on a preemption",
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
    gcloud = make_gcloud(args)
    run = args.run_name or time.strftime("%Y%m%d-%H%M%S")
    if not RUN_NAME.match(run):
        raise LaunchError(f"--run-name {run!r}: letters, digits, '.', '_' and '-' only")
    ensure_slice(gcloud, args)
    start_run(gcloud, args, run)
    print(follow_up(args, run), flush=True)
    return watch_run(gcloud, args, run) if args.watch else 0


# --------------------------------------------------------------------------------------------------- watch


def worker_states(gcloud: Gcloud, args: argparse.Namespace, run: str) -> tuple[list[tuple], str | None]:
    """``[(node, worker, state, exit status or None)]`` from ``worker.sh status --brief`` on every worker (state:
    running, finished, killed or none), or ``([], why)`` when a slice's workers could not tell."""
    rows = []
    for node in node_names(args):
        command = f"--command=bash ~/{REMOTE_ROOT}/{run}/worker.sh status --brief"
        result = gcloud.remote("tpu-vm", "ssh", node, "--worker=all", command, capture=True, check=False, echo=False)
        found = STATUS_LINE.findall(result.stdout)
        if result.returncode or not found:
            last = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:] or [""]
            return [], f"the workers of {node} did not report (ssh status {result.returncode}: {last[0][-200:]})"
        rows += [(node, int(w), state, int(e) if e else None) for w, state, e in found]
    return rows, None


def check_run(gcloud: Gcloud, args: argparse.Namespace, run: str) -> tuple[str, str | int | None]:
    """One poll: ``("wait", line)``, ``("running", line)``, ``("done", status)`` or ``("lost", why)``."""
    healthy = "ACTIVE" if queued(args) else "READY"
    state = slice_state(gcloud, args)
    if state in PASSING_STATES:
        return "wait", f"{args.name} is {state}"
    if state != healthy:
        return "lost", f"{args.name} is {state}"
    rows, why = worker_states(gcloud, args, run)
    if why:
        return "lost", why
    for node, worker, status, code in rows:
        if status == "finished" and code in FINAL_STATUSES:
            print(f"watch: worker {worker} of {node} exited with status {code} ({FINAL_STATUSES[code]}): not retried")
            return "done", code
    for node, worker, status, code in rows:
        if status != "running" and not (status == "finished" and code == 0):
            what = {"killed": "ended without an exit status (killed)", "none": "has not started"}.get(status)
            return "lost", f"worker {worker} of {node} {what or f'exited with status {code}'}"
    if all(status == "finished" for _, _, status, _ in rows):
        print(f"watch: run {run} finished: all {len(rows)} workers exited with status 0", flush=True)
        return "done", 0
    running = sum(status == "running" for _, _, status, _ in rows)
    return "running", f"run {run}: {running} of {len(rows)} workers running on {healthy} {args.name}"


def watch_run(gcloud: Gcloud, args: argparse.Namespace, run: str) -> int:
    """Poll the slice and the run every ``--poll-seconds``; on a preemption or a dead worker delete the slice,
    recreate it and relaunch the run (which resumes from its checkpoint), at most ``--max-restarts`` times."""
    restarts, last = 0, None
    print(
        f"watch: run {run} on {args.name}, every {args.poll_seconds:g} s, at most {args.max_restarts} restarts "
        "(Ctrl-C stops watching, not the run)",
        flush=True,
    )
    if args.dry_run:
        print(f"# dry run: would poll {shlex.join(gcloud.command('tpu-vm', 'describe', args.name))} and "
              f"worker.sh status on every worker")  # fmt: skip
        return 0
    try:
        while True:
            time.sleep(args.poll_seconds)
            try:
                kind, detail = check_run(gcloud, args, run)
            except LaunchError as e:  # a failed describe (API error, expired login): try again at the next poll
                kind, detail = "wait", f"poll failed ({e}); trying again"
            if kind == "done":
                return int(detail)
            if kind in ("wait", "running"):
                if detail != last:
                    print(f"watch: {detail}", flush=True)
                    last = detail
                continue
            if restarts >= args.max_restarts:
                print(f"watch: {detail}; giving up after {restarts} restarts (--max-restarts)", flush=True)
                return 1
            restarts += 1
            print(
                f"watch: {detail}: restart {restarts} of {args.max_restarts}: deleting {args.name}, recreating it "
                f"and relaunching run {run}",
                flush=True,
            )
            delete_slice(gcloud, args)
            wait_gone(gcloud, args)
            ensure_slice(gcloud, args)
            start_run(gcloud, args, run)
            print(f"watch: run {run} relaunched on the new {args.name}; it resumes from its checkpoint", flush=True)
            last = None
    except KeyboardInterrupt:
        print(f"watch: stopped watching; run {run} goes on", flush=True)
        return 130


def watch(args: argparse.Namespace) -> int:
    if not args.run_name or not RUN_NAME.match(args.run_name):
        raise LaunchError("watch: give the run's --run-name (the one it was launched with)")
    return watch_run(make_gcloud(args), args, args.run_name)


def on_workers(args: argparse.Namespace, script_args: str) -> int:
    """``worker.sh SCRIPT_ARGS`` on every worker of the run (status, stop)."""
    command = f"--command=bash ~/{REMOTE_ROOT}/{args.run_name or 'latest'}/worker.sh {script_args}"
    on_nodes(make_gcloud(args), node_names(args), _ssh_all, command)
    return 0


def _ssh_all(gcloud: Gcloud, node: str, command: str) -> None:
    gcloud.remote("tpu-vm", "ssh", node, "--worker=all", command)


def logs(args: argparse.Namespace) -> int:
    gcloud = make_gcloud(args)
    log = f"~/{REMOTE_ROOT}/{args.run_name or 'latest'}/logs/worker-{args.worker}.log"
    node = node_names(args)[args.slice]
    command = f"--command=tail -n {args.lines} -F {log}"
    return gcloud.remote("tpu-vm", "ssh", node, f"--worker={args.worker}", command, check=False).returncode


def delete(args: argparse.Namespace) -> int:
    delete_slice(make_gcloud(args), args)
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
    common.add_argument(
        "--ssh-via",
        choices=["internal-ip", "iap"],
        help="how ssh/scp reach the workers: internal-ip (gcloud's --internal-ip: from a VM in the same or a peered "
        "VPC) or iap (--tunnel-through-iap, gcloud alpha); default: their external IPs",
    )
    common.add_argument("--ssh-tries", type=int, default=6, help="tries of each ssh/scp (connection failures)")
    common.add_argument(
        "--ssh-retry-seconds", type=float, default=10, help="wait before the 2nd try, doubled after each try"
    )
    common.add_argument("--dry-run", action="store_true", help="print the gcloud commands, run none")

    opts = argparse.ArgumentParser(add_help=False)
    opts.add_argument("--accelerator-type", default="v5e-16", help="v5e-16 (= v5litepod-16), v4-32, v5p-8, v6e-8 ...")
    opts.add_argument("--version", help="TPU VM image (default per generation, e.g. v2-alpha-tpuv5-lite for v5e)")
    opts.add_argument("--spot", action="store_true", help="Spot VMs (cheaper, preemptible: see --watch)")
    opts.add_argument("--reserved", action="store_true", help="gcloud's --reserved: use the project's reservation")
    opts.add_argument("--internal-ips", action="store_true", help="workers without external IPs (needs --ssh-via)")
    opts.add_argument("--network", help="VPC network of the workers (gcloud's default: default)")
    opts.add_argument("--subnetwork", help="subnetwork of the workers")
    opts.add_argument("--service-account", help="service account of the workers (e.g. one that may write the bucket)")
    opts.add_argument("--scopes", help="comma-separated access scopes of the service account, e.g. cloud-platform")
    opts.add_argument("--data-disk", action="append", default=[], help="gcloud's --data-disk=source=DISK,mode=MODE")
    opts.add_argument("--boot-disk", help="gcloud's --boot-disk=KEY=VALUE (documented key: kms-key; newer gcloud)")
    opts.add_argument("--wait-minutes", type=float, default=24 * 60, help="how long to wait for a queued resource")
    opts.add_argument("--poll-seconds", type=float, default=30, help="queued resource and --watch polling interval")
    opts.add_argument(
        "--module",
        default="main",
        help="jaxunlearn command to run: main (unlearn), evaluate, compare, muse, or a module path",
    )
    opts.add_argument(
        "--code",
        default="worktree",
        help="worktree (default: tracked + untracked, unignored files as "
        "on disk), tracked, or a git ref (git archive REF)",
    )
    opts.add_argument("--python", help="an existing Python >= 3.11 on every worker (skips the uv environment)")
    opts.add_argument(
        "--python-version",
        default="3.11",
        help="the Python uv downloads when the image has none >= 3.11 (needs github.com or UV_PYTHON_INSTALL_MIRROR)",
    )
    opts.add_argument("--pip", action="append", default=[], help="extra package spec for the environment (repeat)")
    opts.add_argument("--env", action="append", default=[], help="KEY=VALUE for the setup and the run (repeat)")
    opts.add_argument(
        "--index-url", help="package index (mirror) for pip and uv on the workers: PIP_INDEX_URL and UV_DEFAULT_INDEX"
    )
    opts.add_argument("--max-restarts", type=int, default=3, help="--watch: slice recreations at most")
    top = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="action", required=True)
    run = sub.add_parser(
        "launch",
        parents=[common, opts],
        help="create or reuse the slice, ship the code, start the run",
        usage="%(prog)s NAME --zone=ZONE [options] -- --config=CONFIG [flags of the module]",
        epilog="Everything after -- goes to `python -m jaxunlearn.MODULE` on every worker, after --config=... come "
        "--config.distributed=True (and --config.mesh.dcn_data=SLICES) and then the other flags.",
    )
    run.add_argument("--watch", action="store_true", help="then watch the run and relaunch it after a preemption")
    sub.add_parser(
        "watch",
        parents=[common, opts],
        help="watch a launched run (the launch's options, --run-name and flags): recreate and relaunch on preemption",
        usage="%(prog)s NAME --zone=ZONE --run-name=RUN [the launch's options] -- --config=CONFIG [flags]",
    )
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
    if args.flags and args.action not in ("launch", "watch"):
        raise LaunchError(f"{args.action} takes no flags after --")
    if args.slices < 1:
        raise LaunchError("--slices must be >= 1")
    if args.ssh_tries < 1 or args.ssh_retry_seconds < 0:
        raise LaunchError("--ssh-tries must be >= 1 and --ssh-retry-seconds >= 0")
    if args.action == "logs" and not 0 <= args.slice < args.slices:
        raise LaunchError(f"--slice={args.slice}: the run has slices 0 to {args.slices - 1} (--slices)")
    if args.action in ("launch", "watch"):
        if args.internal_ips and not args.ssh_via:
            raise LaunchError(
                "--internal-ips: the workers get no external IP; say how ssh reaches them: --ssh-via=internal-ip "
                "(from a VM in the same or a peered VPC, or over VPN/Interconnect) or --ssh-via=iap (IAP TCP "
                "forwarding; a firewall rule must admit 35.235.240.0/20 on port 22)"
            )
        if args.max_restarts < 0 or args.poll_seconds <= 0:
            raise LaunchError("--max-restarts must be >= 0 and --poll-seconds > 0")
        bad = [kv for kv in args.env if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", kv)]
        if bad:
            raise LaunchError(f"--env={bad[0]}: expected KEY=VALUE")
    if args.action == "watch" and not args.flags:
        raise LaunchError("watch relaunches the run: give the launch's options and its flags after --")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        actions = {
            "launch": launch,
            "watch": watch,
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
