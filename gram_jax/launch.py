"""Run a JAX program as N local processes of one multi-controller job (JAX's multi-host
runtime on one machine): ``python -m gram_jax.launch --processes 2 --devices-per-process 4
-- train.py --config configs/synthetic.py``.

Each process gets the coordinator address (``JAX_COORDINATOR_ADDRESS=127.0.0.1:<free
port>``), its id and the process count (``GRAM_JAX_PROCESS_ID`` / ``GRAM_JAX_NUM_PROCESSES``,
read by ``gram_jax.training.multihost.initialize``, which ``train.py`` calls), and with
``--devices-per-process M`` that many virtual CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=M``, ``JAX_PLATFORMS=cpu``, gloo CPU
collectives). Output lines are streamed with a ``[p<i>]`` prefix. When a process fails
(non-zero exit or a signal), the others get ``--peer-grace`` seconds to exit on their own,
then SIGTERM, then SIGKILL; the launcher exits with the first failure's code (128 + signal
for a signal), 0 when all succeed.

On a TPU pod slice or under SLURM no launcher is needed: run ``train.py`` on every host / task
with ``--config.distributed.initialize=True`` and JAX detects the rest (README, "Many
processes").
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from gram_jax.training.multihost import ENV_HEARTBEAT, ENV_NUM_PROCESSES, ENV_PROCESS_ID

__all__ = ["free_port", "process_env", "launch", "main"]


def free_port() -> int:
    """A TCP port free on the loopback interface now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(
    base: dict[str, str],
    *,
    process_id: int,
    processes: int,
    port: int,
    devices_per_process: int | None,
    heartbeat_timeout: int | None,
) -> dict[str, str]:
    """The environment of process ``process_id`` (module docstring)."""
    env = dict(base)
    env["JAX_COORDINATOR_ADDRESS"] = f"127.0.0.1:{port}"
    env[ENV_NUM_PROCESSES] = str(processes)
    env[ENV_PROCESS_ID] = str(process_id)
    if heartbeat_timeout is not None:
        env[ENV_HEARTBEAT] = str(heartbeat_timeout)
    if devices_per_process is not None:
        flags = [
            f
            for f in env.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")
        ]
        flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
        env["XLA_FLAGS"] = " ".join(flags)
        env["JAX_PLATFORMS"] = "cpu"
        env.setdefault("JAX_CPU_COLLECTIVES_IMPLEMENTATION", "gloo")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _stream(proc: subprocess.Popen, prefix: str, out) -> None:
    for line in iter(proc.stdout.readline, ""):
        out.write(f"{prefix} {line}" if line.endswith("\n") else f"{prefix} {line}\n")
        out.flush()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the child and its own children (grain workers)
    except ProcessLookupError:
        pass


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def launch(
    command: list[str],
    processes: int,
    devices_per_process: int | None = None,
    *,
    port: int | None = None,
    heartbeat_timeout: int | None = 30,
    peer_grace: float = 10.0,
    term_grace: float = 10.0,
    env: dict[str, str] | None = None,
    out=None,
) -> int:
    """Start ``command`` as ``processes`` processes, stream their output, return the job's
    exit code (module docstring). A ``.py`` first word runs with this Python."""
    if processes < 1:
        raise ValueError(f"--processes must be >= 1, got {processes}")
    if devices_per_process is not None and devices_per_process < 1:
        raise ValueError(f"--devices-per-process must be >= 1, got {devices_per_process}")
    if not command:
        raise ValueError("no command to launch (put it after --)")
    if command[0].endswith(".py"):
        command = [sys.executable, *command]
    out = sys.stdout if out is None else out
    port = free_port() if port is None else port
    base = dict(os.environ if env is None else env)
    procs = []
    for i in range(processes):
        e = process_env(
            base,
            process_id=i,
            processes=processes,
            port=port,
            devices_per_process=devices_per_process,
            heartbeat_timeout=heartbeat_timeout,
        )
        procs.append(
            subprocess.Popen(
                command,
                env=e,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
                start_new_session=True,
            )
        )
    threads = [
        threading.Thread(target=_stream, args=(p, f"[p{i}]", out), daemon=True)
        for i, p in enumerate(procs)
    ]
    for t in threads:
        t.start()

    def note(msg: str) -> None:
        out.write(f"[launch] {msg}\n")
        out.flush()

    def forward(signum, _frame):
        note(f"received {signal.Signals(signum).name}; passing it on")
        for p in procs:
            if p.poll() is None:
                _signal_group(p, signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    failure: tuple[int, int] | None = None  # (process, code)
    deadline = None
    reported: set[int] = set()
    start = time.monotonic()
    try:
        while True:
            for i, p in enumerate(procs):
                code = p.poll()
                if code is None or i in reported:
                    continue
                reported.add(i)
                note(f"process {i} ended after {time.monotonic() - start:.1f}s: {_describe(code)}")
                if code != 0 and failure is None:
                    failure = (i, code)
                    deadline = time.monotonic() + peer_grace
            if len(reported) == len(procs):
                break
            if deadline is not None and time.monotonic() > deadline:
                alive = [i for i, p in enumerate(procs) if p.poll() is None]
                note(f"process {failure[0]} failed; terminating processes {alive}")
                for i in alive:
                    _signal_group(procs[i], signal.SIGTERM)
                end = time.monotonic() + term_grace
                while time.monotonic() < end and any(procs[i].poll() is None for i in alive):
                    time.sleep(0.1)
                for i in alive:
                    if procs[i].poll() is None:
                        _signal_group(procs[i], signal.SIGKILL)
                deadline = float("inf")
            time.sleep(0.1)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for p in procs:
            if p.poll() is None:
                _signal_group(p, signal.SIGKILL)
            p.wait()
        for t in threads:
            t.join(timeout=5)
    if failure is None:
        return 0
    code = failure[1]
    return 128 - code if code < 0 else code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" in argv:
        cut = argv.index("--")
        own, command = argv[:cut], argv[cut + 1 :]
    else:
        own, command = argv, []
    parser = argparse.ArgumentParser(
        prog="python -m gram_jax.launch", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--processes", "-n", type=int, required=True)
    parser.add_argument(
        "--devices-per-process", type=int, default=None, help="virtual CPU devices per process"
    )
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: free)")
    parser.add_argument(
        "--heartbeat-timeout",
        type=int,
        default=30,
        help="seconds before a silent peer (kill -9, lost host) is declared dead and the "
        "others exit naming it (JAX's own default is 100)",
    )
    parser.add_argument(
        "--peer-grace",
        type=float,
        default=10.0,
        help="seconds the others may take to exit on their own after a process fails",
    )
    args = parser.parse_args(own)
    if not command:
        parser.error("no command: python -m gram_jax.launch --processes N -- train.py ...")
    try:
        return launch(
            command,
            args.processes,
            args.devices_per_process,
            port=args.port,
            heartbeat_timeout=args.heartbeat_timeout,
            peer_grace=args.peer_grace,
        )
    except ValueError as e:
        parser.error(str(e))


if __name__ == "__main__":
    sys.exit(main())
