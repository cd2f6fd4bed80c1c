"""Rollouts on Ray: SB3's ``VecEnv`` interface over env workers that are Ray actors.

``RayVecEnv(env_fns, n_workers, address)`` splits the ``len(env_fns)`` environments over
``n_workers`` Ray actors (one CPU each). Each actor holds its share as one
:class:`rltune.vecenv.BatchedVecEnv`, so it steps its episodes' stages as one batched computation;
the driver sends each actor its slice of the actions and gathers observations, rewards, dones and
infos in env order. What SB3 sees is exactly what :class:`~stable_baselines3.common.vec_env.SubprocVecEnv`
gives (auto-reset, ``terminal_observation``, ``TimeLimit.truncated``, per-env seeds and options
at reset), so ``rltune train --backend ray --n-envs 64 --address ray://head:10001`` on a cluster is
the same run as ``--n-envs 2`` here, only wider. Local Ray is started (and owned) when no
``address`` is given and Ray is not already running; ``close()`` ends the actors and a Ray it started.

Example usage::

    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import VecMonitor
    venv = VecMonitor(RayVecEnv([lambda: DistillCompressEnv(scenarios=["digits-mlp"])] * 8, n_workers=2))
    PPO("MlpPolicy", venv, n_steps=8).learn(256)
    venv.close()

The env factories are sent to the actors with cloudpickle (closures are fine); an actor that dies
raises :class:`rltune.errors.RltuneError` naming it, not a Ray traceback.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import gymnasium as gym
import numpy as np
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvIndices

from rltune.errors import RltuneError


class _Worker:
    """One Ray actor: a BatchedVecEnv over its share of the environments."""

    def __init__(self, env_fns: list[Callable[[], gym.Env]]):
        import torch

        from rltune.vecenv import BatchedVecEnv

        torch.set_num_threads(1)
        self.error = None
        try:  # an env that cannot be built is reported as one line by the driver, not an actor death
            self.venv = BatchedVecEnv(env_fns)
        except Exception as e:  # noqa: BLE001
            msg = str(e).splitlines()[0] if str(e) else ""
            self.error = msg if isinstance(e, RltuneError) else f"{type(e).__name__}: {msg}"

    def spaces(self):
        if self.error is not None:
            return None, self.error
        return self.venv.observation_space, self.venv.action_space

    def reset(self, seeds: list, options: list) -> tuple[np.ndarray, list[dict]]:
        self.venv._seeds = list(seeds)
        self.venv._options = list(options)
        obs = self.venv.reset()
        return obs, list(self.venv.reset_infos)

    def step(self, actions: np.ndarray):
        obs, rews, dones, infos = self.venv.step(actions)
        return obs, rews, dones, infos, list(self.venv.reset_infos)

    def get_attr(self, name: str, idx: list[int]):
        return self.venv.get_attr(name, idx)

    def set_attr(self, name: str, value: Any, idx: list[int]) -> None:
        self.venv.set_attr(name, value, idx)

    def env_method(self, name: str, args, kwargs, idx: list[int]):
        return self.venv.env_method(name, *args, indices=idx, **kwargs)

    def env_is_wrapped(self, wrapper_class, idx: list[int]):
        return self.venv.env_is_wrapped(wrapper_class, idx)

    def close(self) -> None:
        self.venv.close()


def _running_gcs(ray) -> str | None:
    """The GCS address of the Ray this process is connected to, or None where it cannot be told."""
    try:
        return str(ray.get_runtime_context().gcs_address)
    except Exception:  # noqa: BLE001 - e.g. joined through a ray:// client
        return None


def _host_port(address: str) -> tuple[str, str]:
    """``host:port`` with the host resolved (``localhost:6379`` and ``127.0.0.1:6379`` are one)."""
    import socket

    host, _, port = address.rpartition(":")
    try:
        host = socket.gethostbyname(host)
    except OSError:
        pass
    return host, port


def check_address(address: str | None, timeout: float = 5.0) -> None:
    """Refuse, in one line and within ``timeout`` seconds, a Ray address that nothing answers at.

    ``ray.init(address="host:port")`` with no Ray there retries its GCS connection for minutes (a
    ``rltune train --backend ray --address 127.0.0.1:1`` hung past two), and a ``ray://`` client
    waits 30 s; a TCP connect to the host and port tells at once. ``None`` and ``"auto"`` (find the
    local Ray) are left to Ray. A port that answers but not as Ray (a web server: Ray's GCS
    client retried it for minutes) is refused by :func:`_check_ray_answers`, in seconds too."""
    import socket

    if address is None or str(address).strip() in ("", "auto"):
        return
    text = str(address).strip()
    hostport = text[len("ray://"):] if text.startswith("ray://") else text
    host, sep, port = hostport.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in host:
        raise RltuneError(f"cannot join Ray at {address}: expected host:port or ray://host:port")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        why = e.strerror or type(e).__name__ if not isinstance(e, TimeoutError) else f"no answer in {timeout:g} s"
        raise RltuneError(f"cannot join Ray at {address}: nothing answers at {host}:{port} ({why})") from None
    _check_ray_answers(address, host, int(port), client=text.startswith("ray://"), timeout=2 * timeout)


def _check_ray_answers(address: str, host: str, port: int, client: bool, timeout: float) -> None:
    """Refuse, in one line and within ``timeout`` seconds, a port that answers TCP but not as Ray.

    ``ray.init("host:port")`` where another program listens (a web server) retried its GCS
    connection for minutes, and with ``ray://`` waited 30 s. A GCS address must answer Ray's first
    question, the GCS's gRPC ``GetClusterId``, at the address Ray itself dials (``localhost`` and
    ``127.0.0.1`` become this machine's address); a ``ray://`` address must at least speak gRPC.
    A refusal by authentication is an answer (it is Ray); with TLS (``RAY_USE_TLS``), or without
    grpc, nothing is checked here and Ray judges."""
    import os

    if os.environ.get("RAY_USE_TLS", "0").strip().lower() in ("1", "true"):
        return
    try:
        import grpc
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    except ImportError:
        return
    dial = host
    if not client:
        try:
            from ray._private.services import resolve_ip_for_localhost

            dial = resolve_ip_for_localhost(host) or host
        except Exception:  # noqa: BLE001 - Ray's private helper moved or failed: dial what was given
            dial = host
    target = f"[{dial}]:{port}" if ":" in dial else f"{dial}:{port}"
    at = f"{target} (this machine's address, which Ray dials for {host})" if dial != host else target
    channel = grpc.insecure_channel(target)
    try:
        if client:
            try:
                grpc.channel_ready_future(channel).result(timeout=timeout)
            except grpc.FutureTimeoutError:
                raise RltuneError(f"cannot join Ray at {address}: what listens at {target} is not a Ray client server "
                                  f"(no gRPC answer in {timeout:g} s; 'ray start --head' serves ray:// on port "
                                  "10001)") from None
            return
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=timeout)
        except grpc.RpcError as e:
            code = e.code()
            if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                return  # Ray's GCS, asking for a token: ray.init brings it
            details = (e.details() or "").strip()
            if code == grpc.StatusCode.UNIMPLEMENTED:
                why = f"a gRPC server that is not a Ray GCS listens at {at}"
            elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
                why = f"what listens at {at} gave no Ray answer in {timeout:g} s"
            elif "HTTP/2" in details or "SETTINGS" in details or "handshake" in details.lower():
                why = f"another program listens at {at}: it does not speak gRPC, as a Ray GCS does"
            elif "refused" in details.lower():
                why = f"nothing answers at {at} (connection refused)"
            else:
                why = f"no Ray GCS answers at {at} ({details.splitlines()[0][:200] if details else code.name})"
            raise RltuneError(f"cannot join Ray at {address}: {why}; give the address 'ray start --head' prints "
                              "(port 6379 by default)") from None
    finally:
        channel.close()


def ray_init(ray, address: str | None, **kwargs: Any) -> None:
    """``ray.init(address=address, **kwargs)`` with one-line errors; an address is checked first
    (:func:`check_address`) so that one with nothing behind it fails in seconds, not minutes.

    When rltune's progress is quiet (the ``rltune`` logger set above INFO: the command line's
    ``--quiet``), Ray's own INFO lines ("Started a local Ray instance.", "Connecting to existing
    Ray cluster") are silenced too (``logging_level=WARNING``; a caller's own ``logging_level``
    wins); otherwise Ray logs as it always has."""
    import logging
    import signal
    import threading

    check_address(address)
    if logging.getLogger("rltune").level > logging.INFO:
        kwargs.setdefault("logging_level", logging.WARNING)
        kwargs.setdefault("log_to_driver", False)
    # ray.init replaces the SIGTERM handler with its own (sys.exit(15), and its C++ core a stack dump):
    # a handler the caller installed (the command line's: one line, status 143, finished work kept)
    # is put back; a process with the default handler keeps Ray's
    main = threading.current_thread() is threading.main_thread()
    old = signal.getsignal(signal.SIGTERM) if main else None
    try:
        ray.init(address=address, **kwargs)
    except Exception as e:  # noqa: BLE001 - one clear line: a cluster that is not there
        raise RltuneError(f"cannot start or join Ray{f' at {address}' if address else ''}: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    finally:
        if old is not None and old is not signal.SIG_DFL:
            signal.signal(signal.SIGTERM, old)


class RayVecEnv(VecEnv):
    """``len(env_fns)`` environments stepped by ``n_workers`` Ray actors, each a batched group."""

    def __init__(self, env_fns: Sequence[Callable[[], gym.Env]], n_workers: int | None = None,
                 address: str | None = None, num_cpus_per_worker: float = 1.0):
        try:
            import ray
        except ImportError:
            raise RltuneError("the ray backend needs Ray: pip install 'rltune[ray]'") from None
        env_fns = list(env_fns)
        if not env_fns:
            raise RltuneError("RayVecEnv needs at least one environment")
        self._owns_ray = False
        if ray.is_initialized() and address not in (None, "auto") and not str(address).startswith("ray://"):
            # the running Ray would be used whatever the address said: a run meant for a cluster
            # would quietly run here (a ray:// client address cannot be compared: it is taken as given)
            here = _running_gcs(ray)
            if here is not None and _host_port(str(address)) != _host_port(here):
                raise RltuneError(f"Ray is already running in this process (at {here}), so it cannot join "
                                  f"{address}: call ray.shutdown() first, or leave out the address to use it")
        if not ray.is_initialized():
            ray_init(ray, address, include_dashboard=False, log_to_driver=False)
            self._owns_ray = True
        room = max(1, int(ray.cluster_resources().get("CPU", 1) // num_cpus_per_worker))
        if n_workers is None:
            n_workers = room
        if not (isinstance(n_workers, int) and n_workers >= 1):
            self._stop_ray()
            raise RltuneError(f"RayVecEnv: n_workers must be a whole number >= 1, got {n_workers!r}")
        # an actor Ray has no CPU for would wait for ever: never ask for more than the cluster holds
        n_workers = min(n_workers, len(env_fns), room)
        # contiguous, as even as possible: worker w holds envs [start[w], start[w+1])
        sizes = [len(env_fns) // n_workers + (1 if w < len(env_fns) % n_workers else 0) for w in range(n_workers)]
        self._start = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        actor = ray.remote(num_cpus=num_cpus_per_worker)(_Worker)
        self._ray = ray
        self.workers = [actor.remote(env_fns[self._start[w]:self._start[w + 1]]) for w in range(n_workers)]
        try:
            got_all = self._get([w.spaces.remote() for w in self.workers], "start")
        except RltuneError:
            self._kill_workers()
            raise
        for got in got_all:
            if got[0] is None:
                self._kill_workers()
                raise RltuneError(f"an env worker could not build its environments: {got[1]}")
        obs_space, act_space = got_all[0]
        super().__init__(len(env_fns), obs_space, act_space)
        self._pending = None
        self.closed = False

    def _stop_ray(self) -> None:
        if self._owns_ray:
            import ray

            ray.shutdown()
            self._owns_ray = False

    def _kill_workers(self) -> None:
        for w in self.workers:
            try:
                self._ray.kill(w)
            except Exception:  # noqa: BLE001 - already dead
                pass
        self._stop_ray()

    def _get(self, refs, what: str):
        try:
            return self._ray.get(refs)
        except self._ray.exceptions.RayActorError as e:
            raise RltuneError(f"a Ray env worker died during {what}: {str(e).splitlines()[0]}") from None
        except self._ray.exceptions.RayTaskError as e:
            cause = e.cause if getattr(e, "cause", None) is not None else e
            if isinstance(cause, RltuneError):
                raise cause from None
            raise RltuneError(f"a Ray env worker failed during {what}: {type(cause).__name__}: "
                              f"{str(cause).splitlines()[0] if str(cause) else ''}") from None

    def _slices(self):
        return [(w, self._start[w], self._start[w + 1]) for w in range(len(self.workers))]

    def reset(self):
        refs = [self.workers[w].reset.remote(self._seeds[a:b], self._options[a:b]) for w, a, b in self._slices()]
        out = self._get(refs, "reset")
        self._reset_seeds()
        self._reset_options()
        self.reset_infos = [info for _, infos in out for info in infos]
        return np.concatenate([o for o, _ in out])

    def step_async(self, actions: np.ndarray) -> None:
        actions = np.asarray(actions)
        self._pending = [self.workers[w].step.remote(actions[a:b]) for w, a, b in self._slices()]

    def step_wait(self):
        out = self._get(self._pending, "step")
        self._pending = None
        obs = np.concatenate([o[0] for o in out])
        rews = np.concatenate([o[1] for o in out]).astype(np.float32)
        dones = np.concatenate([o[2] for o in out])
        infos = [i for o in out for i in o[3]]
        self.reset_infos = [i for o in out for i in o[4]]  # refreshed by auto-resets, as SubprocVecEnv does
        return obs, rews, dones, infos

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._ray.get([w.close.remote() for w in self.workers], timeout=30)
        except Exception:  # noqa: BLE001 - closing: a dead worker has nothing left to close
            pass
        self._kill_workers()
        self.closed = True

    def _by_worker(self, indices: VecEnvIndices) -> list[tuple[int, list[int], list[int]]]:
        """(worker, local indices, their positions in ``indices``) for each worker holding some."""
        idx = list(self._get_indices(indices))
        out = []
        for w, a, b in self._slices():
            pos = [k for k, i in enumerate(idx) if a <= i < b]
            if pos:
                out.append((w, [idx[k] - a for k in pos], pos))
        return out

    def _gather(self, per_worker: list[tuple[int, list[int], list[int]]], refs: list, n: int, what: str) -> list:
        results = self._get(refs, what)
        out: list[Any] = [None] * n
        for (_, _, pos), res in zip(per_worker, results):
            for k, r in zip(pos, res):
                out[k] = r
        return out

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        per = self._by_worker(indices)
        refs = [self.workers[w].get_attr.remote(attr_name, loc) for w, loc, _ in per]
        return self._gather(per, refs, len(list(self._get_indices(indices))), "get_attr")

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        per = self._by_worker(indices)
        self._get([self.workers[w].set_attr.remote(attr_name, value, loc) for w, loc, _ in per], "set_attr")

    def env_method(self, method_name: str, *method_args, indices: VecEnvIndices = None, **method_kwargs) -> list[Any]:
        per = self._by_worker(indices)
        refs = [self.workers[w].env_method.remote(method_name, method_args, method_kwargs, loc) for w, loc, _ in per]
        return self._gather(per, refs, len(list(self._get_indices(indices))), "env_method")

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        per = self._by_worker(indices)
        refs = [self.workers[w].env_is_wrapped.remote(wrapper_class, loc) for w, loc, _ in per]
        return self._gather(per, refs, len(list(self._get_indices(indices))), "env_is_wrapped")

    def get_images(self):  # no rendering
        return [None] * self.num_envs
