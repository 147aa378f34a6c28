"""A tiny expert-parallel MoE model implementing ExpertHost, and a multi-process launcher.

Used by the client's tests, its benchmark and the demo. Nothing here is needed
in production.

:class:`TinyMoE`: L MoE layers of E experts (each a 2-matrix MLP, weights
W1 [d, h], W2 [h, d]), top-k routing over a gate with a skewed bias whose hot
spot drifts with the step, all deterministic from (seed, step). Expert
parallelism the simple way: every rank builds the same token batch, computes
only the (token, expert) pairs routed to its local slots — the replica of
expert e for token t is ``log2phy[l, e, t % replica_count[l, e]]`` — and the
partial outputs of all layers are summed with one all-reduce per step (the
layers act in parallel on x0). Routing depends only on x0, so it is bit-identical
under every placement, and the output equals :meth:`TinyMoE.reference_forward`
(one copy of every expert, no parallelism) up to float summation order.
"""

from __future__ import annotations

import contextlib
import faulthandler
import math
import multiprocessing as mp
import os
import signal
import socket
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from eplbd.geometry import Geometry
from eplbd.placement import default_phy2log, log2phy_padded, replica_count

from .host import LayerTables

__all__ = [
    "NullHost",
    "PlanDriver",
    "TinyMoE",
    "check_ranks_exact",
    "free_port",
    "launch",
    "launch_with_driver",
    "rank_report",
]


class NullHost:
    """ExpertHost with one tiny weight tensor per layer and no model (benchmarks and fault
    tests where the client's own work and collectives are all there is)."""

    def __init__(self, g: Geometry) -> None:
        self.g = g
        self.w = [torch.zeros(g.slots_per_rank, 1) for _ in range(g.num_layers)]

    @property
    def num_moe_layers(self) -> int:
        return self.g.num_layers

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def expert_weights(self, layer: int) -> list[torch.Tensor]:
        return [self.w[layer]]

    def commit_layer(self, layer: int, tables: LayerTables) -> None:
        pass


class TinyMoE:
    """The test model on one rank (see the module docstring). Implements ExpertHost."""

    def __init__(
        self,
        g: Geometry,
        rank: int,
        group: Any = None,
        *,
        hidden: int = 16,
        ffn: int = 32,
        top_k: int = 2,
        tokens: int = 128,
        seed: int = 0,
        skew: float = 3.0,
        drift_period: int = 64,
        phy2log: np.ndarray | None = None,
        distributed: bool = True,
        device: str | torch.device = "cpu",
    ) -> None:
        self.g, self.rank, self.group = g, rank, group
        self.d, self.h, self.top_k, self.tokens = hidden, ffn, top_k, tokens
        self.seed, self.skew, self.drift_period = seed, skew, drift_period
        self.distributed = distributed
        self._device = torch.device(device)
        L, E, S = g.num_layers, g.num_experts, g.slots_per_rank
        gen = torch.Generator().manual_seed(seed)
        # Logical weights: the ground truth every slot must match bitwise.
        self.W1 = (torch.randn(L, E, hidden, ffn, generator=gen) * 0.2).to(self._device)
        self.W2 = (torch.randn(L, E, ffn, hidden, generator=gen) * 0.2).to(self._device)
        self.Wg = (torch.randn(L, hidden, E, generator=gen) * 0.5).to(self._device)
        p2l = default_phy2log(g) if phy2log is None else np.array(phy2log, dtype=np.int32)
        self.phy2log = p2l.copy()  # [L, P] host copy of the tables in force
        lo = rank * S
        idx = torch.as_tensor(p2l[:, lo : lo + S].astype(np.int64), device=self._device)
        self.w1 = [self.W1[l, idx[l]].clone().contiguous() for l in range(L)]  # each [S, d, h]
        self.w2 = [self.W2[l, idx[l]].clone().contiguous() for l in range(L)]  # each [S, h, d]
        K = g.max_replicas
        self.log2phy = torch.as_tensor(log2phy_padded(p2l, g, K).astype(np.int64), device=self._device)
        self.rc = torch.as_tensor(replica_count(p2l, g).astype(np.int64), device=self._device)
        # Measurements: tokens this rank's slots got per layer, and logical loads.
        self.rank_tokens = np.zeros(L, dtype=np.int64)
        self.logical_tokens = np.zeros((L, E), dtype=np.int64)
        self.logical_by_step: dict[int, np.ndarray] = {}  # step -> [L, E] routed tokens (if keep_history)
        self.keep_history = False
        self.commits = 0

    # -- ExpertHost -----------------------------------------------------------
    @property
    def num_moe_layers(self) -> int:
        return self.g.num_layers

    @property
    def device(self) -> torch.device:
        return self._device

    def expert_weights(self, layer: int) -> Sequence[torch.Tensor]:
        return (self.w1[layer], self.w2[layer])

    def commit_layer(self, layer: int, tables: LayerTables) -> None:
        self.phy2log[layer] = tables.phy2log
        self.log2phy[layer].copy_(tables.log2phy_dev)  # device to device: queued, no host sync
        self.rc[layer].copy_(tables.replica_count_dev)
        self.commits += 1

    # -- model ------------------------------------------------------------------
    def inputs(self, step: int) -> torch.Tensor:
        """Token batch x0 [T, d] of ``step`` (identical on every rank)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return torch.randn(self.tokens, self.d, generator=gen).to(self._device)

    def route(self, layer: int, step: int, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k experts [T, k] int64 and weights [T, k] for ``layer`` at ``step``.

        The gate bias is a cosine bump of height ``skew`` centred on an expert
        that moves by one every ``drift_period`` steps (layers offset), so a few
        experts are hot and which ones changes slowly.
        """
        E = self.g.num_experts
        centre = layer * E / self.g.num_layers + step / self.drift_period
        e = torch.arange(E, dtype=torch.float32, device=self._device)
        bias = self.skew * torch.cos(2 * math.pi * (e - centre) / E)
        logits = x0 @ self.Wg[layer] + bias
        val, idx = torch.topk(logits, self.top_k, dim=1)
        return idx, torch.softmax(val, dim=1)

    def forward(self, step: int, record: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
        """EP forward of ``step``; calls ``record(layer, counts [S])`` per layer. Returns [T, d].

        The MoE layers act in parallel on x0 (output = x0 + sum of the layers'
        outputs), so one all-reduce per step carries every layer's partial sums:
        on a shared CPU machine a gloo collective costs milliseconds, and the
        tests care about routing and weights, not depth.
        """
        S = self.g.slots_per_rank
        x0 = self.inputs(step)
        T = self.tokens
        tok = torch.arange(T, device=self._device)[:, None].expand(T, self.top_k)
        ys = torch.zeros(self.g.num_layers, T, self.d, device=self._device)
        before = self.logical_tokens.copy() if self.keep_history else None
        for l in range(self.g.num_layers):
            ex, wt = self.route(l, step, x0)
            rep = tok % self.rc[l][ex]
            p = self.log2phy[l][ex, rep]  # [T, k] physical slots
            mine = (p // S) == self.rank
            s = p[mine] - self.rank * S
            t = tok[mine]
            counts = torch.bincount(s, minlength=S)
            if record is not None:
                record(l, counts)
            self.rank_tokens[l] += int(s.numel())
            self.logical_tokens[l] += np.bincount(ex.reshape(-1).cpu().numpy(), minlength=self.g.num_experts)
            w = wt[mine]
            # One matmul pair per local slot (not a weight gather per token: experts can be MiBs).
            order = torch.argsort(s, stable=True)
            bounds = [0, *torch.cumsum(counts, 0).tolist()]
            for j in range(S):
                if bounds[j + 1] == bounds[j]:
                    continue
                sel = order[bounds[j] : bounds[j + 1]]
                ts = t[sel]
                out = torch.relu(x0[ts] @ self.w1[l][j]) @ self.w2[l][j] * w[sel][:, None]
                ys[l].index_add_(0, ts, out)
        if before is not None:
            self.logical_by_step[step] = self.logical_tokens - before
        if self.distributed:
            dist.all_reduce(ys, group=self.group)
        return x0 + ys.sum(0)

    def reference_forward(self, step: int) -> torch.Tensor:
        """The same step with one copy of every expert and no parallelism: [T, d]."""
        x0 = self.inputs(step)
        T = self.tokens
        tok = torch.arange(T, device=self._device)[:, None].expand(T, self.top_k).reshape(-1)
        ys = torch.zeros(self.g.num_layers, T, self.d, device=self._device)
        for l in range(self.g.num_layers):
            ex, wt = self.route(l, step, x0)
            e = ex.reshape(-1)
            w = wt.reshape(-1)
            for x in torch.unique(e).tolist():
                sel = torch.nonzero(e == x).squeeze(1)
                ts = tok[sel]
                out = torch.relu(x0[ts] @ self.W1[l, x]) @ self.W2[l, x] * w[sel][:, None]
                ys[l].index_add_(0, ts, out)
        return x0 + ys.sum(0)

    def rank_loads(self, step: int, phy2log: np.ndarray) -> np.ndarray:
        """Tokens each rank would get in ``step`` under placement ``phy2log`` [L, P]: [L, R] int64.

        Same replica choice as :meth:`forward` (token t -> replica t % count),
        so for the placement in force it equals the ranks' recorded counts.
        """
        g = self.g
        l2p = log2phy_padded(phy2log, g, g.max_replicas)
        rc = replica_count(phy2log, g)
        x0 = self.inputs(step)
        tok = np.arange(self.tokens)[:, None]
        out = np.zeros((g.num_layers, g.num_ranks), dtype=np.int64)
        for l in range(g.num_layers):
            ex = self.route(l, step, x0)[0].cpu().numpy()
            p = l2p[l][ex, tok % rc[l][ex]]
            out[l] = np.bincount((p // g.slots_per_rank).ravel(), minlength=g.num_ranks)
        return out

    def weight_mismatches(self) -> list[tuple[int, int]]:
        """(layer, local slot) whose weights are not bitwise those of the expert phy2log says."""
        S = self.g.slots_per_rank
        bad = []
        for l in range(self.g.num_layers):
            for s in range(S):
                e = int(self.phy2log[l, self.rank * S + s])
                if not (
                    torch.equal(self.w1[l][s], self.W1[l, e]) and torch.equal(self.w2[l][s], self.W2[l, e])
                ):
                    bad.append((l, s))
        return bad

    def tables_consistent(self) -> bool:
        """log2phy / replica_count equal those derived from phy2log."""
        want_l2p = log2phy_padded(self.phy2log, self.g, self.g.max_replicas)
        want_rc = replica_count(self.phy2log, self.g)
        return bool(
            np.array_equal(self.log2phy.cpu().numpy(), want_l2p)
            and np.array_equal(self.rc.cpu().numpy(), want_rc)
        )


# -- what a multi-rank run checks --------------------------------------------------


def rank_report(model: TinyMoE, client: Any, maxdiff: float) -> dict[str, Any]:
    """One rank's end state for :func:`check_ranks_exact` (take it before ``client.close()``).

    ``maxdiff``: the largest |output - reference output| the rank saw."""
    return {
        "maxdiff": maxdiff,
        "mismatches": model.weight_mismatches(),
        "tables_ok": model.tables_consistent(),
        "phy2log": client.phy2log.copy(),
        "model_phy2log": model.phy2log.copy(),
        "epoch": client.epoch,
        "stats": dict(vars(client.stats)),
    }


def check_ranks_exact(res: Sequence[dict[str, Any]]) -> None:
    """Every rank (reports of :func:`rank_report`): each slot holds its logical expert's
    weights bitwise, the routing tables are consistent, the model runs the client's
    placement, outputs equal the unbalanced model's; placement, epoch and plan history
    equal rank 0's."""
    for r in res:
        assert r["mismatches"] == [], r["mismatches"]
        assert r["tables_ok"]
        assert np.array_equal(r["phy2log"], r["model_phy2log"])
        assert r["maxdiff"] < 1e-4, r["maxdiff"]
        assert np.array_equal(r["phy2log"], res[0]["phy2log"])
        assert r["epoch"] == res[0]["epoch"]
        assert r["stats"]["history"] == res[0]["stats"]["history"]


# -- multi-process launcher ---------------------------------------------------------


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stack_file(port: int, rank: int) -> str:
    return os.path.join(tempfile.gettempdir(), f"eplbd-launch-{port}-r{rank}.stacks")


def _child(
    fn: Callable[..., Any], rank: int, world: int, port: int, args: tuple[Any, ...], q: Any, backend: str
) -> None:
    try:
        # On SIGUSR1 (launch's timeout), every thread's stack goes to a file the parent reads.
        stacks = open(_stack_file(port, rank), "w")  # noqa: SIM115 (lives as long as the process)
        faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
        torch.set_num_threads(1)
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        out = fn(rank, world, *args)
        q.put((rank, True, out))
    except BaseException:
        q.put((rank, False, traceback.format_exc()))
    finally:
        try:
            # put() hands the pickle to a feeder thread: flush it before os._exit, or a
            # large result can be lost with the process (the parent then waits in vain).
            q.close()
            q.join_thread()
            if dist.is_initialized():
                dist.destroy_process_group()
        finally:
            os._exit(0)  # skip atexit/finalizers of a forked child


def launch(
    fn: Callable[..., Any],
    world: int,
    *args: Any,
    timeout: float = 120.0,
    on_started: Callable[[], None] | None = None,
    backend: str = "gloo",
    may_die: Sequence[int] = (),
    start_method: str = "fork",
) -> list[Any]:
    """Run ``fn(rank, world, *args)`` in ``world`` forked processes with a ``backend`` group.

    ``may_die``: ranks that are expected to die without reporting (fault tests kill
    them): their result is None once their process has exited.

    ``on_started`` runs in a parent thread once every child is forked (start
    parent-side threads there, not before: fork copies locks held by threads).

    Returns the results ordered by rank; raises RuntimeError with the child's
    traceback if any rank failed, and kills every child still running after
    ``timeout`` seconds. Fork (not spawn) keeps start-up to a fraction of a
    second since torch is already imported. ``start_method="spawn"`` for ranks that use
    CUDA: a parent that called ``torch.cuda.is_available()`` (pytest's skipif does, at
    collection) has registered torch's fork poison, and a forked child's first CUDA call
    raises "Cannot re-initialize CUDA in forked subprocess" (``fn`` must then be picklable:
    a module-level function).
    """
    ctx: Any = mp.get_context(start_method)  # typeshed's BaseContext has no Process
    q = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_child, args=(fn, r, world, port, args, q, backend), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    side = threading.Thread(target=on_started, daemon=True) if on_started is not None else None
    if side is not None:
        side.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    import queue as _queue

    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) + sum(1 for r in may_die if procs[r].exitcode is not None) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = [r for r in range(world) if r not in results and procs[r].is_alive()]
                gone = [
                    f"{r} (exit status {procs[r].exitcode})"
                    for r in range(world)
                    if r not in results and r not in may_die and procs[r].exitcode is not None
                ]
                raise TimeoutError(
                    f"launch: only {len(results)} of {world} ranks reported in {timeout} s; "
                    f"still running: {missing}; exited without a result: {gone or 'none'}"
                    f"{_dump_stacks(procs, missing, port)}"
                )
            try:
                rank, ok, out = q.get(timeout=min(left, 1.0))
            except _queue.Empty:
                died = any(
                    p.exitcode not in (None, 0) or (p.exitcode == 0 and r not in results)
                    for r, p in enumerate(procs)
                    if r not in may_die
                )
                if errors or died:
                    # A rank died without reporting (or another failed): give the rest a moment.
                    deadline = min(deadline, time.monotonic() + 5)
                continue
            if ok:
                results[rank] = out
            else:
                errors.append(f"rank {rank}:\n{out}")
                deadline = min(deadline, time.monotonic() + 10)
    finally:
        for p in procs:
            p.join(timeout=2)
            if p.is_alive():
                p.kill()
                p.join(timeout=2)
        for r in range(world):
            with contextlib.suppress(OSError):
                os.unlink(_stack_file(port, r))
    if side is not None:
        side.join(timeout=10)
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results.get(r) for r in range(world)]


def _dump_stacks(procs: Sequence[Any], ranks: Sequence[int], port: int) -> str:
    """Every thread's Python stack of the ``ranks`` still running (for a timeout's message)."""
    for r in ranks:
        with contextlib.suppress(Exception):
            os.kill(procs[r].pid, signal.SIGUSR1)
    time.sleep(1.0)
    out = []
    for r in ranks:
        try:
            with open(_stack_file(port, r)) as f:
                out.append(f"\n--- rank {r} (pid {procs[r].pid}), every thread:\n{f.read()}")
        except OSError as e:
            out.append(f"\n--- rank {r}: no stacks ({e})")
    return "".join(out)


def launch_with_driver(
    fn: Callable[..., Any], world: int, *args: Any, driver: PlanDriver, **kwargs: Any
) -> list[Any]:
    """:func:`launch` with ``driver`` publishing plans from a parent thread meanwhile.

    The driver starts once the ranks are forked and is stopped when they end (or
    fail); an error raised in the driver is re-raised here.
    """
    th: list[threading.Thread] = []

    def started() -> None:
        t = threading.Thread(target=driver.run, daemon=True)
        t.start()
        th.append(t)

    try:
        res = launch(fn, world, *args, on_started=started, **kwargs)
    finally:
        driver.stop()
        for t in th:
            t.join(5)
    if driver.error is not None:
        raise driver.error
    return res


# -- a stand-in for the daemon ------------------------------------------------------


class PlanDriver:
    """Publishes plans into a domain from a parent-process thread (tests and benchmarks).

    Waits for the domain to appear, then repeatedly: waits until the previous
    plan's status is final and ``gap_windows`` more windows arrived, reads the
    placement in force, computes a new placement (``source="random"``: greedy
    on random loads, i.e. many moves; ``"windows"``: greedy on the sum of the
    last windows) and publishes the plan with id = newest window id. ``mutate``
    may replace a plan before it is published (fault injection). Stops after
    ``plans`` plans or when :meth:`stop` is called. ``published`` lists the ids.
    The first plan waits for window ``first_window`` (default ``gap_windows``).
    ``mirrors``: more domains (other nodes' in a multi-node test) that get the
    same plan (or ``mirror_mutate(i, plan)``) right after the main one.
    """

    def __init__(
        self,
        name: str,
        g: Geometry,
        *,
        plans: int = 3,
        source: str = "random",
        gap_windows: int = 2,
        seed: int = 0,
        mutate: Callable[[int, Any], Any] | None = None,
        timeout: float = 60.0,
        first_window: int | None = None,
        mirrors: Sequence[str] = (),
        mirror_mutate: Callable[[int, Any], Any] | None = None,
    ) -> None:
        self.name, self.g, self.plans, self.source = name, g, plans, source
        self.gap, self.mutate, self.timeout = gap_windows, mutate, timeout
        self.first_window = gap_windows if first_window is None else first_window
        self.mirrors, self.mirror_mutate = list(mirrors), mirror_mutate
        self.rng = np.random.default_rng(seed)
        self.published: list[int] = []
        self.statuses: list[Any] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        try:
            self._run()
        except BaseException as e:  # reported by the test
            self.error = e

    def _run(self) -> None:
        from eplbd.planner import build_plan
        from eplbd.policy import rebalance
        from eplbd.shm import PLAN_ABORTED, PLAN_COMMITTED, PLAN_REJECTED, Domain

        final = (PLAN_COMMITTED, PLAN_ABORTED, PLAN_REJECTED)
        deadline = time.monotonic() + self.timeout
        dom = None
        while dom is None:
            if self._stop.is_set() or time.monotonic() > deadline:
                return
            try:
                dom = Domain.attach(self.name, writable=True)
            except Exception:
                time.sleep(0.01)
        others = []
        for m in self.mirrors:
            while True:
                try:
                    others.append(Domain.attach(m, writable=True))
                    break
                except Exception:
                    if self._stop.is_set() or time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
        try:
            next_wid = self.first_window
            while len(self.published) < self.plans and not self._stop.is_set():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"PlanDriver: {len(self.published)} plans in {self.timeout} s")
                if self.published:
                    st = dom.read_plan_status()
                    if st.plan_id != self.published[-1] or st.state not in final:
                        time.sleep(0.002)
                        continue
                    if len(self.statuses) < len(self.published):
                        self.statuses.append(st)
                wid = dom.latest_window_id()
                if wid < next_wid:
                    time.sleep(0.002)
                    continue
                epoch, p2l = dom.read_placement()
                if self.source == "random":
                    loads = self.rng.gamma(0.5, 1.0, size=(self.g.num_layers, self.g.num_experts))
                else:
                    loads = np.sum([w.loads for w in dom.read_windows(4)], axis=0).astype(np.float64)
                new = rebalance(loads, p2l, self.g, policy="greedy")
                if np.array_equal(new, p2l):
                    next_wid = wid + 1
                    continue
                plan = build_plan(wid, epoch, p2l, new, self.g)
                i = len(self.published)
                if self.mutate is not None:
                    plan = self.mutate(i, plan)
                dom.publish_plan(plan)
                for o in others:
                    o.publish_plan(plan if self.mirror_mutate is None else self.mirror_mutate(i, plan))
                self.published.append(wid)
                next_wid = wid + self.gap
            # Record the last status too.
            while len(self.statuses) < len(self.published) and not self._stop.is_set():
                st = dom.read_plan_status()
                if st.plan_id == self.published[-1] and st.state in final:
                    self.statuses.append(st)
                    break
                if time.monotonic() > deadline:
                    break
                time.sleep(0.002)
        finally:
            dom.close()
            for o in others:
                o.close()
