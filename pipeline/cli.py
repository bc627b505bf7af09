"""The `cdrsync` command line: configuration, topics, connectors, the worker, tapping topics, dead letters, the demo."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from .cli_identity import add_identity_commands
from .config import UNKEYED_WARNING, Config, load_config
from .errors import CdrsyncError
from .settings import Settings

__all__ = ["main"]

Handler = Callable[[argparse.Namespace, Settings, Config], int]


def _config_check(args: argparse.Namespace, settings: Settings, config: Config) -> int:
    for site in config.sites.values():
        routes = ", ".join(f"{r.target} ({r.trigger})" for r in site.routes) or "none"
        role = "target" if site.target else "source"
        print(f"ok  {site.site:10} adapter={site.adapter} {role} routes: {routes}")
    print(f"ok  topics.yaml: {len(config.topics.topics)} topics, {len(config.topics.retry_tiers)} retry tiers")
    if unkeyed := config.unkeyed_patient_sites():
        print("warn " + UNKEYED_WARNING.format(sites=", ".join(unkeyed)))
    return 0


def _topics_apply(args: argparse.Namespace, settings: Settings, config: Config) -> int:
    from .kafkaadmin import apply_topics, declared_topics

    changes = apply_topics(settings.kafka_bootstrap, declared_topics(config), dry_run=args.dry_run)
    print(f"{changes} change(s){' planned (dry run)' if args.dry_run else ' applied'}")
    return 0


def _topics_list(args: argparse.Namespace, settings: Settings, config: Config) -> int:
    from .kafkaadmin import declared_topics

    for plan in declared_topics(config):
        print(f"{plan.name:32} partitions={plan.partitions} rf={plan.replication_factor} {plan.config}")
    return 0


def _connectors_apply(args: argparse.Namespace, settings: Settings, config: Config) -> int:
    from .connect import apply_connectors, load_connectors

    specs = load_connectors(settings.config_root / "connectors" / "debezium", config)
    for line in apply_connectors(settings.connect_url, specs, dry_run=args.dry_run):
        print(line)
    return 0


def _connectors_status(args: argparse.Namespace, settings: Settings, config: Config) -> int:
    from .connect import connector_status, load_connectors

    unhealthy = 0
    for spec in load_connectors(settings.config_root / "connectors" / "debezium", config):
        status = connector_status(settings.connect_url, spec.name)
        tasks = [t.get("state", "?") for t in status.get("tasks", [])]
        state = status.get("connector", {}).get("state", "?")
        unhealthy += state != "RUNNING" or not tasks or any(t != "RUNNING" for t in tasks)
        print(f"{spec.name:20} connector={state} tasks={','.join(tasks) or 'none'}")
    return 1 if unhealthy else 0


def _worker(args: argparse.Namespace, settings: Settings, config: Config) -> int:
    from .keycheck import check_patient_keys

    check_patient_keys(settings.kafka_bootstrap, config, wait_seconds=settings.topic_wait_seconds)
    argv = [
        sys.executable,
        "-m",
        "faust",
        "-A",
        "agents.worker",
        *(["--quiet"] if settings.log_format == "json" else []),  # no banner between the JSON lines
        "worker",
        "-l",
        args.loglevel,
        "--web-port",
        str(args.web_port or settings.web_port),
    ]
    os.chdir(settings.config_root)
    os.execv(sys.executable, argv)  # replaces this process: signals reach the worker directly


def _tap(args: argparse.Namespace, settings: Settings, config: Config) -> int:
    from .tap import tap

    name = config.topics.name(args.topic) if args.topic in config.topics.topics else args.topic
    out = sys.stdout.buffer
    for item in tap(
        settings.kafka_bootstrap,
        name,
        site=args.site,
        resource_type=args.type,
        from_beginning=not args.latest,
        limit=args.limit,
        idle_seconds=args.idle,
    ):
        out.write(orjson.dumps(item) + b"\n")
        out.flush()
    return 0


def _dlq_filter(args: argparse.Namespace) -> Any:
    from .dlq import DeadLetterFilter, parse_time, record_ids

    return DeadLetterFilter(
        ids=record_ids(getattr(args, "ids", None)),
        site=args.site,
        target=args.target,
        stage=args.stage,
        error_class=args.error_class,
        since_ms=parse_time(args.since) if args.since else None,
        until_ms=parse_time(args.until) if args.until else None,
        include_resolved=getattr(args, "include_resolved", False),
    )


def _dlq_list(args: argparse.Namespace, settings: Settings, config: Config) -> int:
    from .dlq import counts_by_reason, read_dead_letters

    chosen = _dlq_filter(args)
    letters = [letter for letter in read_dead_letters(settings.kafka_bootstrap, config) if chosen.matches(letter)]
    letters.sort(key=lambda letter: (letter.failed_ms, letter.partition, letter.offset))
    if args.json:
        for letter in letters:
            sys.stdout.buffer.write(orjson.dumps(letter.summary()) + b"\n")
        return 0
    print(f"{'ID':>9}  {'FAILED AT (UTC)':19}  {'STAGE':9} {'ERROR CLASS':19} {'SITE':7} {'RESOURCE':56} STATUS")
    for letter in letters:
        s = letter.summary()
        print(
            f"{s['id']:>9}  {s['failed_at'][:19]:19}  {s['stage'] or '?':9} {s['error_class'] or '?':19} "
            f"{s['site'] or '?':7} {(s['target_ref'] or s['resource_type'] or '?')[:56]:56} {s['status']}"
        )
        bound = f"for {s['target']}: " if letter.failure is not None and letter.failure.stage == "writeback" else ""
        print(f"{'':11}{(bound + (s['reason'] or ''))[:150]}")
    print(f"\n{len(letters)} dead letters" + ("" if chosen.include_resolved else " still open") + " by reason:")
    for (stage, error_class), count in counts_by_reason(letters):
        print(f"  {count:6}  {stage}/{error_class}")
    return 0


def _dlq_show(args: argparse.Namespace, settings: Settings, config: Config) -> int:
    from .dlq import read_dead_letters, record_ids, redacted

    found = read_dead_letters(settings.kafka_bootstrap, config, ids=record_ids([args.id]))
    if not found:
        raise CdrsyncError(f"no dead letter {args.id} (ids are partition:offset, as `cdrsync dlq list` shows)")
    sys.stdout.buffer.write(orjson.dumps(redacted(found[0], args.with_patient_data), option=orjson.OPT_INDENT_2))
    print()
    return 0


def _resolution_text(resolution: dict[str, Any] | None) -> str:
    resolution = resolution or {}
    return f"{resolution.get('action', '?')} {resolution.get('at', '')} by {resolution.get('by', '?')}".strip()


def _dlq_resolve(action: str) -> Handler:
    def run(args: argparse.Namespace, settings: Settings, config: Config) -> int:
        from .dlq import destination, read_dead_letters, resolve

        chosen = _dlq_filter(args)
        filters = (chosen.site, chosen.target, chosen.stage, chosen.error_class, chosen.since_ms, chosen.until_ms)
        if not (chosen.ids or args.all or any(f is not None for f in filters)):
            raise CdrsyncError(f"name dead letters to {action} (ids, a filter such as --stage, or --all)")
        everything = read_dead_letters(settings.kafka_bootstrap, config, ids=chosen.ids or None)
        letters = [letter for letter in everything if chosen.matches(letter)]
        missing = chosen.ids - {letter.id for letter in letters}
        if missing:
            raise CdrsyncError(f"no dead letter {', '.join(sorted(missing))} (ids are partition:offset)")
        done = [letter for letter in letters if letter.resolution is not None]
        if done and not chosen.include_resolved:  # named by id: found, but not acted on again unasked
            named = ", ".join(f"{letter.id} ({_resolution_text(letter.resolution)})" for letter in done)
            raise CdrsyncError(f"already resolved: {named}; add --include-resolved to {action} again")
        for letter in letters:
            where = destination(config, letter) if action == "replay" else "resolved without writing"
            again = f"  [again: {_resolution_text(letter.resolution)}]" if letter.resolution else ""
            print(f"{letter.id:>9}  {letter.target_ref or letter.resource_type or '?':50} -> {where}{again}")
        if not args.execute:
            print(f"dry run: {len(letters)} dead letters would be {action}ed; add --execute to do it")
            return 0

        def progress(done: int, total: int) -> None:
            print(f"{action}: {done}/{total}", flush=True)

        count = resolve(settings.kafka_bootstrap, config, letters, action, reason=args.reason or "", progress=progress)
        print(f"{count} dead letters {action}ed and audited")
        return 0

    return run


def _chosen_conflicts(args: argparse.Namespace, settings: Settings, config: Config) -> list[Any]:
    from .conflicts import read_conflicts
    from .dlq import parse_time, record_ids

    ids = record_ids(getattr(args, "ids", None))
    since = parse_time(args.since) if args.since else None
    include_resolved = getattr(args, "include_resolved", False) or bool(ids)
    found = [
        c
        for c in read_conflicts(settings.kafka_bootstrap, config, ids=ids or None)
        if (not ids or c.id in ids)
        and (include_resolved or c.resolution is None)
        and (args.site is None or c.value.get("site") == args.site)
        and (since is None or int(c.value.get("detected_ms") or 0) >= since)
    ]
    missing = ids - {c.id for c in found}
    if missing:
        raise CdrsyncError(f"no conflict {', '.join(sorted(missing))} (ids are partition:offset, as `list` shows)")
    return sorted(found, key=lambda c: (int(c.value.get("detected_ms") or 0), c.partition, c.offset))


def _conflicts_list(args: argparse.Namespace, settings: Settings, config: Config) -> int:
    found = _chosen_conflicts(args, settings, config)
    if args.json:
        for conflict in found:
            sys.stdout.buffer.write(orjson.dumps(conflict.summary()) + b"\n")
        return 0
    print(f"{'ID':>9}  {'DETECTED AT (UTC)':19}  {'SITE':7} {'RESOURCE':56} {'OURS':>5} {'NOW':>5}  STATUS")
    for conflict in found:
        s = conflict.summary()
        print(
            f"{s['id']:>9}  {s['detected_at'][:19]:19}  {s['site'] or '?':7} {(s['target_ref'] or '?')[:56]:56} "
            f"{s['our_last_version'] or '-':>5} {s['current_version'] or '-':>5}  {s['status']}"
        )
        print(f"{'':11}fields that differ: {', '.join(s['differing_fields']) or '(none besides meta)'}")
    print(f"\n{len(found)} conflicts" + (" (open and resolved)" if args.include_resolved else " still open"))
    return 0


def _conflicts_show(args: argparse.Namespace, settings: Settings, config: Config) -> int:
    args.ids, args.site, args.since = [args.id], None, None
    [conflict] = _chosen_conflicts(args, settings, config)
    sys.stdout.buffer.write(orjson.dumps(conflict.shown(args.with_patient_data), option=orjson.OPT_INDENT_2))
    print()
    return 0


def _conflicts_resolve(args: argparse.Namespace, settings: Settings, config: Config) -> int:
    from .conflicts import resolve_conflicts

    decision = "take-incoming" if args.take_incoming else "keep-target"
    if not (args.ids or args.all or args.site or args.since):
        raise CdrsyncError("name the conflicts to resolve (ids, --site, --since, or --all)")
    found = _chosen_conflicts(args, settings, config)
    for conflict in found:
        s = conflict.summary()
        effect = (
            f"write {s['site']}'s version over target version {s['current_version']}"
            if decision == "take-incoming"
            else f"keep target version {s['current_version']}; later changes apply over it"
        )
        print(f"{s['id']:>9}  {s['target_ref'] or '?':50} -> {effect}")
    if not args.execute:
        print(f"dry run: {len(found)} conflicts would be resolved ({decision}); add --execute to do it")
        return 0

    def progress(done: int, total: int) -> None:
        print(f"{decision}: {done}/{total}", flush=True)

    count = resolve_conflicts(settings.kafka_bootstrap, config, found, decision, reason=args.reason, progress=progress)  # type: ignore[arg-type]
    print(f"{count} conflicts resolved ({decision}) and audited")
    return 0


def _demo_load(args: argparse.Namespace, settings: Settings, config: Config) -> int:
    from .demo import demo_fhir_loads, site_dsn, upsert_rows

    def dsn_of(site_name: str) -> str:
        site = config.sites[site_name]
        return site_dsn(site, settings.pg_host, settings.pg_port, settings.pg_user, settings.pg_password_value)

    for load in demo_fhir_loads(lambda name: config.sites[name].resource_types):
        count = upsert_rows(dsn_of(load.site), load.rows)
        database = config.sites[load.site].source.database  # type: ignore[union-attr]
        written = f"{load.what:12} {count:3} rows written to {database}.fhir.resource" if load.bundle else load.what
        print(f"{load.site}: {written}")
    from .demo_sources import demo_compositions, demo_messages, write_compositions, write_messages

    for site in config.source_sites():
        if site.adapter == "openehr":
            count = write_compositions(dsn_of(site.site), demo_compositions())
            print(f"{site.site}: {count} openEHR compositions of the same person written to openehr.composition")
        elif site.adapter == "hl7v2":
            count = write_messages(dsn_of(site.site), demo_messages())
            print(f"{site.site}: {count} HL7 v2 messages (ORU^R01; ADT^A08 with the tumour-board ZTB) in hl7v2.message")
    return 0


def _definitions_apply(args: argparse.Namespace, settings: Settings, config: Config) -> int:
    from .definitions import apply_definitions

    for line in asyncio.run(apply_definitions(config.target("central"), settings.config_root / "fhir")):
        print(line)
    return 0


def _demo_wait(args: argparse.Namespace, settings: Settings, config: Config) -> int:
    from .demo_summary import wait_and_summarize

    return asyncio.run(wait_and_summarize(settings, config, timeout=args.timeout))


def _monitor(args: argparse.Namespace, settings: Settings, config: Config) -> int:
    from .logs import configure
    from .monitor import serve

    configure(settings.log_format)
    serve(settings, config, args.group or [settings.app_id], args.port or settings.monitor_port)
    return 0


def _status(args: argparse.Namespace, settings: Settings, config: Config) -> int:
    from .monitor import SourceCollector
    from .status import fetch_samples, fetch_worker, render, route_statuses, samples_of

    group = args.group or settings.app_id
    workers = [fetch_worker(url) for url in args.worker or [f"http://localhost:{settings.web_port}"]]
    if args.monitor:
        monitor = fetch_samples(args.monitor)
    else:
        monitor = samples_of(SourceCollector(settings, config, [group]).collect())
    statuses = route_statuses(config, workers, monitor, group)
    print(render(statuses, workers, monitor, group))
    return 1 if any(status.failures for status in statuses) else 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cdrsync",
        description="Keep hospital CDRs and the central tumour-board CDR in sync over Kafka. "
        "Configuration comes from topics.yaml and sites/*.yaml under CDRSYNC_CONFIG_ROOT "
        "(default: the repository); deployment values (KAFKA_BOOTSTRAP, CONNECT_URL, ...) from the environment.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, handler: Handler | None = None) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if handler is not None:
            sub.set_defaults(handler=handler)
        return sub

    def group(name: str, help_text: str) -> argparse._SubParsersAction[argparse.ArgumentParser]:
        sub = command(name, help_text)
        return sub.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")

    def leaf(
        parent: argparse._SubParsersAction[argparse.ArgumentParser],
        name: str,
        help_text: str,
        handler: Handler,
    ) -> argparse.ArgumentParser:
        sub = parent.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        return sub

    cfg = group("config", "check topics.yaml and sites/*.yaml")
    leaf(
        cfg,
        "check",
        "validate every configuration file; names the file, field and reason on error",
        _config_check,
    )

    topics = group("topics", "Kafka topics declared in topics.yaml")
    apply = leaf(topics, "apply", "create missing topics, grow partitions, align retention/compaction", _topics_apply)
    apply.add_argument("--dry-run", action="store_true", help="print the changes without making them")
    leaf(topics, "list", "print every declared topic", _topics_list)

    connectors = group("connectors", "Debezium connectors in connectors/debezium/")
    apply = leaf(
        connectors,
        "apply",
        "create or update each connector over the Kafka Connect REST API",
        _connectors_apply,
    )
    apply.add_argument("--dry-run", action="store_true", help="print the changes without making them")
    leaf(connectors, "status", "connector and task states; exits 1 if any is not RUNNING", _connectors_status)

    worker = command("worker", "run a stream worker (all stages) in the foreground", _worker)
    worker.add_argument("--web-port", type=int, help="port for /metrics (default: CDRSYNC_WEB_PORT or 6066)")
    worker.add_argument("--loglevel", default="info", choices=["debug", "info", "warning", "error"])

    tap_cmd = command("tap", "print a topic's records as decoded JSON lines (Avro and Debezium JSON)", _tap)
    tap_cmd.add_argument("topic", help="a topics.yaml key (normalized, identified, ready, dlq, audit) or a name")
    tap_cmd.add_argument("--site", help="only records of this site")
    tap_cmd.add_argument("--type", help="only records of this FHIR resource type")
    tap_cmd.add_argument("--limit", type=int, help="stop after this many records")
    tap_cmd.add_argument("--idle", type=float, default=5.0, help="stop after this many seconds without a record")
    tap_cmd.add_argument("--latest", action="store_true", help="only records arriving from now on")

    status = command(
        "status",
        "one screen per route: last write, latency, lag, held, retries, dead letters, conflicts, connector; "
        "exits 1 when a route is failing",
        _status,
    )
    status.add_argument(
        "--worker", action="append", metavar="URL", help="a worker's web address, repeatable (default: this host's)"
    )
    status.add_argument("--monitor", metavar="URL", help="read source health from `cdrsync monitor` at this /metrics")
    status.add_argument("--group", help="the workers' consumer group (default: CDRSYNC_APP_ID or cdrsync)")

    monitor = command("monitor", "serve source health and consumer lag on /metrics for Prometheus", _monitor)
    monitor.add_argument("--port", type=int, help="port for /metrics (default: CDRSYNC_MONITOR_PORT or 6067)")
    monitor.add_argument(
        "--group", action="append", help="consumer group whose lag to report, repeatable (default: CDRSYNC_APP_ID)"
    )

    dlq = group("dlq", "dead letters: list them by reason, show one, replay or discard them (dry run by default)")

    def dlq_filters(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--site", help="only dead letters of this site")
        sub.add_argument("--target", help="only records bound for this site (write-back: the hospital)")
        sub.add_argument(
            "--stage",
            choices=["normalize", "identity", "order", "backflow", "sink", "writeback", "audit"],
            help="failed at",
        )
        sub.add_argument("--error-class", help="e.g. mapping, rejected_by_target, target_unavailable, park_expired")
        sub.add_argument("--since", help="failed at or after: ISO 8601 time or an age (30m, 12h, 7d)")
        sub.add_argument("--until", help="failed before: ISO 8601 time or an age")

    dlq_list = leaf(
        dlq,
        "list",
        "one line per dead letter (ids, stage, error, reason; no clinical content), then counts by reason",
        _dlq_list,
    )
    dlq_filters(dlq_list)
    dlq_list.add_argument("--include-resolved", action="store_true", help="also those already replayed or discarded")
    dlq_list.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    show = leaf(dlq, "show", "one dead letter: its failure and record (patient data withheld unless asked)", _dlq_show)
    show.add_argument("id", help="partition:offset, as `cdrsync dlq list` shows")
    show.add_argument("--with-patient-data", action="store_true", help="include the clinical content and key")
    for action, text in (
        ("replay", "send dead letters back to the stage that failed them (same target ids); audited"),
        ("discard", "resolve dead letters without writing them, releasing what waits behind them; audited"),
    ):
        sub = leaf(dlq, action, text, _dlq_resolve(action))
        sub.add_argument("ids", nargs="*", metavar="ID", help="partition:offset of each dead letter")
        dlq_filters(sub)
        sub.add_argument("--all", action="store_true", help="every open dead letter")
        sub.add_argument("--include-resolved", action="store_true", help="also those already replayed or discarded")
        sub.add_argument("--reason", help="why (kept in the audit trail)", required=action == "discard")
        sub.add_argument("--execute", action="store_true", help="do it (without: a dry run listing what would happen)")

    conflicts = group(
        "conflicts",
        "changes not applied because the target changed since cdrsync's last write: list, show, resolve (dry run)",
    )

    def conflict_filters(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--site", help="only conflicts of changes from this site")
        sub.add_argument("--since", help="detected at or after: ISO 8601 time or an age (30m, 12h, 7d)")
        sub.add_argument("--include-resolved", action="store_true", help="also those already resolved")

    conflicts_list = leaf(
        conflicts, "list", "one line per conflict: resource, versions, the fields that differ", _conflicts_list
    )
    conflict_filters(conflicts_list)
    conflicts_list.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    show = leaf(conflicts, "show", "one conflict; both versions with --with-patient-data", _conflicts_show)
    show.add_argument("id", help="partition:offset, as `cdrsync conflicts list` shows")
    show.add_argument("--with-patient-data", action="store_true", help="include both versions of the resource")
    resolve = leaf(
        conflicts,
        "resolve",
        "decide conflicts after clinical review: write the hospital's version, or keep the target's; audited",
        _conflicts_resolve,
    )
    resolve.add_argument("ids", nargs="*", metavar="ID", help="partition:offset of each conflict")
    conflict_filters(resolve)
    resolve.add_argument("--all", action="store_true", help="every open conflict (with the filters given)")
    how = resolve.add_mutually_exclusive_group(required=True)
    how.add_argument(
        "--take-incoming",
        action="store_true",
        help="write the hospital's version over the target version reviewed (a newer edit there: a new conflict)",
    )
    how.add_argument(
        "--keep-target",
        action="store_true",
        help="the target keeps its version; the hospital's next change of that resource is written over it",
    )
    resolve.add_argument("--reason", required=True, help="the review's decision, for the audit trail (no patient data)")
    resolve.add_argument("--execute", action="store_true", help="do it (without: a dry run listing what would happen)")

    add_identity_commands(group, leaf)

    definitions = group("definitions", "FHIR definitions cdrsync ships in fhir/ (the tumour-board Questionnaire)")
    leaf(definitions, "apply", "PUT every fhir/*.json to the central CDR (idempotent)", _definitions_apply)

    demo = group("demo", "demo hospitals: load sample data, wait for it at the central CDR")
    leaf(demo, "load", "write the sample data into every demo hospital's database (FHIR, openEHR, HL7 v2)", _demo_load)
    wait = leaf(demo, "wait", "wait until every source row is at the central CDR, then print a summary", _demo_wait)
    wait.add_argument("--timeout", type=float, default=600, help="seconds to wait (default 600)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `cdrsync` console script."""
    args = _parser().parse_args(argv)
    try:
        settings = Settings()
        config = load_config(settings.config_root)
        result: int = args.handler(args, settings, config)
        return result
    except CdrsyncError as exc:
        print(f"cdrsync: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
