"""`cdrsync identity list|show|accept|reject|move`: the command line of identity review (pipeline/identityreview.py)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import orjson

from .config import Config
from .errors import CdrsyncError
from .settings import Settings

__all__ = ["add_identity_commands"]

Handler = Callable[[argparse.Namespace, Settings, Config], int]
Leaf = Callable[[Any, str, str, Handler], argparse.ArgumentParser]


def _chosen(args: argparse.Namespace, settings: Settings, config: Config) -> list[Any]:
    from .identityreview import read_reviews

    include_closed = getattr(args, "include_closed", False)
    return [
        r
        for r in read_reviews(settings.kafka_bootstrap, config)
        if (include_closed or r.closed is None) and (args.site is None or r.site == args.site)
    ]


def _one(args: argparse.Namespace, settings: Settings, config: Config) -> Any:
    if args.site not in config.sites:
        raise CdrsyncError(f"no site {args.site!r} (sites: {', '.join(sorted(config.sites))})")
    args.include_closed = True
    for review in _chosen(args, settings, config):
        if review.local_id == args.local_id:
            return review
    raise CdrsyncError(f"no identity review for patient {args.local_id!r} of {args.site} (`cdrsync identity list`)")


def _list(args: argparse.Namespace, settings: Settings, config: Config) -> int:
    found = _chosen(args, settings, config)
    if args.json:
        for review in found:
            sys.stdout.buffer.write(orjson.dumps(review.summary()) + b"\n")
        return 0
    print(f"{'REVIEWED AT (UTC)':19}  {'SITE':9} {'LOCAL PATIENT':24} {'CHANGES':>7}  STATUS")
    for review in found:
        s = review.summary()
        when, local = s["reviewed_at"][:19], s["local_patient_id"][:24]
        print(f"{when:19}  {s['site']:9} {local:24} {s['changes']:>7}  {s['status']}")
        print(f"{'':21}now:      {s['previous_patient'] or '(none)'}")
        print(f"{'':21}proposed: {s['proposed_patient'] or '(no shared identifier)'}")
    what = " (open and closed)" if args.include_closed else " open; their patients' records are held"
    print(f"\n{len(found)} identity reviews{what}")
    return 0


def _left_behind(config: Config, review: Any) -> dict[str, list[str]]:
    """The site's resources at the Patient the review started from (none if it had none)."""
    from .identityreview import written_before

    if review.previous_key is None:
        return {}
    return written_before(config, config.sites[review.site], review.previous_key)


def _show(args: argparse.Namespace, settings: Settings, config: Config) -> int:
    review = _one(args, settings, config)
    shown = {**review.shown(args.with_patient_data), "site_records_at_previous_patient": _left_behind(config, review)}
    sys.stdout.buffer.write(orjson.dumps(shown, option=orjson.OPT_INDENT_2))
    print()
    return 0


def _effect(review: Any, action: str) -> str:
    previous = f"Patient/{review.previous_key}"
    if action == "reject":
        return (
            f"the held records go to {previous}, as before the change; Patient versions naming the rejected "
            "identifier are not applied until the hospital corrects it"
        )
    if review.proposed_key is None:
        return f"the patient is no longer {previous}: its records are held until the hospital records an identifier"
    return (
        f"the held records and all later ones go to Patient/{review.proposed_key}; the worker moves the records "
        f"written before the change there from {previous}"
    )


def _decide(action: str) -> Handler:
    def run(args: argparse.Namespace, settings: Settings, config: Config) -> int:
        from .identityreview import decide, wait_for_closing

        review = _one(args, settings, config)
        if review.closed is not None:
            raise CdrsyncError(f"the identity review of {review.local_patient} is {review.status} already")
        print(f"{review.local_patient}: {action}: {_effect(review, action)}")
        if action == "accept" and review.proposed_key is not None:
            from .identity import moving_targets
            from .identityreview import survivor_not_there

            survivor, missing = survivor_not_there(config, review)
            for target in missing:
                print(
                    f"  warning: at {target}, Patient/{review.proposed_key} does not hold {review.site}|{survivor}, "
                    "the record this one was merged into (not sent there yet, or under identity review itself): "
                    "the move waits for it, through the retry topics, then as a dead letter"
                )

            moving = moving_targets(config.sites[review.site])
            for target, refs in _left_behind(config, review).items():
                if target not in moving:
                    print(
                        f"  at {target}, Patient/{review.previous_key} holds {len(refs)} earlier resources of "
                        f"{review.site}: they stay there (a tumour-board route sends nothing under the new Patient "
                        "before the patient is flagged again)"
                    )
                    continue
                print(
                    f"  at {target}, Patient/{review.previous_key} holds {len(refs)} earlier resources of "
                    f"{review.site}: they move to Patient/{review.proposed_key} (`cdrsync identity show` lists "
                    "what is still there)"
                )
        if not args.execute:
            print("dry run: add --execute to send the decision")
            return 0
        decision = decide(settings.kafka_bootstrap, config, review, action, args.reason)
        print(f"decision sent; waiting up to {args.wait:.0f} s for the identity stage to apply it", flush=True)
        closing = wait_for_closing(settings.kafka_bootstrap, config, review.local_patient, decision, args.wait)
        if closing is None:
            print("not applied yet: the worker is down or behind; `cdrsync identity list` shows it once it is")
            return 1
        if closing["action"] == "refused":
            print(f"refused by the identity stage: {closing['reason']}")
            return 1
        print(
            f"{closing['action']}: {review.local_patient} is Patient/{closing['key']} now"
            if closing["key"]
            else f"{closing['action']}: {review.local_patient} has no central Patient until it has an identifier"
        )
        return 0

    return run


def _move(args: argparse.Namespace, settings: Settings, config: Config) -> int:
    from .identity import moving_targets
    from .identityreview import moved_keys, request_move

    review = _one(args, settings, config)
    previous, new = (f"Patient/{key}" for key in moved_keys(review))
    moving = moving_targets(config.sites[review.site])
    left = {target: refs for target, refs in _left_behind(config, review).items() if target in moving}
    for target, refs in left.items():
        print(f"at {target}, {previous} holds {len(refs)} resources of {review.site}" + (":" if refs else ""))
        for ref in refs:
            print(f"  {ref}")
    if not any(left.values()):
        print(f"nothing of {review.site} at {previous}: nothing to move")
        return 0
    if not args.execute:
        print(f"dry run: add --execute to have the worker move them to {new}")
        return 0
    targets = request_move(settings.kafka_bootstrap, config, review)
    if not targets:
        print(f"nothing sent: {review.site} has no route that moves records (its tumour-board routes do not)")
        return 1
    print(
        f"move to {new} sent to the worker ({', '.join(targets)}); `cdrsync identity show` lists what is still at "
        f"{previous}, the audit trail (step identity_move) what was moved"
    )
    return 0


def add_identity_commands(group: Any, leaf: Leaf) -> None:
    """The `identity` command group, on the parser's own group() and leaf() helpers."""
    identity = group(
        "identity",
        "patients whose shared identifier changed at a hospital: their records are held until a person decides",
    )

    def site_and_id(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("site", help="the hospital (a site name from sites/)")
        sub.add_argument("local_id", help="the patient's id at that hospital, as `cdrsync identity list` shows it")

    listing = leaf(identity, "list", "one entry per patient under review: now, proposed, status", _list)
    listing.add_argument("--site", help="only patients of this site")
    listing.add_argument("--include-closed", action="store_true", help="also reviews already closed")
    listing.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    show = leaf(identity, "show", "one review; the Patient version under review with --with-patient-data", _show)
    site_and_id(show)
    show.add_argument("--with-patient-data", action="store_true", help="include the Patient version under review")
    for action, text in (
        ("accept", "the patient is the person its hospital now names: earlier, held and later records go there"),
        ("reject", "the patient stays the person it was: held records go there, the new identifier is not applied"),
    ):
        sub = leaf(identity, action, text, _decide(action))
        site_and_id(sub)
        sub.add_argument("--reason", required=True, help="the review's finding, for the audit trail (no patient data)")
        sub.add_argument("--execute", action="store_true", help="do it (without: a dry run saying what would happen)")
        sub.add_argument("--wait", type=float, default=60, help="seconds to wait for the worker to apply it (60)")
    move = leaf(
        identity,
        "move",
        "after an accepted review: move what of the site reached the previous Patient since (the worker moves "
        "the earlier records by itself on accepting)",
        _move,
    )
    site_and_id(move)
    move.add_argument("--execute", action="store_true", help="do it (without: list what would move)")
