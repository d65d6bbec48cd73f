"""The ``heimdall`` command: train, evaluate, simulate requests, manage the registry."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from heimdall import contract
from heimdall.config import get_settings
from heimdall.errors import HeimdallError


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def cmd_train(args: argparse.Namespace) -> int:
    """Simulate scenes, train, export ONNX + card, evaluate and record the accuracy."""
    try:
        from heimdall.training.train import TrainParams, train
    except ImportError as exc:  # torch is in the optional "train" extra
        print(
            f"heimdall train needs the train extra (pip install '.[train]'): {exc}", file=sys.stderr
        )
        return 2
    from heimdall.registry import shipped_model_dir
    from heimdall.stations import load_network

    network = load_network(get_settings().stations_file)
    out = Path(args.out) if args.out else shipped_model_dir()
    params = TrainParams(
        train_scenes=args.scenes,
        val_scenes=args.val_scenes,
        calibration_scenes=args.calibration_scenes,
        epochs=args.epochs,
        seed=args.seed,
    )
    started = time.perf_counter()
    summary = train(network, out, params)
    accuracy = _evaluate_dir(out, args.eval_scenes)
    _record_accuracy(out, accuracy)
    print(f"evaluation: {json.dumps(accuracy)}")
    print(f"done in {time.perf_counter() - started:.0f} s (training {summary['training_s']} s)")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Re-fit the served covariance of a model (the shipped one by default), no retraining.

    Writes the card's fusion block, then evaluates every family and records the
    figures in the card (``--eval-scenes 0`` skips that).
    """
    from heimdall.registry import shipped_model_dir
    from heimdall.stations import load_network
    from heimdall.training.calibration import calibrate

    network = load_network(get_settings().stations_file)
    model_dir = Path(args.model_dir) if args.model_dir else shipped_model_dir()
    calibrate(model_dir, network, n_scenes=args.scenes, seed=args.seed)
    if args.eval_scenes > 0:
        accuracy = _evaluate_dir(model_dir, args.eval_scenes)
        _record_accuracy(model_dir, accuracy)
        _print_table(accuracy)
    return 0


def _evaluate_dir(model_dir: Path, n_scenes: int, seed: int | None = None) -> dict[str, Any]:
    from heimdall.evaluation import EVAL_SEED, evaluate
    from heimdall.modelcard import ModelCard
    from heimdall.stations import load_network

    card = ModelCard.load(model_dir / "model_card.json")
    network = load_network(get_settings().stations_file)
    return evaluate(
        model_dir / "model.onnx", card, network, n_scenes=n_scenes, seed=seed or EVAL_SEED
    )


def _record_accuracy(model_dir: Path, report: dict[str, Any]) -> None:
    """Store evaluation figures in the card (the ONNX file and its sha are untouched)."""
    path = model_dir / "model_card.json"
    data = json.loads(path.read_text())
    held = report["families"].get("held-out") or next(iter(report["families"].values()))
    data["accuracy"] = {
        "evaluation_scenes": report["n_scenes_per_family"],
        "evaluation_seed": report["seed"],
        **held["model"],
        "baseline_median_error_m": held["baseline"]["median_error_m"],
        "baseline_p90_error_m": held["baseline"]["p90_error_m"],
        "families": report["families"],
    }
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate a model (the shipped one by default) and the baseline on held-out scenes."""
    from heimdall.registry import resolve, shipped_model_dir

    if args.registry:
        resolved = resolve(get_settings(), args.alias)
        model_dir = resolved.onnx_path.parent
    else:
        model_dir = Path(args.model_dir) if args.model_dir else shipped_model_dir()
    report = _evaluate_dir(model_dir, args.scenes, args.seed)
    report["model_dir"] = str(model_dir)
    if args.json:
        _print_json(report)
    else:
        _print_table(report)
    return 0


def _print_table(report: dict[str, Any]) -> None:
    """The per-family evaluation as a text table."""
    print(f"{report['n_scenes_per_family']} scenes per family (seed {report['seed']})")
    head = (
        "family",
        "model med",
        "base med",
        "ratio",
        "model P90",
        "base P90",
        "cov68",
        "cov95",
    )
    print("{:11s} {:>10s} {:>10s} {:>6s} {:>10s} {:>10s} {:>6s} {:>6s}".format(*head))
    for name, f in report["families"].items():
        m, b = f["model"], f["baseline"]
        print(
            f"{name:11s} {m['median_error_m']:10.0f} {b['median_error_m']:10.0f} "
            f"{f['model_to_baseline_median']:6.2f} {m['p90_error_m']:10.0f} "
            f"{b['p90_error_m']:10.0f} {m['coverage_68']:6.3f} {m['coverage_95']:6.3f}"
        )


def cmd_simulate(args: argparse.Namespace) -> int:
    """Write a /predict request built from one simulated scene, with its truth alongside."""
    from heimdall.simulate.requests import simulated_request
    from heimdall.stations import load_network

    body = simulated_request(
        args.seed,
        args.samples,
        args.encoding,
        all_stations=args.all_stations,
        network=load_network(get_settings().stations_file),
    )
    receivers = body["receivers"]
    text = json.dumps(body)
    if args.out == "-":
        print(text)
    else:
        Path(args.out).write_text(text)
        print(
            f"wrote {args.out}: {len(receivers)} stations x {args.samples} samples "
            f"({args.encoding}); truth {body['truth']}",
            file=sys.stderr,
        )
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    """Register a model directory (the shipped model by default) and set an alias."""
    from heimdall.registry import register_model

    settings = get_settings()
    if args.if_missing:
        from heimdall.errors import ModelUnavailable
        from heimdall.registry import resolve_version

        try:
            current = resolve_version(settings, args.alias)
        except ModelUnavailable:
            pass
        else:
            # An operator may have pointed the alias elsewhere: start-up must not undo that.
            _print_json({**current.to_dict(), "created": False, "unchanged": True})
            return 0
    identity, created = register_model(
        settings, Path(args.model_dir) if args.model_dir else None, alias=args.alias
    )
    _print_json({**identity.to_dict(), "created": created, "tracking_uri": settings.tracking_uri})
    return 0


def cmd_resolve(args: argparse.Namespace) -> int:
    """Resolve name@alias, download it and check its card."""
    from heimdall.registry import model_summary, resolve

    _print_json(model_summary(resolve(get_settings(), args.alias)))
    return 0


def reload_outcome(replies: list[dict[str, Any]]) -> tuple[int, list[str]]:
    """Exit status and one line per worker for the replies of a reload broadcast.

    ``replies`` is Celery's broadcast answer, ``[{hostname: reply}, ...]``. The
    status is 0 only when at least one worker replied and every one replied
    ``ok: true``: a script that promotes a model must learn that a worker still
    serves the old one.
    """
    lines: list[str] = []
    failed = 0
    for entry in replies:
        for hostname, reply in entry.items():
            body: dict[str, Any] = (
                reply if isinstance(reply, dict) else {"ok": False, "error": repr(reply)}
            )
            held = body.get("models") or ([body["model"]] if body.get("model") else [])
            serving = (
                f"{held[0].get('name')} "
                + ", ".join(f"v{i.get('version')} ({i.get('alias')})" for i in held)
                if held
                else "no model"
            )
            if body.get("ok") is True:
                lines.append(f"ok      {hostname}: now serving {serving}")
            else:
                failed += 1
                lines.append(f"FAILED  {hostname}: {_refusals(body)} (still serving {serving})")
    if not lines:
        return 1, ["FAILED  no worker replied (are any running, on this broker?)"]
    if failed:
        lines.append(f"{failed} of {len(lines)} worker(s) failed to reload")
    return (1 if failed else 0), lines


def _celery_app() -> Any:
    """A Celery client configured like the API's, from this process's settings."""
    from celeryconfig import make_app

    return make_app("heimdall-cli", get_settings())


def _refusals(reply: dict[str, Any]) -> str:
    """Why a worker refused a reload: each refused target's reason, else its error."""
    errors = reply.get("errors")
    if isinstance(errors, dict) and errors:
        return "; ".join(f"{target}: {why}" for target, why in sorted(errors.items()))
    return str(reply.get("error") or "no reason given")


def cmd_reload(args: argparse.Namespace) -> int:
    """Ask every worker to re-resolve the champion and extra models and reload them.

    Prints a line per worker (``--json``: the raw replies); exits non-zero when
    no worker replied or any replied ``ok: false``.
    """
    app = _celery_app()
    arguments = {"alias": args.alias} if args.alias else {}
    # Return as soon as every worker answered (the heartbeats say how many
    # there are) instead of always waiting out the timeout.
    expected = len(args.destination) if args.destination else len(_live_hostnames())
    replies = app.control.broadcast(
        contract.RELOAD_COMMAND,
        arguments=arguments,
        reply=True,
        timeout=args.timeout,
        destination=args.destination or None,
        limit=expected or None,
    )
    status, lines = reload_outcome(replies or [])
    if args.json:
        _print_json(replies)
    for line in lines:
        print(line, file=sys.stderr if args.json else sys.stdout)
    return status


def cmd_variant(args: argparse.Namespace) -> int:
    """Register a shifted copy of the shipped model as a new version under ``--alias``."""
    from heimdall.variants import register_variant

    settings = get_settings()
    out_dir = Path(args.out_dir) if args.out_dir else settings.var_dir / "variants" / args.alias
    identity = register_variant(
        settings, out_dir, args.alias, shift_m=(args.shift_east_m, args.shift_north_m)
    )
    _print_json({**identity.to_dict(), "model_dir": str(out_dir)})
    return 0


def _live_hostnames() -> list[str]:
    """Workers with a fresh heartbeat in the state Redis (empty when it cannot be read)."""
    import redis

    from heimdall.heartbeats import live_workers

    settings = get_settings()
    try:
        client = redis.Redis.from_url(settings.redis_url, socket_timeout=5.0)
        return [w["hostname"] for w in live_workers(client, settings.heartbeat_timeout_s)]
    except (redis.RedisError, OSError):
        return []


def cmd_traffic(args: argparse.Namespace) -> int:
    """Show or set the traffic policy every API process routes by (the state Redis).

    ``heimdall model traffic champion=90 challenger=10 --shadow challenger``;
    no weights and no ``--shadow``: print the policy in force; ``--reset``:
    everything to the champion again.
    """
    import redis

    settings = get_settings()
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=5.0)
    try:
        return _set_traffic(args, client, settings.model_alias, settings.extra_models)
    except (redis.RedisError, OSError) as exc:
        print(
            f"error: the state Redis (HEIMDALL_REDIS_URL) does not answer: {type(exc).__name__}",
            file=sys.stderr,
        )
        return 1


def _set_traffic(args: argparse.Namespace, client: Any, champion: str, extra: list[str]) -> int:
    import getpass
    import socket

    from heimdall import traffic

    if args.reset:
        client.delete(contract.TRAFFIC_KEY)
    elif args.weights or args.shadow:
        weights: dict[str, int] = {}
        for assignment in args.weights:
            target, sep, value = assignment.partition("=")
            if not sep or not value.strip().isdigit():
                print(
                    f"error: {assignment!r} is not TARGET=WEIGHT (e.g. champion=90)",
                    file=sys.stderr,
                )
                return 2
            weights[target.strip()] = int(value)
        current = traffic.read_policy(client, champion)
        policy = traffic.parse_policy(
            {"weights": weights or dict(current.weights), "shadow": args.shadow or []},
            traffic.allowed_targets(champion, extra),
            updated_at=round(time.time(), 3),
            updated_by=f"cli:{getpass.getuser()}@{socket.gethostname()}",
        )
        traffic.write_policy(client, policy)
    _print_json(traffic.read_policy(client, champion).to_dict())
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    """Point the champion alias at VERSION (the one it leaves becomes previous-champion)."""
    from heimdall.lifecycle import promote

    _print_json(promote(get_settings(), args.version).to_dict())
    print("workers follow on reload: heimdall model reload", file=sys.stderr)
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    """Point the champion alias back at previous-champion."""
    from heimdall.lifecycle import rollback

    _print_json(rollback(get_settings()).to_dict())
    print("workers follow on reload: heimdall model reload", file=sys.stderr)
    return 0


def _add_lifecycle_commands(model: Any) -> None:
    """``heimdall model traffic | promote | rollback``."""
    p = model.add_parser("traffic", help="show or set the A/B traffic split and shadows")
    p.add_argument(
        "weights", nargs="*", metavar="TARGET=WEIGHT", help="e.g. champion=90 challenger=10"
    )
    p.add_argument(
        "--shadow",
        action="append",
        metavar="TARGET",
        help="send a copy of each computed request to TARGET (repeat for several)",
    )
    p.add_argument("--reset", action="store_true", help="send everything to the champion again")
    p.set_defaults(func=cmd_traffic)
    p = model.add_parser("promote", help="point the champion alias at a registered version")
    p.add_argument("version", help="registry version number, e.g. 7")
    p.set_defaults(func=cmd_promote)
    p = model.add_parser("rollback", help="point the champion alias back at previous-champion")
    p.set_defaults(func=cmd_rollback)


def cmd_stations(args: argparse.Namespace) -> int:
    """Print the receiver network in force."""
    from heimdall.stations import load_network

    _print_json(load_network(get_settings().stations_file).to_dict())
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command-line grammar."""
    parser = argparse.ArgumentParser(prog="heimdall", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="simulate, train, export ONNX + card (needs the train extra)")
    p.add_argument("--out", help="output folder (default: the packaged model folder)")
    p.add_argument("--scenes", type=int, default=30_000, help="training scenes")
    p.add_argument("--val-scenes", type=int, default=4_000, help="validation scenes")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--calibration-scenes", type=int, default=1000, help="scenes per calibration family"
    )
    p.add_argument("--eval-scenes", type=int, default=300, help="evaluation scenes per family")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "calibrate",
        help="re-fit the served covariance on the calibration families (no retraining)",
    )
    p.add_argument(
        "--model-dir", help="folder with model.onnx + model_card.json (default: shipped)"
    )
    p.add_argument("--scenes", type=int, default=1000, help="scenes per calibration family")
    p.add_argument("--seed", type=int, default=3, help="seed of the first calibration family")
    p.add_argument(
        "--eval-scenes", type=int, default=300, help="then evaluate and record (0: skip)"
    )
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("evaluate", help="model vs baseline on held-out simulated scenes")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--scenes", type=int, default=300, help="scenes per family")
    p.add_argument("--seed", type=int, default=None, help="evaluation seed (default: fixed)")
    p.add_argument("--model-dir", help="folder with model.onnx + model_card.json")
    p.add_argument("--registry", action="store_true", help="evaluate name@alias from the registry")
    p.add_argument("--alias", default=None)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("simulate", help="write a /predict request from a simulated scene")
    p.add_argument("--out", default="req.json", help="output file, - for stdout")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=4096, help="IQ samples per station")
    p.add_argument("--encoding", choices=["base64", "pairs"], default="base64")
    p.add_argument("--all-stations", action="store_true", help="every station sends a recording")
    p.set_defaults(func=cmd_simulate)

    model = sub.add_parser("model", help="the MLflow model registry").add_subparsers(
        dest="model_command", required=True
    )
    p = model.add_parser("register", help="register the shipped (or a given) model")
    p.add_argument("--alias", default=None, help="alias to set (default: champion)")
    p.add_argument("--model-dir", help="folder with model.onnx + model_card.json")
    p.add_argument(
        "--if-missing",
        action="store_true",
        help="do nothing when the alias already points at a version (for start-up scripts)",
    )
    p.set_defaults(func=cmd_register)
    p = model.add_parser("resolve", help="resolve name@alias and check its card")
    p.add_argument("--alias", default=None)
    p.set_defaults(func=cmd_resolve)
    p = model.add_parser(
        "reload", help="make running workers reload the champion (--alias) and extra models"
    )
    p.add_argument("--alias", default=None)
    p.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds to wait for the replies (each worker loads and tests the model first)",
    )
    p.add_argument(
        "--destination",
        action="append",
        metavar="NODE",
        help="reload only this worker (e.g. heimdall@host); repeat for several (default: all)",
    )
    p.add_argument("--json", action="store_true", help="print the raw replies as JSON")
    p.set_defaults(func=cmd_reload)
    p = model.add_parser(
        "variant", help="register a copy of the shipped model whose answers move (for trials)"
    )
    p.add_argument("--alias", required=True, help="alias to set, e.g. challenger")
    p.add_argument("--shift-east-m", type=float, default=20_000.0, help="network output shift")
    p.add_argument("--shift-north-m", type=float, default=-10_000.0, help="network output shift")
    p.add_argument("--out-dir", help="where to write it (default: var/variants/ALIAS)")
    p.set_defaults(func=cmd_variant)

    _add_lifecycle_commands(model)

    p = sub.add_parser("stations", help="print the receiver network")
    p.set_defaults(func=cmd_stations)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``heimdall`` command."""
    logging.basicConfig(
        level=get_settings().log_level, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except HeimdallError as exc:
        print(f"error: {exc.detail}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
