"""`eplbd-ctl`: inspect a node's eplbd domains and daemon. Read-only: never writes to shm.

Commands:

- ``status [--json] [--domain NAME] [--prefix P]``: the daemon (pid, uptime,
  health from the heartbeat it writes into every domain) and, per domain:
  geometry, owner and rank pids (alive or not), the latest window and its age,
  β of the latest window under the placement in force, the current plan and its
  status, the last decision's moves and compute time, the hottest experts.
- ``trace DOMAIN -o FILE.npy``: the ring's windows as an int64 array
  [T, L, E], oldest first (the input format of ``eplbd replay``).

Exit status: 0 ok; 1 no domain (or the named one is missing or unreadable);
3 domains exist but no live daemon serves any of them; 2 usage errors.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

import numpy as np

__all__ = [
    "main",
    "collect_status",
    "format_status",
    "plan_error_name",
    "EXIT_NO_DOMAIN",
    "EXIT_NO_DAEMON",
    "MISMATCH_ERRORS",
]

EXIT_NO_DOMAIN = 1
EXIT_NO_DAEMON = 3
#: A heartbeat older than this (seconds) makes a live daemon "stale".
STALE_AFTER_S = 5.0
TOP_EXPERTS = 5

_PLAN_STATES = {0: "none", 1: "started", 2: "committed", 3: "aborted", 4: "rejected"}

#: PlanStatus.error codes the node leader writes. The ranks' side defines them
#: (eplbd_client.control.ERR_*, which needs torch to import); the daemon and this
#: tool must not, so the names are repeated here and a test checks both agree.
PLAN_ERRORS = {
    0: "none",
    16: "unreadable",
    17: "invalid",
    18: "hash_mismatch",
    19: "stale_base_epoch",
    20: "staging_too_small",
    21: "transfer_failed",
    22: "timeout",
    23: "abort_requested",
    24: "internal",
    25: "diverged",
    26: "transfer_group_unsafe",
}
ERR_HASH_MISMATCH, ERR_DIVERGED, ERR_TRANSFER_UNSAFE = 18, 25, 26
#: Errors meaning the nodes' daemons disagree: what the plan said is never started anywhere.
MISMATCH_ERRORS = {
    ERR_HASH_MISMATCH: "the nodes' daemons published different plans under one id",
    ERR_DIVERGED: "only some nodes' daemons published it",
}


def plan_error_name(code: int) -> str:
    return PLAN_ERRORS.get(int(code), f"error_{int(code)}")


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _age_s(ns: int, now_ns: int) -> float | None:
    return round((now_ns - ns) / 1e9, 3) if ns > 0 else None


def _finite(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def daemon_processes() -> list[int]:
    """Pids of processes that look like ``eplbd run`` (for "is a daemon running at all")."""
    import psutil

    me = os.getpid()
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = p.info.get("cmdline") or []
        if p.info["pid"] == me or "run" not in cmd:
            continue
        i = cmd.index("run")
        if any(os.path.basename(c) == "eplbd" or c in ("eplbd.cli", "eplbd.daemon") for c in cmd[:i]):
            out.append(int(p.info["pid"]))
    return sorted(out)


def domain_status(name: str, now_ns: int | None = None) -> dict[str, Any]:
    """Everything ``status`` reports about one domain, as JSON-ready values.

    Attaches read-only; an unreadable segment gives ``{"name", "error"}``.
    """
    from eplbd.placement import balancedness
    from eplbd.shm import Domain

    now_ns = time.time_ns() if now_ns is None else now_ns
    try:
        dom = Domain.attach(name, writable=False)
    except Exception as e:
        return {"name": name, "error": f"{type(e).__name__}: {e}"}
    try:
        g = dom.geometry
        d: dict[str, Any] = {
            "name": name,
            "layout_version": dom.layout_version,
            "geometry": {**g.to_dict(), "num_slots": g.num_slots},
            "ring_capacity": dom.ring_capacity,
            "created_age_s": _age_s(dom.created_ns, now_ns),
            "owner": {"pid": dom.owner_pid, "alive": dom.owner_alive()},
            "ranks": [{"pid": p, "alive": _alive(p)} for p in dom.rank_pids()],
        }
        epoch, phy2log = dom.read_placement()
        d["placement_epoch"] = int(epoch)
        latest = dom.latest_window_id()
        w = dom.read_window(latest) if latest >= 0 else None
        if w is None:
            d["window"] = None
            d["beta"] = None
            d["hottest"] = []
        else:
            loads = np.asarray(w.loads)
            d["window"] = {
                "id": int(w.window_id),
                "age_s": _age_s(int(w.timestamp_ns), now_ns),
                "step_begin": int(w.step_begin),
                "step_end": int(w.step_end),
                "epoch": int(w.epoch),
                "tokens": int(loads.sum()),
            }
            d["beta"] = round(balancedness(loads.astype(np.float64), phy2log, g), 4)
            per_expert = loads.sum(axis=0)  # [E] summed over layers
            total = max(int(per_expert.sum()), 1)
            top = np.argsort(-per_expert, kind="stable")[:TOP_EXPERTS]
            d["hottest"] = [
                {
                    "expert": int(e),
                    "load": int(per_expert[e]),
                    "share": round(float(per_expert[e]) / total, 4),
                }
                for e in top
            ]
        plan_id = dom.latest_plan_id()
        plan: dict[str, Any] | None = None
        st = dom.read_plan_status()
        # The newest plan outcome the ranks wrote; its id may be one this node's
        # daemon never published (rejected because only other nodes had it).
        d["plan_status"] = (
            None
            if st.plan_id < 0
            else {
                "plan_id": int(st.plan_id),
                "state": _PLAN_STATES.get(st.state, str(st.state)),
                "layers_committed": int(st.layers_committed),
                "error": int(st.error),
                "error_name": plan_error_name(st.error) if st.error else "",
                "age_s": _age_s(st.updated_ns, now_ns),
            }
        )
        d["mismatch"] = (
            {
                "plan_id": int(st.plan_id),
                "error": plan_error_name(st.error),
                "reason": MISMATCH_ERRORS[int(st.error)],
                # True / False, or None when this node has published a newer plan since
                # (only the latest id is kept, so whether it also had this one is unknown).
                "published_here": True
                if st.plan_id == plan_id
                else (False if plan_id < st.plan_id else None),
                "age_s": _age_s(st.updated_ns, now_ns),
            }
            if int(st.error) in MISMATCH_ERRORS
            else None
        )
        # The ranks refuse plans once an aborted transfer may have left their p2p group out
        # of step: balancing is off until they restart, which an operator must learn here.
        d["transfer_unsafe"] = (
            {"plan_id": int(st.plan_id), "age_s": _age_s(st.updated_ns, now_ns)}
            if int(st.error) == ERR_TRANSFER_UNSAFE
            else None
        )
        if plan_id >= 0:
            p = dom.read_plan()
            plan = {"latest_id": int(plan_id)}
            if p is not None:
                plan.update(id=int(p.plan_id), base_epoch=int(p.base_epoch), ops=p.num_ops, hash=p.hash)
            if st.plan_id == (p.plan_id if p is not None else plan_id):
                plan.update(
                    state=_PLAN_STATES.get(st.state, str(st.state)),
                    layers_committed=int(st.layers_committed),
                    error=int(st.error),
                    status_age_s=_age_s(st.updated_ns, now_ns),
                )
            else:
                plan.update(state="not started", layers_committed=0, error=0)
            if epoch == plan.get("id", plan_id):
                plan["state"] = "committed"
                plan["layers_committed"] = g.num_layers
        d["plan"] = plan
        info = dom.read_daemon_info()
        if info is None:
            d["daemon"] = None
        else:
            alive = _alive(info.pid)
            hb = _age_s(info.heartbeat_ns, now_ns)
            health = "dead" if not alive else ("ok" if hb is not None and hb <= STALE_AFTER_S else "stale")
            d["daemon"] = {
                "pid": info.pid,
                "alive": alive,
                "health": health,
                "uptime_s": _age_s(info.started_ns, now_ns),
                "heartbeat_age_s": hb,
                "windows_seen": info.windows_seen,
                "plans_published": info.plans_published,
                "errors": info.errors,
                "last_window": info.last_window,
                "last_decision": info.last_decision,
                "beta_now": _finite(info.beta_now),
                "beta_pred": _finite(info.beta_pred),
                "moves": {
                    "remote": info.moves_remote,
                    "cross_node": info.moves_cross_node,
                    "local": info.moves_local,
                },
                "compute_ms": round(float(info.compute_ms), 3),  # of the last published plan
            }
        return d
    except Exception as e:
        return {"name": name, "error": f"{type(e).__name__}: {e}"}
    finally:
        dom.close()


def collect_status(prefix: str, domain: str | None = None) -> dict[str, Any]:
    """``{"prefix", "domains": [...], "daemons": [...], "processes": [...]}``."""
    from eplbd.shm import list_domains

    now_ns = time.time_ns()
    names = [domain] if domain else list_domains(prefix)
    domains = [domain_status(n, now_ns) for n in names]
    daemons: dict[int, dict[str, Any]] = {}
    for d in domains:
        info = d.get("daemon")
        if info:
            cur = daemons.setdefault(
                info["pid"],
                {k: info[k] for k in ("pid", "alive", "health", "uptime_s")}
                | {"heartbeat_age_s": info["heartbeat_age_s"], "domains": []},
            )
            cur["domains"].append(d["name"])
            if info["health"] == "ok":
                cur["health"] = "ok"
                cur["heartbeat_age_s"] = min(cur["heartbeat_age_s"] or 0.0, info["heartbeat_age_s"] or 0.0)
    return {
        "prefix": prefix,
        "domains": domains,
        "daemons": sorted(daemons.values(), key=lambda x: x["pid"]),
        "processes": daemon_processes(),
    }


def _dur(s: float | None) -> str:
    if s is None:
        return "?"
    s = max(s, 0.0)
    if s < 60:
        return f"{s:.1f}s"
    m, s = divmod(int(s), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def format_status(st: dict[str, Any]) -> str:
    """Human-readable form of :func:`collect_status`'s result."""
    lines: list[str] = []
    live = [d for d in st["daemons"] if d["alive"]]
    if not st["daemons"]:
        procs = st["processes"]
        lines.append(
            "daemon    none has written to these domains"
            + (f" (eplbd run processes: {', '.join(map(str, procs))})" if procs else "")
        )
    for dm in st["daemons"]:
        state = "alive" if dm["alive"] else "not running"
        lines.append(
            f"daemon    pid {dm['pid']} {state}, up {_dur(dm['uptime_s'])}, "
            f"heartbeat {_dur(dm['heartbeat_age_s'])} ago: {dm['health']}"
        )
    if not live and st["daemons"]:
        lines.append("          no live daemon: plans are not being made")
    for d in st["domains"]:
        lines.append("")
        lines.append(f"domain    {d['name']}")
        if "error" in d:
            lines.append(f"  error       {d['error']}")
            continue
        g = d["geometry"]
        lines.append(
            f"  geometry    L={g['num_layers']} E={g['num_experts']} R={g['num_ranks']} "
            f"S={g['slots_per_rank']} N={g['num_nodes']} G={g['num_groups']} P={g['num_slots']}, "
            f"ring {d['ring_capacity']}, layout v{d['layout_version']}"
        )
        o = d["owner"]
        ranks = " ".join(f"{r['pid']}{'' if r['alive'] else '(dead)'}" for r in d["ranks"]) or "-"
        lines.append(f"  owner       pid {o['pid']} {'alive' if o['alive'] else 'DEAD'}; ranks {ranks}")
        w = d["window"]
        if w is None:
            lines.append("  window      none yet")
        else:
            lines.append(
                f"  window      #{w['id']} steps [{w['step_begin']}, {w['step_end']}) epoch {w['epoch']}, "
                f"{_dur(w['age_s'])} ago, {w['tokens']} tokens"
            )
        lines.append(
            f"  beta        {_num(d['beta'])} (latest window, placement epoch {d['placement_epoch']})"
        )
        p = d["plan"]
        if p is None:
            lines.append("  plan        none published")
        else:
            pid = p.get("id", p["latest_id"])
            lines.append(
                f"  plan        #{pid} base {p.get('base_epoch', '?')}, {p.get('ops', '?')} ops: "
                f"{p['state']}, {p['layers_committed']}/{g['num_layers']} layers committed"
                + (f", error {p['error']} ({plan_error_name(p['error'])})" if p.get("error") else "")
            )
        mm = d.get("mismatch")
        if mm is not None:
            lines.append(
                f"  MISMATCH    plan #{mm['plan_id']} rejected on every rank {_dur(mm['age_s'])} ago: "
                f"{mm['error']} ({mm['reason']}"
                + ("; this node's daemon did not publish it" if mm["published_here"] is False else "")
                + "); check that every node runs its daemon with the same config and version"
            )
        tu = d.get("transfer_unsafe")
        if tu is not None:
            lines.append(
                f"  REFUSED     plan #{tu['plan_id']} refused on every rank {_dur(tu['age_s'])} ago: an "
                "earlier plan was aborted with p2p transfers possibly unmatched, so the ranks' transfer "
                "group may be out of step; balancing is off until the ranks restart (their logs say why)"
            )
        dm = d["daemon"]
        if dm is not None:
            mv = dm["moves"]
            lines.append(
                f"  decision    {dm['last_decision']} (beta of the forecast: {_num(dm['beta_now'])} now, "
                f"{_num(dm['beta_pred'])} predicted)"
            )
            lines.append(
                f"  last plan   moves remote {mv['remote']} (cross-node {mv['cross_node']}) local "
                f"{mv['local']}; computed in {dm['compute_ms']:.1f} ms"
            )
            lines.append(
                f"  counters    windows {dm['windows_seen']}, plans {dm['plans_published']}, "
                f"errors {dm['errors']} (daemon pid {dm['pid']}: {dm['health']})"
            )
        hot = ", ".join(f"e{h['expert']} {100 * h['share']:.1f}%" for h in d["hottest"]) or "-"
        lines.append(f"  hottest     {hot}")
    return "\n".join(lines).lstrip("\n") + "\n"


def cmd_status(args: argparse.Namespace) -> int:
    from eplbd.shm import validate_name

    if args.domain:
        try:
            validate_name(args.domain)
        except ValueError as e:
            print(f"eplbd-ctl: {e}", file=sys.stderr)
            return 2
    st = collect_status(args.prefix, args.domain)
    if args.json:
        json.dump(st, sys.stdout, indent=2)
        sys.stdout.write("\n")
    if not st["domains"]:
        print(
            f"eplbd-ctl: no eplbd domain with prefix {args.prefix!r} in /dev/shm "
            "(is an inference job with eplbd running on this node?)",
            file=sys.stderr,
        )
        return EXIT_NO_DOMAIN
    if not args.json:
        sys.stdout.write(format_status(st))
    if args.domain and "error" in st["domains"][0]:
        print(f"eplbd-ctl: domain {args.domain}: {st['domains'][0]['error']}", file=sys.stderr)
        return EXIT_NO_DOMAIN
    if not any(d["health"] == "ok" for d in st["daemons"]):
        print(
            "eplbd-ctl: no live eplbd daemon serves these domains (systemctl status eplbd)", file=sys.stderr
        )
        return EXIT_NO_DAEMON
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    from eplbd.shm import Domain

    try:
        dom = Domain.attach(args.domain, writable=False)
    except Exception as e:
        print(f"eplbd-ctl: domain {args.domain}: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_NO_DOMAIN
    try:
        wins = dom.read_windows(dom.ring_capacity)
        L, E = dom.geometry.num_layers, dom.geometry.num_experts
    finally:
        dom.close()
    if not wins:
        print(f"eplbd-ctl: domain {args.domain}: the ring holds no window yet", file=sys.stderr)
        return EXIT_NO_DOMAIN
    trace = np.stack([np.asarray(w.loads, dtype=np.int64) for w in wins])  # [T, L, E]
    assert trace.shape[1:] == (L, E)
    np.save(args.output, trace)
    print(
        f"wrote {args.output}: {trace.shape[0]} windows [{wins[0].window_id}..{wins[-1].window_id}] "
        f"x {L} layers x {E} experts",
        file=sys.stderr,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from eplbd.config import Config

    p = argparse.ArgumentParser(
        prog="eplbd-ctl", description="Inspect eplbd domains and the daemon (read-only)."
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    s = sub.add_parser("status", help="daemon and per-domain status")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--domain", metavar="NAME", help="only this domain")
    s.add_argument(
        "--prefix", metavar="P", default=Config.shm_prefix, help="domain name prefix (default %(default)s)"
    )
    s.set_defaults(func=cmd_status)
    t = sub.add_parser("trace", help="dump the ring's windows as [T, L, E] int64 .npy")
    t.add_argument("domain", metavar="DOMAIN")
    t.add_argument("-o", "--output", required=True, metavar="FILE.npy")
    t.set_defaults(func=cmd_trace)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
