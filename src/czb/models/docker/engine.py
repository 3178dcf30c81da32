"""The Docker engine, through the Docker SDK: run a model container, build a model image.

Everything that talks to the daemon is here; :mod:`czb.models.docker.source` decides what
to run. A container runs sandboxed by default: no network (weights are staged on the
host), all capabilities dropped, no privilege escalation, a non-root user, a read-only
root filesystem where the model allows it (``/tmp`` is a tmpfs), a bound on its processes
and threads (a fork bomb cannot use up the host's), and no Docker socket.
It is always removed, whatever happens. Its log is its own text: control characters are
replaced before a line is shown or kept, lines are cut, and the log is bounded.
"""

from __future__ import annotations

import collections
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from czb.core.errors import ModelRunError

#: Log lines kept in memory (and in a failed run's error message: the last 20).
LOG_TAIL_LINES = 200
#: A container's log is its own text: each line is cut at this many characters (a line
#: without an end is split there), and after this many bytes nothing more is shown or
#: written to the log file (the last lines are still kept).
MAX_LOG_LINE_CHARS = 4000
MAX_LOG_BYTES = 64 << 20
#: Control characters (terminal escapes, carriage returns, bidi overrides) become "?".
_UNPRINTABLE = {
    c: "?" for c in (*range(0x09), *range(0x0A, 0x20), *range(0x7F, 0xA0),
                     0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A))
}
#: uid:gid the container runs as when czb itself runs as root (matches the images' user).
CONTAINER_USER = "10001:10001"
#: Processes and threads a container may have at once: generous (a data loader with many
#: workers, each with its thread pools, stays far below), but a fork bomb stops there.
MAX_PIDS = 16384
#: The longest wait for a container (a socket timeout must fit the platform's time type).
MAX_TIMEOUT_S = 10**8

LogSink = Callable[[str], None]


def _stderr_sink(prefix: str) -> LogSink:
    def sink(line: str) -> None:
        sys.stderr.write(f"{prefix}{line}\n")
        sys.stderr.flush()

    return sink


def client() -> Any:
    """A Docker SDK client for the daemon ``DOCKER_HOST`` (or the local socket) names.

    Raises
    ------
    ModelRunError
        The ``docker`` package is missing or no daemon answers.
    """
    try:
        import docker
    except ImportError as e:  # pragma: no cover - a dependency of czb
        msg = "the 'docker' Python package is not installed (pip install docker)"
        raise ModelRunError(msg) from e
    try:
        engine = docker.from_env(timeout=120)
        engine.ping()
    except Exception as e:  # noqa: BLE001 - every way of not reaching the daemon
        msg = (
            f"cannot reach the Docker daemon ({_short(e)}); is it running and may this "
            f"user use it (DOCKER_HOST, the docker group)?"
        )
        raise ModelRunError(msg) from None
    return engine


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__


@dataclass(frozen=True)
class ImageInfo:
    """What identifies an image: its content-addressed ID and registry digests."""

    tag: str
    id: str
    repo_digests: tuple[str, ...] = ()

    @property
    def digest(self) -> str:
        """The registry digest when the image came from a registry, else its image ID."""
        return self.repo_digests[0] if self.repo_digests else self.id


def image_info(engine: Any, tag: str, *, model: str) -> ImageInfo:
    """Look an image up locally (never pulls: no registry is assumed reachable)."""
    import docker

    try:
        image = engine.images.get(tag)
    except docker.errors.ImageNotFound:
        msg = f"image {tag!r} of model {model} is not built; run `czb models build {model}`"
        raise ModelRunError(msg) from None
    except docker.errors.APIError as e:
        msg = f"cannot inspect image {tag!r}: {_short(e)}"
        raise ModelRunError(msg) from None
    return ImageInfo(tag=tag, id=image.id, repo_digests=tuple(image.attrs.get("RepoDigests") or ()))


@dataclass(frozen=True)
class RunLimits:
    """How a container runs.

    Attributes
    ----------
    gpus
        ``"none"``, ``"all"``, a number of GPUs, or ``"device=0,2"``: those GPUs (what a
        scheduler assigned to the run).
    memory_gb, shm_gb, tmp_gb
        Memory limit, ``/dev/shm`` size (data loaders use shared memory) and ``/tmp`` size.
    timeout_s
        Wall-clock limit; the container is killed after it.
    read_only_rootfs
        Mount the image read-only.
    network
        ``False`` (default) gives the container no network at all.
    pids
        Processes and threads the container may have at once.
    """

    gpus: str = "none"
    memory_gb: float | None = None
    shm_gb: float = 2.0
    tmp_gb: float = 4.0
    timeout_s: int | None = None
    read_only_rootfs: bool = True
    network: bool = False
    pids: int = MAX_PIDS


@dataclass
class ContainerRun:
    """The outcome of one container run.

    Attributes
    ----------
    exit_code
        The container's exit status (``None`` when it was killed for its timeout).
    log_tail
        Its last log lines.
    timed_out, oom_killed
        Why it stopped, when it did not stop by itself.
    runtime_s
        Wall-clock seconds from start to exit.
    """

    exit_code: int | None
    log_tail: list[str] = field(default_factory=list)
    timed_out: bool = False
    oom_killed: bool = False
    runtime_s: float = 0.0


def _device_requests(gpus: str) -> list[Any]:
    import docker

    if gpus in ("none", "0", ""):
        return []
    if gpus.startswith("device="):
        ids = [i.strip() for i in gpus.removeprefix("device=").split(",") if i.strip()]
        return [docker.types.DeviceRequest(device_ids=ids, capabilities=[["gpu"]])]
    count = -1 if gpus == "all" else int(gpus)
    return [docker.types.DeviceRequest(count=count, capabilities=[["gpu"]])]


def run_container(
    engine: Any,
    image: ImageInfo,
    *,
    mounts: Mapping[str, tuple[Path, str]],
    limits: RunLimits,
    name: str,
    environment: Mapping[str, str] | None = None,
    log: LogSink | None = None,
    log_file: Path | None = None,
    on_start: Callable[[Any], None] | None = None,
) -> ContainerRun:
    """Run ``image`` to completion, streaming its logs, and remove the container.

    Parameters
    ----------
    mounts
        ``{container path: (host path, "ro" | "rw")}``.
    name
        Prefix of the container's name (a random suffix is added).
    log
        Receives each log line as it arrives (default: stderr with a ``[name]`` prefix).
    log_file
        Every log line is also appended here.
    on_start
        Called with the started container (tests use it to kill a run midway).

    Raises
    ------
    ModelRunError
        The container cannot be created or started (e.g. GPUs asked of a daemon without
        a GPU driver); it has been removed.
    """
    import docker

    log = log or _stderr_sink(f"[{name}] ")
    uid = os.getuid() if hasattr(os, "getuid") else 0
    user = CONTAINER_USER if uid == 0 else f"{uid}:{os.getgid()}"
    options: dict[str, Any] = {
        "volumes": {str(host): {"bind": target, "mode": mode} for target, (host, mode) in mounts.items()},
        "environment": dict(environment or {}),
        "user": user,
        "network_mode": "bridge" if limits.network else "none",
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "read_only": limits.read_only_rootfs,
        "tmpfs": {"/tmp": f"rw,exec,size={int(limits.tmp_gb * 1024)}m,mode=1777"},
        "shm_size": f"{int(limits.shm_gb * 1024)}m",
        "pids_limit": int(limits.pids),
        "device_requests": _device_requests(limits.gpus),
        "detach": True,
        "name": f"czb-{name}-{os.urandom(4).hex()}",
        # Lets this process (and its tests) find its own containers among others'.
        "labels": {"org.czb.model": name, "org.czb.host-pid": str(os.getpid())},
    }
    if limits.memory_gb:
        options["mem_limit"] = f"{int(limits.memory_gb * 1024)}m"
        options["memswap_limit"] = options["mem_limit"]  # no swap: fail fast, not thrash
    try:
        container = engine.containers.create(image.id, **options)
    except docker.errors.APIError as e:
        msg = f"cannot create a container of {image.tag}: {_short(e)}"
        raise ModelRunError(msg) from None

    tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
    started = time.monotonic()
    try:
        try:
            container.start()
        except docker.errors.APIError as e:
            text = str(e)
            if limits.gpus != "none" and ("device driver" in text or "gpu" in text.lower()):
                msg = (
                    f"the Docker daemon has no GPU driver for --gpus {limits.gpus} ({_short(e)}); "
                    f"install the NVIDIA container toolkit, or run with --gpus none to use the CPU"
                )
            else:
                msg = f"cannot start a container of {image.tag}: {_short(e)}"
            raise ModelRunError(msg) from None
        if on_start is not None:
            on_start(container)
        reader = threading.Thread(
            target=_follow_logs, args=(container, tail, log, log_file), daemon=True
        )
        reader.start()
        timed_out = False
        try:
            # Beyond about 3 years a socket timeout overflows; no run is meant to last that long.
            timeout = min(limits.timeout_s, MAX_TIMEOUT_S) if limits.timeout_s else None
            status = container.wait(timeout=timeout) if timeout else container.wait()
            exit_code: int | None = int(status.get("StatusCode", -1))
        except Exception as e:  # noqa: BLE001 - requests' ReadTimeout/ConnectionError on timeout
            if limits.timeout_s is None or not _is_timeout(e):
                raise
            timed_out, exit_code = True, None
            _quietly(container.kill)
        reader.join(timeout=10)
        oom = False
        if exit_code not in (None, 0):
            _quietly(container.reload)
            oom = bool(container.attrs.get("State", {}).get("OOMKilled"))
        return ContainerRun(
            exit_code=exit_code,
            log_tail=list(tail),
            timed_out=timed_out,
            oom_killed=oom,
            runtime_s=time.monotonic() - started,
        )
    finally:
        _quietly(lambda: container.remove(force=True))


def _is_timeout(e: BaseException) -> bool:
    names = {type(e).__name__, *(type(a).__name__ for a in e.args if isinstance(a, BaseException))}
    return bool(names & {"ReadTimeout", "ReadTimeoutError", "ConnectionError", "timeout", "TimeoutError"})


def _quietly(action: Callable[[], Any]) -> None:
    try:
        action()
    except Exception:  # noqa: BLE001,S110 - cleanup of a container that may be gone already
        pass


class _LogOutput:
    """Where log lines go: the tail, and (up to :data:`MAX_LOG_BYTES`) the sink and the file."""

    def __init__(self, tail: collections.deque[str], log: LogSink, sink: Any):
        self.tail, self.log, self.sink = tail, log, sink
        self.written = 0

    def emit(self, raw: bytes) -> None:
        line = clean_log_line(raw)
        self.tail.append(line)
        if self.written > MAX_LOG_BYTES:
            return
        self.written += len(raw) + 1
        if self.written > MAX_LOG_BYTES:
            line = f"[czb: the container's log passed {MAX_LOG_BYTES >> 20} MiB; the rest is not shown]"
        self.log(line)
        if self.sink is not None:
            self.sink.write(line + "\n")


def clean_log_line(raw: bytes) -> str:
    """One log line as printable text: control characters become ``?``, and it is cut at
    :data:`MAX_LOG_LINE_CHARS` characters."""
    line = raw.decode("utf-8", errors="replace").rstrip("\r").translate(_UNPRINTABLE)
    if len(line) > MAX_LOG_LINE_CHARS:
        line = line[:MAX_LOG_LINE_CHARS] + " [czb: line cut]"
    return line


def _follow_logs(container: Any, tail: collections.deque[str], log: LogSink, log_file: Path | None) -> None:
    sink = log_file.open("a", encoding="utf-8") if log_file is not None else None
    out = _LogOutput(tail, log, sink)
    pending = b""
    limit = MAX_LOG_LINE_CHARS * 4  # bytes of UTF-8 that can make a line that long
    try:
        for chunk in container.logs(stream=True, follow=True, stdout=True, stderr=True):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                out.emit(raw)
            while len(pending) > limit:  # a line without end: never hold it all in memory
                out.emit(pending[:limit])
                pending = pending[limit:]
        if pending:
            out.emit(pending)
    except Exception:  # noqa: BLE001,S110 - the container was removed under us: logs end there
        pass
    finally:
        if sink is not None:
            sink.close()


# --------------------------------------------------------------------------- build


def build_image(
    engine: Any,
    *,
    context_parts: Mapping[str, Path],
    dockerfile: str,
    tag: str,
    build_args: Mapping[str, str],
    wheels: list[Path] | None = None,
    ca_bundle: Path | None = None,
    log: LogSink | None = None,
) -> ImageInfo:
    """Stage a build context in a temporary folder and build it (classic builder, host network).

    Parameters
    ----------
    context_parts
        ``{name in context: host folder or file}``, e.g. ``{"model": ..., "common": ...}``.
    dockerfile
        Path of the Dockerfile inside the context.
    wheels
        Local wheel files copied into ``wheels/`` (e.g. a CPU torch); the folder exists
        even when empty, so the Dockerfile can always ``COPY wheels/``.
    ca_bundle
        CA certificates copied to ``ca-certificates.crt`` so pip inside the build trusts
        the same authorities as the host (an empty file when ``None``).
    """
    import docker

    log = log or _stderr_sink(f"[build {tag}] ")
    with tempfile.TemporaryDirectory(prefix="czb-build-") as tmp:
        context = Path(tmp)
        for name, source in context_parts.items():
            target = context / name
            if source.is_dir():
                # Links stay links: a link in a model folder must not copy a host file
                # (say ~/.ssh/id_rsa) into the image, where the model could read it out.
                shutil.copytree(source, target, symlinks=True, ignore=shutil.ignore_patterns(
                    "__pycache__", "*.pyc", ".pytest_cache", "test_*.py", "conftest.py"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
        (context / "wheels").mkdir(exist_ok=True)
        for wheel in wheels or []:
            shutil.copy2(wheel, context / "wheels" / wheel.name)
        bundle = context / "ca-certificates.crt"
        if ca_bundle is not None and ca_bundle.is_file():
            shutil.copy2(ca_bundle, bundle)
        else:
            bundle.write_text("")
        try:
            stream = engine.api.build(
                path=str(context),
                dockerfile=dockerfile,
                tag=tag,
                buildargs=dict(build_args),
                network_mode="host",
                rm=True,
                forcerm=True,
                decode=True,
            )
            _follow_build(stream, log, tag)
        except docker.errors.APIError as e:
            msg = f"building {tag} failed: {_short(e)}"
            raise ModelRunError(msg) from None
    return image_info(engine, tag, model=tag)


def _follow_build(stream: Iterator[dict[str, Any]], log: LogSink, tag: str) -> None:
    tail: collections.deque[str] = collections.deque(maxlen=40)
    for event in stream:
        if "error" in event:
            detail = event.get("errorDetail", {}).get("message") or event["error"]
            msg = f"building {tag} failed: {detail.strip()}"
            raise ModelRunError(msg, log_tail=list(tail))
        text = event.get("stream")
        if text:
            for line in text.rstrip("\n").splitlines():
                tail.append(line)
                log(line)
