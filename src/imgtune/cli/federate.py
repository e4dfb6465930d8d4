"""imgtune federate: train one model across sites whose images never leave them (Flower).

``simulate SITE_DIR...`` runs a whole federation on this machine; ``server`` is the coordinator of a
federation across machines and ``site DATA --server HOST:PORT`` one of its sites (docs/federated.md).
"""

from __future__ import annotations

from pathlib import Path

from .. import config as cfg
from ..artifact import default_out_dir
from .output import console, print_metrics
from .train import GROUPS, add_flag

# imgtune train's options that a site decides for itself, or that a federation does not use
NOT_FEDERATED = ("val_fraction", "test_fraction", "extra_labels", "allow_outside_paths", "device", "cache_dir",
                 "num_workers", "checkpoint_every", "early_stop", "keep", "monitor", "epochs", "freeze_epochs",
                 "head_fit", "log", "budget_ms", "candidates")


def register(commands) -> None:
    p = commands.add_parser("federate", help="federated training: each site trains on its own images (Flower)",
                            description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="federate_command", required=True, metavar="ACTION")
    simulate = sub.add_parser("simulate", help="a whole federation on this machine: one site per folder")
    simulate.add_argument("sites", nargs="+", metavar="SITE_DIR", help="one folder per site, each with train/ "
                                                                       "and val/")
    simulate.add_argument("--audit", metavar="DIR", help="each site appends one JSON line per message it sends "
                                                         "to DIR/NAME.jsonl (what federate site --audit writes)")
    _coordinator_flags(simulate)
    simulate.set_defaults(handler=run_simulate)
    server = sub.add_parser("server", help="the coordinator of a federation across machines (a SuperLink)")
    server.add_argument("--host", default="0.0.0.0", help="address the SuperLink listens on (default: 0.0.0.0)")
    server.add_argument("--port", type=int, default=9092, help="its port (default: 9092)")
    _coordinator_flags(server)
    server.set_defaults(handler=run_server)
    site = sub.add_parser("site", help="one site of a federation: trains on DATA, sends only parameters")
    site.add_argument("data", metavar="DATA", help="this site's folder, with train/ and val/")
    site.add_argument("--server", required=True, metavar="HOST:PORT", help="the coordinator's SuperLink")
    _site_flags(site)
    site.set_defaults(handler=run_site)
    certs = sub.add_parser("certs", help="test TLS certificates for a federation (a CA and the SuperLink's)")
    certs.add_argument("folder", metavar="DIR", help="where ca.crt, ca.key, server.crt and server.key are written")
    certs.add_argument("--host", action="append", default=[], metavar="NAME",
                       help="a name or address the sites reach the SuperLink by (repeatable; localhost and "
                            "127.0.0.1 are always included)")
    certs.add_argument("--days", type=int, default=30, help="validity in days (default: 30)")
    certs.set_defaults(handler=run_certs)


def _coordinator_flags(p) -> None:
    group = p.add_argument_group("federation")
    group.add_argument("--rounds", type=int, default=3, help="federated rounds (default: 3)")
    group.add_argument("--local-epochs", type=int, default=1, help="epochs each site trains per round (default: 1)")
    group.add_argument("--freeze-rounds", type=int, help="gradual: rounds with the backbone frozen, only the head "
                                                         "travelling (default: half of --rounds)")
    group.add_argument("--fl-strategy", default="fedavg", choices=("fedavg", "fedprox", "fedadam"),
                       help="Flower's aggregation strategy (default: fedavg)")
    group.add_argument("--proximal-mu", type=float, default=0.01, help="fedprox: weight of the proximal term "
                                                                       "(default: 0.01)")
    group.add_argument("--server-lr", type=float, default=0.1, help="fedadam: the server's learning rate "
                                                                    "(default: 0.1)")
    group.add_argument("--min-sites", type=int, help="sites needed to start and in every round (default: all "
                                                     "SITE_DIRs with simulate, 2 with server)")
    group.add_argument("--classes", metavar="A,B,C", help="the class list (default: the union of the sites' class "
                                                          "folder names)")
    group.add_argument("--round-timeout", type=float, default=600.0, help="seconds to wait for the sites' replies "
                                                                          "in a round (default: 600)")
    group.add_argument("--logs", metavar="DIR", help="folder for the Flower processes' logs (default: a new "
                                                     "temporary folder)")
    group.add_argument("--dp-noise", type=float, default=0.0, metavar="Z",
                       help="central differential privacy: Gaussian noise multiplier on the aggregate, each site's "
                            "update clipped to --dp-clip; the (epsilon, delta) spent goes into metrics.json "
                            "(default: 0, off)")
    group.add_argument("--dp-clip", type=float, default=1.0, help="L2 norm each site's update is clipped to with "
                                                                  "--dp-noise (default: 1)")
    group.add_argument("--dp-delta", type=float, default=1e-5, help="the delta epsilon is reported at (default: "
                                                                    "1e-5)")
    _secagg_flags(group)
    group.add_argument("--tls", metavar="DIR", help="TLS between all parties with DIR's ca.crt, server.crt and "
                                                    "server.key (imgtune federate certs DIR; default: no TLS)")
    groups = {title: p.add_argument_group(title) for title in GROUPS.values()}
    for option in cfg.OPTIONS.values():
        if option.name not in NOT_FEDERATED:
            add_flag(groups[option.group or GROUPS[option.section]], option)


def _secagg_flags(group) -> None:
    group.add_argument("--secure-aggregation", action="store_true",
                       help="Flower's SecAgg+: the coordinator learns only the sum of the sites' updates, never one "
                            "site's (fedavg, fedprox, fedadam; not with --dp-noise; docs/federated.md)")
    group.add_argument("--secagg-shares", type=float, default=1.0, metavar="N",
                       help="SecAgg+: shares each site's secrets are split into, a count (3 or more) or a fraction "
                            "of the round's sites (default: 1.0, every site)")
    group.add_argument("--secagg-threshold", type=float, default=0.5, metavar="T",
                       help="SecAgg+: shares needed to rebuild a secret, a count or a fraction of the shares, at "
                            "least 2 (default: 0.5); higher resists more colluding sites, tolerates fewer dropouts")
    group.add_argument("--secagg-clip", type=float, default=1.0,
                       help="SecAgg+: each value of a site's weighted update must lie in [-clip, clip]; the "
                            "federation stops, naming the site, if one does not (default: 1)")
    group.add_argument("--secagg-quantization", type=int, default=2**24, metavar="LEVELS",
                       help="SecAgg+: integer levels over [-clip, clip]; times the number of sites below 2**32 "
                            "(default: 2**24)")
    group.add_argument("--secagg-max-weight", type=float, default=0.0, metavar="IMAGES",
                       help="SecAgg+: the largest number of training images a site may have; each update is "
                            "weighted by its images / this (default: 0, the largest count among the connected "
                            "sites, asked before the first round: the finest quantisation)")


def _site_flags(p) -> None:
    p.add_argument("--name", help="this site's name in the coordinator's metrics (default: DATA's folder name)")
    p.add_argument("--audit", metavar="FILE", help="append one JSON line per message this site sends, listing "
                                                   "every array's name and shape and every scalar")
    p.add_argument("--cache-dir", help="this site's feature cache (default: $IMGTUNE_CACHE, else ~/.cache/imgtune)")
    p.add_argument("--device", choices=cfg.DEVICES, help="this site's device (default: auto)")
    p.add_argument("--logs", metavar="DIR", help="folder for the SuperNode's log (default: a new temporary folder)")
    p.add_argument("--secure-aggregation", action="store_true",
                   help="take part only in SecAgg+ rounds: a plain round's request is refused, no update sent")
    p.add_argument("--tls-ca", metavar="FILE", help="the federation's ca.crt: connect with TLS and verify the "
                                                    "SuperLink against it (default: no TLS)")


def settings_from(args, sites: int | None):
    from ..federated.coordinator import Settings

    options = {o.name: getattr(args, o.name) for o in cfg.OPTIONS.values() if o.name not in NOT_FEDERATED}
    out, overwrite = options.pop("out"), options.pop("overwrite")
    config = cfg.build("(held by the sites)", **options)
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else []
    out = Path(out).resolve() if out else default_out_dir().resolve()
    return Settings(options=cfg.to_dict(config), out=str(out), rounds=args.rounds,
                    freeze_rounds=args.freeze_rounds, local_epochs=args.local_epochs, strategy=args.fl_strategy,
                    proximal_mu=args.proximal_mu, server_lr=args.server_lr,
                    min_sites=args.min_sites or sites or 2, classes=classes, round_timeout=args.round_timeout,
                    overwrite=bool(overwrite), dp_noise=args.dp_noise, dp_clip=args.dp_clip,
                    dp_delta=args.dp_delta, secure_aggregation=args.secure_aggregation,
                    secagg_shares=args.secagg_shares, secagg_threshold=args.secagg_threshold,
                    secagg_clip=args.secagg_clip, secagg_quantization=args.secagg_quantization,
                    secagg_max_weight=args.secagg_max_weight)


def run_simulate(args) -> int:
    from ..federated import launch

    settings = settings_from(args, len(args.sites))
    metrics = launch.simulate(args.sites, settings, args.logs, launch.Security.from_folder(args.tls),
                              audit=args.audit)
    _report(metrics, settings.out)
    return 0


def run_server(args) -> int:
    from ..federated import launch

    settings = settings_from(args, None)
    metrics = launch.serve(settings, args.host, args.port, args.logs, launch.Security.from_folder(args.tls))
    _report(metrics, settings.out)
    return 0


def run_site(args) -> int:
    from ..federated import launch

    options = {k: v for k, v in (("cache-dir", args.cache_dir), ("device", args.device)) if v}
    if args.secure_aggregation:
        options["secure-aggregation"] = "1"
    security = launch.Security(Path(args.tls_ca).resolve()) if args.tls_ca else launch.Security()
    return launch.join(args.data, args.server, args.name, args.audit, args.logs, security, options)


def run_certs(args) -> int:
    from ..federated.certs import make_certificates

    files = make_certificates(args.folder, args.host, args.days)
    console.print(f"wrote {', '.join(str(p) for p in files.values())}: the SuperLink uses --tls {args.folder}; "
                  f"each site --tls-ca {files['ca.crt']}")
    return 0


def _report(metrics: dict, out: str) -> None:
    print_metrics(metrics, "pooled validation (all sites)")
    for name, site in metrics["federated"]["sites"].items():
        console.print(f"  site {name}: accuracy {site['accuracy']:.3f} on {site['n']} val images")
    privacy = metrics.get("privacy")
    if privacy:
        console.print(f"differential privacy: epsilon {privacy['epsilon']:.3g} at delta {privacy['delta']:g} over "
                      f"{privacy['noised_rounds']} noised round(s) (noise {privacy['noise_multiplier']:g}, clip "
                      f"{privacy['clipping_norm']:g}; per site)")
    console.print(f"run folder: {out}")
